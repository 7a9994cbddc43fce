"""Raw batches -> one cleaned, deduplicated, split and versioned dataset.

:func:`clean_dataset` is the one entry point. For every ingested raw record (see the raw
manifest contract in docs/contracts.md) it decides exactly one outcome:

- ``clean``: decoded, normalised to the dataset's canonical PNG, assigned a split;
- ``duplicate``: the same pixels (``exact``) or nearly the same image (``near``) as a clean
  sample with the same label, recorded as an alias of it (``alias_of``);
- ``quarantined``: with a reason (decoder reasons from :mod:`cvops_dagster.imaging.policy`,
  ``no_label``, or ``label_conflict`` when duplicates disagree on the label: all copies).

The steps: the ingested records in ingestion order (:func:`ingested_records`); the decode
facts of each distinct raw file, from the decode cache or decoded in the sandbox
(:mod:`cvops_dagster.datasets.image_facts`); the outcomes
(:mod:`cvops_dagster.datasets.outcomes`); the canonical PNGs of the clean samples (:mod:`cvops_dagster.datasets.canonical`); the manifest
and dataset.json (:mod:`cvops_dagster.datasets.manifest`). The counts are checked to add up
to the input (:func:`~cvops_dagster.datasets.manifest.check_accounting` raises otherwise).

Which copy of a duplicate group is kept: the earliest ingested (then the smallest record
id), so adding a batch never replaces an existing clean sample by a newcomer.

Dataset mode rule: the dataset is "RGB" when more than ``rgb_fraction`` (default 10%) of its
distinct decodable images are colour (channels differing by more than the gray tolerance),
else "L". Images of the other mode are converted (gray -> RGB is exact; colour -> L uses
Pillow's luma). The rule is recorded in dataset.json.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cvops_dagster.core.contracts import SPLITS, dataset_keys
from cvops_dagster.core.storage import ArtifactStorage, is_valid_key
from cvops_dagster.datasets.canonical import CanonicalSource, Published, publish_canonical
from cvops_dagster.datasets.decode_cache import CacheStats, is_sample_id
from cvops_dagster.datasets.duplicates import NearDuplicateConfig
from cvops_dagster.datasets.image_facts import ImageFacts, decode_keys, gather_facts, save_to_cache
from cvops_dagster.datasets.manifest import (
    MANIFEST_COLUMNS,
    AccountingError,
    check_accounting,
    manifest_parquet,
    manifest_table,
    most_common_size,
    quarantine_examples,
)
from cvops_dagster.datasets.outcomes import Outcomes, decide_outcomes
from cvops_dagster.datasets.review_decisions import REASON_REVIEW_DISCARD, AppliedReview, apply_review_decisions
from cvops_dagster.datasets.splits import SplitConfig, dataset_version
from cvops_dagster.imaging.policy import NORMALISATION_POLICY, DecodeConfig
from cvops_dagster.imaging.sandbox import PoolStats

# The manifest's names stay importable from here, where callers of clean_dataset look.
__all__ = ["MANIFEST_COLUMNS", "AccountingError", "CleaningConfig", "CleaningResult", "check_accounting", "clean_dataset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleaningConfig:
    """Settings of a cleaning run.

    Attributes:
        decode: safe-decoding limits and normalisation.
        near_duplicates: near-duplicate thresholds.
        splits: split fractions and salt.
        rgb_fraction: the dataset is RGB when more than this fraction of its distinct
            decodable images are colour, else L.
        mode: force the dataset mode ("L" or "RGB") instead of the rule.
        quarantine_examples: example rows per reason in the quarantine table.
        decode_cache: reuse decode facts of files decoded before under the same policy
            (see :mod:`cvops_dagster.datasets.decode_cache`); the results are the same
            either way, so it is not recorded in dataset.json.
    """

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    near_duplicates: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    rgb_fraction: float = 0.10
    mode: str | None = None
    quarantine_examples: int = 5
    decode_cache: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The settings that shape the dataset, as recorded in dataset.json."""
        settings = asdict(self)
        del settings["decode_cache"]
        return settings


