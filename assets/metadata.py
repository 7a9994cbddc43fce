"""Helpers that turn domain results into Dagster metadata the UI renders well."""


import base64
from typing import Any

import pandas as pd
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema


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
    return MetadataValue.json(obj)


def latest_figure(context, asset: str, name: str):  # noqa: ANN001, ANN201 - context is any Dagster context
    """A figure from an asset's latest materialization metadata (how stages hand over ids).

    Refuses a materialization whose blocking check failed (its ``accepted`` figure is false),
    so a later run that selects only downstream assets cannot build on rejected data.
    """
    from dagster import AssetKey

    event = context.instance.get_latest_materialization_event(AssetKey(asset))
    if event is None:
        raise ValueError(f"{asset} has not been materialized yet")
    metadata = event.asset_materialization.metadata
    accepted = metadata.get("accepted")
    if accepted is not None and accepted.value is False:
        raise ValueError(f"the latest {asset} failed its blocking check; fix its input and materialize it again")
    value = metadata.get(name)
    if value is None:
        raise ValueError(f"{asset}'s latest materialization has no {name!r}")
    return value.value
