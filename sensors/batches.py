"""image_batches_sensor: turns each new or changed complete landing-zone batch into a run.

Each tick lists the batches' ``_READY`` markers (one listing, one look per marker) and
fingerprints only the batches whose marker is new or changed; every ten minutes it
fingerprints them all, to catch a batch changed without its marker being rewritten.

The cursor remembers, per batch, the marker, the fingerprint of its files, a generation
number (bumped whenever the fingerprint changes) and the run it requested. Run keys carry
the generation, so a batch that goes A -> B -> A is ingested three times, while the same
content seen twice is requested once. A requested run that failed is requested again, up to
:data:`MAX_ATTEMPTS` times per generation, so a transient failure (storage, a killed process)
does not leave the partition missing and the downstream automation waiting forever.
"""

from __future__ import annotations

import json
import time
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

from assets.partitions import image_batches
from cvops_dagster.ingestion.landing import LandingZone
from resources.storage import ImageSource

#: Runs requested for one generation of a batch: the first and two retries.
MAX_ATTEMPTS = 3
#: Seconds between full re-fingerprints of every complete batch.
FULL_SCAN_INTERVAL_S = 600.0
BATCH_TAG = "cvops/batch"
RUN_KEY_TAG = "dagster/run_key"


@sensor(
    job_name="ingest_job",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds each complete batch (one holding _READY) as an image_batches partition and requests "
    "one raw_images run for it; a batch whose files change is ingested again (rewrite _READY after "
    "changing a batch), and a failed ingestion is retried up to 3 times.",
)
def image_batches_sensor(context: SensorEvaluationContext, image_source: ImageSource) -> SensorResult:
    landing = image_source.landing()
    state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    seen: dict[str, dict[str, Any]] = state.get("batches", {})
    now = time.time()
    full_scan = now - float(state.get("full_scan_at", 0.0)) >= FULL_SCAN_INTERVAL_S
    known = set(context.instance.get_dynamic_partitions(image_batches.name))
    requests: list[RunRequest] = []
    new_partitions: list[str] = []
    for batch_id, marker in landing.ready_markers().items():
        entry = seen.get(batch_id)
        if entry is None or entry.get("marker") != marker or full_scan:
            request = _look_at_batch(context, landing, batch_id, marker, entry, batch_id in known)
            seen[batch_id] = request[0]
            if request[1] is not None:
                requests.append(request[1])
                if batch_id not in known:
                    new_partitions.append(batch_id)
        elif (retry := _retry_if_failed(context, batch_id, entry)) is not None:
            seen[batch_id], request = retry
            requests.append(request)
    cursor = json.dumps({"batches": seen, "full_scan_at": now if full_scan else state.get("full_scan_at", 0.0)}, sort_keys=True)
    if not requests:
        return SensorResult(skip_reason="no new, changed or failed complete batch", cursor=cursor)
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[image_batches.build_add_request(new_partitions)] if new_partitions else [],
        cursor=cursor,
    )


def _look_at_batch(
    context: SensorEvaluationContext,
    landing: LandingZone,
    batch_id: str,
    marker: str,
    entry: dict[str, Any] | None,
    known: bool,
) -> tuple[dict[str, Any], RunRequest | None]:
    """The batch's new cursor entry, and a run request when its content is new."""
    fingerprint = landing.fingerprint(batch_id)
    if entry is not None and entry.get("fingerprint") == fingerprint:
        return {**entry, "marker": marker}, None  # marker rewritten, files unchanged
    generation = int(entry["generation"]) + 1 if entry is not None else 0
    fresh = {"marker": marker, "fingerprint": fingerprint, "generation": generation, "attempts": 0, "run_key": None}
    if known and _ingested_fingerprint(context, batch_id) == fingerprint:
        return fresh, None  # already ingested as it is now (by `cvops run`, say)
    return _request(batch_id, fresh)


def _request(batch_id: str, entry: dict[str, Any]) -> tuple[dict[str, Any], RunRequest]:
    attempt = int(entry["attempts"])
    run_key = f"{batch_id}:{entry['fingerprint']}:g{entry['generation']}" + (f":retry{attempt}" if attempt else "")
    updated = {**entry, "attempts": attempt + 1, "run_key": run_key}
    return updated, RunRequest(run_key=run_key, partition_key=batch_id, tags={BATCH_TAG: batch_id})


def _retry_if_failed(
    context: SensorEvaluationContext, batch_id: str, entry: dict[str, Any]
) -> tuple[dict[str, Any], RunRequest] | None:
    """The batch's new cursor entry and a new request when the run it last requested failed
    (bounded attempts); ``None`` otherwise."""
    run_key = entry.get("run_key")
    if not run_key or int(entry.get("attempts", 0)) >= MAX_ATTEMPTS:
        return None
    runs = context.instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    if not runs or runs[0].status != DagsterRunStatus.FAILURE:
        return None
    updated, request = _request(batch_id, entry)
    context.log.info(f"batch {batch_id}: run for {run_key} failed; requesting it again ({updated['attempts']}/{MAX_ATTEMPTS})")
    return updated, request


def _ingested_fingerprint(context: SensorEvaluationContext, batch_id: str) -> str | None:
    """The file-list fingerprint recorded by the partition's latest raw_images materialization."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("raw_images"), asset_partitions=[batch_id]), limit=1
    ).records
    if not records:
        return None
    value = records[0].asset_materialization.metadata.get("fingerprint")
    return value.value if value is not None else None
