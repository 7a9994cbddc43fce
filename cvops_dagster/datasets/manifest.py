"""The cleaned manifest: its columns and types, its Parquet file, and the accounting check.

``datasets/<version>/manifest.parquet`` holds one row per ingested raw record (the contract
is in docs/contracts.md). Its column types are fixed whatever one dataset holds: text is
pandas ``str``, counts and sizes ``Int64``, ``animated`` ``boolean``, the features
``float64``; missing values are nulls. :func:`check_accounting` proves from the file alone
that every input record has exactly one valid outcome.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cvops_dagster.core.contracts import OUTCOMES, SPLITS

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

_INT_COLUMNS = ("orig_width", "orig_height", "orientation", "width", "height", "channels", "file_size")
_FLOAT_COLUMNS = ("aspect_ratio", "brightness", "contrast", "sharpness")
# Columns with few distinct values; the others (ids, paths, hashes) are mostly unique, where
# Parquet dictionary encoding only costs time.
_DICTIONARY_COLUMNS = ["batch_id", "label", "outcome", "reason", "split", "format", "mode", "canonical_mode"]


class AccountingError(RuntimeError):
    """Some input record has no outcome, several, or counts do not add up."""


@cache
def manifest_schema() -> pa.Schema:
    """The manifest's Arrow schema, with the pandas metadata of its dtypes.

    ``read_parquet`` and :attr:`CleaningResult.manifest` give these dtypes back, whatever
    the values of one dataset (an all-empty column included).
    """
    dtypes = {name: "str" for name in MANIFEST_COLUMNS}
    dtypes.update({name: "Int64" for name in _INT_COLUMNS})
    dtypes.update({name: "float64" for name in _FLOAT_COLUMNS})
    dtypes["animated"] = "boolean"
    frame = pd.DataFrame({name: pd.Series([], dtype=dtypes[name]) for name in MANIFEST_COLUMNS})
    return pa.Schema.from_pandas(frame, preserve_index=False)


def manifest_table(columns: dict[str, Any]) -> pa.Table:
    """The manifest as an Arrow table of :func:`manifest_schema`.

    Args:
        columns: every manifest column, as a pandas series or array-like, one entry per
            record; missing values (``None``, NaN, ``pd.NA``) become nulls, and text
            columns take other values (an integer batch id, say) as their ``str``.
    """
    schema = manifest_schema()
    return pa.Table.from_arrays([_column_array(f.name, columns[f.name], f.type) for f in schema], schema=schema)


def _column_array(name: str, values: Any, kind: pa.DataType) -> pa.Array:
    """One column as an Arrow array of type ``kind`` (NaN, ``None`` and ``pd.NA`` are nulls)."""
    try:
        return pa.array(values, type=kind, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise
    # Text columns holding other values (an integer batch id): their str, value by value.
    return pa.array([None if _missing(v) else str(v) for v in list(values)], type=kind)


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def manifest_parquet(manifest: pa.Table) -> bytes:
    """The manifest as Parquet bytes (read back by ``pandas.read_parquet`` with its dtypes)."""
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
    ids = manifest["record_id"].tolist()
    if len(set(ids)) != len(ids):
        raise AccountingError("a record appears more than once in the manifest")
    if len(ids) != len(expected) or len(set(expected)) != len(expected) or set(ids) != set(expected):
        missing_ids = sorted(map(str, set(expected) - set(ids)))[:5]
        extra = sorted(map(str, set(ids) - set(expected)))[:5]
        raise AccountingError(f"manifest records differ from the input: missing {missing_ids}, unexpected {extra}")
    outcome = manifest["outcome"]
    invalid = ~outcome.isin(OUTCOMES)
    if invalid.any():
        raise AccountingError(f"invalid outcomes: {sorted(map(str, set(outcome[invalid])))}")
    quarantined, clean, duplicate = (outcome == "quarantined"), (outcome == "clean"), (outcome == "duplicate")
    if not _present(manifest["reason"][quarantined]).all():
        raise AccountingError("a quarantined record has no reason")
    if not manifest["split"][clean].isin(SPLITS).all():
        raise AccountingError("a clean record has no split")
    # Python sets: pandas' isin on Arrow-backed text makes a pyarrow scalar of every value it
    # looks for (~0.4 s for 60k clean samples). Missing values are one value, as isin has them.
    clean_ids = {None if _missing(v) else v for v in manifest["sample_id"][clean].tolist()}
    if not all((None if _missing(v) else v) in clean_ids for v in manifest["alias_of"][duplicate].tolist()):
        raise AccountingError("a duplicate is not the alias of a clean sample")
    counts = {
        "input": len(expected),
        "clean": int(clean.sum()),
        "duplicates": int(duplicate.sum()),
        "quarantined": int(quarantined.sum()),
    }
    if counts["clean"] + counts["duplicates"] + counts["quarantined"] != counts["input"]:
        raise AccountingError(f"outcomes do not add up to the input: {counts}")
    return counts


def _present(values: pd.Series) -> pd.Series:
    """Per value: not missing and not blank text."""
    return values.notna() & (values.astype(object).map(str).str.strip() != "")


def quarantine_examples(manifest: pd.DataFrame, per_reason: int) -> pd.DataFrame:
    """Reason, count and the first ``per_reason`` example records of each quarantine reason."""
    quarantined = manifest[manifest["outcome"] == "quarantined"]
    table = []
    for reason, group in sorted(quarantined.groupby("reason", sort=False), key=lambda item: str(item[0])):
        for _, row in group.head(per_reason).iterrows():
            table.append(
                {
                    "reason": reason,
                    "count": len(group),
                    "record_id": row["record_id"],
                    "path": row["path"],
                    "detail": None if pd.isna(row["reason_detail"]) else row["reason_detail"],
                }
            )
    return pd.DataFrame(table, columns=["reason", "count", "record_id", "path", "detail"])


def class_breakdown(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per label: clean samples per split, duplicates, quarantined, and its share of the clean set.

    Rows without a label are counted under ``(none)``; labels sorted by name.
    """
    labels = manifest["label"].astype(object).where(manifest["label"].notna(), "(none)").map(str)
    clean = manifest["outcome"] == "clean"
    columns: dict[str, pd.Series] = {"clean": clean}
    columns.update({split: clean & (manifest["split"] == split).fillna(False) for split in SPLITS})
    columns.update(duplicates=manifest["outcome"] == "duplicate", quarantined=manifest["outcome"] == "quarantined")
    counts = pd.DataFrame({name: flags.astype("int64").to_numpy() for name, flags in columns.items()}, index=labels.to_numpy())
    table = counts.groupby(level=0, sort=True).sum().rename_axis("label").reset_index()
    total = int(table["clean"].sum())
    table["share"] = (table["clean"] / total) if total else 0.0
    return table


def quarantine_breakdown(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per quarantine reason: files, how many of them decoded, and the first example's path and detail."""
    quarantined = manifest[manifest["outcome"] == "quarantined"]
    rows = []
    for reason, group in sorted(quarantined.groupby("reason", sort=False, dropna=False), key=lambda item: str(item[0])):
        first = group.iloc[0]
        rows.append({
            "reason": None if pd.isna(reason) else str(reason),
            "files": len(group),
            "decoded": int(group["width"].notna().sum()),
            "example": first["path"],
            "detail": None if pd.isna(first["reason_detail"]) else first["reason_detail"],
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=["reason", "files", "decoded", "example", "detail"])
    return frame.astype({"files": "int64", "decoded": "int64"})


def most_common_size(heights: np.ndarray, widths: np.ndarray) -> list[int] | None:
    """The most frequent (height, width); ties go to the one met first."""
    if not len(heights):
        return None
    pairs = np.stack([heights, widths], axis=1)
    unique, first, counts = np.unique(pairs, axis=0, return_index=True, return_counts=True)
    best = np.flatnonzero(counts == counts.max())
    return [int(v) for v in unique[best[np.argmin(first[best])]].tolist()]
