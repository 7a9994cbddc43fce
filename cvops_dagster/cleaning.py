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

import io
import logging
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from cvops_dagster.decoding import (
    NORMALISATION_POLICY,
    REASON_MISSING,
    DecodeConfig,
    PoolStats,
    decode_files,
    default_scratch_dir,
    encode_png,
    single_threaded_blas,
)
from cvops_dagster.duplicates import NearDuplicateConfig, find_duplicates
from cvops_dagster.splits import SPLITS, SplitConfig, assign_splits, dataset_version
from cvops_dagster.storage import ArtifactStorage, is_valid_key

logger = logging.getLogger(__name__)

REASON_NO_LABEL = "no_label"
REASON_LABEL_CONFLICT = "label_conflict"
CANONICAL_PREFIX = "canonical"
IMAGES_PREFIX = "images"
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


# Decoded images up to this size that are not canonical PNGs already come back from the
# workers as pixels and are encoded here only if they end up clean (duplicates never need a
# canonical file). Larger ones are encoded by the workers, in parallel.
_KEEP_PIXELS_BYTES = 64 * 64 * 3


# storage.is_valid_key's rule as an RE2 pattern ("$" is the end of the text in RE2).
_BAD_KEY = r"^$|^/|//|/$|\\|(?:^|/)\.\.?(?:/|$)"


def _first_invalid_key(keys: list[str]) -> str | None:
    """The first key :func:`~cvops_dagster.storage.is_valid_key` rejects, if any.

    Checked for all keys at once with Arrow's regular expressions (RE2), ~4 ms for 18k keys
    where Python's ``re`` over each key or over the joined keys takes 10-50 ms.
    """
    try:
        bad = pc.match_substring_regex(pa.array(keys, type=pa.string()), _BAD_KEY)
        if not pc.any(bad).as_py():
            return None
        return keys[int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])]
    except (pa.ArrowException, TypeError, ValueError):
        pass
    return next((key for key in keys if not is_valid_key(key)), None)


def _present(values: pd.Series) -> np.ndarray:
    """Per entry: not missing and not blank text (vectorised :func:`_is_blank`)."""
    present = values.notna().to_numpy(dtype=bool).copy()
    if present.any():
        present[present] = values[present].astype(str).str.strip().ne("").to_numpy(dtype=bool)
    return present


def _floats(values: Any) -> np.ndarray:
    return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)


def _isin(values: pd.Series, allowed: Any) -> np.ndarray:
    """``values.isin(allowed)`` as a bool array, in Arrow's C code when the types allow.

    pandas' ``isin`` on Arrow-backed strings walks the values in Python (tens of
    milliseconds for a manifest of 20k rows); ``pyarrow.compute.is_in`` does not.
    """
    try:
        array = pa.array(values, from_pandas=True)
        value_set = pa.array(allowed if isinstance(allowed, pd.Series) else list(allowed), from_pandas=True)
        if array.type != value_set.type:
            value_set = value_set.cast(array.type)
        return np.asarray(pc.is_in(array, value_set=value_set).to_numpy(zero_copy_only=False), dtype=bool)
    except (pa.ArrowException, TypeError, ValueError):
        return values.isin(allowed).to_numpy(dtype=bool)


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or pd.isna(value) or not str(value).strip()


def _stage_inputs(
    storage: ArtifactStorage, keys: list[str], scratch: Path | None
) -> tuple[list[tuple[str, str]], Path]:
    """Local paths for the raw files and the folder workers write canonical PNGs into."""
    if storage.is_local:
        root = str(storage.local_path(CANONICAL_PREFIX))[: -len(CANONICAL_PREFIX)]
        # storage.is_valid_key for all keys at once.
        bad = _first_invalid_key(keys)
        if bad is not None:
            raise ValueError(f"invalid artifact key {bad!r}")
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


