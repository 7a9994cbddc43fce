"""The decode cache: per-file decode facts kept in the artifact storage, keyed by
(sample id, normalisation policy).

Cleaning needs the decode facts of every raw file of every batch on each run (duplicates and
the dataset mode are decided over all of them), but a file's facts depend only on its bytes
and the decode policy. The sample id is the sha256 of the raw bytes (ingestion's content
address), so a cached row belongs to exactly those bytes; the policy key
(:func:`~cvops_dagster.imaging.policy.policy_key`) covers
:data:`~cvops_dagster.imaging.policy.NORMALISATION_POLICY_VERSION`, the decode settings that
change results, and the Pillow release. A new batch is therefore decoded alone, and a policy
change (a bumped version, another limit, a Pillow upgrade) decodes everything again.

Layout: ``cache/decode/<policy key>/part-<UTC time>-<random>.parquet``, each part holding
``sample_id`` and the columns of :data:`~cvops_dagster.imaging.facts.FACTS_SCHEMA` of the
files one run decoded; it works the same on a local folder and on ``s3://`` (only whole
objects are written, atomically, and never rewritten). When a folder holds more than
:data:`MAX_PARTS` parts, a run merges them into one and deletes the merged ones; a reader
that misses a part deleted meanwhile only decodes those files again.

What is cached: the facts of decoded files, and failures that depend only on the bytes and
the policy (a truncated file stays truncated). Failures in
:data:`~cvops_dagster.imaging.policy.TRANSIENT_REASONS` (timeouts, crashes, the memory limit,
a missing or unreadable file) are never cached: the next run tries those files again.

``canonical_sha`` names a canonical PNG that was made for the file; whether that PNG is in
the storage depends on what happened to the file (only kept images are published), so a
user of the cached name checks that the file exists.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.imaging.facts import FACT_COLUMNS, FACTS_SCHEMA, facts_frame, facts_table
from cvops_dagster.imaging.policy import TRANSIENT_REASONS, DecodeConfig, policy_key

logger = logging.getLogger(__name__)

DECODE_CACHE_PREFIX = "cache/decode"
"""Where the decode cache lives in the artifact storage, one folder per policy key."""

MAX_PARTS = 8
"""Parts a policy folder may hold before a run merges them into one."""

CACHE_SCHEMA = pa.schema([("sample_id", pa.string()), *FACTS_SCHEMA])
"""One row per sample: its id and its decode facts."""

_SAMPLE_ID = re.compile(r"[0-9a-f]{64}")
_DICTIONARY_COLUMNS = ["reason", "format", "mode", "canonical_mode"]


def is_sample_id(value: object) -> bool:
    """Whether ``value`` is a content address (64 lowercase hex digits), a sound cache key."""
    return isinstance(value, str) and _SAMPLE_ID.fullmatch(value) is not None


@dataclass
class CacheStats:
    """What the cache did in one cleaning run.

    Attributes:
        hits: distinct files whose facts came from the cache (not decoded).
        decoded: distinct files decoded in this run.
        written: rows this run added to the cache.
        policy_key: the policy folder used.
    """

    hits: int = 0
    decoded: int = 0
    written: int = 0
    policy_key: str = ""


class DecodeCache:
    """Decode facts under one policy, in ``cache/decode/<policy key>/``.

    Args:
        storage: the artifact storage (local folder or ``s3://``).
        config: the decode settings; they (with the policy version) name the folder.
    """

    def __init__(self, storage: ArtifactStorage, config: DecodeConfig = DecodeConfig()) -> None:
        self.storage = storage
        self.key = policy_key(config)
        self.prefix = f"{DECODE_CACHE_PREFIX}/{self.key}"

    def load(self, sample_ids: Collection[str]) -> pd.DataFrame:
        """The cached facts of ``sample_ids`` (those the cache knows), one row per sample.

        Returns:
            A facts frame (see :func:`~cvops_dagster.imaging.facts.facts_frame`) with a
            ``sample_id`` column first.
        """
        table = self._read_parts(self._parts())
        if table.num_rows:
            table = table.filter(pc.is_in(table["sample_id"], value_set=pa.array(list(sample_ids), pa.string())))
        return _latest_per_sample(table)

    def save(self, facts: pd.DataFrame) -> int:
        """Add facts (a frame with ``sample_id``): of files decoded now, or of files known
        before that got a canonical PNG name now.

        Rows without a content-address sample id and transient failures are left out. When
        the folder then holds more than :data:`MAX_PARTS` parts, they are merged.

        Returns:
            The number of rows written.
        """
        cacheable = facts["sample_id"].map(is_sample_id).astype(bool) & ~facts["reason"].isin(TRANSIENT_REASONS)
        rows = facts.loc[cacheable, ["sample_id", *FACT_COLUMNS]].drop_duplicates("sample_id", keep="last")
        if rows.empty:
            return 0
        table = facts_table(rows).add_column(0, "sample_id", pa.array(rows["sample_id"].tolist(), pa.string()))
        self._write_part(table)
        parts = self._parts()
        if len(parts) > MAX_PARTS:
            self._merge(parts)
        return len(rows)

    def _parts(self) -> list[str]:
        return [key for key in self.storage.list(self.prefix) if key.endswith(".parquet")]

    def _write_part(self, table: pa.Table) -> str:
        # Named by time first: listing order is writing order, so later rows win (see load).
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        key = f"{self.prefix}/part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
        buffer = pa.BufferOutputStream()
        # Dictionary encoding only where values repeat; ids and hashes are unique.
        pq.write_table(table.cast(CACHE_SCHEMA), buffer, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS)
        self.storage.write_bytes(key, buffer.getvalue().to_pybytes())
        return key

    def _read_parts(self, parts: list[str]) -> pa.Table:
        tables = []
        for order, key in enumerate(parts):
            try:
                table = pq.read_table(io.BytesIO(self.storage.read_bytes(key))).cast(CACHE_SCHEMA)
            except FileNotFoundError:  # merged and deleted by another run meanwhile
                continue
            except (pa.ArrowException, OSError, ValueError) as exc:  # a damaged part: its files decode again
                logger.warning("decode cache part %s unreadable (%s); ignored", key, exc)
                continue
            tables.append(table.append_column("_part", pa.array(np.full(table.num_rows, order), pa.int64())))
        if not tables:
            return CACHE_SCHEMA.empty_table().append_column("_part", pa.array([], pa.int64()))
        return pa.concat_tables(tables)

    def _merge(self, parts: list[str]) -> None:
        """Merge ``parts`` into one new part, then delete them."""
        merged = _latest_per_sample(self._read_parts(parts))
        self._write_part(facts_table(merged).add_column(0, "sample_id", pa.array(merged["sample_id"].tolist(), pa.string())))
        for key in parts:
            self.storage.delete(key)
        logger.info("decode cache %s: merged %d parts (%d samples)", self.key, len(parts), len(merged))


def _latest_per_sample(table: pa.Table) -> pd.DataFrame:
    """One row per sample id: its latest facts, with every canonical PNG name any row knew.

    A file's facts are the same in every row (same bytes, same policy); later rows may add
    the name of a canonical PNG made by a later run.
    """
    frame = facts_frame(table)
    frame.insert(0, "sample_id", table["sample_id"].to_pandas().astype(object))
    if not frame["sample_id"].duplicated().any():
        return frame
    order = np.argsort(table["_part"].to_numpy(), kind="stable")
    # groupby().last() takes each column's last non-null value: the names from any row.
    latest = frame.iloc[order].groupby("sample_id", sort=False, dropna=False).last()
    return latest.reset_index()[frame.columns]
