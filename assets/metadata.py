"""Helpers that turn domain results into Dagster metadata the UI renders well.

Every asset and check passes its metadata through :func:`safe_metadata`, the one place where
domain values (NumPy scalars and arrays, pandas missing values, paths, dates, dataclasses)
become values Dagster can store, so no figure can fail a run for being "not JSON
serializable".
"""

import base64
import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema


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


def png_markdown(png: bytes, alt: str) -> MetadataValue:
    """An inline PNG plot, shown by the UI in the metadata panel."""
    encoded = base64.b64encode(png).decode()
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def table(frame: pd.DataFrame, limit: int = 20) -> MetadataValue:
    """A small preview table; values become strings so any dtype renders."""
    head = frame.head(limit)
    schema = TableSchema(columns=[TableColumn(str(c), "string") for c in head.columns])
    records = [
        TableRecord({str(c): "" if pd.isna(v) else str(v) for c, v in row.items()})
        for row in head.to_dict(orient="records")
    ]
    return MetadataValue.table(records, schema=schema)


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