def _canonical_images(
    storage: ArtifactStorage,
    config: CleaningConfig,
    mode: str,
    out_dir: Path,
    clean_rows: np.ndarray,
    decoded: pd.DataFrame,
    safe_row: np.ndarray,
    raw_keys: np.ndarray,
    modes: np.ndarray,
    channels: Any,
) -> tuple[np.ndarray, np.ndarray, Any, int]:
    """The canonical PNG key of every clean record, written where it does not exist yet.

    A raw file that already is a canonical PNG in the dataset mode (decoding reports it as
    ``passthrough``) is its own canonical image: both are content addressed by the sha256
    of the same bytes, so its raw key ``images/<sha256>.png`` is used as is. Other images
    are encoded (here from the pixels the workers returned, or by the workers for large
    images) and stored as ``canonical/<sha256>.png``.

    Returns:
        ``(image_key, canonical_mode, channels, converted)`` per record (``None`` for
        records that are not clean) and the number of images converted to ``mode``.
    """
    n = len(raw_keys)
    image_key = np.full(n, None, dtype=object)
    canonical_mode = modes.copy()
    rows = safe_row[clean_rows]
    shas = decoded["canonical_sha"].to_numpy(dtype=object, na_value=None)[rows]
    passthrough = decoded["passthrough"].to_numpy(dtype=bool, na_value=False)[rows]
    pixels = decoded["pixels"].to_numpy(dtype=object)[rows]
    level = config.decode.png_compress_level
    converted = 0
    for position, index in enumerate(clean_rows.tolist()):
        sha = shas[position]
        raw_key = raw_keys[index]
        if modes[index] != mode:
            if pixels[position] is not None:
                source = Image.fromarray(pixels[position])
            elif passthrough[position]:
                source = Image.open(io.BytesIO(storage.read_bytes(raw_key)), formats=["PNG"])
            else:
                source = Image.open(out_dir / f"{sha}.png", formats=["PNG"])
            with source:
                data = encode_png(source.convert(mode), level)
            _, key = storage.write_content_addressed(CANONICAL_PREFIX, data, "png")
            converted += 1
            canonical_mode[index] = mode
            channels[index] = 3 if mode == "RGB" else 1
        elif passthrough[position]:
            key = raw_key if raw_key == f"{IMAGES_PREFIX}/{sha}.png" else None
            if key is None:  # canonical bytes stored under another extension
                _, key = storage.write_content_addressed(CANONICAL_PREFIX, storage.read_bytes(raw_key), "png")
        elif pixels[position] is not None:
            data = encode_png(Image.fromarray(pixels[position]), level)
            _, key = storage.write_content_addressed(CANONICAL_PREFIX, data, "png")
        else:
            key = f"{CANONICAL_PREFIX}/{sha}.png"
            if not storage.is_local:
                storage.write_bytes(key, (out_dir / f"{sha}.png").read_bytes())
        image_key[index] = key
    return image_key, canonical_mode, channels, converted


# Manifest columns with few distinct values; the others (ids, paths, hashes) are mostly
# unique, where Parquet dictionary encoding only costs time.
_DICTIONARY_COLUMNS: list[str] = [
    "batch_id", "label", "outcome", "reason", "split", "format", "mode", "canonical_mode",
]


def _manifest_parquet(manifest: pd.DataFrame) -> bytes:
    """The manifest as Parquet bytes (what ``DataFrame.to_parquet`` writes, read back alike).

    Written through pyarrow directly with dictionary encoding only on the low-cardinality
    columns: about half the time of the pandas defaults on a 20k-row manifest.
    """
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="snappy", use_dictionary=_DICTIONARY_COLUMNS)
    return buffer.getvalue().to_pybytes()


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
    expected = pd.Series(list(input_records) if not isinstance(input_records, pd.Series) else input_records)
    ids = manifest["record_id"]
    # Vectorised checks; the set arithmetic below only runs to describe a failure.
    if ids.duplicated().any():
        raise AccountingError("a record appears more than once in the manifest")
    if len(ids) != len(expected) or expected.duplicated().any() or not _isin(ids, expected).all():
        id_set, expected_set = set(ids.tolist()), set(expected.tolist())
        missing = sorted(expected_set - id_set)[:5]
        extra = sorted(id_set - expected_set)[:5]
        raise AccountingError(f"manifest records differ from the input: missing {missing}, unexpected {extra}")
    outcome = manifest["outcome"]
    if not _isin(outcome, OUTCOMES).all():
        raise AccountingError(f"invalid outcomes: {sorted(set(outcome) - set(OUTCOMES))}")
    is_quarantined = (outcome == "quarantined").to_numpy(dtype=bool)
    if not _present(manifest["reason"][is_quarantined]).all():
        raise AccountingError("a quarantined record has no reason")
    is_clean = (outcome == "clean").to_numpy(dtype=bool)
    clean_split = manifest["split"][is_clean]
    if not _isin(clean_split, SPLITS).all():
        raise AccountingError("a clean record has no split")
    is_duplicate = (outcome == "duplicate").to_numpy(dtype=bool)
    if not _isin(manifest["alias_of"][is_duplicate], manifest["sample_id"][is_clean]).all():
        raise AccountingError("a duplicate is not the alias of a clean sample")
    n_clean, n_duplicates, n_quarantined = int(is_clean.sum()), int(is_duplicate.sum()), int(is_quarantined.sum())
    counts = {"input": len(expected), "clean": n_clean, "duplicates": n_duplicates, "quarantined": n_quarantined}
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

    Decodes each distinct raw file once in worker processes, removes duplicates,
    quarantines what cannot be used, gives every clean sample its canonical PNG
    (``canonical/<sha256>.png``, or the raw ``images/<sha256>.png`` itself when that file
    already is canonical), assigns stable splits, and writes
    ``datasets/<version>/manifest.parquet`` and ``datasets/<version>/dataset.json``.

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
    # One BLAS thread for the whole pass: the decode workers are the parallelism, and
    # switching the count back and forth makes OpenBLAS spin up fresh threads each time.
    with single_threaded_blas():
        return _clean_dataset(storage, raw_manifest, config, workers)


