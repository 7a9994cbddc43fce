"""The production side through Dagster: batch predictions, drift report, delayed labels and review
feedback on a runtime trained once through the real lifecycle (digits, tiny budgets).

One module-scoped project (landing zone, artifact root, Dagster instance, a served model); each
test uses its own production batches, and looks only at its own batches' rows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetCheckSeverity, AssetKey, AssetRecordsFilter, DagsterInstance, instance_for_test

from assets.metadata import table_as_mapping
from assets.monitoring import CHECK_DRIFT, CHECK_PREDICTIONS
from cvops_dagster.core.contracts import dataset_keys
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.ingestion.labels import (
    LABELS_BAD_HEADER,
    LABELS_EMPTY,
    LABELS_NOT_UTF8,
    ROW_ABSOLUTE,
    ROW_CONFLICT,
    ROW_ESCAPES,
    ROW_NOT_IN_MODEL,
    ROW_UNKNOWN_FILE,
)
from cvops_dagster.ingestion.production import production_batch
from cvops_dagster.ingestion.sample_data import digit_images, labelled_and_production_indices, png_bytes
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.monitoring.feedback import FEEDBACK_BATCH_PREFIX, REASON_LABELS_FILE, REASON_NOT_AN_IMAGE
from cvops_dagster.monitoring.predictions import (
    PREDICTION_COLUMNS,
    STATUS_PREDICTED,
    STATUS_QUARANTINED,
    STATUS_REJECTED,
    predictions_key,
)
from cvops_dagster.serving.pointer import read_pointer

pytestmark = pytest.mark.slow

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

    def run_production(self, batch: str, **kwargs):  # noqa: ANN003, ANN201
        if batch not in self.instance.get_dynamic_partitions("production_batches"):
            self.instance.add_dynamic_partitions("production_batches", [batch])
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


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
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


# --------------------------------------------------------------------------- (a) hostile batch


def _truncated_png(project: Project) -> bytes:
    data = png_bytes(project.images[project.pool[-1]])
    return data[: len(data) // 2]


def _check_accounting(project: Project, batch: str, result) -> tuple[pd.DataFrame, dict]:  # noqa: ANN001
    """Every landing entry is one row with exactly one status; the metadata adds up."""
    assert result.success
    entries = production_batch(LandingZone(str(project.landing)), batch).entries
    frame = project.predictions(batch)
    assert list(frame.columns) == PREDICTION_COLUMNS
    assert sorted(frame["path"]) == sorted(e.path for e in entries)
    assert frame["path"].is_unique and frame["record_id"].is_unique
    assert set(frame["status"]) <= {STATUS_PREDICTED, STATUS_QUARANTINED, STATUS_REJECTED}
    lost = frame[frame["status"] != STATUS_PREDICTED]
    assert lost["reason"].notna().all() and (lost["reason"].astype(str) != "").all()
    predicted = frame[frame["status"] == STATUS_PREDICTED]
    assert predicted["reason"].isna().all()
    # The runtime that predicted, on every row.
    assert (frame["model_id"] == project.model_id).all()
    assert (frame["runtime_sha256"] == project.runtime_sha256).all()
    # Outputs on every predicted row.
    assert predicted["embedding"].notna().all() and predicted["probabilities"].notna().all()
    for probabilities, embedding, confidence, index, label in zip(
        predicted["probabilities"], predicted["embedding"], predicted["confidence"], predicted["class_index"], predicted["label"],
        strict=True,
    ):  # fmt: skip
        probabilities = np.asarray(probabilities)
        assert probabilities.shape == (len(project.labels),) and abs(probabilities.sum() - 1.0) < 1e-3
        assert int(np.argmax(probabilities)) == int(index) and abs(float(probabilities.max()) - confidence) < 1e-5
        assert project.labels[int(index)] == label
        assert np.asarray(embedding).ndim == 1 and len(embedding) > 0 and np.isfinite(embedding).all()
    metadata = _values(project.latest("batch_predictions", batch))
    assert metadata["images"] == len(predicted) and metadata["quarantined"] == len(lost)
    assert metadata["images"] + metadata["quarantined"] == metadata["dagster/row_count"] == len(frame) == len(entries)
    reasons = table_as_mapping(project.latest("batch_predictions", batch)["quarantine_reasons"])
    assert reasons == lost["reason"].astype(str).value_counts().to_dict()
    class_counts = table_as_mapping(project.latest("batch_predictions", batch)["class_counts"]) or {}
    assert sum(class_counts.values()) == len(predicted)
    assert metadata["model_id"] == project.model_id and metadata["runtime_sha256"] == project.runtime_sha256
    assert metadata["reused_predictions"] is False
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks[CHECK_PREDICTIONS] is (len(predicted) > 0)
    return frame, metadata


def test_a_hostile_batch_gives_one_row_per_entry(project: Project) -> None:
    files = project.write_batch("hostile", project.take(30))
    folder = project.batch_folder("hostile")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image, only text with a .png name\n")
    (folder / "truncated.png").write_bytes(_truncated_png(project))
    os.symlink("/etc/passwd", folder / "link.png")
    (folder / ".hidden.png").write_bytes(png_bytes(project.images[project.pool[-2]]))
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.png").write_bytes(png_bytes(project.images[project.pool[-3]]))
    (folder / "_READY").write_text("rewritten")

    frame, _ = _check_accounting(project, "hostile", project.run_production("hostile"))
    by_path = frame.set_index("path")
    assert (by_path.loc[list(files), "status"] == STATUS_PREDICTED).all()
    expected_rejections = {"empty.png": "empty_file", "link.png": "symlink", ".hidden.png": "hidden", "sub/nested.png": "in_subfolder"}
    for path, reason in expected_rejections.items():
        assert (by_path.loc[path, "status"], by_path.loc[path, "reason"]) == (STATUS_REJECTED, reason)
    for path in ("text.png", "truncated.png"):
        assert by_path.loc[path, "status"] == STATUS_QUARANTINED and by_path.loc[path, "reason"]
    assert "_READY" not in by_path.index and "labels.csv" not in by_path.index

    # Labels for refused files never become training records; each is refused with its reason.
    good = str(project.digits[files["img_0000.png"]])
    project.write_labels(
        "hostile", f"file,label\nimg_0000.png,{good}\ntext.png,1\ntruncated.png,1\nempty.png,1\nlink.png,1\nsub/nested.png,1\n"
    )
    assert project.run_labels("hostile").success
    figures = _values(project.latest("batch_predictions", "hostile"))
    assert figures["labelled_images"] == 1 and figures["reused_predictions"] is True
    assert dict(zip(_feedback_rows(project, "hostile")["path"], _feedback_rows(project, "hostile")["label"], strict=True)) == {
        "img_0000.png": good
    }
    refused = dict(zip(*[_feedback_quarantine(project, "hostile")[c] for c in ("file", "reason")], strict=True))
    for path in ("text.png", "truncated.png"):
        assert refused[path] == f"{REASON_NOT_AN_IMAGE}:{by_path.loc[path, 'reason']}"
    for path in ("empty.png", "link.png", "sub/nested.png"):  # not batch files: the landing rules refused them
        assert refused[path] == ROW_UNKNOWN_FILE


def test_pillow_corpus_files_end_in_one_status_each(project: Project, pillow_corpus: Path) -> None:
    corpus = sorted(p for p in pillow_corpus.rglob("*") if p.is_file() and p.stat().st_size < 256 * 1024)
    chosen = corpus[:: max(1, len(corpus) // 12)][:12]
    project.write_batch("corpus", project.take(5))
    folder = project.batch_folder("corpus")
    for n, path in enumerate(chosen):
        shutil.copyfile(path, folder / f"c{n:02d}_{path.name.lstrip('.')}")
    (folder / "_READY").write_text("rewritten")
    frame, _ = _check_accounting(project, "corpus", project.run_production("corpus"))
    assert len(frame) == 5 + len(chosen)


# --------------------------------------------------------------------------- (b) drift report


def _drift_check(result):  # noqa: ANN001, ANN202
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == CHECK_DRIFT]
    return evaluation


def test_drift_report_in_distribution_and_shifted(project: Project) -> None:
    from cvops_dagster.cli import collect_status

    project.write_batch("in_dist", project.take(80))
    calm = project.run_production("in_dist")
    assert calm.success
    report = _values(project.latest("drift_report", "in_dist"))
    assert report["drift"] is False and report["verdict"] == "no drift"
    assert report["score"] < report["threshold"] == pytest.approx(0.95)
    assert report["model_id"] == project.model_id and report["images"] == 80
    assert report["event"].startswith("in_dist:") and report["event"].endswith(f":{project.model_id}")
    assert _drift_check(calm).passed

    project.write_batch("inverted", project.take(80), transform=lambda image: 255 - image)
    shifted = project.run_production("inverted")
    assert shifted.success  # a WARN check never fails the run
    drifted = _values(project.latest("drift_report", "inverted"))
    assert drifted["drift"] is True and drifted["verdict"] == "drift"
    assert drifted["score"] >= drifted["threshold"]
    check = _drift_check(shifted)
    assert check.passed is False and check.severity == AssetCheckSeverity.WARN
    # The second report (and any later one) read the cached reference.
    assert drifted["reference_built"] is False

    document = project.storage.read_json("monitoring/drift/inverted.json")
    assert set(document) >= {"drift", "verdict", "score", "threshold", "tests", "top_features", "n_reference", "n_batch", "method", "notes"}
    assert document["batch_id"] == "inverted" and document["model_id"] == project.model_id and document["event"] == drifted["event"]
    assert document["drift"] is True and document["n_batch"] == 80
    assert all(set(t) == {"statistic", "p_value", "p_adjusted", "drift"} for t in document["tests"].values())
    assert any(t["drift"] for t in document["tests"].values())
    assert document["top_features"] and set(document["top_features"][0]) == {"name", "statistic", "p_value", "reference_mean", "batch_mean"}

    status = collect_status(project.instance, project.defs)["drift_report"]["batches"]
    for batch, verdict in (("in_dist", False), ("inverted", True)):
        figures = status[batch]
        assert set(figures) >= {"drift", "score", "threshold", "tests", "top_features"}
        assert figures["drift"] is verdict and figures["tests"] and figures["model_id"] == project.model_id


def test_the_reference_is_built_once_per_model(project: Project) -> None:
    project.write_batch("cached", project.take(40))
    assert project.run_production("cached").success
    records = project.instance.fetch_materializations(AssetKey("drift_report"), limit=100, ascending=True).records
    built = [bool(r.asset_materialization.metadata["reference_built"].value) for r in records]
    assert built[0] is True and not any(built[1:]), built
    references = [k for k in project.storage.list("monitoring/references") if k.endswith(".npz")]
    assert len(references) == 1 and f"/{project.model_id}/" in references[0]


# --------------------------------------------------------------------------- (c) delayed labels


def _feedback_rows(project: Project, batch: str) -> pd.DataFrame:
    key = _values(project.latest("review_feedback"))["manifest_key"]
    manifest = project.storage.read_parquet(key)
    return manifest[manifest["batch_id"] == f"{FEEDBACK_BATCH_PREFIX}{batch}"]


def _feedback_quarantine(project: Project, batch: str) -> pd.DataFrame:
    examples = project.latest("review_feedback")["quarantine_examples"].value
    frame = pd.DataFrame([dict(r.data) for r in examples.records])
    return frame[frame["batch_id"] == batch] if len(frame) else frame


def test_labels_arriving_later_record_accuracy_without_predicting_again(project: Project) -> None:
    files = project.write_batch("labelled", project.take(40))
    assert project.run_production("labelled").success
    before = project.predictions("labelled")
    first = _values(project.latest("batch_predictions", "labelled"))
    assert first["accuracy"] is None and first["labelled_images"] == 0

    covered = sorted(files)[:25]  # part of the batch
    truth = {name: str(project.digits[files[name]]) for name in covered}
    project.write_labels("labelled", "file,label\n" + "".join(f"{name},{label}\n" for name, label in truth.items()))
    again = project.run_labels("labelled")
    assert again.success
    assert {e.asset_key for e in again.get_asset_materialization_events()} == set(LABELS_RUN)
    after = project.predictions("labelled")
    pd.testing.assert_frame_equal(before, after)  # no re-predict
    figures = _values(project.latest("batch_predictions", "labelled"))
    assert figures["reused_predictions"] is True
    assert figures["model_id"] == first["model_id"] == project.model_id
    assert figures["labelled_images"] == 25
    predicted = before.set_index("path").loc[covered, "label"].astype(str)
    expected = float(np.mean([predicted[name] == truth[name] for name in covered]))
    assert figures["accuracy"] == pytest.approx(expected, abs=1e-4)
    assert figures["labels_status"]["status"] == "read" and figures["labels_status"]["accepted"] == 25

    feedback = _values(project.latest("review_feedback"))
    rows = _feedback_rows(project, "labelled")
    assert len(rows) == 25 and dict(zip(rows["path"], rows["label"], strict=True)) == truth
    assert set(rows["source"]) == {"delayed_labels"}
    assert feedback["labelled_samples"] >= 25 and "labelled" in feedback["batches"]
    by_path = before.set_index("path")
    assert list(rows["sample_id"]) == [by_path.loc[p, "sample_id"] for p in rows["path"]]
    # The labels run asked for predictions and feedback only: drift_report was not run again.
    drift_runs = {r.run_id for r in project.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("drift_report"), asset_partitions=["labelled"]), limit=10).records}  # fmt: skip
    assert again.run_id not in drift_runs and len(drift_runs) == 1


MALFORMED_ROWS = (
    "file,label\n"
    "img_0000.png,{good}\n"
    "nope.png,3\n"
    "../x.png,3\n"
    "/abs.png,3\n"
    "img_0001.png,3\n"
    "img_0001.png,4\n"
    "img_0002.png,cat\n"
    "_READY,3\n"
)


@pytest.mark.parametrize(
    ("name", "data", "whole_file"),
    [
        ("rows", None, None),
        ("header", "name,label\nimg_0000.png,1\n", LABELS_BAD_HEADER),
        ("bytes", b"file,label\nimg_0000.png,\xff\xfe\n", LABELS_NOT_UTF8),
        ("empty", b"", LABELS_EMPTY),
    ],
)
def test_malformed_labels_never_fail_the_run_and_record_reasons(
    project: Project, name: str, data: str | bytes | None, whole_file: str | None
) -> None:
    batch = f"malformed_{name}"
    files = project.write_batch(batch, project.take(6))
    assert project.run_production(batch).success
    good = str(project.digits[files["img_0000.png"]])
    project.write_labels(batch, MALFORMED_ROWS.format(good=good) if data is None else data)
    result = project.run_labels(batch)
    assert result.success
    status = _values(project.latest("batch_predictions", batch))["labels_status"]
    quarantine = _feedback_quarantine(project, batch)
    rows = _feedback_rows(project, batch)
    assert set(rows["path"]) <= set(files)  # never a file outside the batch
    if whole_file is not None:
        assert status["status"] == "rejected" and status["reason"] == whole_file
        assert len(rows) == 0
        assert list(quarantine["reason"]) == [f"{REASON_LABELS_FILE}:{whole_file}"]
        return
    assert status["status"] == "read" and status["accepted"] == 1
    assert status["rejected_reasons"] == {
        ROW_UNKNOWN_FILE: 2, ROW_ESCAPES: 1, ROW_ABSOLUTE: 1, ROW_CONFLICT: 2, ROW_NOT_IN_MODEL: 1,
    }  # fmt: skip
    assert dict(zip(rows["path"], rows["label"], strict=True)) == {"img_0000.png": good}
    reasons = dict(zip(quarantine["file"], quarantine["reason"], strict=False))
    assert reasons["img_0002.png"] == ROW_NOT_IN_MODEL == "label_not_in_model"
    assert reasons["../x.png"] == ROW_ESCAPES and reasons["/abs.png"] == ROW_ABSOLUTE
    assert reasons["nope.png"] == ROW_UNKNOWN_FILE and reasons["_READY"] == ROW_UNKNOWN_FILE
    assert reasons["img_0001.png"] == ROW_CONFLICT


# --------------------------------------------------------------------------- (d) feedback into the dataset


def test_cleaned_dataset_includes_the_labelled_production_images(project: Project) -> None:
    files = project.write_batch("feedback", project.take(12))
    # A production image byte-identical to a training image, labelled otherwise.
    training_file, index = sorted(project.training.items())[0]
    (project.batch_folder("feedback") / "copy.png").write_bytes(png_bytes(project.images[index]))
    (project.batch_folder("feedback") / "_READY").write_text("rewritten")
    assert project.run_production("feedback").success
    true_label = str(project.digits[index])
    other = next(label for label in project.labels if label != true_label)
    truth = {name: str(project.digits[i]) for name, i in files.items()}
    project.write_labels("feedback", "file,label\n" + "".join(f"{n},{lb}\n" for n, lb in truth.items()) + f"copy.png,{other}\n")
    assert project.run_labels("feedback").success
    feedback = _values(project.latest("review_feedback"))
    assert set(_feedback_rows(project, "feedback")["path"]) == {*files, "copy.png"}

    cleaned = project.defs.resolve_job_def("lifecycle_job").execute_in_process(
        instance=project.instance, asset_selection=[AssetKey("cleaned_dataset")], raise_on_error=False
    )
    assert cleaned.success
    figures = _values(project.latest("cleaned_dataset"))
    assert figures["review_feedback_version"] == feedback["version"]
    assert figures["review_feedback_samples"] == feedback["labelled_samples"]
    manifest_key, _ = dataset_keys(figures["version"])
    manifest = project.storage.read_parquet(manifest_key)
    mine = manifest[manifest["batch_id"].astype(str) == f"{FEEDBACK_BATCH_PREFIX}feedback"]
    assert set(mine["path"]) == {*files, "copy.png"}
    assert (manifest["batch_id"].astype(str).str.startswith(FEEDBACK_BATCH_PREFIX)).sum() == feedback["labelled_samples"]
    clean = mine[mine["outcome"] == "clean"]
    assert set(clean["path"]) == set(files)
    assert dict(zip(clean["path"], clean["label"].astype(str), strict=True)) == truth
    copy = mine[mine["path"] == "copy.png"].iloc[0]
    assert (copy["outcome"], copy["reason"], str(copy["label"])) == ("quarantined", "label_conflict", other)
    original = manifest[manifest["record_id"] == f"b1/{training_file}"].iloc[0]
    assert (original["outcome"], original["reason"]) == ("quarantined", "label_conflict")
