"""The composition root: every asset, check, job, sensor and resource of the code location."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, load_asset_checks_from_modules, load_assets_from_modules

from cvops_dagster.core.settings import disable_telemetry

disable_telemetry()

import assets.datasets  # noqa: E402
import assets.ingestion  # noqa: E402
import assets.registry  # noqa: E402
import assets.serving  # noqa: E402
import assets.training  # noqa: E402
from assets.partitions import image_batches  # noqa: E402
from resources.storage import artifact_store_from_env, image_source_from_env  # noqa: E402
from resources.tuning import optuna_storage_from_env  # noqa: E402
from sensors.automation import asset_update_sensor  # noqa: E402
from sensors.batches import image_batches_sensor  # noqa: E402

ASSET_MODULES = [assets.ingestion, assets.datasets, assets.training, assets.registry, assets.serving]

ingest_job = define_asset_job(
    "ingest_job",
    selection=AssetSelection.assets("raw_images"),
    description="Ingest one landing-zone batch (one image_batches partition).",
)

lifecycle_job = define_asset_job(
    "lifecycle_job",
    selection=AssetSelection.all() - AssetSelection.assets("raw_images"),
    description="Everything downstream of the ingested batches: dataset, model, runtime.",
)

rollback_job = define_asset_job(
    "rollback_job",
    selection=AssetSelection.assets("production_model", "onnx_runtime"),
    config={"ops": {"production_model": {"config": {"rollback": True}}}},
    description="Restore the previous champion: production_model decides the rollback, onnx_runtime publishes it "
    "with the restored model's runtime (reused when its files still verify, else rebuilt). `cvops rollback` runs it.",
)


def build_definitions() -> Definitions:
    return Definitions(
        assets=load_assets_from_modules(ASSET_MODULES),
        asset_checks=load_asset_checks_from_modules(ASSET_MODULES),
        jobs=[ingest_job, lifecycle_job, rollback_job],
        sensors=[image_batches_sensor, asset_update_sensor],
        resources={
            "artifact_store": artifact_store_from_env(),
            "image_source": image_source_from_env(),
            "optuna_storage": optuna_storage_from_env(),
        },
    )


defs = build_definitions()
