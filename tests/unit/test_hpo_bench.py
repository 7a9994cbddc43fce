"""The parallel-HPO benchmark runs end to end at a tiny size and reports every figure.

Not a timed test: it checks that both studies run the same budget, that both workers of the
parallel one ran trials and that the figures are consistent, not how fast.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from cvops_dagster.bench.cleaning import PHOTO_SOURCES
from cvops_dagster.bench.hpo import bench_hpo, build_patch_files, value_spread

FIGURES = {
    "hpo_seconds_1_worker", "hpo_seconds_2_workers", "hpo_speedup_2_workers", "best_value_1_worker",
    "best_value_2_workers", "best_value_difference", "trial_value_spread_1_worker", "trial_value_spread_2_workers",
    "trials_per_worker", "worker_exit_codes", "speedup_target", "speedup_target_met", "best_value_target_met",
    "n_trials", "max_epochs", "pruner", "dataset_version", "classes", "image_size", "train_images", "val_images",
    "cleaning_outcomes", "torch_threads", "cpus", "load_average_1m", "prepare_seconds", "total_seconds",
    "finished_trials_1_worker", "finished_trials_2_workers", "pruned_trials_1_worker", "pruned_trials_2_workers",
    "failed_trials_1_worker", "failed_trials_2_workers", "epochs_1_worker", "epochs_2_workers",
    "all_trial_value_spread_1_worker", "all_trial_value_spread_2_workers", "epoch_throughput_speedup_2_workers",
}  # fmt: skip


def test_hpo_bench_runs_the_same_budget_with_one_and_two_workers() -> None:
    figures = bench_hpo(n_trials=4, per_class=12, image_size=16, max_epochs=1, pruner="none", min_resource=1, threads=2)
    assert FIGURES <= set(figures), sorted(FIGURES - set(figures))
    assert figures["finished_trials_1_worker"] == figures["finished_trials_2_workers"] == 4
    assert figures["epochs_1_worker"] == figures["epochs_2_workers"] == 4  # unpruned: the same work
    assert figures["classes"] == len(PHOTO_SOURCES) and figures["image_size"] == [16, 16]
    # Trials from both workers are in the parallel study, and only the budget.
    assert set(figures["trials_per_worker"]) == {"0", "1"} and sum(figures["trials_per_worker"].values()) == 4
    assert all(count > 0 for count in figures["trials_per_worker"].values()), figures["trials_per_worker"]
    assert figures["worker_exit_codes"] == {"0": 0, "1": 0}
    for name in ("1_worker", "2_workers"):
        spread = figures[f"trial_value_spread_{name}"]
        assert spread["n"] == 4 and 0.0 <= spread["min"] <= spread["max"] <= 1.0 and spread["std"] >= 0.0
        assert spread["max"] == pytest.approx(figures[f"best_value_{name}"])
    assert math.isfinite(figures["hpo_speedup_2_workers"]) and figures["hpo_speedup_2_workers"] > 0
    assert figures["best_value_difference"] == pytest.approx(figures["best_value_2_workers"] - figures["best_value_1_worker"])


def test_patches_are_a_function_of_the_seed(tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        files = sorted(folder.rglob("*.png"))
        return hashlib.sha256(b"".join(f.relative_to(folder).as_posix().encode() + f.read_bytes() for f in files)).hexdigest()

    assert build_patch_files(str(tmp_path / "a"), 2, 8, seed=3) == 2 * len(PHOTO_SOURCES)
    build_patch_files(str(tmp_path / "b"), 2, 8, seed=3)
    build_patch_files(str(tmp_path / "c"), 2, 8, seed=4)
    assert {p.name for p in (tmp_path / "a").iterdir()} == set(PHOTO_SOURCES)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {"n": 0, "min": None, "max": None, "std": None}),
        ([0.5], {"n": 1, "min": 0.5, "max": 0.5, "std": 0.0}),
        ([0.2, 0.6], {"n": 2, "min": 0.2, "max": 0.6, "std": pytest.approx(0.2)}),
    ],
)
def test_value_spread(values: list[float], expected: dict[str, object]) -> None:
    assert value_spread(values) == expected


def test_the_benchmark_needs_several_workers() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        bench_hpo(workers=1)
