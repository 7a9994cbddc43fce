"""The code location loads, names what DESIGN.md promises, and keeps its layering."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetKey, Definitions, build_resources

from cvops_dagster.definitions import defs

REPO = Path(__file__).resolve().parents[1]


def test_definitions_load() -> None:
    Definitions.validate_loadable(defs)


LIFECYCLE = {"raw_images", "cleaned_dataset", "hpo_study", "trained_model", "production_model", "onnx_runtime"}
PRODUCTION = {"batch_predictions", "drift_report", "edge_case_review", "review_feedback"}


def test_expected_assets_checks_and_sensors() -> None:
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == LIFECYCLE | PRODUCTION
    check_names = {k.name for k in graph.asset_check_keys}
    assert check_names == {
        "check_raw_images_not_empty",
        "check_cleaned_dataset_expectations",
        "check_trained_model_accuracy_floor",
        "check_production_model_no_regression",
        "check_onnx_runtime_parity",
        "check_batch_predictions_not_empty",
        "check_drift_report_within_threshold",
    }
    non_blocking = {"check_raw_images_not_empty", "check_batch_predictions_not_empty", "check_drift_report_within_threshold"}
    for key in graph.asset_check_keys:
        assert graph.get_check_spec(key).blocking == (key.name not in non_blocking), key.name
    # The labelled side refreshes itself; the production side is driven by its sensors.
    for name in LIFECYCLE - {"raw_images"}:
        assert graph.get(AssetKey(name)).automation_condition is not None, name
    for name in PRODUCTION:
        assert graph.get(AssetKey(name)).automation_condition is None, name
    assert graph.get(AssetKey("trained_model")).pools == {"training"}
    assert graph.get(AssetKey("edge_case_review")).pools == {"review"}
    assert all(name.startswith("check_") for name in check_names)
    for sensor in ("asset_update_sensor", "image_batches_sensor", "production_batches_sensor", "drift_retrain_sensor", "review_sensor"):
        assert defs.resolve_sensor_def(sensor).default_status.value == "RUNNING", sensor
    for job in ("ingest_job", "lifecycle_job", "production_job", "review_job", "rollback_job"):
        assert defs.resolve_job_def(job) is not None
    assert graph.get(AssetKey("raw_images")).partitions_def.name == "image_batches"
    for name in ("batch_predictions", "drift_report"):
        assert graph.get(AssetKey(name)).partitions_def.name == "production_batches"
    # A retraining run (lifecycle_job) never touches the production side or the raw batches.
    lifecycle = defs.resolve_job_def("lifecycle_job").asset_layer.executable_asset_keys
    assert {k.to_user_string() for k in lifecycle} == LIFECYCLE - {"raw_images"}
    # `cvops run` splits the graph the same way the jobs do.
    from cvops_dagster.cli.runs import PRODUCTION_ASSETS

    production = defs.resolve_job_def("production_job").asset_layer.executable_asset_keys
    assert {k.to_user_string() for k in production} == set(PRODUCTION_ASSETS) == PRODUCTION
    # A review in the App refreshes the feedback and (new_data policy, the default) the dataset.
    review = defs.resolve_job_def("review_job").asset_layer.executable_asset_keys
    assert {k.to_user_string() for k in review} == {"review_feedback", "cleaned_dataset"}


def test_the_drift_check_warns_instead_of_failing() -> None:
    from dagster import AssetCheckKey

    graph = defs.resolve_asset_graph()
    spec = graph.get_check_spec(AssetCheckKey(AssetKey("drift_report"), "check_drift_report_within_threshold"))
    assert not spec.blocking


def test_new_labels_alone_never_start_a_dataset_version() -> None:
    """cleaned_dataset's automation reacts to labelled batches, not to review_feedback: production
    labels reach a dataset through drift_retrain_sensor's policy."""
    from dagster import AssetMaterialization, DataVersion, evaluate_automation_conditions, instance_for_test
    from dagster._core.definitions.data_version import DATA_VERSION_TAG

    def materialize(instance, name: str, version: str, partition: str | None = None) -> None:  # noqa: ANN001
        instance.report_runless_asset_event(
            AssetMaterialization(name, partition=partition, tags={DATA_VERSION_TAG: DataVersion(version).value})
        )

    def requested(result) -> set[str]:  # noqa: ANN001
        return {name for name in ("cleaned_dataset", "hpo_study") if result.get_num_requested(AssetKey(name))}

    with instance_for_test() as instance:
        instance.add_dynamic_partitions("image_batches", ["b1"])
        result = evaluate_automation_conditions(defs=defs, instance=instance)
        # A labelled batch: a new dataset version, although review_feedback was never materialized.
        materialize(instance, "raw_images", "batch-1", partition="b1")
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert "cleaned_dataset" in requested(result)
        materialize(instance, "cleaned_dataset", "v1")
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        # Production labels alone: nothing.
        materialize(instance, "review_feedback", "labels-1")
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert "cleaned_dataset" not in requested(result)
        # Another labelled batch: a new version again.
        materialize(instance, "raw_images", "batch-2", partition="b1")
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert "cleaned_dataset" in requested(result)


def _modules_after(code: str) -> set[str]:
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(result.stdout.split())


def test_quieting_the_cli_for_a_cleaning_benchmark_loads_no_torch() -> None:
    quiet = "import logging; logging.basicConfig(); from cvops_dagster import cli; cli._quiet_libraries(trains={})"
    assert "torch" not in _modules_after(quiet.format(False))
    assert {"torch", "lightning", "optuna"} <= _modules_after(quiet.format(True))


def test_one_s3_resource_serves_dagster_code_and_the_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    """dagster-aws's S3Resource is the ``s3`` resource, and the stores hold that same one."""
    from dagster_aws.s3 import S3Resource

    from cvops_dagster.definitions import build_definitions

    monkeypatch.setenv("CVOPS_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CVOPS_ARTIFACT_ROOT", "s3://cvops/artifacts")
    resources = build_definitions().resources
    s3 = resources["s3"]
    assert isinstance(s3, S3Resource)
    assert resources["artifact_store"].s3 is s3 and resources["image_source"].s3 is s3
    with build_resources({"s3": s3, "artifact_store": resources["artifact_store"]}) as bound:
        # As an op sees them: the boto3 client from ``s3``, the s3fs filesystem of the store.
        assert bound.s3.meta.endpoint_url == "http://127.0.0.1:9"
        assert bound.artifact_store.storage.fs.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.delenv("CVOPS_S3_ENDPOINT_URL")
    assert build_definitions().resources["s3"].endpoint_url is None
