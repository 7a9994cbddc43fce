"""The trained project the production-side tests share (monitoring and review): one landing
zone, artifact root and Dagster instance with a served model trained once through the real
lifecycle (digits, tiny budgets). Each test uses its own production batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, instance_for_test

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.ingestion.sample_data import digit_images, labelled_and_production_indices, png_bytes
from cvops_dagster.monitoring.predictions import predictions_key
from cvops_dagster.serving.pointer import read_pointer

TINY = {
    "ops": {
        "hpo_study": {"config": {"n_trials": 2, "max_epochs": 2}},
        "trained_model": {"config": {"max_epochs": 4, "patience": 4, "accuracy_floor": 0.0}},
    }
}
PER_CLASS = 40  # labelled digits per class in the training batch
LABELS_RUN = [AssetKey("batch_predictions"), AssetKey("review_feedback")]


@dataclass
class Project:
    """The trained project every test shares."""

    instance: DagsterInstance
    defs: object
    landing: Path
    artifacts: Path
    storage: ArtifactStorage
    model_id: str
    runtime_sha256: str
    labels: tuple[str, ...]
    images: np.ndarray  # every digit, 32x32 uint8
    digits: np.ndarray  # every digit's label
    training: dict[str, int]  # file name in training batch b1 -> digit index
    pool: list[int]  # digit indices never trained on (the production pool)
    _next: int = 0

    def take(self, n: int) -> list[int]:
        """``n`` pool digits no other test used."""
        chosen = self.pool[self._next : self._next + n]
        assert len(chosen) == n, "production pool exhausted"
        self._next += n
        return chosen

    def batch_folder(self, batch: str) -> Path:
        return self.landing / "production" / batch

    def write_batch(self, batch: str, indices: list[int], transform=None) -> dict[str, int]:  # noqa: ANN001
        """A complete production batch of pool digits; returns file name -> digit index."""
        folder = self.batch_folder(batch)
        folder.mkdir(parents=True)
        files = {}
        for n, i in enumerate(indices):
            image = self.images[i] if transform is None else transform(self.images[i])
            name = f"img_{n:04d}.png"
            (folder / name).write_bytes(png_bytes(image))
            files[name] = i
        (folder / "_READY").write_text("")
        return files

    def write_labels(self, batch: str, data: bytes | str) -> None:
        """Deliver labels.csv as the contract says: written elsewhere, then renamed in."""
        temporary = self.landing / f".labels-{batch}.tmp"
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, self.batch_folder(batch) / "labels.csv")

    def run_production(self, batch: str, review: bool = False, **kwargs):  # noqa: ANN003, ANN201
        """One production_job run of ``batch``; without ``review`` it leaves out edge_case_review
        (the FiftyOne build, tested in test_review.py), as the monitoring tests do not need it."""
        if batch not in self.instance.get_dynamic_partitions("production_batches"):
            self.instance.add_dynamic_partitions("production_batches", [batch])
        if not review and "asset_selection" not in kwargs:
            kwargs["asset_selection"] = [AssetKey(a) for a in ("batch_predictions", "drift_report", "review_feedback")]
        job = self.defs.resolve_job_def("production_job")
        return job.execute_in_process(instance=self.instance, partition_key=batch, raise_on_error=False, **kwargs)

    def run_labels(self, batch: str):  # noqa: ANN201
        """What production_batches_sensor requests when labels arrive: batch_predictions + review_feedback."""
        return self.run_production(batch, asset_selection=LABELS_RUN)

    def latest(self, asset: str, batch: str | None = None) -> dict:
        """The latest materialization's metadata values of ``asset`` (for ``batch``)."""
        key = AssetKey(asset)
        records_filter = AssetRecordsFilter(asset_key=key, asset_partitions=[batch] if batch else None)
        (record,) = self.instance.fetch_materializations(records_filter, limit=1).records
        return dict(record.asset_materialization.metadata)

    def predictions(self, batch: str) -> pd.DataFrame:
        return self.storage.read_parquet(predictions_key(batch))


def _values(metadata: dict) -> dict:
    return {name: value.value for name, value in metadata.items()}


def _write_training_batch(landing: Path, images: np.ndarray, digits: np.ndarray, labelled: np.ndarray) -> dict[str, int]:
    taken: dict[int, int] = {}
    files = {}
    for i in labelled:
        digit = int(digits[i])
        if taken.get(digit, 0) >= PER_CLASS:
            continue
        taken[digit] = taken.get(digit, 0) + 1
        folder = landing / "b1" / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"digit_{i:04d}.png"
        (folder / name).write_bytes(png_bytes(images[i]))
        files[f"{digit}/{name}"] = int(i)
    (landing / "b1" / "_READY").write_text("")
    return files


def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    from cvops_dagster.definitions import build_definitions
    from cvops_dagster.training.model_store import load_card

    root = tmp_path_factory.mktemp("monitoring")
    landing, artifacts = root / "landing", root / "artifacts"
    images, digits = digit_images()
    labelled, pool = labelled_and_production_indices(digits)
    training = _write_training_batch(landing, images, digits, labelled)
    with pytest.MonkeyPatch.context() as env, instance_for_test() as instance:
        for name in [n for n in os.environ if n.startswith("CVOPS_")]:
            env.delenv(name)
        env.setenv("CVOPS_LANDING", str(landing))
        env.setenv("CVOPS_ARTIFACT_ROOT", str(artifacts))
        env.setenv("CVOPS_REVIEW_MEDIA", str(root / "media"))
        # Bound as an EnvVar (the variable is set), so each run reads the prefix of the test
        # that starts it (tests/conftest.py gives every test its own review dataset).
        env.setenv("CVOPS_REVIEW_DATASET_PREFIX", "orchestration")
        defs = build_definitions()
        instance.add_dynamic_partitions("image_batches", ["b1"])
        assert defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key="b1").success
        lifecycle = defs.resolve_job_def("lifecycle_job").execute_in_process(instance=instance, run_config=TINY, raise_on_error=False)
        assert lifecycle.success
        storage = ArtifactStorage(str(artifacts))
        pointer = read_pointer(storage)
        assert pointer is not None
        labels = tuple(str(x) for x in load_card(storage, pointer.model_id)["labels"])
        assert sorted(labels) == [str(d) for d in range(10)]
        # Shuffle the pool once (fixed seed): every test gets digits of every class.
        order = np.random.default_rng(0).permutation(len(pool))
        yield Project(
            instance, defs, landing, artifacts, storage, pointer.model_id, pointer.fp32_sha256, labels, images, digits,
            training, [int(pool[i]) for i in order],
        )  # fmt: skip


