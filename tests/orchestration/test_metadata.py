"""Metadata helpers: every domain value becomes something Dagster stores, at one place; tables
are typed, figures rounded floats, column schemas those of the files written; the
optimization-history plot shows every trial."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import MetadataValue, TableMetadataValue
from optuna.trial import TrialState
from PIL import Image

from assets.metadata import (
    arrow_column_type,
    artifact,
    figure,
    json_safe,
    json_value,
    optional_png,
    parquet_table_metadata,
    records_table,
    safe_metadata,
    table,
)


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


def test_typed_table_keeps_numbers_numeric() -> None:
    frame = pd.DataFrame({
        "label": pd.array(["a", None], dtype="str"),
        "count": pd.array([3, None], dtype="Int64"),
        "share": [0.123456789, float("nan")],
        "ok": pd.array([True, None], dtype="boolean"),
    })  # fmt: skip
    value = table(frame)
    assert isinstance(value, TableMetadataValue)
    assert {c.name: c.type for c in value.schema.columns} == {"label": "string", "count": "int", "share": "float", "ok": "bool"}
    first, second = (dict(r.data) for r in value.records)
    assert first == {"label": "a", "count": 3, "share": 0.1235, "ok": True}
    assert type(first["count"]) is int and second == {"label": None, "count": None, "share": None, "ok": None}
    assert len(table(pd.DataFrame({"n": range(30)}), limit=5).records) == 5


def test_records_table_converts_each_cell_to_its_column_type() -> None:
    value = records_table([{"n": np.int64(2), "x": np.float32(0.5), "s": 7}, {"n": None}], {"n": "int", "x": "float", "s": "string"})
    assert [dict(r.data) for r in value.records] == [{"n": 2, "x": 0.5, "s": "7"}, {"n": None, "x": None, "s": None}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.987654321, 0.9877), (np.float32(0.5), 0.5), (3.2e-7 + 1e-12, 3.2e-7), (1234.5678, 1235.0), (None, None), (float("nan"), None), (7, 7.0)],
)
def test_figure_rounds_to_significant_digits(value: object, expected: float | None) -> None:
    out = figure(value)
    assert out == expected and (out is None or type(out) is float)


@pytest.mark.parametrize(
    ("arrow", "expected"),
    [
        (pa.int64(), "int"), (pa.uint8(), "int"), (pa.float64(), "float"), (pa.bool_(), "bool"),
        (pa.large_string(), "string"), (pa.string(), "string"), (pa.dictionary(pa.int32(), pa.string()), "string"),
        (pa.timestamp("us"), "timestamp"), (pa.null(), "null"), (pa.list_(pa.int64()), "list<item: int64>"),
    ],
)  # fmt: skip
def test_arrow_column_types(arrow: pa.DataType, expected: str) -> None:
    assert arrow_column_type(arrow) == expected


def test_parquet_table_metadata_matches_the_written_file(tmp_path: Path) -> None:
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "size": pd.array([1, None], dtype="Int64"), "score": [0.5, 1.5]})
    frame.to_parquet(tmp_path / "m.parquet", index=False)
    metadata = parquet_table_metadata(frame, len(frame), partition=True)
    schema = metadata["dagster/column_schema"].schema
    written = pq.read_schema(tmp_path / "m.parquet")
    assert [(c.name, c.type, c.description) for c in schema.columns] == [
        (f.name, arrow_column_type(f.type), str(f.type)) for f in written
    ]
    assert [c.type for c in schema.columns] == ["string", "int", "float"]
    assert metadata["dagster/row_count"] == metadata["dagster/partition_row_count"] == 2


def test_artifact_is_a_path_locally_and_a_url_on_s3() -> None:
    assert artifact("/data/x.parquet") == MetadataValue.path("/data/x.parquet")
    assert artifact("s3://bucket/x.parquet") == MetadataValue.url("s3://bucket/x.parquet")


def test_optional_png_degrades_to_nothing_with_a_warning() -> None:
    warnings: list[str] = []
    log = type("Log", (), {"warning": lambda self, m: warnings.append(m)})()

    def broken() -> None:
        raise MemoryError("too big")

    assert optional_png(broken, "sample_thumbnails", log) == {}
    assert warnings == ["no sample_thumbnails: MemoryError: too big"]
    assert optional_png(lambda: None, "sample_thumbnails", log) == {}


def _study_with_every_state() -> optuna.Study:
    """An in-memory study: complete, pruned (after 2 reports), failed (after 1) and complete trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    plan = [("complete", [0.5, 0.7, 0.8]), ("pruned", [0.3, 0.35]), ("fail", [0.2]), ("complete", [0.6, 0.9, 0.95])]
    for state, values in plan:
        trial = study.ask()
        for step, value in enumerate(values):
            trial.report(value, step)
        if state == "complete":
            study.tell(trial, values[-1])
        else:
            study.tell(trial, state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL)
    return study


def test_history_points_show_every_trial_with_integer_numbers() -> None:
    from cvops_dagster.training.evaluation import optimization_history_png
    from cvops_dagster.training.tuning import history_points

    points = history_points(_study_with_every_state().trials)
    assert [(p.number, p.state, p.value) for p in points] == [
        (0, "complete", 0.8), (1, "pruned", 0.35), (2, "fail", None), (3, "complete", 0.95)
    ]  # fmt: skip
    assert all(type(p.number) is int for p in points)
    assert points[1].intermediate == ((0, 0.3), (1, 0.35))  # drawn, and the pruned value is its last report
    assert all(type(step) is int for p in points for step, _ in p.intermediate)
    png = optimization_history_png(points)
    assert png.startswith(b"\x89PNG") and len(png) < 20_000
    with Image.open(io.BytesIO(png)) as image:
        assert image.width <= 600 and image.height <= 260  # 7 x 2.8 inches at 72 dpi, trimmed
    assert history_points([]) == [] and optimization_history_png([]).startswith(b"\x89PNG")
