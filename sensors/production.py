"""production_batches_sensor: each complete production batch becomes a partition and one run;
a batch's delayed labels arriving or changing become a labels run.

Each tick lists the production batches' ``_READY`` markers and looks at each batch's
``labels.csv`` stamp (one stat each). A batch whose marker is new or changed (or every ten
minutes, all of them) is listed again and fingerprinted:

- new or changed images: one ``production_job`` run of the partition (``batch_predictions``,
  ``drift_report``, ``review_feedback``), run key ``<batch_id>:<images fingerprint>:g<generation>``;
- the same images, new or changed ``labels.csv``: one run of ``batch_predictions`` (which keeps
  its stored predictions and records the realised accuracy) and ``review_feedback``, run key
  ``<batch_id>:<images fingerprint>:labels:<labels fingerprint>``.

A labels file is only ever read inside a run (never by the sensor), so a malformed or hostile
``labels.csv`` cannot break a tick; the run records its reasons. A failed run is requested
again up to :data:`MAX_ATTEMPTS` times, as ``image_batches_sensor`` does. Until a runtime is
served (``production/serving.json``) the sensor requests nothing: the batches wait for the
first champion.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from assets.partitions import production_batches
from cvops_dagster.ingestion.production import production_run_key
from resources.storage import ArtifactStore, ImageSource
from sensors.batches import FULL_SCAN_INTERVAL_S, MAX_ATTEMPTS, RUN_KEY_TAG

PRODUCTION_BATCH_TAG = "cvops/production_batch"
TRIGGER_TAG = "cvops/trigger"
LABELS_ASSETS = ("batch_predictions", "review_feedback")
NOTHING_SERVED = "no runtime is served yet (production/serving.json): production batches wait for the first champion"
#: The requests the cursor follows per batch, each retried on its own when its run fails.
PENDING_KINDS = ("run", "labels_run")


def _labels_stamp(landing: Any, batch_id: str) -> str | None:  # noqa: ANN401 - a LandingZone
    try:
        return landing.labels_fingerprint(batch_id)
    except (OSError, ValueError):  # unreadable now: looked at again next tick
        return None


@sensor(
    job_name="production_job",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Once a runtime is served, adds each complete production batch (landing/production/<batch_id>/ holding _READY) as a "
    "production_batches partition and requests one run of batch_predictions, drift_report and review_feedback "
    "for it; a new or changed labels.csv requests batch_predictions (realised accuracy) and review_feedback. "
    "Failed runs are retried up to 3 times.",
)
def production_batches_sensor(
    context: SensorEvaluationContext, image_source: ImageSource, artifact_store: ArtifactStore
) -> SensorResult:
    from cvops_dagster.ingestion.production import production_batch
    from cvops_dagster.serving.pointer import read_pointer

    if read_pointer(artifact_store.storage) is None:
        # Nothing to predict with: the batches wait, unseen, for the first champion (runs now
        # would only fail, be retried and fill the run queue ahead of the training they wait on).
        return SensorResult(skip_reason=NOTHING_SERVED, cursor=context.cursor)
    landing = image_source.landing()
    state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    seen: dict[str, dict[str, Any]] = state.get("batches", {})
    now = time.time()
    full_scan = now - float(state.get("full_scan_at", 0.0)) >= FULL_SCAN_INTERVAL_S
    known = set(context.instance.get_dynamic_partitions(production_batches.name))
    requests: list[RunRequest] = []
    new_partitions: list[str] = []
    for batch_id, marker in landing.ready_markers(production=True).items():
        entry = seen.get(batch_id)
        labels = _labels_stamp(landing, batch_id)
        if entry is None or entry.get("marker") != marker or full_scan:
            fingerprint = production_batch(landing, batch_id).fingerprint
            if entry is None and batch_id in known and (done := _predicted(context, batch_id)) is not None and done[0] == fingerprint:
                # Already predicted as it is now (by `cvops run` or `cvops demo`, or before the
                # cursor was lost): only labels newer than that run's are news.
                entry = {"marker": marker, "fingerprint": fingerprint, "generation": 0, "labels": done[1]}
            elif entry is None or entry.get("fingerprint") != fingerprint:
                generation = int(entry["generation"]) + 1 if entry is not None else 0
                entry = {"marker": marker, "fingerprint": fingerprint, "generation": generation, "labels": labels}
                seen[batch_id], request = _request(batch_id, entry, "run", labels_only=False)
                requests.append(request)
                if batch_id not in known:
                    new_partitions.append(batch_id)
                continue
            entry = {**entry, "marker": marker}
        if labels is not None and labels != entry.get("labels"):
            seen[batch_id], request = _request(batch_id, {**entry, "labels": labels}, "labels_run", labels_only=True)
            requests.append(request)
            continue
        for kind in PENDING_KINDS:
            retried = _retry_if_failed(context, batch_id, entry, kind)
            if retried:
                entry = retried[0]
                requests.append(retried[1])
        seen[batch_id] = entry
    cursor = json.dumps({"batches": seen, "full_scan_at": now if full_scan else state.get("full_scan_at", 0.0)}, sort_keys=True)
    if not requests:
        return SensorResult(skip_reason="no new or changed production batch or labels", cursor=cursor)
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[production_batches.build_add_request(new_partitions)] if new_partitions else [],
        cursor=cursor,
    )


def _predicted(context: SensorEvaluationContext, batch_id: str) -> tuple[str | None, str | None] | None:
    """The images and labels fingerprints the partition's latest batch_predictions recorded."""
    from dagster import AssetKey, AssetRecordsFilter

    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("batch_predictions"), asset_partitions=[batch_id]), limit=1
    ).records
    if not records:
        return None
    metadata = records[0].asset_materialization.metadata
    values = [metadata.get(name) for name in ("fingerprint", "labels_fingerprint")]
    return tuple(v.value if v is not None else None for v in values)  # type: ignore[return-value]