@dataclass
class CleaningResult:
    """Outcome of :func:`clean_dataset`.

    Attributes:
        version: content hash of (ids, labels, splits, canonical keys) of the clean samples.
        mode: the dataset's canonical mode, "L" or "RGB".
        manifest_table: one row per ingested record (columns :data:`MANIFEST_COLUMNS`),
            what manifest.parquet holds; :attr:`manifest` is the same as a pandas frame.
        manifest_key, dataset_json_key: where they were written in the storage.
        dataset_info: the content of dataset.json.
        quarantine_examples: reason, count and a few example records per reason.
        pool: decode sandbox statistics; ``timings``: seconds per phase.
        cache: decode cache statistics (files known, decoded, rows added).
    """

    version: str
    mode: str
    manifest_table: pa.Table
    manifest_key: str
    dataset_json_key: str
    dataset_info: dict[str, Any]
    quarantine_examples: pd.DataFrame
    pool: PoolStats
    timings: dict[str, float]
    cache: CacheStats = field(default_factory=CacheStats)

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """The manifest as pandas (the dtypes ``read_parquet`` gives), made on first use."""
        return self.manifest_table.to_pandas()

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.dataset_info["counts"])

    @property
    def duplicates(self) -> int:
        return int(self.dataset_info["counts"]["duplicates"])

    def summary(self) -> dict[str, Any]:
        """The figures ``cvops status --json`` reports under ``cleaned_dataset``."""
        info = self.dataset_info
        return {
            "version": self.version,
            "input": info["counts"]["input"],
            "clean": info["counts"]["clean"],
            "duplicates": info["counts"]["duplicates"],
            "quarantined": info["counts"]["quarantined"],
            "quarantine_reasons": dict(info["quarantine_reasons"]),
            "splits": dict(info["splits"]),
            "classes": dict(info["classes"]),
            "mode": self.mode,
            "manifest_key": self.manifest_key,
            "review_overrides": len(info.get("review", {}).get("overrides", [])),
            "review_discards": int(info.get("review", {}).get("discarded", 0)),
        }


