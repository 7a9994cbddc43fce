"""Batch ingestion: copy a landing-zone batch into content-addressed storage with a manifest.

Ingestion never decodes an image (that is cleaning's job); it only makes every file of a batch
durable under ``images/<sha256>.<ext>`` and records what happened to each entry, so that the
batch can be deleted from the landing zone without losing anything.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from cvops_dagster.core.contracts import IMAGES_PREFIX
from cvops_dagster.ingestion.landing import REJECT_UNREADABLE, BatchEntry, LandingZone
from cvops_dagster.core.storage import ArtifactStorage

logger = logging.getLogger(__name__)

RAW_MANIFEST_PREFIX = "manifests/raw"
PRODUCTION_MANIFEST_PREFIX = "manifests/production"
STATUS_INGESTED = "ingested"
STATUS_REJECTED = "rejected"

MANIFEST_COLUMNS = [
    "record_id",
    "batch_id",
    "path",
    "label",
    "status",
    "reason",
    "sample_id",
    "image_key",
    "ext",
    "size_bytes",
    "ingested_at",
]

_EXT_RE = re.compile(r"^[a-z0-9]{1,8}$")


def raw_manifest_key(batch_id: str, production: bool = False) -> str:
    """Where a batch's ingestion manifest is: ``manifests/raw/<id>.parquet`` for a labelled
    batch, ``manifests/production/<id>.parquet`` for a production batch."""
    return f"{PRODUCTION_MANIFEST_PREFIX if production else RAW_MANIFEST_PREFIX}/{batch_id}.parquet"


def safe_extension(path: str) -> str:
    """The lower-case extension if it is short and plain, else ``bin``: keys stay predictable."""
    name = path.rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if _EXT_RE.match(ext) else "bin"


@dataclass
class IngestResult:
    """What one batch ingestion produced."""

    batch_id: str
    manifest_key: str
    manifest: pd.DataFrame
    bytes_ingested: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def files(self) -> int:
        return int((self.manifest["status"] == STATUS_INGESTED).sum())

    @property
    def content_version(self) -> str:
        """A hash of what the batch holds (paths, labels, outcomes, content ids), not of when
        it was ingested: re-ingesting an unchanged batch gives the same version."""
        digest = hashlib.sha256()
        for row in self.manifest[["path", "label", "status", "reason", "sample_id"]].itertuples(index=False):
            digest.update("\0".join("" if pd.isna(v) else str(v) for v in row).encode("utf-8", "backslashreplace") + b"\n")
        return digest.hexdigest()[:16]

    @property
    def rejected(self) -> int:
        return int((self.manifest["status"] == STATUS_REJECTED).sum())

    def label_counts(self) -> dict[str, int]:
        ok = self.manifest[self.manifest["status"] == STATUS_INGESTED]
        return {str(k): int(v) for k, v in sorted(Counter(ok["label"]).items())}

    def summary(self) -> dict[str, object]:
        return {
            "batch_id": self.batch_id,
            "files": self.files,
            "bytes": self.bytes_ingested,
            "rejected": self.rejected,
            "rejected_reasons": dict(sorted(self.rejected_reasons.items())),
            "labels": self.label_counts(),
            "manifest": self.manifest_key,
        }


def _previous_times(storage: ArtifactStorage, key: str) -> dict[tuple[str, str | None], str]:
    """Ingestion times of a batch's earlier manifest, so a re-run rewrites identical rows."""
    if not storage.exists(key):
        return {}
    try:
        old = storage.read_parquet(key)
    except Exception:  # noqa: BLE001 - a corrupt old manifest is simply replaced
        logger.warning("previous manifest %s unreadable; rewriting", key)
        return {}
    return {
        (r.record_id, r.sample_id if isinstance(r.sample_id, str) else None): r.ingested_at
        for r in old.itertuples()
    }


