"""review feedback: one label per image from every source, precedence recorded, a raw-manifest-shaped
manifest with a stable content version; the delayed-labels source against stored predictions."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.ingestion.ingest import MANIFEST_COLUMNS, STATUS_INGESTED
from cvops_dagster.ingestion.labels import ROW_ESCAPES, ROW_NOT_IN_MODEL, ROW_UNKNOWN_FILE
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.monitoring.feedback import (
    FEEDBACK_BATCH_PREFIX,
    REASON_BATCH_NOT_PREDICTED,
    REASON_LABELS_FILE,
    REASON_NOT_AN_IMAGE,
    SOURCE_DELAYED_LABELS,
    DelayedLabelsSource,
    LabelledRecord,
    SourceResult,
    collect_feedback,
    feedback_key,
    read_feedback_records,
    write_feedback,
)
from cvops_dagster.monitoring.predictions import (
    STATUS_PREDICTED,
    STATUS_QUARANTINED,
    STATUS_REJECTED,
    prediction_frame,
    predictions_key,
)


def record(
    sample: str, label: str, source: str = SOURCE_DELAYED_LABELS, batch: str = "p1", at: str = "2025-01-01T00:00:00+00:00"
) -> LabelledRecord:
    return LabelledRecord(
        sample_id=sample, image_key=f"images/{sample}.png", ext="png", size_bytes=100, label=label, source=source,
        batch_id=batch, path=f"{sample}.png", labelled_at=at,
    )  # fmt: skip


@dataclass
class FakeSource:
    """A FeedbackSource that returns fixed records."""

    name: str
    records: list[LabelledRecord] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    calls: int = 0

    def collect(self) -> SourceResult:
        self.calls += 1
        return SourceResult(list(self.records), list(self.quarantined), list(self.batches))


def labels_of(feedback) -> dict[str, tuple[str, str]]:  # noqa: ANN001
    return {r.sample_id: (r.label, r.source) for r in feedback.manifest.itertuples()}


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize("review_first", [True, False])
def test_review_beats_delayed_labels_and_the_override_is_recorded(review_first: bool) -> None:
    delayed = FakeSource(SOURCE_DELAYED_LABELS, [record("s1", "cat"), record("s2", "dog"), record("s3", "cat")])
    review = FakeSource("fiftyone", [record("s1", "dog", "fiftyone"), record("s2", "dog", "fiftyone")])
    sources = [review, delayed] if review_first else [delayed, review]
    feedback = collect_feedback(sources)
    assert labels_of(feedback) == {"s1": ("dog", "fiftyone"), "s2": ("dog", "fiftyone"), "s3": ("cat", SOURCE_DELAYED_LABELS)}
    # Only s1 disagreed: s2's agreement is no override.
    assert feedback.overrides == [
        {"sample_id": "s1", "label": "dog", "source": "fiftyone", "overridden_label": "cat", "overridden_source": SOURCE_DELAYED_LABELS}
    ]
    overrides = dict(zip(feedback.manifest["sample_id"], feedback.manifest["overrides"], strict=True))
    assert overrides["s1"] == f"{SOURCE_DELAYED_LABELS}:cat"
    assert pd.isna(overrides["s2"]) and pd.isna(overrides["s3"])
    assert feedback.sources() == {SOURCE_DELAYED_LABELS: 1, "fiftyone": 2}
    assert feedback.summary()["overrides"] == 1 and feedback.labelled_samples == 3


def test_precedence_is_configurable_and_unknown_sources_rank_last() -> None:
    delayed = FakeSource(SOURCE_DELAYED_LABELS, [record("s1", "cat")])
    review = FakeSource("fiftyone", [record("s1", "dog", "fiftyone")])
    flipped = collect_feedback([review, delayed], precedence=[SOURCE_DELAYED_LABELS, "fiftyone"])
    assert labels_of(flipped) == {"s1": ("cat", SOURCE_DELAYED_LABELS)}
    assert flipped.overrides[0]["overridden_source"] == "fiftyone"

    other = FakeSource("crowd", [record("s1", "bird", "crowd")])
    result = collect_feedback([other, delayed])
    assert labels_of(result) == {"s1": ("cat", SOURCE_DELAYED_LABELS)}
    assert result.overrides[0]["overridden_source"] == "crowd"


@pytest.mark.parametrize("later_first", [True, False])
def test_same_source_later_label_wins_without_an_override(later_first: bool) -> None:
    early = record("s1", "cat", batch="p1", at="2025-01-01T00:00:00+00:00")
    late = record("s1", "dog", batch="p2", at="2025-02-01T00:00:00+00:00")
    source = FakeSource(SOURCE_DELAYED_LABELS, [late, early] if later_first else [early, late])
    feedback = collect_feedback([source])
    assert labels_of(feedback) == {"s1": ("dog", SOURCE_DELAYED_LABELS)}
    (row,) = feedback.manifest.itertuples()
    assert row.batch_id == f"{FEEDBACK_BATCH_PREFIX}p2" and row.labelled_at == late.labelled_at
    assert feedback.overrides == []


def test_quarantine_and_batches_are_gathered_from_every_source() -> None:
    refused = {"source": "x", "batch_id": "p1", "file": "a.png", "label": "cat", "reason": "unknown_file", "detail": "line 2"}
    one = FakeSource(SOURCE_DELAYED_LABELS, [record("s1", "cat")], [refused], ["p2", "p1"])
    two = FakeSource("fiftyone", [], [{**refused, "source": "fiftyone"}], ["p1", "p3"])
    feedback = collect_feedback([one, two])
    assert feedback.batches == ["p1", "p2", "p3"]
    assert list(feedback.quarantined.columns) == ["source", "batch_id", "file", "label", "reason", "detail"]
    assert len(feedback.quarantined) == 2 and one.calls == two.calls == 1
    assert feedback.summary()["quarantined"] == 2


# --------------------------------------------------------------------------- manifest and version


def test_manifest_has_the_raw_manifest_columns_plus_source_and_labelled_at() -> None:
    feedback = collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, [record("s2", "dog", batch="p2"), record("s1", "cat")])])
    manifest = feedback.manifest
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert {"source", "labelled_at"} <= set(manifest.columns)
    assert set(manifest.columns) - set(MANIFEST_COLUMNS) <= {"source", "labelled_at", "overrides"}
    assert list(manifest["sample_id"]) == ["s1", "s2"]  # sorted by batch, path
    first = manifest.iloc[0]
    assert first["record_id"] == f"{FEEDBACK_BATCH_PREFIX}p1/s1.png"
    assert first["batch_id"] == f"{FEEDBACK_BATCH_PREFIX}p1" and first["path"] == "s1.png"
    assert first["status"] == STATUS_INGESTED and pd.isna(first["reason"])
    assert first["image_key"] == "images/s1.png" and first["ext"] == "png" and first["size_bytes"] == 100
    assert first["ingested_at"] == first["labelled_at"] == "2025-01-01T00:00:00+00:00"
    assert str(manifest["size_bytes"].dtype) == "Int64"


def test_empty_feedback_has_the_columns_and_a_version() -> None:
    feedback = collect_feedback([FakeSource(SOURCE_DELAYED_LABELS)])
    assert feedback.labelled_samples == 0 and list(feedback.manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert feedback.version and feedback.sources() == {}


def test_version_is_stable_and_depends_on_content_only() -> None:
    records = [record("s1", "cat"), record("s2", "dog", batch="p2")]
    base = collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, records)]).version
    # Same content: same version, whatever the order or the labelling time.
    assert collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, records[::-1])]).version == base
    retimed = [replace(r, labelled_at="2026-06-06T00:00:00+00:00") for r in records]
    assert collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, retimed)]).version == base
    # Another label, another image, another source: another version.
    assert collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, [record("s1", "dog"), records[1]])]).version != base
    assert collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, [*records, record("s3", "cat")])]).version != base
    assert collect_feedback([FakeSource("fiftyone", [replace(r, source="fiftyone") for r in records])]).version != base
    assert collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, records[:1])]).version != base


def test_written_once_under_its_version_and_read_back_as_raw_rows(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path / "artifacts"))
    feedback = collect_feedback([FakeSource(SOURCE_DELAYED_LABELS, [record("s1", "cat")])])
    key = write_feedback(storage, feedback)
    assert key == feedback_key(feedback.version) and storage.exists(key)
    stamp = os.stat(storage.local_path(key)).st_mtime_ns
    assert write_feedback(storage, feedback) == key
    assert os.stat(storage.local_path(key)).st_mtime_ns == stamp  # content-addressed: written once
    rows = read_feedback_records(storage, key)
    assert list(rows.columns) == list(MANIFEST_COLUMNS) and list(rows["sample_id"]) == ["s1"]
    assert list(read_feedback_records(storage, None).columns) == list(MANIFEST_COLUMNS)
    with pytest.raises(FileNotFoundError, match="review_feedback"):
        read_feedback_records(storage, feedback_key("0" * 16))


# --------------------------------------------------------------------------- the delayed-labels source


MODEL_ID = "m1"


def _production_batch(landing: Path, storage: ArtifactStorage, batch: str, files: dict[str, bytes], predicted: bool = True) -> None:
    """A production batch in the landing zone and (when ``predicted``) its stored predictions:
    ``bad.png`` quarantined by the decoder, every other file predicted."""
    folder = landing / "production" / batch
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "_READY").write_text("")
    if not predicted:
        return
    rows = []
    for name, data in sorted(files.items()):
        sha, key = storage.write_content_addressed("images", data, "png")
        row = {"record_id": f"{batch}/{name}", "batch_id": batch, "path": name, "sample_id": sha, "image_key": key,
               "model_id": MODEL_ID, "runtime_sha256": "r" * 64, "file_size": len(data)}  # fmt: skip
        if name == "bad.png":
            rows.append({**row, "status": STATUS_QUARANTINED, "reason": "not_an_image"})
        else:
            rows.append({**row, "status": STATUS_PREDICTED, "label": "cat", "class_index": 0, "confidence": 0.9})
    storage.write_parquet(predictions_key(batch), prediction_frame(rows))


def _labels(landing: Path, batch: str, text: str | bytes, mtime: float | None = None) -> Path:
    path = landing / "production" / batch / "labels.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def zone(tmp_path: Path) -> tuple[Path, ArtifactStorage]:
    return tmp_path / "landing", ArtifactStorage(str(tmp_path / "artifacts"))


def test_delayed_labels_source_records_and_reasons(zone: tuple[Path, ArtifactStorage]) -> None:
    landing, storage = zone
    files = {"a.png": b"image-a", "b.png": b"image-b", "c.png": b"image-c", "bad.png": b"not an image"}
    _production_batch(landing, storage, "p1", files)
    _labels(landing, "p1", "file,label\na.png,cat\nb.png,dog\nc.png,zebra\nbad.png,cat\n../x.png,cat\nnope.png,cat\n")
    _production_batch(landing, storage, "p2", {"d.png": b"image-d"}, predicted=False)
    _labels(landing, "p2", "file,label\nd.png,cat\n")
    _production_batch(landing, storage, "p3", {"e.png": b"image-e"})
    _labels(landing, "p3", "name,label\ne.png,cat\n")
    _production_batch(landing, storage, "p4", {"f.png": b"image-f"})  # no labels.csv

    source = DelayedLabelsSource(LandingZone(str(landing)), storage, ("p1", "p2", "p3", "p4"), {MODEL_ID: ("cat", "dog")})
    result = source.collect()
    assert sorted((r.path, r.label) for r in result.records) == [("a.png", "cat"), ("b.png", "dog")]
    by_path = {r.path: r for r in result.records}
    assert by_path["a.png"].sample_id == hashlib.sha256(b"image-a").hexdigest()
    assert by_path["a.png"].image_key.startswith("images/") and by_path["a.png"].size_bytes == len(b"image-a")
    assert all(r.source == SOURCE_DELAYED_LABELS and r.batch_id == "p1" for r in result.records)
    reasons = {(q["batch_id"], q["file"]): q["reason"] for q in result.quarantined}
    assert reasons[("p1", "c.png")] == ROW_NOT_IN_MODEL
    assert reasons[("p1", "bad.png")] == f"{REASON_NOT_AN_IMAGE}:not_an_image"
    assert reasons[("p1", "../x.png")] == ROW_ESCAPES
    assert reasons[("p1", "nope.png")] == ROW_UNKNOWN_FILE
    assert reasons[("p2", "d.png")] == REASON_BATCH_NOT_PREDICTED  # waits for the batch's run
    assert reasons[("p3", "labels.csv")] == f"{REASON_LABELS_FILE}:bad_header"
    assert result.batches == ["p1", "p2", "p3"]  # p4 has no labels
    assert not any(q["batch_id"] == "p4" for q in result.quarantined)


def test_a_rejected_prediction_row_is_not_labelled(zone: tuple[Path, ArtifactStorage]) -> None:
    landing, storage = zone
    _production_batch(landing, storage, "p1", {"a.png": b"image-a"})
    frame = storage.read_parquet(predictions_key("p1"))
    frame.loc[0, "status"] = STATUS_REJECTED
    frame.loc[0, "reason"] = "empty_file"
    storage.write_parquet(predictions_key("p1"), frame)
    _labels(landing, "p1", "file,label\na.png,cat\n")
    result = DelayedLabelsSource(LandingZone(str(landing)), storage, ("p1",), {MODEL_ID: ("cat",)}).collect()
    assert result.records == []
    assert [q["reason"] for q in result.quarantined] == [f"{REASON_NOT_AN_IMAGE}:empty_file"]


def test_labelled_at_is_when_the_labels_file_was_written(zone: tuple[Path, ArtifactStorage]) -> None:
    landing, storage = zone
    _production_batch(landing, storage, "p1", {"a.png": b"image-a"})
    written = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    _labels(landing, "p1", "file,label\na.png,cat\n", mtime=written.timestamp())
    (only,) = DelayedLabelsSource(LandingZone(str(landing)), storage, ("p1",), {MODEL_ID: ("cat",)}).collect().records
    assert only.labelled_at == written.isoformat(timespec="seconds")


class _FrozenNow(datetime):
    """``datetime`` whose ``now()`` is fixed: a fallback to "now" cannot order two labels by chance."""

    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206
        return datetime(2030, 1, 1, tzinfo=tz)


def test_same_image_in_two_batches_keeps_the_later_labels_file(
    zone: tuple[Path, ArtifactStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through collect_feedback: the later-written labels.csv wins for an image two batches share
    (batch order deliberately opposite to writing order)."""
    import cvops_dagster.monitoring.feedback as feedback_module

    monkeypatch.setattr(feedback_module, "datetime", _FrozenNow)
    landing, storage = zone
    _production_batch(landing, storage, "p1", {"a.png": b"shared-image"})
    _production_batch(landing, storage, "p2", {"z.png": b"shared-image"})
    _labels(landing, "p1", "file,label\na.png,cat\n", mtime=datetime(2025, 1, 1, tzinfo=UTC).timestamp())
    _labels(landing, "p2", "file,label\nz.png,dog\n", mtime=datetime(2025, 5, 1, tzinfo=UTC).timestamp())
    source = DelayedLabelsSource(LandingZone(str(landing)), storage, ("p1", "p2"), {MODEL_ID: ("cat", "dog")})
    feedback = collect_feedback([source])
    assert feedback.labelled_samples == 1
    (row,) = feedback.manifest.itertuples()
    assert (row.label, row.batch_id) == ("dog", f"{FEEDBACK_BATCH_PREFIX}p2")