def _clean_dataset(
    storage: ArtifactStorage, raw_manifest: pd.DataFrame, config: CleaningConfig, workers: int | None
) -> CleaningResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    records = raw_manifest[raw_manifest["status"] == "ingested"].reset_index(drop=True)
    if records["record_id"].duplicated().any():
        raise ValueError("raw manifest repeats record ids")
    n = len(records)

    # Distinct keys, sorted, and the decode row of each record (-1: no image_key): all the
    # decoding needs. The rest of the preparation runs while the workers decode.
    unsorted_keys = records["image_key"].to_numpy(dtype=object)
    unsorted_has_key = _present(records["image_key"])
    codes, uniques = pd.factorize(records["image_key"][unsorted_has_key], sort=True)
    # (Through a plain list: iterating an Arrow-backed index boxes each value, ~1 us apiece.)
    keys = [str(key) for key in np.asarray(uniques, dtype=object).tolist()]
    unsorted_row_of = np.full(n, -1, dtype=np.int64)
    unsorted_row_of[unsorted_has_key] = codes
    prepared: dict[str, Any] = {}

    def prepare() -> None:
        """Records in ingestion order (earliest kept among duplicates) and their columns."""
        sort_columns = [c for c in ("ingested_at", "record_id") if c in records.columns]
        order = records.sort_values(sort_columns, kind="stable").index.to_numpy()
        ordered = records.take(order).reset_index(drop=True)
        prepared.update(
            records=ordered,
            raw_keys=unsorted_keys[order],
            row_of=unsorted_row_of[order],
            labels=ordered["label"].to_numpy(dtype=object),
            labelled=_present(ordered["label"]),
            sample_ids=ordered["sample_id"].to_numpy(dtype=object),
            record_ids=ordered["record_id"].to_numpy(dtype=object),
            batch_ids=ordered["batch_id"].to_numpy(dtype=object),
            paths=ordered["path"].to_numpy(dtype=object),
        )

    scratch = None if storage.is_local else default_scratch_dir()
    try:
        items, out_dir = _stage_inputs(storage, keys, scratch)
        decoded, phash_all, compare_all, pool = decode_files(
            items,
            out_dir,
            config.decode,
            workers,
            keep_pixels_up_to=_KEEP_PIXELS_BYTES,
            write_passthrough=False,
            meanwhile=prepare,
        )
        if not prepared:  # no file to decode: the pool did not start
            prepare()
        records = prepared["records"]
        raw_keys = prepared["raw_keys"]
        row_of = prepared["row_of"]
        timings["decode_s"] = time.perf_counter() - started
        mark = time.perf_counter()
        have = row_of >= 0
        safe_row = np.where(have, row_of, 0)

        def pick(name: str) -> Any:
            """One decode column per record: nullable ints/bools stay typed, the rest object."""
            column = decoded[name]
            if isinstance(column.dtype, (pd.Int64Dtype, pd.BooleanDtype)):
                return column.array.take(row_of, allow_fill=True)
            values = column.to_numpy(dtype=object, na_value=None)[safe_row]
            values[~have] = None
            return values

        labels = prepared["labels"]
        labelled = prepared["labelled"]
        ok = np.asarray(decoded["ok"].to_numpy(dtype=bool))[safe_row] & have
        outcome = np.full(n, "quarantined", dtype=object)
        reason = pick("reason")
        detail = pick("reason_detail")
        reason[~have] = REASON_MISSING
        detail[~have] = "record has no image_key"
        reason[ok & ~labelled] = REASON_NO_LABEL
        detail[ok & ~labelled] = "ingested record has no label"
        alias_of = np.full(n, None, dtype=object)

        # Dataset mode from the distinct decodable images.
        eligible = np.nonzero(ok & labelled)[0]
        pixel_hashes = pick("pixel_hash")
        modes = pick("canonical_mode")
        if config.mode is not None:
            mode = config.mode
        else:
            distinct = pd.Series(modes[eligible]).groupby(pd.Series(pixel_hashes[eligible])).first()
            colour_fraction = float((distinct == "RGB").mean()) if len(distinct) else 0.0
            mode = "RGB" if colour_fraction > config.rgb_fraction else "L"

        # Duplicates among eligible records, earliest kept.
        keep, kind = find_duplicates(
            pixel_hashes[eligible].tolist(),
            phash_all[safe_row][eligible],
            compare_all[safe_row][eligible],
            config.near_duplicates,
        )
        sample_ids = prepared["sample_ids"]
        group_label = pd.Series(labels[eligible].astype(str))
        label_count = group_label.groupby(keep).nunique()
        conflict_local = label_count.reindex(keep).to_numpy() > 1
        conflict = eligible[conflict_local]
        reason[conflict] = REASON_LABEL_CONFLICT
        for target in np.unique(keep[conflict_local]).tolist():  # conflicting groups only
            members = conflict_local & (keep == target)
            detail[eligible[members]] = f"duplicates carry labels {sorted(set(group_label[members]))}"
        kept_local = (keep == np.arange(len(keep))) & ~conflict_local
        dup_local = (keep != np.arange(len(keep))) & ~conflict_local
        clean_rows, dup_rows = eligible[kept_local], eligible[dup_local]
        outcome[clean_rows] = "clean"
        reason[clean_rows] = None
        detail[clean_rows] = None
        outcome[dup_rows] = "duplicate"
        reason[dup_rows] = np.asarray(kind, dtype=object)[dup_local]
        detail[dup_rows] = None
        alias_of[dup_rows] = sample_ids[eligible[keep[dup_local]]]
        timings["dedup_s"] = time.perf_counter() - mark
        mark = time.perf_counter()

        # Canonical images in the dataset mode, only for the clean samples.
        image_key, canonical_mode, channels, converted = _canonical_images(
            storage, config, mode, out_dir, clean_rows, decoded, safe_row, raw_keys, modes, pick("channels")
        )
        split = np.full(n, None, dtype=object)
        split[clean_rows] = assign_splits(
            [str(s) for s in sample_ids[clean_rows].tolist()], [str(v) for v in labels[clean_rows].tolist()], config.splits
        )
        timings["canonical_s"] = time.perf_counter() - mark
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    mark = time.perf_counter()
    phash_text = np.full(n, None, dtype=object)
    if ok.any():
        # Big-endian bytes in hex: the zero-padded 16-digit hex of each hash.
        text = phash_all[safe_row][ok].astype(">u8").tobytes().hex()
        phash_text[ok] = [text[i : i + 16] for i in range(0, len(text), 16)]
    label_column = labels.copy()
    label_column[~labelled] = None
    label_column[labelled] = np.array([str(v) for v in labels[labelled].tolist()] + [""], dtype=object)[:-1]
    canonical_mode[~ok] = None
    channels[~ok] = pd.NA
    manifest = pd.DataFrame(
        {
            "record_id": prepared["record_ids"],
            "batch_id": prepared["batch_ids"],
            "path": prepared["paths"],
            "sample_id": sample_ids,
            "label": label_column,
            "outcome": outcome,
            "reason": reason,
            "reason_detail": detail,
            "alias_of": alias_of,
            "split": split,
            "image_key": image_key,
            "raw_image_key": raw_keys,
            "format": pick("format"),
            "mode": pick("mode"),
            "orig_width": pick("orig_width"),
            "orig_height": pick("orig_height"),
            "animated": pick("animated"),
            "orientation": pick("orientation"),
            "canonical_mode": canonical_mode,
            "width": pick("width"),
            "height": pick("height"),
            "channels": channels,
            "aspect_ratio": _floats(pick("aspect_ratio")),
            "brightness": _floats(pick("brightness")),
            "contrast": _floats(pick("contrast")),
            "sharpness": _floats(pick("sharpness")),
            "file_size": pick("file_size"),
            "pixel_hash": pixel_hashes,
            "phash": phash_text,
        },
        columns=list(MANIFEST_COLUMNS),
    )
    counts = check_accounting(manifest, records["record_id"])

    clean = manifest[manifest["outcome"] == "clean"]
    # The canonical key (a hash of the canonical PNG) and the mode are in the version, so a
    # change of mode or normalisation makes a new version instead of rewriting an old one.
    # (From the arrays the manifest was built of: iterating its Arrow-backed columns costs more.)
    version = dataset_version(
        zip(
            sample_ids[clean_rows].tolist(),
            label_column[clean_rows].tolist(),
            split[clean_rows].tolist(),
            image_key[clean_rows].tolist(),
            strict=True,
        ),
        context=f"mode={mode}",
    )
    prefix = f"datasets/{version}"
    manifest_key = f"{prefix}/manifest.parquet"
    dataset_json_key = f"{prefix}/dataset.json"
    # The Parquet encoding and write release the GIL: they run beside the summary below.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cvops-manifest")
    manifest_written = writer.submit(lambda: storage.write_bytes(manifest_key, _manifest_parquet(manifest)))
    writer.shutdown(wait=False)
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
    quarantine_examples = _quarantine_table(manifest, config.quarantine_examples)
    manifest_written.result()  # dataset.json only once its manifest is in place
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
        quarantine_examples=quarantine_examples,
        pool=pool,
        timings=timings,
    )
