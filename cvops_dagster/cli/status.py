"""``cvops status``: the latest figures and checks of every asset, read from the Dagster instance.

Read-only: the instance must exist (``cvops status`` never creates one). The human output
names the instance and roots in use, then walks the assets in lifecycle order (the asset
graph's topological order) with a few rounded key figures, each check's latest result and,
for anything missing or failed, a ``next:`` line saying what to do.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cvops_dagster.cli.common import load_instance, resolved_roots
from cvops_dagster.core import settings

#: The figures worth a glance per asset (a dotted name reads inside a JSON figure); an asset
#: not listed shows its first few plain figures.
KEY_FIGURES: dict[str, tuple[str, ...]] = {
    "raw_images": ("batches", "files", "rejected", "bytes"),
    "cleaned_dataset": ("version", "input", "clean", "duplicates", "quarantined"),
    "hpo_study": ("best_value", "trials_complete", "trials_pruned", "trials_failed", "skipped"),
    "trained_model": ("model_id", "test_accuracy", "macro_f1", "baseline_accuracy", "epochs_trained"),
    "production_model": ("decision", "model_id", "test_accuracy", "promoted"),
    "onnx_runtime": ("model_id", "publication", "parity_max_abs_diff", "parity_argmax_agreement", "int8.accepted"),
    "batch_predictions": ("batch_id", "images", "quarantined", "mean_confidence", "accuracy"),
    "drift_report": ("batch_id", "drift", "score", "threshold"),
    "edge_case_review": ("samples", "views.edge_cases", "views.likely_mislabeled", "app_command"),
    "review_feedback": ("labelled_samples", "sources.fiftyone", "review_decisions", "quarantined", "version"),
}
#: Figures shown for an asset without a KEY_FIGURES entry.
GENERIC_FIGURES = 5
#: Figure names never picked for the generic line (long, or said elsewhere).
_NOT_KEY = {"materialized_at", "checks", "path", "manifest", "sha256", "fingerprint", "inputs"}

_FAILED_RUN_STATUSES = {"FAILURE", "CANCELED", "CANCELING"}
_ACTIVE_RUN_STATUSES = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "MANAGED"}


def _metadata_to_json(metadata: dict[str, Any]) -> dict[str, Any]:
    """Plain figures from materialization metadata; plots and tables stay in the UI, except
    counts tables (name -> number), which come back as the mapping they show."""
    from dagster import JsonMetadataValue, MarkdownMetadataValue, PathMetadataValue, TableMetadataValue

    from assets.metadata import table_as_mapping

    out: dict[str, Any] = {}
    for name, value in metadata.items():
        if (counts := table_as_mapping(value)) is not None:
            out[name] = counts
            continue
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


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


#: The asset group of the production side, listed after the lifecycle it watches.
PRODUCTION_GROUP = "monitoring"


def lifecycle_order(graph: Any) -> list[Any]:
    """Every asset key of the graph in lifecycle order: topological, ties alphabetical, the
    production side (the ``monitoring`` group) after the lifecycle it watches (its feedback
    into the next dataset version closes a loop rather than coming first)."""
    keys = set(graph.get_all_asset_keys())
    ordered = [k for k in graph.toposorted_asset_keys if k in keys]
    ordered += sorted(keys - set(ordered), key=lambda k: k.to_user_string())
    production = [k for k in ordered if graph.get(k).group_name == PRODUCTION_GROUP]
    return [k for k in ordered if k not in production] + production


# ------------------------------------------------------------------------------------------ collect


@dataclass
class AssetView:
    """What the human output shows of one asset (collected by :func:`collect_views`)."""

    name: str
    figures: dict[str, Any] | None  #: the asset's ``cvops status --json`` object (None: never materialized)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  #: check name -> result, as in the JSON
    parents: list[str] = field(default_factory=list)
    partitioned: bool = False
    #: The latest run that planned this asset after its latest materialization, when it did not
    #: succeed or is still going: ``{"run_id": ..., "status": "FAILURE"}``.
    later_run: dict[str, str] | None = None


def collect_status(instance: Any, defs: Any) -> dict[str, Any]:
    """The latest figures per asset, as ``cvops status --json`` prints them.

    One key per asset (lifecycle order); its value is None when never materialized, else the
    figures of its latest materialization, ``materialized_at`` and, for an asset with checks,
    ``checks``: check name -> ``passed`` (None when not evaluated), ``result`` ("passed",
    "failed", "not evaluated", "in progress"), ``severity``, ``blocking``, ``evaluated_at``,
    ``run_id``, ``partition``, ``metadata`` and, for a partitioned asset, ``failed_partitions``.
    """
    return {view.name: view.figures for view in collect_views(instance, defs)}


def collect_views(instance: Any, defs: Any) -> list[AssetView]:
    """Every asset's figures, check results and later failed run, in lifecycle order."""
    from dagster import AssetKey, AssetRecordsFilter

    graph = defs.resolve_asset_graph()
    order = lifecycle_order(graph)
    views = []
    for key in order:
        node = graph.get(key)
        name = key.to_user_string()
        if key == AssetKey("raw_images"):
            figures = _raw_images_status(instance, key, AssetRecordsFilter)
        elif name in PER_BATCH_FIGURES:
            figures = _per_batch_status(instance, key, AssetRecordsFilter, PER_BATCH_FIGURES[name])
        else:
            event = instance.get_latest_materialization_event(key)
            figures = None
            if event is not None:
                figures = _metadata_to_json(dict(event.asset_materialization.metadata))
                figures["materialized_at"] = _iso(event.timestamp)
        checks = _check_results(instance, graph, node)
        if figures is not None and checks:
            figures["checks"] = checks
        views.append(
            AssetView(
                name=name,
                figures=figures,
                checks=checks,
                parents=[k.to_user_string() for k in order if k in node.parent_keys],
                partitioned=bool(node.is_partitioned),
                later_run=_later_run(instance, key),
            )
        )
    return views