def clean_dataset(
    storage: ArtifactStorage,
    raw_manifest: pd.DataFrame,
    config: CleaningConfig = CleaningConfig(),
    workers: int | None = None,
    review: pd.DataFrame | None = None,
) -> CleaningResult:
    """Clean every ingested raw record into one versioned dataset.

    Decodes each distinct raw file once (or reuses its cached decode facts), removes
    duplicates, quarantines what cannot be used, gives every clean sample its canonical PNG
    (``canonical/<sha256>.png``, or the raw ``images/<sha256>.png`` itself when that file
    already is canonical), assigns stable splits, and writes
    ``datasets/<version>/manifest.parquet`` and ``datasets/<version>/dataset.json``.

    Args:
        storage: artifact storage holding ``images/...`` and receiving the outputs.
        raw_manifest: the concatenated raw manifests (rejected rows are ignored: they are
            accounted for by ingestion).
        config: cleaning settings.
        workers: decode processes; ``None`` means one per CPU core.
        review: reviewers' relabel/discard decisions about ingested images (see
            :mod:`cvops_dagster.datasets.review_decisions`), recorded in dataset.json.

    Returns:
        The result, with :meth:`CleaningResult.summary` for status reporting.

    Raises:
        AccountingError: the outcomes do not account for every ingested record.
        ValueError: the raw manifest repeats a record id, or names an invalid key.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    applied = apply_review_decisions(ingested_records(raw_manifest), review)
    records = applied.records
    keys, key_samples = _distinct_keys(records)
    scratch = None if storage.is_local else Path(tempfile.mkdtemp(prefix="cvops-clean-"))
    try:
        gathered = gather_facts(
            storage, keys, key_samples, config.decode, workers, scratch, use_cache=config.decode_cache
        )
        timings["decode_s"] = time.perf_counter() - started
        mark = time.perf_counter()
        # The facts of each record's file; all missing for a record without one (row -1).
        facts = gathered.facts.reindex(records["row"].to_numpy()).reset_index(drop=True)
        facts["ok"] = facts["ok"].astype("boolean").fillna(False).astype(bool)
        if applied.discarded.any():  # a reviewer's discard quarantines the record, with its reason
            for column, value in (("ok", False), ("reason", REASON_REVIEW_DISCARD)):
                facts[column] = facts[column].astype(object).where(~applied.discarded, value)
            facts["reason_detail"] = facts["reason_detail"].astype(object).where(~applied.discarded, applied.discard_detail)
            facts["ok"] = facts["ok"].astype(bool)
        outcomes = decide_outcomes(records, facts, config)
        timings["dedup_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        published = _publish(storage, config, workers, scratch, records, gathered, outcomes)
        if config.decode_cache:
            save_to_cache(storage, config.decode, gathered)
        timings["canonical_s"] = time.perf_counter() - mark
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    mark = time.perf_counter()
    result = _write_dataset(storage, config, records, facts, outcomes, published, gathered, applied)
    timings["write_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    result.timings.update(timings)
    counts = result.counts
    logger.info(
        "cleaned dataset %s: %d input, %d clean, %d duplicates, %d quarantined (%d decoded, %d from cache) in %.2f s",
        result.version, counts["input"], counts["clean"], counts["duplicates"], counts["quarantined"],
        gathered.cache.decoded, gathered.cache.hits, timings["total_s"],
    )  # fmt: skip
    return result


_RECORD_COLUMNS = ("record_id", "batch_id", "path", "label", "sample_id", "image_key", "ingested_at")


def ingested_records(raw_manifest: pd.DataFrame) -> pd.DataFrame:
    """The ingested records in ingestion order (then record id), one row each.

    Returns:
        ``record_id``, ``batch_id``, ``path``, ``sample_id``, ``label`` (text, ``None``
        when missing or blank), ``raw_key`` (the raw manifest's ``image_key``, ``None``
        when missing or blank), as object columns.

    Raises:
        ValueError: a record id repeats.
    """
    if "status" in raw_manifest.columns:
        rows = raw_manifest[(raw_manifest["status"] == "ingested").to_numpy(dtype=bool, na_value=False)]
    else:
        rows = raw_manifest.iloc[:0]
    records = pd.DataFrame(
        {
            name: rows[name].astype(object).where(rows[name].notna(), None).to_numpy()
            if name in rows.columns
            else np.full(len(rows), None, dtype=object)
            for name in _RECORD_COLUMNS
        }
    )
    if records["record_id"].duplicated().any():
        raise ValueError("raw manifest repeats record ids")
    try:
        records = records.sort_values(["ingested_at", "record_id"], kind="stable", na_position="last")
    except TypeError:  # mixed types in a column: order by their text
        text = records[["ingested_at", "record_id"]].apply(lambda column: column.map(_text))
        records = records.loc[text.sort_values(["ingested_at", "record_id"], kind="stable", na_position="last").index]
    records = records.reset_index(drop=True)
    records["label"] = records["label"].map(_text)
    records["raw_key"] = records.pop("image_key").map(_text)
    return records.drop(columns="ingested_at")


def _text(value: Any) -> str | None:
    """``str(value)``, or ``None`` for a missing or blank value."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _distinct_keys(records: pd.DataFrame) -> tuple[list[str], list[str | None]]:
    """The distinct raw keys (sorted) with each one's sample id; sets ``records["row"]``."""
    present = records["raw_key"].notna().to_numpy()
    # Plain lists and one index lookup: per-value pandas calls cost ~5 us a record (0.6 s at 60k).
    raw_keys = records["raw_key"].to_numpy(dtype=object)[present].tolist()
    keys = sorted(set(raw_keys))
    bad = next((key for key in keys if not is_valid_key(key)), None)
    if bad is not None:  # refused before anything is read: it could reach outside the storage
        raise ValueError(f"invalid artifact key {bad!r}")
    rows = np.full(len(records), -1, dtype=np.int64)
    rows[present] = pd.Index(keys, dtype=object).get_indexer(raw_keys)
    records["row"] = rows
    first: dict[str, Any] = {}  # each key's sample id on its first record
    for key, sample_id in zip(raw_keys, records["sample_id"].to_numpy(dtype=object)[present].tolist(), strict=True):
        first.setdefault(key, sample_id)
    return keys, [first[key] if is_sample_id(first[key]) else None for key in keys]


