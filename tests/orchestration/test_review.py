"""The FiftyOne review through Dagster, on the shared trained project (real runtime, real mongod):

- ``edge_case_review`` after a production batch: one sample per predicted image plus the served
  model's test split, every Brain run keyed by the model, the saved views; re-materializing
  updates the same samples (no duplicate);
- the whole loop: a review written through FiftyOne's API exactly as the App writes it (tags and
  ``ground_truth``) -> ``review_feedback`` (the ``fiftyone`` source, review beats delayed label,
  refused reviews with reasons) -> the next ``cleaned_dataset`` version (overrides recorded,
  discards quarantined as ``review_discard``, accounting holds);
- ``review_sensor`` requests ``review_job`` once per new review state.
"""

from __future__ import annotations

import os

import fiftyone as fo
import numpy as np
import pytest
from dagster import build_sensor_context

from assets.metadata import table_as_mapping
from cvops_dagster.core.contracts import dataset_keys
from cvops_dagster.datasets.review_decisions import REASON_REVIEW_DISCARD
from cvops_dagster.monitoring.feedback import FEEDBACK_BATCH_PREFIX
from cvops_dagster.review.brain import brain_keys
from cvops_dagster.review.connection import dataset_name
from cvops_dagster.review.dataset import KEY_FIELD, TAG_DISCARD, TAG_REVIEWED
from cvops_dagster.review.reviews import REASON_NO_LABEL, REASON_UNKNOWN_LABEL
from resources.review import fiftyone_from_env
from cvops_dagster.review.views import DRIFT_VIEW_PREFIX, VIEW_EDGE_CASES, VIEW_MISLABELED, VIEW_NEAR_DUPLICATES
from tests.orchestration.monitoring_project import Project, _values

pytestmark = pytest.mark.slow


def _dataset() -> fo.Dataset:
    """This test's review dataset (``CVOPS_REVIEW_DATASET_PREFIX`` is per test, see tests/conftest.py;
    the resource reads it when a run starts)."""
    return fo.load_dataset(dataset_name(os.environ["CVOPS_REVIEW_DATASET_PREFIX"]))


def _rotate(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(image))


def _batch_samples(batch: str) -> fo.DatasetView:
    from fiftyone import ViewField as F

    return _dataset().match_tags("production").match(F("batch_id") == batch)


def test_edge_case_review_builds_upserts_and_saves_views(project: Project) -> None:
    files = project.write_batch("rv_drift", project.take(60), transform=_rotate)
    assert project.run_production("rv_drift", review=True).success
    figures = _values(project.latest("edge_case_review"))
    dataset = _dataset()
    mine = _batch_samples("rv_drift")
    assert len(mine) == len(files)
    assert sorted(mine.values("source_path")) == sorted(files)
    # The test split of the served model's dataset version, with ground truth.
    manifest = project.storage.read_parquet(dataset_keys(_served_dataset_version(project))[0])
    test_ids = set(manifest.loc[(manifest["outcome"] == "clean") & (manifest["split"] == "test"), "sample_id"])
    test_view = dataset.match_tags("test_split")
    assert set(test_view.values("cvops_sample_id")) == test_ids
    assert test_view.count("ground_truth") == len(test_ids)
    # Fields of the contract on every production sample.
    sample = mine.first()
    assert sample.prediction.label in project.labels and 0 < sample.prediction.confidence <= 1
    assert len(sample.prediction.logits) == len(project.labels) and len(sample.embedding) > 0
    assert sample.model_id == project.model_id and sample.batch_id == "rv_drift" and sample.drift_batch is True
    assert sample.brightness is not None and sample.cvops_key.startswith("production:rv_drift:")
    # Every Brain run, keyed by the model; every view, counts as the metadata says.
    assert sorted(dataset.list_brain_runs()) == sorted(brain_keys(project.model_id).values()) == figures["brain_runs"]
    views = {name: len(dataset.load_saved_view(name)) for name in dataset.list_saved_views()}
    assert views == figures["view_counts"]
    assert views[VIEW_EDGE_CASES] > 0 and views[VIEW_MISLABELED] > 0 and f"{DRIFT_VIEW_PREFIX}rv_drift" in views
    assert views[f"{DRIFT_VIEW_PREFIX}rv_drift"] == len(files)
    assert VIEW_NEAR_DUPLICATES in views
    assert figures["app_command"].startswith("cvops review")
    assert figures["samples"] == len(dataset)
    assert "edge_case_preview" in figures and "data:image/png;base64," in figures["edge_case_preview"]
    # Upsert: materializing again adds nothing and keeps every sample once.
    before = len(dataset)
    assert project.run_production("rv_drift", review=True).success
    again = _values(project.latest("edge_case_review"))
    assert again["added"] == 0 and again["updated"] == before and len(_dataset()) == before
    keys = _dataset().values(KEY_FIELD)
    assert len(keys) == len(set(keys))