def _check_results(instance: Any, graph: Any, node: Any) -> dict[str, dict[str, Any]]:
    """The latest execution of each of the asset's checks (any partition), with its verdict."""
    results: dict[str, dict[str, Any]] = {}
    for check_key in sorted(node.check_keys, key=lambda k: k.name):
        blocking = bool(graph.get(check_key).blocking)
        record = instance.get_latest_asset_check_evaluation_record(check_key)
        if record is None:
            continue  # never planned nor evaluated: the asset's own line says it was never built
        entry: dict[str, Any] = {
            "passed": None,
            "result": "not evaluated",
            "severity": None,
            "blocking": blocking,
            "evaluated_at": None,
            "run_id": record.run_id,
            "partition": record.partition,
        }
        if record.status.value in ("SUCCEEDED", "FAILED") and record.event is not None:
            evaluation = record.event.dagster_event.event_specific_data
            entry.update(
                passed=bool(evaluation.passed),
                result="passed" if evaluation.passed else "failed",
                severity=evaluation.severity.value,
                evaluated_at=_iso(record.event.timestamp),
                metadata=_metadata_to_json(dict(evaluation.metadata)),
            )
        else:
            run = instance.get_run_by_id(record.run_id)
            if run is not None and run.status.value in _ACTIVE_RUN_STATUSES:
                entry["result"] = "in progress"
        if node.is_partitioned:
            entry["failed_partitions"] = _failed_partitions(instance, check_key)
        results[check_key.name] = entry
    return results


#: Check executions read back to find the batches whose latest check failed.
PARTITION_HISTORY_LIMIT = 1000


def _failed_partitions(instance: Any, check_key: Any) -> list[str]:
    """Partitions whose latest execution of the check failed.

    A check of a partitioned asset may itself be unpartitioned (as ``raw_images``'s is): its
    executions are then told apart by the partition their run materialized.
    """
    from dagster import RunsFilter

    history = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=PARTITION_HISTORY_LIMIT)
    runs_without_partition = sorted({r.run_id for r in history if r.partition is None})
    run_partition = {}
    if runs_without_partition:
        for run in instance.get_runs(RunsFilter(run_ids=runs_without_partition)):
            run_partition[run.run_id] = run.tags.get("dagster/partition")
    latest: dict[str, str] = {}
    for record in history:  # newest first
        partition = record.partition or run_partition.get(record.run_id)
        if partition is not None and partition not in latest:
            latest[partition] = record.status.value
    return sorted(p for p, status in latest.items() if status == "FAILED")


