"""Helpers that turn domain results into Dagster metadata the UI renders well.

Every asset and check passes its metadata through :func:`safe_metadata`, the one place where
domain values (NumPy scalars and arrays, pandas missing values, paths, dates, dataclasses)
become values Dagster can store, so no figure can fail a run for being "not JSON
serializable".

What a user sees on an asset page is built here too:

- measured numbers as floats rounded to 4 significant digits (:func:`figure`), which the UI's
  Plots tab charts across materializations;
- tables with typed columns (:func:`table`, :func:`records_table`): int, float, bool, string;
- ``dagster/column_schema`` and ``dagster/row_count`` of every Parquet file an asset writes,
  derived from the Arrow schema it was written with (:func:`parquet_table_metadata`);
- ``uri`` of each artifact: a local path or an ``s3://`` URL (:func:`artifact`);
- inline PNGs (plots, sample thumbnails); a figure that cannot be drawn is left out with a
  warning, never a failed step (:func:`optional_png`);
- the owners of every asset (:data:`ASSET_OWNERS`, ``CVOPS_ASSET_OWNERS``).

Descriptions are Markdown: a path with placeholders goes in backticks (`images/<sha256>.<ext>`),
else the UI would take ``<sha256>`` for an HTML tag and drop it.
"""

import base64
import dataclasses
import datetime as dt
import enum
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from dagster import MetadataValue, TableColumn, TableMetadataValue, TableRecord, TableSchema

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.manifest import class_breakdown, quarantine_breakdown
from cvops_dagster.datasets.thumbnails import class_thumbnails, quarantine_thumbnails
from cvops_dagster.imaging.policy import DecodeConfig
from resources.catalog import asset_owners_from_env

#: Owners of every asset (``CVOPS_ASSET_OWNERS``, read once when the code location loads).
ASSET_OWNERS: list[str] = asset_owners_from_env()


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON data: dicts with string keys, lists, str, int, float, bool, None.

    NumPy scalars become Python numbers, arrays lists, missing values (None, NaN, NA, NaT) and
    infinities ``None`` (JSON has neither), paths strings, dates ISO strings, dataclasses
    dicts; anything else its ``str``.
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset, np.ndarray, pd.Series)):
        items = obj.tolist() if isinstance(obj, (np.ndarray, pd.Series)) else obj
        items = sorted(items, key=str) if isinstance(obj, (set, frozenset)) else items
        return [json_safe(v) for v in items]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if isinstance(obj, enum.Enum):
        return json_safe(obj.value)
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    if isinstance(obj, PurePath):
        return str(obj)
    return str(obj)


def safe_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata Dagster always accepts: MetadataValues kept, scalars made plain, structures JSON."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, MetadataValue):
            out[key] = value
            continue
        plain = json_safe(value)
        if isinstance(plain, (dict, list)):
            out[key] = MetadataValue.json(plain)
        elif plain is None:
            out[key] = MetadataValue.null()
        else:
            out[key] = plain
    return out


def png_markdown(png: bytes, alt: str, caption: str = "") -> MetadataValue:
    """An inline PNG (a plot, thumbnails), shown by the UI in the metadata panel."""
    encoded = base64.b64encode(png).decode()
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})" + (f"\n\n{caption}" if caption else ""))


def figure(value: Any, digits: int = 4) -> float | None:
    """A measured number as a float rounded to ``digits`` significant digits (None stays None).

    Significant digits, not decimals, so tiny figures (a parity difference of 1e-7) survive;
    the Plots tab charts any float across materializations.
    """
    plain = json_safe(value)
    if plain is None or isinstance(plain, bool) or not isinstance(plain, (int, float)):
        return None
    return float(f"{float(plain):.{digits}g}")


#: Dagster column types used in tables and column schemas.
INT, FLOAT, BOOL, STRING, TIMESTAMP = "int", "float", "bool", "string", "timestamp"


def _cell(value: Any, kind: str) -> str | int | float | bool | None:
    """One table cell of column type ``kind``; missing values (None, NaN, NA) become None."""
    plain = json_safe(value)
    if plain is None:
        return None
    if kind == INT:
        return int(plain) if isinstance(plain, (int, float)) and not isinstance(plain, bool) else None
    if kind == FLOAT:
        return figure(plain)
    if kind == BOOL:
        return bool(plain) if isinstance(plain, (bool, int)) else None
    return plain if isinstance(plain, str) else json.dumps(plain, sort_keys=True) if isinstance(plain, (dict, list)) else str(plain)


