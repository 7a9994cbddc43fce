"""``cvops status``: the latest figures of every asset, read from the Dagster instance."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from cvops_dagster.cli.common import load_instance


def _metadata_to_json(metadata: dict[str, Any]) -> dict[str, Any]:
    """Plain figures from materialization metadata; plots and tables stay in the UI."""
    from dagster import JsonMetadataValue, MarkdownMetadataValue, PathMetadataValue, TableMetadataValue

    out: dict[str, Any] = {}
    for name, value in metadata.items():
        if isinstance(value, (MarkdownMetadataValue, TableMetadataValue)):
            continue
        if isinstance(value, JsonMetadataValue):
            out[name] = value.data
        elif isinstance(value, PathMetadataValue):
            out[name] = str(value.path)
        elif hasattr(value, "value"):
            v = value.value
            if isinstance(v, (str, int, float, bool, list, dict)) or v is None:
                out[name] = v
    return out


def collect_status(instance: Any, defs: Any) -> dict[str, Any]:
    """The latest figures per asset, as ``cvops status --json`` prints them."""
    from dagster import AssetKey, AssetRecordsFilter

    status: dict[str, Any] = {}
    for key in sorted(defs.resolve_asset_graph().get_all_asset_keys(), key=lambda k: k.to_user_string()):
        name = key.to_user_string()
        if key == AssetKey("raw_images"):
            status[name] = _raw_images_status(instance, key, AssetRecordsFilter)
            continue
        event = instance.get_latest_materialization_event(key)
        if event is None:
            status[name] = None
            continue
        figures = _metadata_to_json(dict(event.asset_materialization.metadata))
        figures["materialized_at"] = datetime.fromtimestamp(event.timestamp, UTC).isoformat(timespec="seconds")
        status[name] = figures
    return status


def _raw_images_status(instance: Any, key: Any, records_filter: Any) -> dict[str, Any] | None:
    partitions = sorted(instance.get_materialized_partitions(key))
    if not partitions:
        return None
    per_batch: dict[str, Any] = {}
    reasons: dict[str, int] = {}
    for partition in partitions:
        result = instance.fetch_materializations(records_filter(asset_key=key, asset_partitions=[partition]), limit=1)
        if not result.records:
            continue
        figures = _metadata_to_json(dict(result.records[0].asset_materialization.metadata))
        per_batch[partition] = {k: figures.get(k) for k in ("files", "rejected", "bytes")}
        for reason, n in (figures.get("rejected_reasons") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    return {
        "batches": len(per_batch),
        "files": sum(int(b["files"] or 0) for b in per_batch.values()),
        "bytes": sum(int(b["bytes"] or 0) for b in per_batch.values()),
        "rejected": sum(int(b["rejected"] or 0) for b in per_batch.values()),
        "rejected_reasons": dict(sorted(reasons.items())),
        "per_batch": per_batch,
    }


def cmd_status(args: argparse.Namespace) -> int:
    instance, defs = load_instance()
    status = collect_status(instance, defs)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return 0
    for name, figures in status.items():
        if figures is None:
            print(f"{name}: not materialized")
            continue
        shown = {k: v for k, v in figures.items() if not isinstance(v, (dict, list))}
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
