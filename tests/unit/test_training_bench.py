"""The training benchmark runs end to end on a tiny dataset and reports every figure.

Not a timed test: it checks the figures are produced and consistent, not how fast.
"""

from __future__ import annotations

from pathlib import Path

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.bench.training import run_training_benchmark
from tests.unit.synthetic_datasets import shapes_dataset


def test_training_benchmark_reports_its_figures(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path))
    version = shapes_dataset(storage, n_classes=2, per_class=30, size=(12, 12)).version
    figures = run_training_benchmark(storage, version, epochs=2, n_trials=4, trial_epochs=3, num_threads=1)
    for key in (
        "lightning_vs_plain_epoch_ratio",
        "pruned_vs_unpruned_epochs_ratio",
        "pruned_best_val_accuracy",
        "unpruned_best_val_accuracy",
    ):
        assert isinstance(figures[key], float), key
    assert figures["lightning_vs_plain_epoch_ratio"] > 0
    assert figures["unpruned_epochs"] == 4 * 3  # nothing pruned: every trial runs every epoch
    assert figures["pruned_epochs"] <= figures["unpruned_epochs"]
    assert figures["pruned_vs_unpruned_epochs_ratio"] == figures["pruned_epochs"] / figures["unpruned_epochs"]
    # Same seeded configurations: the first trial (never pruned) is identical in both studies.
    assert 0.0 <= figures["pruned_best_val_accuracy"] <= 1.0