def records_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], limit: int | None = None) -> MetadataValue:
    """A table with a typed schema: ``columns`` maps each column to ``int``, ``float``, ``bool`` or
    ``string``; each cell is converted to its column's type (floats rounded, missing values null)."""
    schema = TableSchema(columns=[TableColumn(name, kind) for name, kind in columns.items()])
    shown = rows if limit is None else rows[:limit]
    records = [TableRecord({name: _cell(row.get(name), kind) for name, kind in columns.items()}) for row in shown]
    return MetadataValue.table(records, schema=schema)


def counts_table(counts: Mapping[str, Any], name: str = "name", value: str = "count", by_count: bool = True) -> MetadataValue:
    """A mapping of names to numbers (labels, splits, reasons, statistics) as a two-column
    table the UI sorts, instead of a JSON object; largest first, ties by name (``by_count``),
    else in the mapping's own order.

    ``cvops status --json`` reads such a table back as the mapping (:func:`table_as_mapping`).
    """
    numbers = {str(k): json_safe(v) for k, v in counts.items()}
    kind = INT if all(isinstance(v, int) and not isinstance(v, bool) for v in numbers.values()) else FLOAT
    items = sorted(numbers.items(), key=lambda kv: (-(kv[1] or 0), kv[0])) if by_count else list(numbers.items())
    rows = [{name: k, value: v} for k, v in items]
    return records_table(rows, {name: STRING, value: kind})


def table_as_mapping(value: Any) -> dict[str, Any] | None:  # noqa: ANN401 - any metadata value
    """The mapping a :func:`counts_table` holds (a table of exactly a string column and a
    number column); None for any other value."""
    if not isinstance(value, TableMetadataValue) or value.schema is None or len(value.schema.columns) != 2:
        return None
    key, number = value.schema.columns
    if key.type != STRING or number.type not in (INT, FLOAT):
        return None
    return {record.data[key.name]: record.data[number.name] for record in value.records}


def pandas_column_type(dtype: Any) -> str:
    """The Dagster column type of a pandas dtype."""
    if pd.api.types.is_bool_dtype(dtype):
        return BOOL
    if pd.api.types.is_integer_dtype(dtype):
        return INT
    if pd.api.types.is_float_dtype(dtype):
        return FLOAT
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return TIMESTAMP
    return STRING


def table(frame: pd.DataFrame, limit: int = 20) -> MetadataValue:
    """The first ``limit`` rows of ``frame`` as a table typed from its dtypes (int, float, bool,
    string); a numeric column stays numeric so the UI sorts it as one."""
    columns = {str(c): pandas_column_type(frame[c].dtype) for c in frame.columns}
    rows = [{str(k): v for k, v in row.items()} for row in frame.head(limit).to_dict(orient="records")]
    return records_table(rows, columns)


def arrow_column_type(kind: pa.DataType) -> str:
    """The Dagster column type of an Arrow type (dictionary columns: their values' type)."""
    if pa.types.is_dictionary(kind):
        return arrow_column_type(kind.value_type)
    if pa.types.is_boolean(kind):
        return BOOL
    if pa.types.is_integer(kind):
        return INT
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return FLOAT
    if pa.types.is_timestamp(kind):
        return TIMESTAMP
    if pa.types.is_date(kind):
        return "date"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return STRING
    if pa.types.is_null(kind):
        return "null"
    return str(kind)


def column_schema(schema: pa.Schema) -> TableSchema:
    """A Dagster column schema of an Arrow schema; each column's description is its Arrow type."""
    return TableSchema(columns=[TableColumn(f.name, arrow_column_type(f.type), description=str(f.type)) for f in schema])


def parquet_table_metadata(written: pa.Table | pa.Schema | pd.DataFrame, rows: int, partition: bool = False) -> dict[str, Any]:
    """``dagster/column_schema`` and ``dagster/row_count`` (``dagster/partition_row_count`` too for a
    partition) of a Parquet file, from the Arrow schema it was written with (a DataFrame: the
    schema ``to_parquet`` gives it)."""
    if isinstance(written, pd.DataFrame):
        schema = pa.Schema.from_pandas(written, preserve_index=False)
    else:
        schema = written.schema if isinstance(written, pa.Table) else written
    out: dict[str, Any] = {"dagster/column_schema": MetadataValue.table_schema(column_schema(schema)), "dagster/row_count": int(rows)}
    if partition:
        out["dagster/partition_row_count"] = int(rows)
    return out


