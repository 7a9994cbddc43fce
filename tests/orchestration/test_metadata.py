"""Metadata helpers: every domain value becomes something Dagster stores, at one place."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import MetadataValue

from assets.metadata import json_safe, json_value, safe_metadata


@dataclasses.dataclass
class Figure:
    name: str
    value: np.float32


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.int64(3), 3),
        (np.float32(0.5), 0.5),
        (np.bool_(True), True),
        (float("nan"), None),
        (np.float64("inf"), None),
        (pd.NA, None),
        (pd.NaT, None),
        (np.array([[1, 2], [3, 4]], dtype=np.uint8), [[1, 2], [3, 4]]),
        ({1: np.int32(2), "k": (np.float64(1.5), None)}, {"1": 2, "k": [1.5, None]}),
        ({"b", "a"}, ["a", "b"]),
        (Path("/x/y.parquet"), "/x/y.parquet"),
        (dt.datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05"),
        (Figure("acc", np.float32(0.25)), {"name": "acc", "value": 0.25}),
    ],
)
def test_json_safe(value: object, expected: object) -> None:
    plain = json_safe(value)
    assert plain == expected
    json.dumps(plain, allow_nan=False)  # strict JSON


def test_safe_metadata_keeps_metadata_values_and_wraps_structures() -> None:
    table = MetadataValue.md("# plot")
    out = safe_metadata({"n": np.int64(4), "ratio": np.float64(0.5), "plot": table, "classes": {"a": np.int64(1)}, "none": None})
    assert out["n"] == 4 and type(out["n"]) is int
    assert out["plot"] is table
    assert out["classes"] == MetadataValue.json({"a": 1})
    assert out["none"] == MetadataValue.null()


def test_json_value_of_nothing_is_null() -> None:
    assert json_value(None) == MetadataValue.null()
    assert json_value([np.int8(1)]) == MetadataValue.json([1])