def ingest_batch(landing: LandingZone, storage: ArtifactStorage, batch_id: str, production: bool = False) -> IngestResult:
    """Copy one complete batch into ``images/`` and write its manifest
    (``manifests/raw/<batch_id>.parquet``, or ``manifests/production/...`` for a production
    batch, whose records have no label and ids ``production/<batch_id>/<file>``).

    Idempotent: files are content-addressed, and a re-run keeps the ingestion time of every
    record it already knew, so the manifest comes out byte-for-byte the same.
    """
    key = raw_manifest_key(batch_id, production)
    previous = _previous_times(storage, key)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    storage.remove_stale_temporaries(IMAGES_PREFIX)  # left by a killed earlier ingestion
    # On an object store one listing says which images exist, instead of a HEAD per file.
    known = None if storage.is_local else set(storage.list(IMAGES_PREFIX))

    def ingest_entry(entry: BatchEntry) -> dict[str, object]:
        row = _entry_row(landing, storage, batch_id, entry, known, production)
        row["ingested_at"] = previous.get((str(row["record_id"]), row["sample_id"]), now)  # type: ignore[arg-type]
        return row

    # Reading from the landing zone and writing to the store are whole-object transfers: with
    # either on S3 they run on a bounded thread pool (one round trip each, overlapping).
    rows = storage.map_transfers(ingest_entry, landing.list_entries(batch_id, production), remote=not (landing.is_local and storage.is_local))
    total_bytes = sum(int(r["size_bytes"] or 0) for r in rows if r["status"] == STATUS_INGESTED)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest["size_bytes"] = manifest["size_bytes"].astype("Int64")
    storage.write_parquet(key, manifest)
    reasons = Counter(str(r) for r in manifest.loc[manifest["status"] == STATUS_REJECTED, "reason"])
    result = IngestResult(batch_id, key, manifest, total_bytes, dict(reasons))
    logger.info("ingested batch %s: %d files, %d rejected", batch_id, result.files, result.rejected)
    return result


def read_raw_manifests(storage: ArtifactStorage, batch_ids: list[str] | None = None) -> pd.DataFrame:
    """All batch manifests (or the named ones) as one frame, in batch order.

    Raises:
        MissingManifestError: a named batch has no manifest (deleted, or its ingestion never
            finished): a dataset built without it would shrink silently.
    """
    keys = [k for k in storage.list(RAW_MANIFEST_PREFIX) if k.endswith(".parquet")]
    if batch_ids is not None:
        wanted = {raw_manifest_key(b): b for b in batch_ids}
        missing = sorted(b for key, b in wanted.items() if key not in set(keys))
        if missing:
            raise MissingManifestError(
                f"raw manifest missing for batch(es) {missing} at {storage.uri(RAW_MANIFEST_PREFIX)}: "
                "materialize raw_images for them again (or remove their partitions) before cleaning"
            )
        keys = [k for k in keys if k in wanted]
    frames = [storage.read_parquet(k) for k in sorted(keys)]
    if not frames:
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    return pd.concat(frames, ignore_index=True)


class MissingManifestError(FileNotFoundError):
    """A batch that should be part of a dataset has no raw manifest."""


def _entry_row(
    landing: LandingZone,
    storage: ArtifactStorage,
    batch_id: str,
    entry: BatchEntry,
    known: set[str] | None,
    production: bool = False,
) -> dict[str, object]:
    """One manifest row: the entry copied into content-addressed storage, or why it was not."""
    row: dict[str, object] = {
        "record_id": f"{'production/' if production else ''}{batch_id}/{entry.path}",
        "batch_id": batch_id,
        "path": entry.path,
        "label": entry.label,
        "status": STATUS_REJECTED,
        "reason": entry.reason,
        "sample_id": None,
        "image_key": None,
        "ext": None,
        "size_bytes": entry.size,
    }
    if not entry.accepted:
        return row
    try:
        data = landing.read_bytes(batch_id, entry.path, production)
    except OSError as exc:
        logger.warning("unreadable %s/%s: %s", batch_id, entry.path, exc)
        row["reason"] = REJECT_UNREADABLE
        return row
    ext = safe_extension(entry.path)
    sample_id, image_key = storage.write_content_addressed(IMAGES_PREFIX, data, ext, known)
    row.update(status=STATUS_INGESTED, reason=None, sample_id=sample_id, image_key=image_key, ext=ext, size_bytes=len(data))
    return row