def artifact(uri: str) -> MetadataValue:
    """Where an artifact is: a local path (the UI offers to copy it) or a URL (``s3://...``)."""
    return MetadataValue.url(uri) if "://" in uri else MetadataValue.path(uri)


def optional_png(make: Callable[[], Any], alt: str, log: Any) -> dict[str, MetadataValue]:  # noqa: ANN401
    """``{alt: inline PNG}`` from ``make()`` (a ``.png`` and a ``.caption``, or None), or nothing:
    a figure that cannot be made (hostile data, a bug in drawing) is logged, never a failed step."""
    try:
        made = make()
    except Exception as exc:  # noqa: BLE001 - metadata decoration must not fail the step
        log.warning(f"no {alt}: {type(exc).__name__}: {exc}")
        return {}
    if made is None:
        return {}
    return {alt: png_markdown(made.png, alt.replace("_", " "), made.caption)}


def dataset_overview(storage: ArtifactStorage, manifest: pd.DataFrame, decode: DecodeConfig, log: Any) -> dict[str, Any]:  # noqa: ANN401
    """What shows a user a cleaned dataset: typed tables per class and per quarantine reason, and
    thumbnails of a few samples of each (left out, with a warning, when they cannot be made)."""
    return {
        "per_class": table(class_breakdown(manifest), limit=200),
        "quarantine_by_reason": table(quarantine_breakdown(manifest), limit=100),
        **optional_png(lambda: class_thumbnails(storage, manifest), "sample_thumbnails", log),
        **optional_png(lambda: quarantine_thumbnails(storage, manifest, decode), "quarantine_thumbnails", log),
    }


def per_class_table(per_class: Mapping[str, Mapping[str, Any]]) -> MetadataValue:
    """Test metrics per class (``{label: {precision, recall, support}}``) as a typed table."""
    rows = [{"label": label, **figures} for label, figures in per_class.items()]
    return records_table(rows, {"label": STRING, "precision": FLOAT, "recall": FLOAT, "support": INT})


def json_value(obj: Any) -> MetadataValue:
    """A JSON metadata value of any domain structure (made JSON-safe first)."""
    plain = json_safe(obj)
    if plain is None:
        return MetadataValue.null()
    return MetadataValue.json(plain) if isinstance(plain, (dict, list)) else MetadataValue.json({"value": plain})


@dataclasses.dataclass(frozen=True)
class Upstream:
    """The materialization of an upstream asset that a step builds on, and its figures."""

    asset: str
    run_id: str
    same_run: bool
    figures: dict[str, Any]

    def figure(self, name: str) -> Any:
        """One recorded figure; a clear error when the materialization lacks it."""
        if name not in self.figures:
            raise ValueError(f"{self.asset}'s materialization in run {self.run_id} has no {name!r}; materialize it again")
        return self.figures[name]

    def reference(self, *names: str) -> dict[str, Any]:
        """What a downstream step records about this input: the run it came from and its ids."""
        return {"run_id": self.run_id, **{n: self.figures.get(n) for n in names}}


def upstream(context, asset: str) -> Upstream:  # noqa: ANN001 - any Dagster execution context
    """The ``asset`` materialization this step consumes: the one made earlier in this same run,
    else the latest one.

    Stages hand over explicit versions: inside one run every step builds on what that run
    produced, whatever another run (automation, a drift retraining, ``cvops run``) materializes
    meanwhile. Refuses a materialization whose blocking check failed (``accepted`` false), so a
    run that selects only downstream assets cannot build on rejected data.
    """
    from dagster import AssetKey, DagsterEventType

    key = AssetKey(asset)
    records = context.instance.get_records_for_run(
        context.run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION, ascending=False
    ).records
    entry = next((r.event_log_entry for r in records if r.event_log_entry.dagster_event.asset_key == key), None)
    same_run = entry is not None
    if entry is None:
        entry = context.instance.get_latest_materialization_event(key)
    if entry is None:
        raise ValueError(f"{asset} has not been materialized yet")
    figures = {name: value.value for name, value in entry.asset_materialization.metadata.items()}
    if figures.get("accepted") is False:
        raise ValueError(f"the {asset} this run would build on (run {entry.run_id}) failed its blocking check; fix its input and materialize it again")
    return Upstream(asset, entry.run_id, same_run, figures)