def _later_run(instance: Any, key: Any) -> dict[str, str] | None:
    """The latest run that planned ``key`` after its latest materialization, unless it succeeded."""
    records = instance.get_asset_records([key])
    if not records:
        return None
    entry = records[0].asset_entry
    # The planned-run columns are not kept by every storage (SQLite leaves them empty); the last
    # run id is (a run that plans an asset updates it).
    run_id = entry.last_planned_materialization_run_id or entry.last_run_id
    if run_id is None:
        return None
    planned = entry.last_planned_materialization_storage_id
    materialized = entry.last_materialization_record
    if materialized is not None and (
        materialized.event_log_entry.run_id == run_id or (planned is not None and materialized.storage_id > planned)
    ):
        return None
    run = instance.get_run_by_id(run_id)
    if run is None or run.status.value not in _FAILED_RUN_STATUSES | _ACTIVE_RUN_STATUSES:
        return None
    return {"run_id": run_id, "status": run.status.value}


def _raw_images_status(instance: Any, key: Any, records_filter: Any) -> dict[str, Any] | None:
    partitions = sorted(instance.get_materialized_partitions(key))
    if not partitions:
        return None
    per_batch: dict[str, Any] = {}
    reasons: dict[str, int] = {}
    latest = 0.0
    for partition in partitions:
        result = instance.fetch_materializations(records_filter(asset_key=key, asset_partitions=[partition]), limit=1)
        if not result.records:
            continue
        latest = max(latest, result.records[0].timestamp)
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
        "materialized_at": _iso(latest) if latest else None,
    }


#: Inputs an asset builds without (cleaned_dataset includes review feedback once there is some;
#: review_feedback reads the FiftyOne review once edge_case_review has built it).
OPTIONAL_PARENTS: dict[str, tuple[str, ...]] = {"cleaned_dataset": ("review_feedback",), "review_feedback": ("edge_case_review",)}
#: What a never-materialized production asset waits for: production data, not a user's action.
PRODUCTION_NOTES = {
    "batch_predictions": "no production batch yet: put one in <landing>/production/<batch_id>/ (images, then _READY); "
    "production_batches_sensor predicts it under `cvops watch` or `cvops ui`, or `cvops run` does",
}
#: What a failed WARN check means, shown beside it.
WARN_NOTES = {
    "check_drift_report_within_threshold": "drift; drift_retrain_sensor retrains once labelled production images "
    "exist (see retraining below)",
}
#: Partitioned production assets: the figures ``cvops status --json`` shows per batch.
PER_BATCH_FIGURES: dict[str, tuple[str, ...]] = {
    "batch_predictions": ("images", "quarantined", "class_counts", "mean_confidence", "model_id", "accuracy", "labelled_images"),
    "drift_report": ("drift", "score", "threshold", "model_id", "tests", "top_features", "verdict", "images"),
}


def _table_rows(value: Any) -> list[dict[str, Any]]:
    """The rows of a table metadata value as plain dicts."""
    from dagster import TableMetadataValue

    if not isinstance(value, TableMetadataValue):
        return []
    return [dict(record.data) for record in value.records]


