"""Raw batches -> one cleaned, deduplicated, split and versioned dataset.

:func:`clean_dataset` is the one entry point. For every ingested raw record (see the raw
manifest contract in docs/contracts.md) it decides exactly one outcome:

- ``clean``: decoded, normalised to the dataset's canonical PNG, assigned a split;
- ``duplicate``: the same pixels (``exact``) or nearly the same image (``near``) as a clean
  sample with the same label, recorded as an alias of it (``alias_of``);
- ``quarantined``: with a reason (decoder reasons from :mod:`cvops_dagster.imaging.decoding`,
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
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from cvops_dagster.imaging.decoding import (
    NORMALISATION_POLICY,
    REASON_MISSING,
    DecodeConfig,
    DecodeOutput,
    PoolStats,
    decode_pool,
    default_scratch_dir,
    encode_png,
    pin_single_threaded_blas,
)
from cvops_dagster.datasets.duplicates import NearDuplicateConfig, find_duplicates
from cvops_dagster.core.contracts import CANONICAL_PREFIX, DATASETS_PREFIX, IMAGES_PREFIX, OUTCOMES, SPLITS
from cvops_dagster.datasets.splits import SplitConfig, assign_splits, dataset_version
from cvops_dagster.core.storage import ArtifactStorage, is_valid_key

logger = logging.getLogger(__name__)

REASON_NO_LABEL = "no_label"
REASON_LABEL_CONFLICT = "label_conflict"

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
        manifest_table: one row per ingested record (columns :data:`MANIFEST_COLUMNS`),
            what manifest.parquet holds; :attr:`manifest` is the same as a pandas frame.
        manifest_key, dataset_json_key: where they were written in the storage.
        dataset_info: the content of dataset.json.
        quarantine_examples: reason, count and a few example records per reason.
        pool: decode pool statistics; ``timings``: seconds per phase.
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
        }


# Decoded images up to this size that are not canonical PNGs already come back from the
# workers as pixels and are encoded here only if they end up clean (duplicates never need a
# canonical file). Larger ones are encoded by the workers, in parallel.
_KEEP_PIXELS_BYTES = 64 * 64 * 3


# storage.is_valid_key's rule as an RE2 pattern ("$" is the end of the text in RE2).
_BAD_KEY = r"^$|^/|//|/$|\\|(?:^|/)\.\.?(?:/|$)"


def _first_invalid_key(keys: list[str]) -> str | None:
    """The first key :func:`~cvops_dagster.core.storage.is_valid_key` rejects, if any.

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