def _request(batch_id: str, entry: dict[str, Any], kind: str, labels_only: bool, attempt: int = 0) -> tuple[dict[str, Any], RunRequest]:
    """The entry recording a request of ``kind`` (``run`` or ``labels_run``) and the request."""
    base = f"{production_run_key(batch_id, entry['fingerprint'])}:g{entry['generation']}"
    run_key = f"{base}:labels:{entry['labels']}" if labels_only else base
    if attempt:
        run_key += f":retry{attempt}"
    tags = {PRODUCTION_BATCH_TAG: batch_id, TRIGGER_TAG: "production_labels" if labels_only else "production_batch"}
    # One pending request per kind: a labels run requested while the batch's run is still in
    # flight must not hide that run, which is retried on its own if it fails.
    pending = {k: v for k, v in (entry.get("pending") or {}).items() if k in PENDING_KINDS and k != kind}
    if kind == "run":
        pending.pop("labels_run", None)  # a new batch run reads the labels too
    pending[kind] = {"run_key": run_key, "attempts": attempt + 1}
    updated = {**entry, "pending": pending}
    request = RunRequest(
        run_key=run_key,
        partition_key=batch_id,
        tags=tags,
        asset_selection=None if not labels_only else [_key(name) for name in LABELS_ASSETS],
    )
    return updated, request


def _key(name: str):  # noqa: ANN202
    from dagster import AssetKey

    return AssetKey(name)


def _retry_if_failed(
    context: SensorEvaluationContext, batch_id: str, entry: dict[str, Any], kind: str
) -> tuple[dict[str, Any], RunRequest] | None:
    """A new request when the ``kind`` run last requested for the batch failed (bounded attempts)."""
    pending = (entry.get("pending") or {}).get(kind)
    if not isinstance(pending, dict) or int(pending.get("attempts", 0)) >= MAX_ATTEMPTS:
        return None
    runs = context.instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: pending["run_key"]}), limit=1)
    if not runs or runs[0].status != DagsterRunStatus.FAILURE:
        return None
    updated, request = _request(batch_id, entry, kind, kind == "labels_run", attempt=int(pending["attempts"]))
    attempts = updated["pending"][kind]["attempts"]
    context.log.info(f"production batch {batch_id}: run {pending['run_key']} failed; requesting it again ({attempts}/{MAX_ATTEMPTS})")
    return updated, request
