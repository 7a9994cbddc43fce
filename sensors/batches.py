"""image_batches_sensor: turns each new complete landing-zone batch into a partition and a run."""


import json

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from assets.partitions import image_batches
from resources.storage import ImageSource


@sensor(
    job_name="ingest_job",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds each complete batch (one holding _READY) as an image_batches partition and "
    "requests one raw_images run for it. The cursor maps batch id -> file-list fingerprint, so a "
    "batch whose files change is ingested again.",
)
def image_batches_sensor(context: SensorEvaluationContext, image_source: ImageSource) -> SensorResult:
    landing = image_source.landing()
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(image_batches.name))
    requests: list[RunRequest] = []
    new_partitions: list[str] = []
    for batch_id in landing.list_complete_batches():
        fingerprint = landing.fingerprint(batch_id)
        if seen.get(batch_id) == fingerprint:
            continue
        seen[batch_id] = fingerprint
        if batch_id not in known:
            new_partitions.append(batch_id)
        elif _ingested_fingerprint(context, batch_id) == fingerprint:
            continue  # already ingested as it is now (by `cvops run`, say): nothing to do
        requests.append(RunRequest(run_key=f"{batch_id}:{fingerprint}", partition_key=batch_id))
    if not requests:
        return SensorResult(skip_reason="no new or changed complete batch", cursor=json.dumps(seen, sort_keys=True))
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[image_batches.build_add_request(new_partitions)] if new_partitions else [],
        cursor=json.dumps(seen, sort_keys=True),
    )


def _ingested_fingerprint(context: SensorEvaluationContext, batch_id: str) -> str | None:
    """The file-list fingerprint recorded by the partition's latest raw_images materialization."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("raw_images"), asset_partitions=[batch_id]), limit=1
    ).records
    if not records:
        return None
    value = records[0].asset_materialization.metadata.get("fingerprint")
    return value.value if value is not None else None