def _batch_figures(metadata: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    figures = _metadata_to_json(metadata)
    out = {name: figures.get(name) for name in names}
    if "tests" in names:
        out["tests"] = {
            row["test"]: {"statistic": row.get("statistic"), "p_value": row.get("p_value"), "drift": row.get("drift")}
            for row in _table_rows(metadata.get("tests"))
        }
        out["top_features"] = _table_rows(metadata.get("top_features"))
    return out


def _per_batch_status(instance: Any, key: Any, records_filter: Any, names: tuple[str, ...]) -> dict[str, Any] | None:
    """A partitioned production asset: its latest materialization's figures, and ``batches``:
    batch id -> the figures of that batch's latest materialization."""
    latest = instance.get_latest_materialization_event(key)
    if latest is None:
        return None
    per_batch: dict[str, Any] = {}
    for partition in sorted(instance.get_materialized_partitions(key)):
        result = instance.fetch_materializations(records_filter(asset_key=key, asset_partitions=[partition]), limit=1)
        if result.records:
            per_batch[partition] = _batch_figures(dict(result.records[0].asset_materialization.metadata), names)
    figures = _batch_figures(dict(latest.asset_materialization.metadata), names)
    return {
        **figures,
        "batch_id": latest.asset_materialization.partition,
        "batches": per_batch,
        "materialized_at": _iso(latest.timestamp),
    }


def retraining_status(instance: Any) -> dict[str, Any]:
    """``retraining``: the runs drift_retrain_sensor requested and the drift events waiting for labels."""
    from cvops_dagster.cli.common import artifact_storage
    from sensors.retraining import retraining_state, waiting_entries

    state = retraining_state(instance, artifact_storage())
    return {
        "requests": state.requests,
        "waiting": waiting_entries(state.decision),
        "champion": state.champion,
        "policy": sorted(settings.retrain_triggers()),
    }


# ------------------------------------------------------------------------------------------- format


def format_figure(value: Any) -> str:
    """A figure for people: floats to 4 significant digits, tiny ones in scientific notation."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or value != value:  # zero, NaN
            return f"{value:g}"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if abs(value) >= 1e-3:
            return f"{value:.4g}"
        return f"{value:.2e}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pick(figures: dict[str, Any], name: str) -> Any:
    value: Any = figures
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def key_figures(name: str, figures: dict[str, Any]) -> list[tuple[str, str]]:
    """The few figures of an asset worth a glance, formatted, as (label, text)."""
    names = KEY_FIGURES.get(name)
    if names is None:
        names = tuple(
            k
            for k, v in figures.items()
            if k not in _NOT_KEY and not isinstance(v, (dict, list)) and not (isinstance(v, str) and len(v) > 40)
        )[:GENERIC_FIGURES]
    shown = []
    for figure in names:
        value = _pick(figures, figure)
        if value is not _MISSING:
            shown.append((figure.replace(".", " "), format_figure(value)))
    return shown


def _check_line(name: str, check: dict[str, Any]) -> str:
    result = check.get("result") or ("passed" if check.get("passed") else "failed")
    if result == "failed":
        text = f"FAILED ({check.get('severity') or 'ERROR'}{', blocking' if check.get('blocking') else ''})"
        details = [(k, v) for k, v in (check.get("metadata") or {}).items() if not isinstance(v, (dict, list))]
        if details:
            text += ": " + ", ".join(f"{k} {format_figure(v)}" for k, v in details[:4])
        if check.get("failed_partitions"):
            text += f"; failed in {', '.join(check['failed_partitions'])}"
    elif result == "passed":
        text = "passed"
        if check.get("failed_partitions"):
            text = f"passed on the latest batch, FAILED in {', '.join(check['failed_partitions'])}"
    else:
        text = f"{result} (run {check.get('run_id')})"
    return f"  check {name}: {text}"


def _run_hint(run: dict[str, str], materialized: bool) -> str:
    what = "failed" if run["status"] == "FAILURE" else run["status"].lower()
    after = " after this materialization (the figures above are from the one before)" if materialized else ""
    return f"  next: run {run['run_id']} {what}{after}: `cvops ui` shows its log; fix the cause, then `cvops run`"


def format_status(views: list[AssetView], roots: settings.Roots | None = None) -> list[str]:
    """The human ``cvops status``: the roots in use, then every asset in lifecycle order.

    Each asset: a heading line (name, materialized when), its key figures, its checks, and
    ``next:`` (something to do here), ``waits:`` (an upstream must be fixed or built first) or
    ``running:`` lines; a last line sums up.
    """
    lines = _roots_lines(roots) if roots is not None else []
    width = max((len(v.name) for v in views), default=0)
    blocked: dict[str, str] = {}  # asset -> why it cannot be built now (its failed blocking check, or an upstream's)
    missing: set[str] = set()
    todo = 0
    for view in views:
        block = _asset_block(view, width, blocked, missing)
        todo += any(line.startswith("  next:") for line in block)
        lines += block
    lines.append("")
    if todo:
        lines.append(f"{todo} asset{'s' if todo > 1 else ''} to act on: see the `next:` lines above")
    elif any(v.figures is None or v.later_run for v in views):
        lines.append("nothing to act on yet: see the `waits:`/`running:` lines above")
    else:
        lines.append("every asset is materialized and every check passed")
    return lines


def _roots_lines(roots: settings.Roots) -> list[str]:
    project = f"{roots.project} ({roots.project_source})" if roots.project else "none (outside any project: the current folder)"
    return [
        f"instance   {roots.dagster_home} ({roots.dagster_home_source})",
        f"project    {project}",
        f"landing    {roots.landing} ({roots.landing_source})",
        f"artifacts  {roots.artifacts} ({roots.artifacts_source})",
        "",
    ]


def _asset_block(view: AssetView, width: int, blocked: dict[str, str], missing: set[str]) -> list[str]:
    """One asset's lines; records in ``blocked``/``missing`` what its descendants wait on."""
    figures = view.figures
    if figures is None:
        missing.add(view.name)
        lines = [f"{view.name:<{width}}  not materialized"]
    else:
        when = (figures.get("materialized_at") or "").replace("T", " ").replace("+00:00", " UTC")
        lines = [f"{view.name:<{width}}  materialized {when}".rstrip()]
        if shown := key_figures(view.name, figures):
            lines.append("  " + " · ".join(f"{label} {text}" for label, text in shown))
    hints: list[str] = []
    for check_name, check in view.checks.items():
        if figures is None and check.get("passed") is None:
            continue  # a check of an asset never built was never evaluated: the asset's line says why
        lines.append(_check_line(check_name, check))
        if check.get("result") == "failed" or check.get("failed_partitions"):
            partitions = check.get("failed_partitions") or ([check["partition"]] if check.get("partition") else [])
            where = f" in {', '.join(partitions)}" if partitions else ""
            if check.get("severity") == "WARN":
                # A warning reports (drift); what follows from it is a sensor's business.
                lines.append(f"  warning: {check_name}{where}" + (f": {WARN_NOTES[check_name]}" if check_name in WARN_NOTES else ""))
                continue
            hints.append(
                f"  next: {check_name} failed{where}: fix its cause (its figures are above), then "
                f"`cvops run --select '{view.name}*'` (it and everything after it)"
            )
            if check.get("blocking") and check.get("result") == "failed":
                blocked[view.name] = f"{view.name}'s blocking check {check_name} failed"
    upstream_block = next((blocked[p] for p in view.parents if p in blocked), None)
    if upstream_block and view.name not in blocked:
        blocked[view.name] = upstream_block
    run = view.later_run
    if run is not None and run["status"] in _ACTIVE_RUN_STATUSES:
        lines.append(f"  running: run {run['run_id']} ({run['status'].lower()})")
    elif run is not None:
        stopped = f"  waits: {upstream_block} (run {run['run_id']} stopped there)"
        hints.append(stopped if upstream_block else _run_hint(run, figures is not None))
    elif figures is None:
        upstream_missing = [p for p in view.parents if p in missing and p not in OPTIONAL_PARENTS.get(view.name, ())]
        if upstream_block:
            hints.append(f"  waits: {upstream_block}")
        elif upstream_missing:
            hints.append(f"  waits: {', '.join(upstream_missing)} (not materialized yet)")
        elif view.name in PRODUCTION_NOTES:
            lines.append(f"  note: {PRODUCTION_NOTES[view.name]}")
        elif not view.parents and view.partitioned:
            hints.append("  next: put complete batches in the landing zone (`cvops seed` for the sample), then `cvops run`")
        else:
            hints.append(f"  next: `cvops run` (or `cvops run --select {view.name}`)")
    return lines + hints


def cmd_status(args: argparse.Namespace) -> int:
    roots = getattr(args, "roots", None) or resolved_roots()
    instance, defs = load_instance(create=False)
    views = collect_views(instance, defs)
    try:
        retraining: dict[str, Any] = retraining_status(instance)
    except Exception as exc:  # noqa: BLE001 - a damaged serving pointer must not hide every other figure
        retraining = {"requests": [], "waiting": [], "error": f"{type(exc).__name__}: {exc}"}
    if args.json:
        status = {v.name: v.figures for v in views}
        status["retraining"] = retraining
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return 0
    print("\n".join(format_status(views, roots)))
    print("\n".join(format_retraining(retraining)))
    return 0


def format_retraining(retraining: dict[str, Any]) -> list[str]:
    """The human lines about drift retraining: what was requested, what waits and why."""
    lines = ["", f"retraining (policy: retrain on {', '.join(retraining.get('policy') or ['nothing'])})"]
    if retraining.get("error"):
        lines.append(f"  cannot tell: {retraining['error']}")
    for request in retraining.get("requests", []):
        lines.append(f"  requested {request['requested_at']} for drift on {request['report']}: run {request['run_id']} ({request.get('status')})")
    waiting = retraining.get("waiting", [])
    if waiting:
        lines.append(f"  waiting: {', '.join(w['report'] for w in waiting)}: {waiting[0]['reason']}")
    if len(lines) == 2:
        lines.append("  no drift retraining requested, none waiting")
    return lines
