"""The code location loads, names what DESIGN.md promises, and keeps its layering."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetKey, Definitions

from cvops_dagster.definitions import defs

REPO = Path(__file__).resolve().parents[1]


def test_definitions_load() -> None:
    Definitions.validate_loadable(defs)


def test_expected_assets_checks_and_sensors() -> None:
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_images", "cleaned_dataset", "hpo_study", "trained_model", "production_model", "onnx_runtime"}
    check_names = {k.name for k in graph.asset_check_keys}
    assert check_names == {
        "check_raw_images_not_empty",
        "check_cleaned_dataset_expectations",
        "check_trained_model_accuracy_floor",
        "check_production_model_no_regression",
        "check_onnx_runtime_parity",
    }
    for key in graph.asset_check_keys:
        if key.name != "check_raw_images_not_empty":
            assert graph.get_check_spec(key).blocking, key.name
    for name in keys - {"raw_images"}:
        assert graph.get(AssetKey(name)).automation_condition is not None, name
    assert graph.get(AssetKey("trained_model")).pools == {"training"}
    assert defs.resolve_sensor_def("asset_update_sensor").default_status.value == "RUNNING"
    assert all(name.startswith("check_") for name in check_names)
    sensor = defs.resolve_sensor_def("image_batches_sensor")
    assert sensor.default_status.value == "RUNNING"
    assert defs.resolve_job_def("ingest_job") is not None
    assert graph.get(AssetKey("raw_images")).partitions_def.name == "image_batches"


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
