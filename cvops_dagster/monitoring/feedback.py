"""Review feedback: every labelled production image, from every label source, as training records.

A *source* is a plug-in (:class:`FeedbackSource`): anything that can say "this content-addressed
image has this label" with a reason for what it refuses. The first source is the delayed labels
of production batches (:class:`DelayedLabelsSource`, ``labels.csv``); the FiftyOne review
(another issue) plugs in as a second source through the same protocol.

:func:`collect_feedback` asks each source, then keeps one label per image: when sources disagree
the one earlier in ``precedence`` wins (the review beats delayed labels), and the override is
recorded, never silent. The result is written as a manifest in the raw-manifest format
(``record_id``, ``batch_id``, ``path``, ``label``, ``status``, ``sample_id``, ``image_key``...,
see docs/contracts.md) plus ``source`` and ``labelled_at``, so ``cleaned_dataset`` takes the
records through the same decode, dedupe, split and accounting rules as labelled batches: a
production image that duplicates a training image under another label becomes a
``label_conflict`` there, quarantined with its reason.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import pandas as pd

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.review_decisions import DECISION_COLUMNS
from cvops_dagster.ingestion.ingest import MANIFEST_COLUMNS as RAW_COLUMNS
from cvops_dagster.ingestion.ingest import STATUS_INGESTED
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.ingestion.production import production_batch, production_batch_labels
from cvops_dagster.monitoring.predictions import STATUS_PREDICTED, read_predictions

logger = logging.getLogger(__name__)

FEEDBACK_PREFIX = "monitoring/feedback"
SOURCE_DELAYED_LABELS = "delayed_labels"
#: Which source wins when two label the same image differently (first wins).
DEFAULT_PRECEDENCE = ("fiftyone", SOURCE_DELAYED_LABELS)
#: Prefix of the ``batch_id`` of feedback records in the manifest cleaning reads.
FEEDBACK_BATCH_PREFIX = "production/"

# Reasons a source gives for a label it did not turn into a record.
REASON_BATCH_NOT_PREDICTED = "batch_not_predicted"
REASON_NOT_AN_IMAGE = "file_not_predicted"
REASON_LABELS_FILE = "labels_file_rejected"

FEEDBACK_COLUMNS = [*RAW_COLUMNS, "source", "labelled_at", "overrides"]
QUARANTINE_COLUMNS = ["source", "batch_id", "file", "label", "reason", "detail"]


@dataclass(frozen=True)
class LabelledRecord:
    """One labelled production image.

    Attributes:
        sample_id: sha256 of the image bytes (content address).
        image_key: ``images/<sha256>.<ext>`` in the artifact store.
        ext, size_bytes: of the stored file.
        label: the label.
        source: the source's name (``delayed_labels``, ``fiftyone``...).
        batch_id: the production batch the image came from.
        path: its path in that batch.
        labelled_at: when the source says it was labelled (ISO 8601, UTC).
    """

    sample_id: str
    image_key: str
    ext: str
    size_bytes: int
    label: str
    source: str
    batch_id: str
    path: str
    labelled_at: str


@dataclass
class SourceResult:
    """What one source gave: records, refused labels with reasons, batches it read, and
    decisions about images already in the data (relabel/discard, see
    :mod:`cvops_dagster.datasets.review_decisions`; columns :data:`DECISION_COLUMNS`)."""

    records: list[LabelledRecord] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)


class FeedbackSource(Protocol):
    """A label source for :func:`collect_feedback`."""

    name: str

    def collect(self) -> SourceResult:
        """Every label the source holds now; never raises for what the labels say."""
        ...


@dataclass(frozen=True)
class DelayedLabelsSource:
    """Delayed labels: ``landing/production/<batch_id>/labels.csv`` of each predicted batch.

    A label is applied to the image that batch predictions stored for the named file, and
    checked against the label set of the model that served the batch (a label the model does
    not know is quarantined as ``label_not_in_model``). Labels of a batch not predicted yet
    wait (``batch_not_predicted``): they are read again on the batch's next run.

    Attributes:
        landing: the landing zone.
        storage: the artifact store (predictions, model cards).
        batch_ids: the production batches to read.
        label_sets: model id -> its labels (the served model's label set per batch).
    """

    landing: LandingZone
    storage: ArtifactStorage
    batch_ids: tuple[str, ...]
    label_sets: dict[str, tuple[str, ...]]
    name: str = SOURCE_DELAYED_LABELS

    def collect(self) -> SourceResult:
        result = SourceResult()
        for batch_id in self.batch_ids:
            self._collect_batch(batch_id, result)
        return result

    def _collect_batch(self, batch_id: str, result: SourceResult) -> None:
        batch = production_batch(self.landing, batch_id)
        if batch.labels_fingerprint is None:
            return
        predictions = read_predictions(self.storage, batch_id)
        model_ids = sorted(set(predictions["model_id"].dropna().astype(str))) if predictions is not None else []
        label_set = set(self.label_sets.get(model_ids[0], ())) if len(model_ids) == 1 else None
        parsed = production_batch_labels(self.landing, batch, label_set or None)
        if parsed is None:
            return
        result.batches.append(batch_id)
        labelled_at = _stamp_time(parsed.fingerprint)

        def refuse(file: str, label: str, reason: str, detail: str = "") -> None:
            result.quarantined.append(
                {"source": self.name, "batch_id": batch_id, "file": file, "label": label, "reason": reason, "detail": detail}
            )

        if not parsed.ok:
            refuse("labels.csv", "", f"{REASON_LABELS_FILE}:{parsed.reason}", parsed.detail)
            return
        for row in parsed.rejected:
            refuse(row.file, row.label, str(row.reason), f"line {row.line}")
        if predictions is None:
            for row in parsed.accepted:
                refuse(row.file, row.label, REASON_BATCH_NOT_PREDICTED)
            return
        stored = predictions.set_index(predictions["path"].astype(str))
        for row in parsed.accepted:
            entry = stored.loc[row.file] if row.file in stored.index else None
            if entry is None or str(entry["status"]) != STATUS_PREDICTED:
                reason = str(entry["reason"]) if entry is not None else REASON_BATCH_NOT_PREDICTED
                refuse(row.file, row.label, f"{REASON_NOT_AN_IMAGE}:{reason}", f"line {row.line}")
                continue
            key = str(entry["image_key"])
            result.records.append(
                LabelledRecord(
                    sample_id=str(entry["sample_id"]), image_key=key, ext=key.rsplit(".", 1)[-1],
                    size_bytes=int(entry["file_size"]) if pd.notna(entry["file_size"]) else 0, label=row.label,
                    source=self.name, batch_id=batch_id, path=row.file, labelled_at=labelled_at,
                )
            )  # fmt: skip


def _stamp_time(fingerprint: str | None) -> str:
    """When a labels file was written, from its stamp (``<mtime in ns>:<size>`` on a local
    landing zone), else now (an S3 stamp is an ETag, not a time)."""
    if fingerprint:
        try:
            stamp = int(fingerprint.split(":", 1)[0])
            return datetime.fromtimestamp(stamp / 1e9, UTC).isoformat(timespec="seconds")
        except (ValueError, OverflowError, OSError):
            pass
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Feedback:
    """Every labelled production image, one label each, and what was refused.

    Attributes:
        manifest: one row per labelled image (columns :data:`FEEDBACK_COLUMNS`), sorted.
        quarantined: refused labels with reasons (columns :data:`QUARANTINE_COLUMNS`).
        overrides: images two sources labelled differently: winner, loser and both labels.
        batches: the production batches that contributed, sorted.
        version: content hash of the manifest's (sample, label, source) rows and the decisions.
        decisions: relabel/discard decisions about images in the data (:data:`DECISION_COLUMNS`).
    """

    manifest: pd.DataFrame
    quarantined: pd.DataFrame
    overrides: list[dict[str, Any]]
    batches: list[str]
    version: str
    decisions: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DECISION_COLUMNS))

    @property
    def labelled_samples(self) -> int:
        return len(self.manifest)

    def sources(self) -> dict[str, int]:
        """Source -> labelled records plus decisions it gave."""
        counts = Counter(self.manifest["source"]) + Counter(self.decisions["source"])
        return {str(k): int(v) for k, v in sorted(counts.items())}

    def decision_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in sorted(Counter(self.decisions["action"]).items())}

    def summary(self) -> dict[str, Any]:
        """What ``cvops status --json`` shows under ``review_feedback``."""
        return {
            "labelled_samples": self.labelled_samples,
            "sources": self.sources(),
            "batches": self.batches,
            "quarantined": len(self.quarantined),
            "overrides": len(self.overrides),
            "decisions": self.decision_counts(),
            "version": self.version,
        }


def collect_feedback(sources: Sequence[FeedbackSource], precedence: Sequence[str] = DEFAULT_PRECEDENCE) -> Feedback:
    """One label per labelled image from all ``sources``; disagreements resolved by ``precedence``.

    The same source labelling one image twice (the same file in two batches) keeps the later
    label; two sources disagreeing keep the label of the source earlier in ``precedence`` (an
    unknown source ranks last), and the override is recorded.
    """
    rank = {name: i for i, name in enumerate(precedence)}
    chosen: dict[str, LabelledRecord] = {}
    overrides: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    batches: set[str] = set()
    decisions: list[dict[str, Any]] = []
    for source in sources:
        result = source.collect()
        quarantined.extend(result.quarantined)
        batches.update(result.batches)
        decisions.extend(result.decisions)
        for record in result.records:
            current = chosen.get(record.sample_id)
            if current is None:
                chosen[record.sample_id] = record
                continue
            if current.source == record.source:
                chosen[record.sample_id] = max(current, record, key=lambda r: r.labelled_at)
                continue
            winner, loser = sorted((current, record), key=lambda r: rank.get(r.source, len(rank)))
            chosen[record.sample_id] = winner
            if winner.label != loser.label:
                overrides.append({
                    "sample_id": record.sample_id, "label": winner.label, "source": winner.source,
                    "overridden_label": loser.label, "overridden_source": loser.source,
                })  # fmt: skip
    manifest = feedback_manifest(sorted(chosen.values(), key=lambda r: (r.batch_id, r.path)), overrides)
    digest = hashlib.sha256()
    for row in manifest[["sample_id", "label", "source"]].itertuples(index=False):
        digest.update("\0".join(map(str, row)).encode() + b"\n")
    decided = pd.DataFrame(decisions, columns=DECISION_COLUMNS).sort_values(["sample_id", "reviewed_at"], kind="stable")
    for row in decided[["sample_id", "action", "label", "source"]].itertuples(index=False):
        digest.update(b"decision\0" + "\0".join(map(str, row)).encode() + b"\n")
    return Feedback(
        manifest=manifest,
        quarantined=pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS),
        overrides=overrides,
        batches=sorted(batches),
        version=digest.hexdigest()[:16],
        decisions=decided.reset_index(drop=True),
    )


def feedback_manifest(records: Sequence[LabelledRecord], overrides: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """Records in the raw-manifest format cleaning reads, plus ``source`` and ``labelled_at``."""
    overridden = {o["sample_id"]: f"{o['overridden_source']}:{o['overridden_label']}" for o in overrides}
    rows = [
        {
            "record_id": f"{FEEDBACK_BATCH_PREFIX}{r.batch_id}/{r.path}",
            "batch_id": f"{FEEDBACK_BATCH_PREFIX}{r.batch_id}",
            "path": r.path,
            "label": r.label,
            "status": STATUS_INGESTED,
            "reason": None,
            "sample_id": r.sample_id,
            "image_key": r.image_key,
            "ext": r.ext,
            "size_bytes": r.size_bytes,
            "ingested_at": r.labelled_at,
            "source": r.source,
            "labelled_at": r.labelled_at,
            "overrides": overridden.get(r.sample_id),
        }
        for r in records
    ]
    frame = pd.DataFrame(rows, columns=FEEDBACK_COLUMNS)
    frame["size_bytes"] = frame["size_bytes"].astype("Int64")
    return frame


def feedback_key(version: str) -> str:
    """``monitoring/feedback/<version>.parquet``: content-addressed, written once."""
    return f"{FEEDBACK_PREFIX}/{version}.parquet"


def decisions_key(version: str) -> str:
    """``monitoring/feedback/<version>.decisions.parquet``: the review decisions of a version."""
    return f"{FEEDBACK_PREFIX}/{version}.decisions.parquet"


def write_feedback(storage: ArtifactStorage, feedback: Feedback) -> str:
    """Write the manifest (and the decisions, when any) under its version, once; return the
    manifest's key."""
    key = feedback_key(feedback.version)
    if len(feedback.decisions) and not storage.exists(decisions_key(feedback.version)):
        storage.write_parquet(decisions_key(feedback.version), feedback.decisions)
    if not storage.exists(key):
        storage.write_parquet(key, feedback.manifest)
    return key


def read_review_decisions(storage: ArtifactStorage, key: str | None) -> pd.DataFrame | None:
    """The decisions at ``key`` (``None`` when ``key`` is).

    Raises:
        FileNotFoundError: ``key`` names a file that is gone.
    """
    if key is None:
        return None
    if not storage.exists(key):
        raise FileNotFoundError(f"review decisions {storage.uri(key)} are missing: materialize review_feedback again")
    return storage.read_parquet(key)[DECISION_COLUMNS]


def read_feedback_records(storage: ArtifactStorage, key: str | None) -> pd.DataFrame:
    """The feedback manifest at ``key`` as raw-manifest rows (the columns cleaning reads);
    empty when ``key`` is ``None``.

    Raises:
        FileNotFoundError: ``key`` names a manifest that is gone.
    """
    if key is None:
        return pd.DataFrame(columns=RAW_COLUMNS)
    if not storage.exists(key):
        raise FileNotFoundError(f"review feedback manifest {storage.uri(key)} is missing: materialize review_feedback again")
    return storage.read_parquet(key)[RAW_COLUMNS]