def _publish(
    storage: ArtifactStorage,
    config: CleaningConfig,
    workers: int | None,
    scratch: Path | None,
    records: pd.DataFrame,
    gathered: ImageFacts,
    outcomes: Outcomes,
) -> Published:
    """Canonical PNGs of the clean records; the decode cache learns the ones made here."""
    rows = records["row"].to_numpy()[outcomes.clean]
    facts = gathered.facts.iloc[rows]
    names = {column: facts[column].to_numpy(dtype=object, na_value=None) for column in ("canonical_sha", "converted_sha")}
    sources = [
        CanonicalSource(key, natural_mode, bool(passthrough), sha, converted, gathered.pixels[row])
        for key, natural_mode, passthrough, sha, converted, row in zip(
            facts["key"], facts["canonical_mode"], facts["passthrough"], names["canonical_sha"],
            names["converted_sha"], rows.tolist(), strict=True,
        )  # fmt: skip
    ]

    def redecode(keys: list[str]) -> dict[str, np.ndarray]:
        # Files whose facts were cached but whose canonical PNG was never published.
        decoded = decode_keys(storage, keys, config.decode, workers, scratch, keep_pixels_up_to=2**62)
        gathered.pool.add(decoded.stats)
        failed = decoded.facts.loc[~decoded.facts["ok"], ["key", "reason"]]
        if len(failed):
            raise RuntimeError(f"raw files decoded before no longer decode: {failed.head().to_dict('records')}")
        return dict(zip(keys, decoded.pixels, strict=True))  # type: ignore[arg-type]

    published = publish_canonical(
        storage, sources, outcomes.mode, gathered.out_dir, redecode, config.decode.png_compress_level
    )
    # PNGs made here (from kept pixels, or converted) are in the storage now: cache their names.
    for column, made in (("canonical_sha", published.natural_shas), ("converted_sha", published.converted_shas)):
        known = gathered.facts[column].to_numpy(dtype=object, na_value=None).copy()
        learnt = [(row, sha) for row, sha in zip(rows.tolist(), made, strict=True) if sha and known[row] is None]
        for row, sha in learnt:
            known[row] = sha
            gathered.learnt[row] = True
        gathered.facts[column] = pd.array(known, dtype=gathered.facts[column].dtype)
    return published


