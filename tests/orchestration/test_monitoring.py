"""The production side through Dagster: batch predictions, drift report, delayed labels and review
feedback on a runtime trained once through the real lifecycle (digits, tiny budgets).

One module-scoped project (landing zone, artifact root, Dagster instance, a served model); each
test uses its own production batches, and looks only at its own batches' rows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetCheckSeverity, AssetKey, AssetRecordsFilter

from assets.metadata import table_as_mapping
from assets.monitoring import CHECK_DRIFT, CHECK_PREDICTIONS
from cvops_dagster.core.contracts import dataset_keys
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
from cvops_dagster.ingestion.sample_data import png_bytes
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.monitoring.feedback import FEEDBACK_BATCH_PREFIX, REASON_LABELS_FILE, REASON_NOT_AN_IMAGE
from cvops_dagster.monitoring.predictions import (
    PREDICTION_COLUMNS,
    STATUS_PREDICTED,
    STATUS_QUARANTINED,
    STATUS_REJECTED,
)

pytestmark = pytest.mark.slow

from tests.orchestration.monitoring_project import LABELS_RUN, Project, _values


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
