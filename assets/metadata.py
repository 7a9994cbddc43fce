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
