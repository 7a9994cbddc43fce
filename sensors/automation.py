"""asset_update_sensor: evaluates the assets' automation conditions (new data -> new model)."""

from dagster import AssetSelection, AutomationConditionSensorDefinition, DefaultSensorStatus

asset_update_sensor = AutomationConditionSensorDefinition(
    "asset_update_sensor",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Requests the downstream assets whose upstream changed (a batch ingested by "
    "image_batches_sensor leads to a new dataset version, study, model and runtime).",
)
