"""drift_retrain_sensor: a drifted production batch requests one retraining run, once labels exist.

The policy is :mod:`cvops_dagster.monitoring.policy` (pure); this module gathers its facts from
the Dagster instance and the artifact store, and is what ``cvops status`` reads too
(:func:`retraining_state`), so the status and the sensor never disagree:

- drift events: the latest ``drift_report`` materialization of each production batch;
- the champion: the model ``production/serving.json`` serves;
- handled events: the sensor's cursor, *and* the tags of the runs it requested (one
  ``cvops/drift_event.<digest>`` tag per event), so a daemon restart with the cursor lost never
  asks twice; the run key is tied to the events too;
- labels: the latest ``review_feedback`` version against the versions ``cleaned_dataset``
  materializations included.

The retraining run is ``lifecycle_job`` (cleaned_dataset -> hpo_study -> trained_model ->
production_model -> onnx_runtime), tagged with its cause (``cvops/trigger=drift``,
``cvops/drift_batch``, ``cvops/drift_reason``), with the run config of ``CVOPS_RETRAIN_CONFIG``
when set. The current runtime serves throughout; only a challenger that wins the gate replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from cvops_dagster.core.settings import retrain_run_config_path, retrain_triggers
from cvops_dagster.monitoring.policy import DriftEvent, LabelsState, RetrainDecision, decide_retraining
from resources.storage import ArtifactStore

TRIGGER_TAG = "cvops/trigger"
DRIFT_TRIGGER = "drift"
DRIFT_BATCH_TAG = "cvops/drift_batch"
DRIFT_REASON_TAG = "cvops/drift_reason"
EVENT_TAG_PREFIX = "cvops/drift_event."
#: The assets a retraining run materializes (labelled batches are already ingested).
RETRAIN_ASSETS = ("cleaned_dataset", "hpo_study", "trained_model", "production_model", "onnx_runtime")
#: Retraining runs requested per drift event: the first and two retries of a failed one.
MAX_ATTEMPTS = 3
_ENDED_BADLY = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
_IN_FLIGHT = [
    DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
]  # fmt: skip


def event_tag(event: str) -> str:
    """The run tag that records one handled drift event (keys stay short and tag-safe)."""
    return EVENT_TAG_PREFIX + hashlib.sha256(event.encode()).hexdigest()[:16]


def drift_events(instance: Any) -> list[DriftEvent]:  # noqa: ANN401 - a DagsterInstance
    """The latest drift report of every production batch."""
    key = AssetKey("drift_report")
    partitions = sorted(instance.get_materialized_partitions(key))
    events = []
    for partition in partitions:
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
        if not records:
            continue
        meta = {k: v.value for k, v in records[0].asset_materialization.metadata.items()}
        if not meta.get("event"):
            continue
        events.append(
            DriftEvent(
                event=str(meta["event"]), batch_id=partition, model_id=str(meta.get("model_id")), drift=meta.get("drift"),
                score=meta.get("score"), threshold=meta.get("threshold"), reported_at=records[0].timestamp,
            )
        )  # fmt: skip
    return events


def labels_state(instance: Any) -> LabelsState:  # noqa: ANN401
    """The latest review_feedback and the feedback versions datasets included."""
    latest = instance.get_latest_materialization_event(AssetKey("review_feedback"))
    if latest is None:
        return LabelsState(None, 0)
    meta = {k: v.value for k, v in latest.asset_materialization.metadata.items()}
    # A dataset version counts as having used the labels only when its run went through
    # (trained, gated, published or kept): a retraining that failed after cleaning did not.
    versions: dict[str, str] = {}
    for record in instance.fetch_materializations(AssetKey("cleaned_dataset"), limit=200).records:
        value = record.asset_materialization.metadata.get("review_feedback_version")
        if value is not None and value.value:
            versions[record.run_id] = str(value.value)
    succeeded = {run.run_id for run in instance.get_runs(RunsFilter(run_ids=list(versions))) if run.status == DagsterRunStatus.SUCCESS} if versions else set()
    consumed = {version for run_id, version in versions.items() if run_id in succeeded or not run_id}
    # Review decisions (relabel/discard of images in the data) are new labels too.
    labelled = int(meta.get("labelled_samples") or 0) + int(meta.get("review_decisions") or 0)
    return LabelsState(meta.get("version"), labelled, frozenset(consumed))


def served_model(storage: Any) -> str | None:  # noqa: ANN401 - an ArtifactStorage
    from cvops_dagster.serving.pointer import read_pointer

    pointer = read_pointer(storage)
    return pointer.model_id if pointer is not None else None


def _requested_runs(instance: Any) -> list[Any]:  # noqa: ANN401
    return list(instance.get_runs(filters=RunsFilter(tags={TRIGGER_TAG: DRIFT_TRIGGER}), limit=500))


def attempts(runs: list[Any], events: list[DriftEvent]) -> dict[str, tuple[int, int]]:  # noqa: ANN401
    """Per event: the requested retraining runs tagged with it, and how many of them failed or
    were canceled."""
    counts: dict[str, tuple[int, int]] = {}
    for event in events:
        tag = event_tag(event.event)
        tagged = [run for run in runs if tag in run.tags]
        counts[event.event] = (len(tagged), sum(1 for run in tagged if run.status in _ENDED_BADLY))
    return counts


def handled_events(counts: dict[str, tuple[int, int]], cursor_handled: dict[str, str]) -> set[str]:
    """Events a request already covered: tagged on a run that did not fail, or on
    :data:`MAX_ATTEMPTS` failed ones (given up), or requested on a tick whose run does not
    exist yet (the cursor). An event whose retraining failed fewer times is open again, so a
    crashed retraining is retried, a bounded number of times."""
    return {
        event
        for event, (tagged, failed) in counts.items()
        if tagged > failed or failed >= MAX_ATTEMPTS or (not tagged and event in cursor_handled)
    }


@dataclass(frozen=True)
class RetrainingState:
    """Everything ``retraining`` in ``cvops status --json`` shows, and what the sensor decides.

    ``attempts``: per drift event, its requested runs and how many of them failed.
    """

    decision: RetrainDecision
    requests: list[dict[str, Any]]
    champion: str | None
    attempts: dict[str, tuple[int, int]]


def retraining_state(instance: Any, storage: Any, cursor_handled: dict[str, str] | None = None) -> RetrainingState:  # noqa: ANN401
    """The sensor's view now: its decision, and the retraining runs it requested so far (read
    from the instance once)."""
    events = drift_events(instance)
    champion = served_model(storage)
    runs = _requested_runs(instance)
    counts = attempts(runs, events)
    in_flight = any(run.status in _IN_FLIGHT for run in runs)
    decision = decide_retraining(events, champion, handled_events(counts, cursor_handled or {}), labels_state(instance), in_flight)
    requests = []
    for run in sorted(runs, key=lambda r: r.tags.get("cvops/requested_at", "")):
        requests.append({
            "report": run.tags.get(DRIFT_BATCH_TAG), "run_id": run.run_id, "requested_at": run.tags.get("cvops/requested_at"),
            "reason": run.tags.get(DRIFT_REASON_TAG), "status": run.status.value,
        })  # fmt: skip
    return RetrainingState(decision, requests, champion, counts)


def waiting_entries(decision: RetrainDecision) -> list[dict[str, Any]]:
    """The ``retraining.waiting`` entries of ``cvops status --json``."""
    return [
        {"report": e.batch_id, "event": e.event, "model_id": e.model_id, "score": e.score, "reason": decision.reason}
        for e in decision.waiting
    ]


def _retrain_run_config() -> dict[str, Any]:
    path = retrain_run_config_path()
    if not path:
        return {}
    import yaml

    with open(os.path.expanduser(path), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"CVOPS_RETRAIN_CONFIG={path}: the file must hold a Dagster run config mapping")
    return config


@sensor(
    job_name="lifecycle_job",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING if DRIFT_TRIGGER in retrain_triggers() else DefaultSensorStatus.STOPPED,
    description="When a production batch's drift report crosses the threshold, requests one retraining run "
    "(cleaned_dataset -> hpo_study -> trained_model -> production_model -> onnx_runtime) once labelled production "
    "images newer than the last dataset version exist; until then the drift event waits (see the tick). Exactly "
    "once per drift event (batch, images, served model); a failed retraining is requested again up to 3 times. On when "
    "CVOPS_RETRAIN_ON includes drift (the default).",
)
def drift_retrain_sensor(context: SensorEvaluationContext, artifact_store: ArtifactStore) -> SensorResult:
    state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    handled: dict[str, str] = state.get("handled", {})
    current = retraining_state(context.instance, artifact_store.storage, handled)
    decision = current.decision
    if not decision.request:
        if decision.waiting:
            context.log.info(decision.reason)
        return SensorResult(skip_reason=decision.reason, cursor=json.dumps({"handled": handled}, sort_keys=True))
    try:
        run_config = _retrain_run_config()
    except (OSError, ValueError) as exc:
        return SensorResult(skip_reason=f"cannot read the retraining run config: {exc}", cursor=context.cursor)
    run_key = decision.run_key
    assert run_key is not None
    retry = max((current.attempts[e.event][1] for e in decision.request), default=0)
    if retry:  # a new key: Dagster skips a run key a sensor already used
        run_key += f":retry{retry}"
    first = decision.request[0]
    tags = {
        TRIGGER_TAG: DRIFT_TRIGGER,
        DRIFT_BATCH_TAG: first.batch_id,
        DRIFT_REASON_TAG: decision.reason[:2000],
        "cvops/drift_batches": ",".join(e.batch_id for e in decision.request)[:2000],
        "cvops/requested_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **{event_tag(e.event): e.batch_id for e in decision.request},
    }
    handled.update({e.event: run_key for e in decision.request})
    context.log.info(f"requesting retraining {run_key}: {decision.reason}")
    return SensorResult(
        run_requests=[RunRequest(run_key=run_key, run_config=run_config, tags=tags, asset_selection=[AssetKey(a) for a in RETRAIN_ASSETS])],
        cursor=json.dumps({"handled": handled}, sort_keys=True),
    )
