"""Raw batches -> one cleaned, deduplicated, split and versioned dataset.

:func:`clean_dataset` is the one entry point. For every ingested raw record (see the raw
manifest contract in docs/contracts.md) it decides exactly one outcome:

- ``clean``: decoded, normalised to the dataset's canonical PNG, assigned a split;
- ``duplicate``: the same pixels (``exact``) or nearly the same image (``near``) as a clean
  sample with the same label, recorded as an alias of it (``alias_of``);
- ``quarantined``: with a reason (decoder reasons from :mod:`cvops_dagster.decoding`,
  ``no_label``, or ``label_conflict`` when duplicates disagree on the label: all copies).

The counts are checked to add up to the input (:func:`check_accounting` raises otherwise).

Which copy of a duplicate group is kept: the earliest ingested (then the smallest
record id), so adding a batch never replaces an existing clean sample by a newcomer.

Dataset mode rule: the dataset is "RGB" when more than ``rgb_fraction`` (default 10%) of its
distinct decodable images are colour (channels differing by more than the gray tolerance),
else "L". Images of the other mode are converted (gray -> RGB is exact; colour -> L uses
Pillow's luma). The rule is recorded in dataset.json.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cvops_dagster.decoding import (
    NORMALISATION_POLICY,
    REASON_MISSING,
    DecodeConfig,
    PoolStats,
    decode_files,
    default_scratch_dir,
    encode_png,
)
from cvops_dagster.duplicates import NearDuplicateConfig, find_duplicates
from cvops_dagster.splits import SPLITS, SplitConfig, assign_split, dataset_version
from cvops_dagster.storage import ArtifactStorage

logger = logging.getLogger(__name__)

REASON_NO_LABEL = "no_label"
REASON_LABEL_CONFLICT = "label_conflict"
CANONICAL_PREFIX = "canonical"
OUTCOMES: tuple[str, ...] = ("clean", "duplicate", "quarantined")

MANIFEST_COLUMNS: tuple[str, ...] = (
    "record_id",
    "batch_id",
    "path",
    "sample_id",
    "label",
    "outcome",
    "reason",
    "reason_detail",
    "alias_of",
    "split",
    "image_key",
    "raw_image_key",
    "format",
    "mode",
    "orig_width",
    "orig_height",
    "animated",
    "orientation",
    "canonical_mode",
    "width",
    "height",
    "channels",
    "aspect_ratio",
    "brightness",
    "contrast",
    "sharpness",
    "file_size",
    "pixel_hash",
    "phash",
)
"""Columns of ``datasets/<version>/manifest.parquet``, in order."""


class AccountingError(RuntimeError):
    """Some input record has no outcome, several, or counts do not add up."""


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
    """

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    near_duplicates: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    rgb_fraction: float = 0.10
    mode: str | None = None
    quarantine_examples: int = 5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CleaningResult:
    """Outcome of :func:`clean_dataset`.

    Attributes:
        version: content hash of (ids, labels, splits) of the clean samples.
        mode: the dataset's canonical mode, "L" or "RGB".
        manifest: one row per ingested record (columns :data:`MANIFEST_COLUMNS`).
        manifest_key, dataset_json_key: where they were written in the storage.
        dataset_info: the content of dataset.json.
        quarantine_examples: reason, count and a few example records per reason.
        pool: decode pool statistics; ``timings``: seconds per phase.
    """

    version: str
    mode: str
    manifest: pd.DataFrame
    manifest_key: str
    dataset_json_key: str
    dataset_info: dict[str, Any]
    quarantine_examples: pd.DataFrame
    pool: PoolStats
    timings: dict[str, float]

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
        }


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or pd.isna(value) or not str(value).strip()


def _stage_inputs(
    storage: ArtifactStorage, keys: list[str], scratch: Path | None
) -> tuple[list[tuple[str, str]], Path]:
    """Local paths for the raw files and the folder workers write canonical PNGs into."""
    if storage.is_local:
        root = str(storage.local_path(CANONICAL_PREFIX))[: -len(CANONICAL_PREFIX)]
        for key in keys:  # the storage's own key rule, without a Path per key
            if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
                raise ValueError(f"invalid artifact key {key!r}")
        items = [(key, root + key) for key in keys]
        out_dir = storage.local_path(CANONICAL_PREFIX)
        assert out_dir is not None
        return items, out_dir
    assert scratch is not None
    items = []
    for n, key in enumerate(keys):
        target = scratch / "raw" / f"{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.write_bytes(storage.read_bytes(key))
        except FileNotFoundError:
            pass  # the worker reports the missing file as `missing_image`
        items.append((key, str(target)))
    return items, scratch / CANONICAL_PREFIX