def _present_values(values: np.ndarray) -> np.ndarray:
    """Per entry of an object array: not missing and not blank text (vectorised
    :func:`_is_blank`, in Arrow's C code for text)."""
    try:
        array = pa.array(values, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        array = None
    if array is not None and (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        present = pc.not_equal(pc.utf8_trim_whitespace(array), "").fill_null(False)
        return np.asarray(present.to_numpy(zero_copy_only=False), dtype=bool)
    return np.fromiter((not _is_blank(v) for v in values.tolist()), dtype=bool, count=len(values))


def _column(frame: pd.DataFrame, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    """A column as an object array with ``None`` for missing values (all ``None`` if absent)."""
    if name not in frame.columns:
        return np.full(len(frame) if rows is None else len(rows), None, dtype=object)
    values = frame[name].to_numpy(dtype=object, na_value=None)
    return values if rows is None else values[rows]


def _ingestion_order(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Row order by ingestion time, then record id (stable; missing values last)."""
    names = [name for name in ("ingested_at", "record_id") if name in columns]
    n = len(columns["record_id"])
    if not names:
        return np.arange(n, dtype=np.int64)
    try:
        table = pa.table({name: pa.array(columns[name], from_pandas=True) for name in names})
        indices = pc.sort_indices(table, sort_keys=[(name, "ascending") for name in names])  # nulls last (the default)
        return np.asarray(indices.to_numpy(), dtype=np.int64)
    except (pa.ArrowException, TypeError, ValueError):  # mixed types in a column
        frame = pd.DataFrame({name: pd.Series(columns[name], dtype=object) for name in names})
        return frame.sort_values(names, kind="stable").index.to_numpy(dtype=np.int64)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value is pd.NaT


def _is_blank(value: Any) -> bool:
    return _is_missing(value) or pd.isna(value) or not str(value).strip()


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
    decoded: DecodeOutput,
    row_of: np.ndarray,
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
    rows = row_of[clean_rows]  # clean records all have a decoded row
    shas = decoded.objects["canonical_sha"][rows]
    passthrough = decoded.numbers["passthrough"][rows]
    pixels = decoded.pixels[rows]
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


_INT_MANIFEST_COLUMNS = ("orig_width", "orig_height", "orientation", "width", "height", "channels", "file_size")
_FLOAT_MANIFEST_COLUMNS = ("aspect_ratio", "brightness", "contrast", "sharpness")


@cache
def _manifest_schema() -> pa.Schema:
    """The manifest's Arrow schema, with the pandas metadata of its dtypes.

    Text is pandas' ``str``, counts ``Int64``, ``animated`` ``boolean``, measures ``float64``
    (missing values are nulls): ``read_parquet`` and :attr:`CleaningResult.manifest` give
    these dtypes back, whatever the values of one dataset (an all-empty column included).
    """
    dtypes = {name: "str" for name in MANIFEST_COLUMNS}
    dtypes.update({name: "Int64" for name in _INT_MANIFEST_COLUMNS})
    dtypes.update({name: "float64" for name in _FLOAT_MANIFEST_COLUMNS})
    dtypes["animated"] = "boolean"
    frame = pd.DataFrame({name: pd.Series([], dtype=dtypes[name]) for name in MANIFEST_COLUMNS})
    return pa.Schema.from_pandas(frame, preserve_index=False)


def _manifest_array(name: str, values: Any) -> pa.Array:
    """One manifest column as an Arrow array of its schema type (``None``/NaN are nulls).

    Text columns take other values (an integer batch id, say) as their ``str``.
    """
    if isinstance(values, pa.Array):
        return values
    kind = _manifest_schema().field(name).type
    try:
        return pa.array(values, type=kind, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise
        return pa.array([None if _is_missing(v) else str(v) for v in list(values)], type=kind)


def _manifest_table(columns: dict[str, Any]) -> pa.Table:
    """The manifest as an Arrow table, straight from its column arrays (no pandas frame)."""
    schema = _manifest_schema()
    return pa.Table.from_arrays([_manifest_array(f.name, columns[f.name]) for f in schema], schema=schema)


def _manifest_parquet(manifest: pa.Table) -> bytes:
    """The manifest as Parquet bytes (read back by ``pandas.read_parquet`` with its dtypes).

    Dictionary encoding only on the low-cardinality columns: about half the time of the
    pandas defaults on a 20k-row manifest.
    """
    buffer = pa.BufferOutputStream()
    pq.write_table(manifest, buffer, compression="snappy", use_dictionary=_DICTIONARY_COLUMNS)
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
    expected = input_records.tolist() if isinstance(input_records, pd.Series) else list(input_records)
    required = ("record_id", "outcome", "reason", "split", "alias_of", "sample_id")
    missing = [c for c in required if c not in manifest.columns]
    if missing:
        raise AccountingError(f"manifest lacks the columns {missing}")
    return _account(
        _column(manifest, "record_id"),
        expected,
        _column(manifest, "outcome"),
        _column(manifest, "reason"),
        _column(manifest, "split"),
        _column(manifest, "alias_of"),
        _column(manifest, "sample_id"),
    )


def _account(
    record_ids: np.ndarray,
    expected: list[Any],
    outcome: np.ndarray,
    reason: np.ndarray,
    split: np.ndarray,
    alias_of: np.ndarray,
    sample_ids: np.ndarray,
) -> dict[str, int]:
    """:func:`check_accounting` on the manifest's columns (object arrays)."""
    ids = record_ids.tolist()
    id_set = set(ids)
    if len(id_set) != len(ids):
        raise AccountingError("a record appears more than once in the manifest")
    expected_set = set(expected)
    if len(ids) != len(expected) or len(expected_set) != len(expected) or id_set != expected_set:
        missing = sorted(map(str, expected_set - id_set))[:5]
        extra = sorted(map(str, id_set - expected_set))[:5]
        raise AccountingError(f"manifest records differ from the input: missing {missing}, unexpected {extra}")
    is_clean = outcome == "clean"
    is_duplicate = outcome == "duplicate"
    is_quarantined = outcome == "quarantined"
    if not (is_clean | is_duplicate | is_quarantined).all():
        invalid = {str(v) for v in outcome[~(is_clean | is_duplicate | is_quarantined)].tolist()}
        raise AccountingError(f"invalid outcomes: {sorted(invalid)}")
    if not _present_values(reason[is_quarantined]).all():
        raise AccountingError("a quarantined record has no reason")
    if not set(split[is_clean].tolist()) <= set(SPLITS):
        raise AccountingError("a clean record has no split")
    if not set(alias_of[is_duplicate].tolist()) <= set(sample_ids[is_clean].tolist()):
        raise AccountingError("a duplicate is not the alias of a clean sample")
    n_clean, n_duplicates, n_quarantined = int(is_clean.sum()), int(is_duplicate.sum()), int(is_quarantined.sum())
    counts = {"input": len(expected), "clean": n_clean, "duplicates": n_duplicates, "quarantined": n_quarantined}
    if counts["clean"] + counts["duplicates"] + counts["quarantined"] != counts["input"]:
        raise AccountingError(f"outcomes do not add up to the input: {counts}")
    return counts


def _quarantine_table(
    reason: np.ndarray, record_ids: np.ndarray, paths: np.ndarray, detail: np.ndarray, rows: np.ndarray, per_reason: int
) -> pd.DataFrame:
    """Reason, count and the first ``per_reason`` example records of each quarantine reason."""
    by_reason: dict[str, list[int]] = {}
    for row, value in zip(rows.tolist(), reason[rows].tolist(), strict=True):
        by_reason.setdefault(value, []).append(row)
    table = []
    for value in sorted(by_reason, key=str):
        members = by_reason[value]
        for row in members[:per_reason]:
            table.append(
                {
                    "reason": value,
                    "count": len(members),
                    "record_id": record_ids[row],
                    "path": paths[row],
                    "detail": detail[row],
                }
            )
    return pd.DataFrame(table, columns=["reason", "count", "record_id", "path", "detail"])


def _most_common_size(heights: np.ndarray, widths: np.ndarray) -> list[int] | None:
    """The most frequent (height, width); ties go to the one met first."""
    if not len(heights):
        return None
    pairs = np.stack([heights, widths], axis=1)
    unique, first, counts = np.unique(pairs, axis=0, return_index=True, return_counts=True)
    best = np.flatnonzero(counts == counts.max())
    return [int(v) for v in unique[best[np.argmin(first[best])]].tolist()]


def _sorted_counts(values: list[Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values).items(), key=lambda item: str(item[0]))}


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

    numpy's BLAS is left at one thread in this process afterwards (see
    :func:`~cvops_dagster.imaging.decoding.pin_single_threaded_blas`).

    Returns:
        The result, with :meth:`CleaningResult.summary` for status reporting.

    Raises:
        AccountingError: the outcomes do not account for every ingested record.
        ValueError: the raw manifest repeats a record id.
    """
    # One BLAS thread from here on: the decode workers are the parallelism, and every
    # switch back to more threads makes OpenBLAS spin up fresh threads (see there).
    pin_single_threaded_blas()
    return _clean_dataset(storage, raw_manifest, config, workers)


_RECORD_COLUMNS = ("record_id", "batch_id", "path", "label", "sample_id", "image_key", "ingested_at")


def _clean_dataset(
    storage: ArtifactStorage, raw_manifest: pd.DataFrame, config: CleaningConfig, workers: int | None
) -> CleaningResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    # The ingested records' columns as object arrays: every per-record step below is numpy
    # or plain Python on these, never a DataFrame operation (each costs ~0.1-1 ms).
    ingested = np.flatnonzero(_column(raw_manifest, "status") == "ingested")
    columns = {name: _column(raw_manifest, name, ingested) for name in _RECORD_COLUMNS if name in raw_manifest.columns}
    for name in ("record_id", "batch_id", "path", "label", "sample_id", "image_key"):
        columns.setdefault(name, np.full(len(ingested), None, dtype=object))
    input_ids = columns["record_id"].tolist()
    if len(set(input_ids)) != len(input_ids):
        raise ValueError("raw manifest repeats record ids")
    n = len(ingested)

    # Distinct keys, sorted, and the decode row of each record (-1: no image_key): all the
    # decoding needs. The rest of the preparation runs while the workers decode.
    unsorted_keys = columns["image_key"]
    unsorted_has_key = _present_values(unsorted_keys)
    keys = sorted({str(key) for key in unsorted_keys[unsorted_has_key].tolist()})
    row_of_key = {key: row for row, key in enumerate(keys)}
    unsorted_row_of = np.full(n, -1, dtype=np.int64)
    unsorted_row_of[unsorted_has_key] = [row_of_key[str(key)] for key in unsorted_keys[unsorted_has_key].tolist()]
    prepared: dict[str, Any] = {}

    def prepare() -> None:
        """Records in ingestion order (earliest kept among duplicates) and their columns."""
        order = _ingestion_order(columns)
        prepared.update({name: values[order] for name, values in columns.items()})
        labelled = _present_values(prepared["label"])
        label_texts = [str(v) for v in prepared["label"][labelled].tolist()]
        label_column = np.full(n, None, dtype=object)
        label_column[labelled] = np.array([*label_texts, ""], dtype=object)[:-1]  # ("": keep it 1-D)
        # The split of every labelled record (a function of its id and label); the clean
        # ones' are picked once duplicates are known.
        split_all = np.full(n, None, dtype=object)
        split_all[labelled] = assign_splits(
            [str(s) for s in prepared["sample_id"][labelled].tolist()], label_texts, config.splits
        )
        raw_keys = unsorted_keys[order]
        # The manifest's per-record columns as Arrow arrays, made now rather than after.
        arrow = {
            name: _manifest_array(name, values)
            for name, values in (
                ("record_id", prepared["record_id"]),
                ("batch_id", prepared["batch_id"]),
                ("path", prepared["path"]),
                ("sample_id", prepared["sample_id"]),
                ("label", label_column),
                ("raw_image_key", raw_keys),
            )
        }
        prepared.update(
            raw_keys=raw_keys,
            row_of=unsorted_row_of[order],
            labelled=labelled,
            split_all=split_all,
            label_column=label_column,
            arrow=arrow,
        )

    scratch = None if storage.is_local else default_scratch_dir()
    try:
        items, out_dir = _stage_inputs(storage, keys, scratch)
        decoded = decode_pool(
            items,
            out_dir,
            config.decode,
            workers,
            keep_pixels_up_to=_KEEP_PIXELS_BYTES,
            write_passthrough=False,
            meanwhile=prepare,
        )
        if not prepared:  # no file to decode: the pool started no worker
            prepare()
        raw_keys = prepared["raw_keys"]
        row_of = prepared["row_of"]
        timings["decode_s"] = time.perf_counter() - started
        mark = time.perf_counter()
        have = row_of >= 0

        def pick(name: str) -> Any:
            """One decode column per record (see DecodeOutput.column)."""
            return decoded.column(name, row_of)

        labelled = prepared["labelled"]
        ok = pick("ok")
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
            distinct = dict(zip(pixel_hashes[eligible].tolist()[::-1], modes[eligible].tolist()[::-1], strict=True))
            colour_fraction = sum(m == "RGB" for m in distinct.values()) / len(distinct) if distinct else 0.0
            mode = "RGB" if colour_fraction > config.rgb_fraction else "L"

        # Duplicates among eligible records, earliest kept.
        keep, kind = find_duplicates(
            pixel_hashes[eligible].tolist(),
            decoded.phash[row_of[eligible]],
            decoded.compare[row_of[eligible]],
            config.near_duplicates,
        )
        sample_ids = prepared["sample_id"]
        group_labels = prepared["label_column"][eligible]  # eligible records are labelled
        # A group conflicts when its (group, label) pairs are not all one pair.
        label_code: dict[str, int] = {}
        codes = np.fromiter(
            (label_code.setdefault(v, len(label_code)) for v in group_labels.tolist()), np.int64, len(keep)
        )
        pairs = np.unique(keep * max(len(label_code), 1) + codes)
        labels_per_group = np.bincount(pairs // max(len(label_code), 1), minlength=len(keep))
        conflict_local = labels_per_group[keep] > 1
        conflict = eligible[conflict_local]
        reason[conflict] = REASON_LABEL_CONFLICT
        for target in np.unique(keep[conflict_local]).tolist():  # conflicting groups only
            members = conflict_local & (keep == target)
            detail[eligible[members]] = f"duplicates carry labels {sorted(set(group_labels[members].tolist()))}"
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
            storage, config, mode, out_dir, clean_rows, decoded, row_of, raw_keys, modes, pick("channels")
        )
        split = np.full(n, None, dtype=object)
        split[clean_rows] = prepared["split_all"][clean_rows]
        timings["canonical_s"] = time.perf_counter() - mark
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    mark = time.perf_counter()
    phash_text = np.full(n, None, dtype=object)
    if ok.any():
        # Big-endian bytes in hex: the zero-padded 16-digit hex of each hash.
        text = decoded.phash[row_of[ok]].astype(">u8").tobytes().hex()
        phash_text[ok] = [text[i : i + 16] for i in range(0, len(text), 16)]
    label_column = prepared["label_column"]
    arrow = prepared["arrow"]
    canonical_mode[~ok] = None
    channels[~ok] = pd.NA
    record_ids = prepared["record_id"]
    paths = prepared["path"]
    batch_ids = prepared["batch_id"]
    width, height = pick("width"), pick("height")
    manifest = _manifest_table(
        {
            "record_id": arrow["record_id"],
            "batch_id": arrow["batch_id"],
            "path": arrow["path"],
            "sample_id": arrow["sample_id"],
            "label": arrow["label"],
            "outcome": outcome,
            "reason": reason,
            "reason_detail": detail,
            "alias_of": alias_of,
            "split": split,
            "image_key": image_key,
            "raw_image_key": arrow["raw_image_key"],
            "format": pick("format"),
            "mode": pick("mode"),
            "orig_width": pick("orig_width"),
            "orig_height": pick("orig_height"),
            "animated": pick("animated"),
            "orientation": pick("orientation"),
            "canonical_mode": canonical_mode,
            "width": width,
            "height": height,
            "channels": channels,
            "aspect_ratio": pick("aspect_ratio"),
            "brightness": pick("brightness"),
            "contrast": pick("contrast"),
            "sharpness": pick("sharpness"),
            "file_size": pick("file_size"),
            "pixel_hash": pixel_hashes,
            "phash": phash_text,
        }
    )
    # The accounting check and the summary read the arrays the manifest was built of:
    # filtering its Arrow-backed columns costs ~1 ms an operation.
    counts = _account(record_ids, input_ids, outcome, reason, split, alias_of, sample_ids)

    # The canonical key (a hash of the canonical PNG) and the mode are in the version, so a
    # change of mode or normalisation makes a new version instead of rewriting an old one.
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
    prefix = f"{DATASETS_PREFIX}/{version}"
    manifest_key = f"{prefix}/manifest.parquet"
    dataset_json_key = f"{prefix}/dataset.json"
    # Written here, not in a thread beside the summary: the summary is Python holding the
    # GIL, and each hand-over to a writer thread can wait out the 5 ms switch interval
    # (measured: ~10 ms waiting for a 2.4 ms encoding on the sample data).
    storage.write_bytes(manifest_key, _manifest_parquet(manifest))
    duplicate_reasons = reason[outcome == "duplicate"]
    counts["exact_duplicates"] = int((duplicate_reasons == "exact").sum())
    counts["near_duplicates"] = int((duplicate_reasons == "near").sum())
    clean_labels = label_column[clean_rows].tolist()
    clean_splits = split[clean_rows]
    quarantined = np.flatnonzero(outcome == "quarantined")
    dataset_info = {
        "version": version,
        "mode": mode,
        "channels": 3 if mode == "RGB" else 1,
        "labels": sorted(set(clean_labels)),
        "image_size": _most_common_size(
            np.asarray(height[clean_rows], dtype=np.int64), np.asarray(width[clean_rows], dtype=np.int64)
        ),
        "counts": counts,
        "splits": {s: int((clean_splits == s).sum()) for s in SPLITS},
        "classes": _sorted_counts(clean_labels),
        "quarantine_reasons": _sorted_counts(reason[quarantined].tolist()),
        "batches": sorted({str(b) for b in batch_ids.tolist()}),
        "mode_rule": f"RGB if more than {config.rgb_fraction:.0%} of distinct decodable images are colour, else L"
        if config.mode is None
        else f"forced {config.mode}",
        "image_size_rule": "most common canonical (height, width) of the clean samples; images are not resized",
        "normalisation": dict(NORMALISATION_POLICY),
        "config": config.to_dict(),
    }
    quarantine_examples = _quarantine_table(reason, record_ids, paths, detail, quarantined, config.quarantine_examples)
    # dataset.json last: a version whose dataset.json exists has its manifest in place.
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
        manifest_table=manifest,
        manifest_key=manifest_key,
        dataset_json_key=dataset_json_key,
        dataset_info=dataset_info,
        quarantine_examples=quarantine_examples,
        pool=decoded.stats,
        timings=timings,
    )
