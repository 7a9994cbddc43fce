"""The whole asset graph through Dagster on a small RGB landing zone, with tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, instance_for_test

from cvops_dagster.cli import collect_status
from cvops_dagster.definitions import build_definitions
from tests.unit.synthetic_datasets import shape_image

pytestmark = pytest.mark.slow

TINY = {
    "ops": {
        "hpo_study": {"config": {"n_trials": 2, "max_epochs": 2}},
        "trained_model": {"config": {"max_epochs": 4, "patience": 4, "accuracy_floor": 0.0}},
    }
}


def write_landing(root: Path, per_class: dict[str, int], batch: str = "b1", size: tuple[int, int] = (24, 20)) -> None:
    rng = np.random.default_rng(0)
    for label, n in per_class.items():
        folder = root / batch / label
        folder.mkdir(parents=True)
        for i in range(n):
            shape_image(label, size, "RGB", rng).save(folder / f"{i}.png")
    (root / batch / per_class.__iter__().__next__() / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / batch / "_READY").write_text("")


def run_all(instance: DagsterInstance, landing: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch, config: dict):  # noqa: ANN201
    monkeypatch.setenv("CVOPS_LANDING", str(landing))
    monkeypatch.setenv("CVOPS_ARTIFACT_ROOT", str(artifacts))
    defs = build_definitions()
    instance.add_dynamic_partitions("image_batches", ["b1"])
    ingest = defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key="b1")
    assert ingest.success
    lifecycle = defs.resolve_job_def("lifecycle_job").execute_in_process(
        instance=instance, run_config=config, raise_on_error=False
    )
    return defs, lifecycle


def test_graph_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_landing(landing, {"circle": 40, "hbar": 40, "vbar": 40})
    with instance_for_test() as instance:
        defs, result = run_all(instance, landing, artifacts, monkeypatch, TINY)
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks == {
            "check_cleaned_dataset_expectations": True,
            "check_trained_model_accuracy_floor": True,
            "check_production_model_no_regression": True,
            "check_onnx_runtime_parity": True,
        }
        status = collect_status(instance, defs)
    assert status["raw_images"]["files"] == 121
    cleaned = status["cleaned_dataset"]
    assert cleaned["input"] == 121 and cleaned["clean"] + cleaned["duplicates"] + cleaned["quarantined"] == 121
    assert cleaned["quarantine_reasons"].get("truncated", 0) + cleaned["quarantine_reasons"].get("decode_error", 0) >= 1
    assert cleaned["mode"] == "RGB"
    trained = status["trained_model"]
    assert trained["test_accuracy"] > 1 / 3  # better than chance on three classes
    assert trained["dataset_version"] == cleaned["version"]
    assert trained["baseline_accuracy"] is not None
    production = status["production_model"]
    assert production["model_id"] == trained["model_id"] and production["promoted_at"]
    runtime = status["onnx_runtime"]
    assert runtime["parity_max_abs_diff"] <= 1e-4 and runtime["parity_argmax_agreement"] >= 0.999
    assert Path(runtime["path"]).exists()
    assert set(runtime["int8"]) >= {"accepted", "reason", "test_accuracy", "path"}
    assert runtime["int8"]["reason"]
    serving = json.loads((artifacts / "production" / "serving.json").read_text())
    assert serving["model_id"] == production["model_id"] and serving["fp32_sha256"] == runtime["sha256"]


def test_no_regression_check_fails_when_production_got_worse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_landing(landing, {"circle": 30, "hbar": 30, "vbar": 30})
    with instance_for_test() as instance:
        defs, result = run_all(instance, landing, artifacts, monkeypatch, TINY)
        assert result.success
        # The champion was recorded better than it scores now (as if newer data were harder).
        current = artifacts / "production" / "current.json"
        record = json.loads(current.read_text())
        record["test_accuracy"] = 1.5
        current.write_text(json.dumps(record))
        again = defs.resolve_job_def("lifecycle_job").execute_in_process(
            instance=instance, asset_selection=[AssetKey("production_model"), AssetKey("onnx_runtime")], raise_on_error=False
        )
        checks = {e.check_name: e.passed for e in again.get_asset_check_evaluations()}
        assert checks["check_production_model_no_regression"] is False
        # Blocking: the runtime was not rebuilt for a regressed production model.
        assert "check_onnx_runtime_parity" not in checks


def test_failed_expectations_stop_training_in_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_landing(landing, {"circle": 30, "hbar": 30, "vbar": 2})  # vbar is below the class minimum
    with instance_for_test() as instance:
        _, result = run_all(instance, landing, artifacts, monkeypatch, TINY)
        assert not result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        failed = checks["check_cleaned_dataset_expectations"]
        assert not failed.passed
        assert "vbar" in str(failed.metadata["failing_expectations"].value)
        assert instance.get_latest_materialization_event(AssetKey("cleaned_dataset")) is not None
        for downstream in ("hpo_study", "trained_model", "production_model", "onnx_runtime"):
            assert instance.get_latest_materialization_event(AssetKey(downstream)) is None
    assert not (artifacts / "models").exists()

    # A later run of the downstream assets alone refuses the rejected dataset too.
    with instance_for_test() as instance:
        defs, _ = run_all(instance, landing, artifacts, monkeypatch, TINY)
        later = defs.resolve_job_def("lifecycle_job").execute_in_process(
            instance=instance, run_config=TINY, asset_selection=[AssetKey("hpo_study")], raise_on_error=False
        )
        assert not later.success
        failure = next(e for e in later.all_events if e.event_type_value == "STEP_FAILURE")
        assert "failed its blocking check" in str(failure.event_specific_data.error)