def _convert_canonical(
    storage: ArtifactStorage, out_dir: Path, sha: str, mode: str, compress_level: int
) -> tuple[str, str]:
    """Convert one canonical PNG to the dataset mode; return (new sha, key)."""
    with Image.open(out_dir / f"{sha}.png", formats=["PNG"]) as image:
        converted = image.convert(mode)
    return storage.write_content_addressed(CANONICAL_PREFIX, encode_png(converted, compress_level), "png")


def check_accounting(manifest: pd.DataFrame, input_records: pd.Series | list[str]) -> dict[str, int]:
    """Check that every input record has exactly one valid outcome.

    Args:
        manifest: the cleaned manifest.
        input_records: the record ids of the ingested input.

    Returns:
        Counts per outcome plus ``input``.

    Raises:
        AccountingError: a record is missing, repeated, or unknown; an outcome is invalid;
            a quarantined row has no reason; a duplicate is not the alias of a clean sample;
            a clean row has no split; or the counts do not add up to the input.
    """
    expected = list(input_records)
    ids = manifest["record_id"].tolist()
    if len(ids) != len(set(ids)):
        raise AccountingError("a record appears more than once in the manifest")
    if set(ids) != set(expected) or len(expected) != len(set(expected)):
        missing = sorted(set(expected) - set(ids))[:5]
        extra = sorted(set(ids) - set(expected))[:5]
        raise AccountingError(f"manifest records differ from the input: missing {missing}, unexpected {extra}")
    outcome = manifest["outcome"]
    if not outcome.isin(OUTCOMES).all():
        raise AccountingError(f"invalid outcomes: {sorted(set(outcome) - set(OUTCOMES))}")
    quarantined = manifest[outcome == "quarantined"]
    if quarantined["reason"].map(_is_blank).any():
        raise AccountingError("a quarantined record has no reason")
    clean = manifest[outcome == "clean"]
    if not clean["split"].isin(SPLITS).all():
        raise AccountingError("a clean record has no split")
    duplicates = manifest[outcome == "duplicate"]
    if not duplicates["alias_of"].isin(set(clean["sample_id"])).all():
        raise AccountingError("a duplicate is not the alias of a clean sample")
    counts = {"input": len(expected), "clean": len(clean), "duplicates": len(duplicates), "quarantined": len(quarantined)}
    if counts["clean"] + counts["duplicates"] + counts["quarantined"] != counts["input"]:
        raise AccountingError(f"outcomes do not add up to the input: {counts}")
    return counts


def _quarantine_table(manifest: pd.DataFrame, per_reason: int) -> pd.DataFrame:
    quarantined = manifest[manifest["outcome"] == "quarantined"]
    rows = []
    for reason, group in quarantined.groupby("reason", sort=True):
        for _, row in group.head(per_reason).iterrows():
            rows.append(
                {
                    "reason": reason,
                    "count": len(group),
                    "record_id": row["record_id"],
                    "path": row["path"],
                    "detail": row["reason_detail"],
                }
            )
    return pd.DataFrame(rows, columns=["reason", "count", "record_id", "path", "detail"])