def test_copies_are_one_sample_and_near_duplicates_are_grouped(project: Project) -> None:
    from PIL import Image

    files = project.write_batch("rv_dup", project.take(10))
    folder = project.batch_folder("rv_dup")
    # A byte-identical copy (the same image: one sample), and the same pixels encoded otherwise
    # (another file, identical embeddings: a near duplicate).
    (folder / "copy.png").write_bytes((folder / "img_0000.png").read_bytes())
    with Image.open(folder / "img_0001.png") as image:
        image.save(folder / "reencoded.png", compress_level=0)
    (folder / "_READY").write_text("rewritten")
    assert project.run_production("rv_dup", review=True).success
    mine = _batch_samples("rv_dup")
    assert len(mine) == len(files) + 1  # copy.png and img_0000.png are one sample (the first path)
    assert "copy.png" in mine.values("source_path") and "img_0000.png" not in mine.values("source_path")
    groups = dict(zip(mine.values("source_path"), mine.values("near_duplicate_group"), strict=True))
    assert groups["img_0001.png"] is not None and groups["img_0001.png"] == groups["reencoded.png"]
    assert len(_dataset().load_saved_view(VIEW_NEAR_DUPLICATES)) >= 2


def test_review_in_fiftyone_reaches_the_next_dataset_version(project: Project) -> None:
    files = project.write_batch("rv_loop", project.take(16))
    truth = {name: str(project.digits[i]) for name, i in files.items()}
    assert project.run_production("rv_loop", review=True).success
    mine = {s.source_path: s for s in _batch_samples("rv_loop")}
    names = sorted(mine)
    # Delayed labels for four files; the review of one of them disagrees (the review wins).
    delayed = {n: truth[n] for n in names[:4]}
    wrong = next(lb for lb in project.labels if lb != truth[names[0]])
    delayed[names[0]] = wrong
    project.write_labels("rv_loop", "file,label\n" + "".join(f"{n},{lb}\n" for n, lb in delayed.items()))
    assert project.run_labels("rv_loop").success

    # What the App writes: ground_truth set, tag added (through FiftyOne's API, sample by sample).
    def review(sample: fo.Sample, label: str | None, tag: str) -> None:
        if label is not None:
            sample["ground_truth"] = fo.Classification(label=label)
        sample.tags.append(tag)
        sample.save()

    review(mine[names[0]], truth[names[0]], TAG_REVIEWED)  # corrects the delayed label
    review(mine[names[4]], truth[names[4]], TAG_REVIEWED)  # a new label
    review(mine[names[5]], truth[names[5]], TAG_REVIEWED)
    review(mine[names[1]], None, TAG_DISCARD)  # delayed-labelled image discarded
    review(mine[names[6]], "cat", TAG_REVIEWED)  # not a label of the model
    review(mine[names[7]], None, TAG_REVIEWED)  # reviewed without a label
    mine[names[7]].clear_field("ground_truth") if mine[names[7]].has_field("ground_truth") else None
    mine[names[7]].save()
    # A test-split (training data) image relabelled, and one discarded.
    test_samples = list(_dataset().match_tags("test_split").sort_by("cvops_sample_id").limit(2))
    corrected, discarded = test_samples
    new_label = next(lb for lb in project.labels if lb != corrected.ground_truth.label)
    old_label = corrected.ground_truth.label
    review(corrected, new_label, TAG_REVIEWED)
    review(discarded, None, TAG_DISCARD)

    # The sensor notices the reviews and asks once.
    from sensors.review import review_sensor as sensor

    resources = {"fiftyone": fiftyone_from_env()}
    first = sensor(build_sensor_context(instance=project.instance, resources=resources))
    assert len(first.run_requests) == 1 and first.run_requests[0].tags["cvops/trigger"] == "review"
    repeat = sensor(build_sensor_context(instance=project.instance, cursor=first.cursor, resources=resources))
    assert not repeat.run_requests

    # What that request runs: review_feedback, then the next dataset version.
    result = project.defs.resolve_job_def("review_job").execute_in_process(instance=project.instance, raise_on_error=False)
    assert result.success
    feedback = _values(project.latest("review_feedback"))
    # Three labelled production images, one relabel and two discards.
    assert table_as_mapping(project.latest("review_feedback")["sources"])["fiftyone"] == 3 + 1 + 2
    assert table_as_mapping(project.latest("review_feedback")["decisions"]) == {"discard": 2, "relabel": 1}
    rows = project.storage.read_parquet(feedback["manifest_key"])
    loop = rows[rows["batch_id"] == f"{FEEDBACK_BATCH_PREFIX}rv_loop"].set_index("path")
    assert loop.loc[names[0], "label"] == truth[names[0]] and loop.loc[names[0], "source"] == "fiftyone"
    assert loop.loc[names[0], "overrides"] == f"delayed_labels:{wrong}"
    assert loop.loc[names[4], "source"] == "fiftyone" and loop.loc[names[2], "source"] == "delayed_labels"
    assert names[6] not in loop.index and names[7] not in loop.index
    quarantine = {row["file"]: row["reason"] for row in _rows(feedback["quarantine_examples"])}
    assert quarantine[names[6]] == REASON_UNKNOWN_LABEL and quarantine[names[7]] == REASON_NO_LABEL

    dataset = _values(project.latest("cleaned_dataset"))
    assert dataset["review_feedback_version"] == feedback["version"]
    manifest = project.storage.read_parquet(dataset_keys(dataset["version"])[0])
    assert len(manifest) == dataset["input"] == dataset["clean"] + dataset["duplicates"] + dataset["quarantined"]
    # The test-split correction: recorded, old -> new.
    overrides = {row["record_id"]: (row["old_label"], row["new_label"]) for row in _rows(dataset["review_override_examples"])}
    corrected_rows = manifest[manifest["sample_id"] == corrected.cvops_sample_id]
    assert len(corrected_rows) >= 1 and set(corrected_rows["label"].astype(str)) == {new_label}
    for record_id in corrected_rows["record_id"]:
        assert overrides[record_id] == (old_label, new_label)
    # Discards: every record of the two images quarantined with the reason; nothing lost.
    for sample_id in (discarded.cvops_sample_id, mine[names[1]].cvops_sample_id):
        records = manifest[manifest["sample_id"] == sample_id]
        assert len(records) >= 1
        assert set(records["outcome"]) == {"quarantined"} and set(records["reason"]) == {REASON_REVIEW_DISCARD}
    assert dataset["review_discards"] == int((manifest["reason"] == REASON_REVIEW_DISCARD).sum()) >= 2
    assert dataset["review_overrides"] == len(corrected_rows)
    # A review changed later asks again.
    review(mine[names[5]], next(lb for lb in project.labels if lb != truth[names[5]]), TAG_REVIEWED)
    later = sensor(build_sensor_context(instance=project.instance, cursor=first.cursor, resources=resources))
    assert len(later.run_requests) == 1 and later.run_requests[0].run_key != first.run_requests[0].run_key


def _rows(table) -> list[dict]:  # noqa: ANN001 - the records of a table metadata value
    return [record.data for record in table.records]


def _served_dataset_version(project: Project) -> str:
    from cvops_dagster.serving.pointer import open_production_predictor

    return open_production_predictor(project.storage).metadata.dataset_version


def test_edge_case_review_appears_in_status(project: Project) -> None:
    from cvops_dagster.cli.status import collect_status

    project.write_batch("rv_status", project.take(8))
    assert project.run_production("rv_status", review=True).success
    status = collect_status(project.instance, project.defs)
    review = status["edge_case_review"]
    assert review["dataset"] == _dataset().name
    assert review["samples"] == len(_dataset())
    assert set(review["views"]) >= {VIEW_EDGE_CASES, VIEW_MISLABELED, VIEW_NEAR_DUPLICATES}
    assert review["brain_runs"] == sorted(brain_keys(project.model_id).values())
    assert review["app_command"].startswith("cvops review")