def _write_dataset(
    storage: ArtifactStorage,
    config: CleaningConfig,
    records: pd.DataFrame,
    facts: pd.DataFrame,
    outcomes: Outcomes,
    published: Published,
    gathered: ImageFacts,
    applied: AppliedReview,
) -> CleaningResult:
    """Build the manifest, check the accounting, and write the manifest and dataset.json."""
    clean = outcomes.clean
    image_key = np.full(len(records), None, dtype=object)
    image_key[clean] = published.keys
    canonical_mode = facts["canonical_mode"].to_numpy(dtype=object, na_value=None).copy()
    channels = facts["channels"].copy()
    converted = clean[np.asarray(published.converted, dtype=bool)]
    canonical_mode[converted] = outcomes.mode
    channels.iloc[converted] = 3 if outcomes.mode == "RGB" else 1
    phash = facts["phash"]
    columns: dict[str, Any] = {name: facts[name] for name in MANIFEST_COLUMNS if name in facts.columns}
    columns.update(
        {name: records[name] for name in ("record_id", "batch_id", "path", "sample_id", "label")},
        outcome=outcomes.outcome, reason=outcomes.reason, reason_detail=outcomes.detail, alias_of=outcomes.alias_of,
        split=outcomes.split, image_key=image_key, raw_image_key=records["raw_key"], canonical_mode=canonical_mode,
        channels=channels, orig_width=facts["orig_width"], orig_height=facts["orig_height"],
        phash=_hex64(phash),
    )  # fmt: skip
    table = manifest_table(columns)
    manifest = table.to_pandas()
    counts = check_accounting(manifest, records["record_id"].tolist())
    counts["exact_duplicates"] = int((outcomes.reason[outcomes.outcome == "duplicate"] == "exact").sum())
    counts["near_duplicates"] = int((outcomes.reason[outcomes.outcome == "duplicate"] == "near").sum())
    labels = records["label"].to_numpy(dtype=object)[clean]
    # The canonical key (a hash of the canonical PNG) and the mode are in the version, so a
    # change of mode or normalisation makes a new version instead of rewriting an old one.
    ids = records["sample_id"].to_numpy(dtype=object)[clean]
    rows = zip(ids.tolist(), labels.tolist(), outcomes.split[clean].tolist(), published.keys, strict=True)
    version = dataset_version(rows, context=f"mode={outcomes.mode}")
    manifest_key, dataset_json_key = dataset_keys(version)
    info = _dataset_info(config, version, outcomes, counts, manifest, labels, records["batch_id"].tolist())
    info["review"] = applied.summary()
    storage.write_bytes(manifest_key, manifest_parquet(table))
    storage.write_json(dataset_json_key, info)  # last: a version with dataset.json is complete
    result = CleaningResult(
        version, outcomes.mode, table, manifest_key, dataset_json_key, info,
        quarantine_examples(manifest, config.quarantine_examples), gathered.pool, {}, gathered.cache,
    )  # fmt: skip
    result.__dict__["manifest"] = manifest  # the cached_property's value, made once already
    return result


def _hex64(values: pd.Series) -> np.ndarray:
    """Each 64-bit value as 16 lowercase hex digits (``f"{value:016x}"``), ``None`` where missing;
    in one pass over the bytes (a format call per record was ~2 us)."""
    missing = values.isna().to_numpy()
    big_endian = values.to_numpy(dtype=np.uint64, na_value=0).astype(">u8")
    text = np.frombuffer(big_endian.tobytes().hex().encode("ascii"), dtype="S16").astype(str).astype(object)
    text[missing] = None
    return text


def _dataset_info(
    config: CleaningConfig,
    version: str,
    outcomes: Outcomes,
    counts: dict[str, int],
    manifest: pd.DataFrame,
    labels: np.ndarray,
    batch_ids: list[Any],
) -> dict[str, Any]:
    """The content of dataset.json."""
    clean = manifest[manifest["outcome"] == "clean"]
    quarantined = manifest[manifest["outcome"] == "quarantined"]
    return {
        "version": version,
        "mode": outcomes.mode,
        "channels": 3 if outcomes.mode == "RGB" else 1,
        "labels": sorted(set(labels.tolist())),
        "image_size": most_common_size(clean["height"].to_numpy(np.int64), clean["width"].to_numpy(np.int64)),
        "counts": counts,
        "splits": {split: int((clean["split"] == split).sum()) for split in SPLITS},
        "classes": _sorted_counts(labels.tolist()),
        "quarantine_reasons": _sorted_counts(quarantined["reason"].tolist()),
        "batches": sorted({str(b) for b in batch_ids}),
        "mode_rule": f"RGB if more than {config.rgb_fraction:.0%} of distinct decodable images are colour, else L"
        if config.mode is None
        else f"forced {config.mode}",
        "image_size_rule": "most common canonical (height, width) of the clean samples; images are not resized",
        "normalisation": dict(NORMALISATION_POLICY),
        "config": config.to_dict(),
    }


def _sorted_counts(values: list[Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values).items(), key=lambda item: str(item[0]))}