def clean_dataset(
    storage: ArtifactStorage,
    raw_manifest: pd.DataFrame,
    config: CleaningConfig = CleaningConfig(),
    workers: int | None = None,
) -> CleaningResult:
    """Clean every ingested raw record into one versioned dataset.

    Decodes each distinct raw file once in worker processes, normalises it to a canonical
    PNG under ``canonical/<sha256>.png``, removes duplicates, quarantines what cannot be
    used, assigns stable splits, and writes ``datasets/<version>/manifest.parquet`` and
    ``datasets/<version>/dataset.json``.

    Args:
        storage: artifact storage holding ``images/...`` and receiving the outputs.
        raw_manifest: the concatenated raw manifests (rejected rows are ignored: they are
            accounted for by ingestion).
        config: cleaning settings.
        workers: decode processes; ``None`` means one per CPU core.

    Returns:
        The result, with :meth:`CleaningResult.summary` for status reporting.

    Raises:
        AccountingError: the outcomes do not account for every ingested record.
        ValueError: the raw manifest repeats a record id.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    records = raw_manifest[raw_manifest["status"] == "ingested"].copy()
    if records["record_id"].duplicated().any():
        raise ValueError("raw manifest repeats record ids")
    sort_columns = [c for c in ("ingested_at", "record_id") if c in records.columns]
    records = records.sort_values(sort_columns, kind="stable").reset_index(drop=True)
    n = len(records)

    keys = sorted({k for k in records["image_key"].tolist() if not _is_blank(k)})
    scratch = None if storage.is_local else default_scratch_dir()
    try:
        items, out_dir = _stage_inputs(storage, keys, scratch)
        decoded, phash_all, compare_all, pool = decode_files(items, out_dir, config.decode, workers)
        timings["decode_s"] = time.perf_counter() - started
        mark = time.perf_counter()
        position = {key: i for i, key in enumerate(keys)}
        row_of = np.array(
            [position.get(k, -1) if not _is_blank(k) else -1 for k in records["image_key"].tolist()], dtype=np.int64
        )
        have = row_of >= 0
        per_record = decoded.astype(object).iloc[np.where(have, row_of, 0)].reset_index(drop=True)
        per_record.loc[~have, :] = None
        per_record.loc[~have, "ok"] = False
        per_record.loc[~have, "reason"] = REASON_MISSING
        per_record.loc[~have, "reason_detail"] = "record has no image_key"

        labels = records["label"].tolist()
        ok = per_record["ok"].fillna(False).astype(bool).to_numpy()
        labelled = np.array([not _is_blank(v) for v in labels], dtype=bool)
        outcome = np.full(n, "quarantined", dtype=object)
        reason = per_record["reason"].astype(object).to_numpy().copy()
        detail = per_record["reason_detail"].astype(object).to_numpy().copy()
        reason[ok & ~labelled] = REASON_NO_LABEL
        detail[ok & ~labelled] = "ingested record has no label"
        alias_of = np.full(n, None, dtype=object)

        # Dataset mode from the distinct decodable images.
        eligible = np.nonzero(ok & labelled)[0]
        pixel_hashes = per_record["pixel_hash"].to_numpy(dtype=object)
        modes = per_record["canonical_mode"].to_numpy(dtype=object)
        if config.mode is not None:
            mode = config.mode
        else:
            distinct = pd.Series(modes[eligible]).groupby(pd.Series(pixel_hashes[eligible])).first()
            colour_fraction = float((distinct == "RGB").mean()) if len(distinct) else 0.0
            mode = "RGB" if colour_fraction > config.rgb_fraction else "L"

        # Duplicates among eligible records, earliest kept.
        keep, kind = find_duplicates(
            pixel_hashes[eligible].tolist(),
            phash_all[np.where(have, row_of, 0)][eligible],
            compare_all[np.where(have, row_of, 0)][eligible],
            config.near_duplicates,
        )
        group_labels: dict[int, set[str]] = {}
        for local, target in enumerate(keep.tolist()):
            group_labels.setdefault(target, set()).add(str(labels[eligible[local]]))
        sample_ids = records["sample_id"].to_numpy(dtype=object)
        for local, target in enumerate(keep.tolist()):
            index = eligible[local]
            seen = group_labels[target]
            if len(seen) > 1:
                reason[index] = REASON_LABEL_CONFLICT
                detail[index] = f"duplicates carry labels {sorted(seen)}"
            elif target == local:
                outcome[index] = "clean"
                reason[index] = None
                detail[index] = None
            else:
                outcome[index] = "duplicate"
                reason[index] = kind[local]
                detail[index] = None
                alias_of[index] = sample_ids[eligible[target]]
        timings["dedup_s"] = time.perf_counter() - mark
        mark = time.perf_counter()

        # Canonical images in the dataset mode; split per clean sample.
        clean_idx = np.nonzero(outcome == "clean")[0]
        image_key = np.full(n, None, dtype=object)
        canonical_mode = modes.copy()
        channels = per_record["channels"].to_numpy(dtype=object).copy()
        shas = per_record["canonical_sha"].to_numpy(dtype=object)
        converted = 0
        for index in clean_idx.tolist():
            sha = shas[index]
            if modes[index] != mode:
                sha, key = _convert_canonical(storage, out_dir, sha, mode, config.decode.png_compress_level)
                converted += 1
                canonical_mode[index] = mode
                channels[index] = 3 if mode == "RGB" else 1
            else:
                key = f"{CANONICAL_PREFIX}/{sha}.png"
                if not storage.is_local:
                    storage.write_bytes(key, (out_dir / f"{sha}.png").read_bytes())
            image_key[index] = key
        split = np.full(n, None, dtype=object)
        for index in clean_idx.tolist():
            split[index] = assign_split(str(sample_ids[index]), str(labels[index]), config.splits)
        timings["canonical_s"] = time.perf_counter() - mark
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    mark = time.perf_counter()
    manifest = pd.DataFrame(
        {
            "record_id": records["record_id"].astype(object).to_numpy(),
            "batch_id": records["batch_id"].astype(object).to_numpy(),
            "path": records["path"].astype(object).to_numpy(),
            "sample_id": sample_ids,
            "label": np.array([None if _is_blank(v) else str(v) for v in labels], dtype=object),
            "outcome": outcome,
            "reason": reason,
            "reason_detail": detail,
            "alias_of": alias_of,
            "split": split,
            "image_key": image_key,
            "raw_image_key": records["image_key"].astype(object).to_numpy(),
            "format": per_record["format"].to_numpy(dtype=object),
            "mode": per_record["mode"].to_numpy(dtype=object),
            "orig_width": pd.array(per_record["orig_width"].tolist(), dtype="Int64"),
            "orig_height": pd.array(per_record["orig_height"].tolist(), dtype="Int64"),
            "animated": pd.array(per_record["animated"].tolist(), dtype="boolean"),
            "orientation": pd.array(per_record["orientation"].tolist(), dtype="Int64"),
            "canonical_mode": canonical_mode,
            "width": pd.array(per_record["width"].tolist(), dtype="Int64"),
            "height": pd.array(per_record["height"].tolist(), dtype="Int64"),
            "channels": pd.array(channels.tolist(), dtype="Int64"),
            "aspect_ratio": pd.to_numeric(per_record["aspect_ratio"], errors="coerce").astype("float64"),
            "brightness": pd.to_numeric(per_record["brightness"], errors="coerce").astype("float64"),
            "contrast": pd.to_numeric(per_record["contrast"], errors="coerce").astype("float64"),
            "sharpness": pd.to_numeric(per_record["sharpness"], errors="coerce").astype("float64"),
            "file_size": pd.array(per_record["file_size"].tolist(), dtype="Int64"),
            "pixel_hash": per_record["pixel_hash"].to_numpy(dtype=object),
            "phash": np.array(
                [f"{int(h):016x}" if o else None for h, o in zip(phash_all[np.where(have, row_of, 0)], ok, strict=True)],
                dtype=object,
            ),
        },
        columns=list(MANIFEST_COLUMNS),
    )
    manifest.loc[~ok, ["canonical_mode", "channels"]] = None
    counts = check_accounting(manifest, records["record_id"].tolist())

    clean = manifest[manifest["outcome"] == "clean"]
    version = dataset_version(zip(clean["sample_id"], clean["label"], clean["split"], strict=True))
    duplicates = manifest[manifest["outcome"] == "duplicate"]
    counts["exact_duplicates"] = int((duplicates["reason"] == "exact").sum())
    counts["near_duplicates"] = int((duplicates["reason"] == "near").sum())
    sizes = Counter(zip(clean["height"].tolist(), clean["width"].tolist()))
    image_size = list(sizes.most_common(1)[0][0]) if sizes else None
    dataset_info = {
        "version": version,
        "mode": mode,
        "channels": 3 if mode == "RGB" else 1,
        "labels": sorted(clean["label"].unique().tolist()),
        "image_size": image_size,
        "counts": counts,
        "splits": {s: int((clean["split"] == s).sum()) for s in SPLITS},
        "classes": {str(k): int(v) for k, v in clean["label"].value_counts().sort_index().items()},
        "quarantine_reasons": {
            str(k): int(v)
            for k, v in manifest.loc[manifest["outcome"] == "quarantined", "reason"].value_counts().sort_index().items()
        },
        "batches": sorted({str(b) for b in manifest["batch_id"].tolist()}),
        "mode_rule": f"RGB if more than {config.rgb_fraction:.0%} of distinct decodable images are colour, else L"
        if config.mode is None
        else f"forced {config.mode}",
        "image_size_rule": "most common canonical (height, width) of the clean samples; images are not resized",
        "normalisation": dict(NORMALISATION_POLICY),
        "config": config.to_dict(),
    }
    prefix = f"datasets/{version}"
    manifest_key = f"{prefix}/manifest.parquet"
    dataset_json_key = f"{prefix}/dataset.json"
    storage.write_parquet(manifest_key, manifest)
    storage.write_json(dataset_json_key, dataset_info)
    timings["write_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    logger.info(
        "cleaned dataset %s: %d input, %d clean, %d duplicates, %d quarantined (%d converted to %s) in %.2f s",
        version,
        counts["input"],
        counts["clean"],
        counts["duplicates"],
        counts["quarantined"],
        converted,
        mode,
        timings["total_s"],
    )
    return CleaningResult(
        version=version,
        mode=mode,
        manifest=manifest,
        manifest_key=manifest_key,
        dataset_json_key=dataset_json_key,
        dataset_info=dataset_info,
        quarantine_examples=_quarantine_table(manifest, config.quarantine_examples),
        pool=pool,
        timings=timings,
    )
