"""The whole asset graph through Dagster on a small RGB landing zone, with tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cvops_dagster.core.settings import REVIEW_PREFIX_ENV  # kept: each test has its own review dataset (tests/conftest.py)
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
        _check_graph_end_to_end(instance, landing, artifacts, monkeypatch)


def _check_graph_end_to_end(instance: DagsterInstance, landing: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole graph, then a second run of the gate and the runtime on the same instance."""
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
    # torch threads are set on purpose per step and recorded.
    assert trained["torch_threads"] >= 1 and status["hpo_study"]["torch_threads"] >= 1
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
    # The decision was recorded before anything was published, and the publish event names it.
    assert production["decision"] == "promote" and production["target_model_id"] == production["model_id"]
    assert runtime["publication"] == "promoted" and runtime["published"] and not runtime["reused"]
    events = [json.loads(p.read_text()) for p in sorted((artifacts / "production" / "history").glob("*.json"))]
    assert [(e["event"], e["model_id"], e["decision_id"]) for e in events] == [("promoted", production["model_id"], production["decision_id"])]
    assert events[0]["runtime"] == serving
    assert (artifacts / "production" / "decisions" / f"{production['decision_id']}.json").exists()

    # A second run on unchanged data: the recorded decision and the published runtime are reused.
    again = defs.resolve_job_def("lifecycle_job").execute_in_process(
        instance=instance, asset_selection=[AssetKey("production_model"), AssetKey("onnx_runtime")], raise_on_error=False
    )
    assert again.success
    second = collect_status(instance, defs)
    assert second["production_model"]["decision"] == "keep" and second["production_model"]["model_id"] == production["model_id"]
    assert second["onnx_runtime"]["publication"] == "unchanged" and second["onnx_runtime"]["reused"]
    assert second["onnx_runtime"]["sha256"] == runtime["sha256"]
    assert len(list((artifacts / "production" / "history").glob("*.json"))) == 1
    assert json.loads((artifacts / "production" / "serving.json").read_text()) == serving


def test_no_regression_check_fails_when_production_got_worse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_landing(landing, {"circle": 30, "hbar": 30, "vbar": 30})
    with instance_for_test() as instance:
        defs, result = run_all(instance, landing, artifacts, monkeypatch, TINY)
        assert result.success
        production = artifacts / "production"
        before = {p.relative_to(production): p.read_bytes() for p in production.rglob("*") if p.is_file() and "decisions" not in p.parts}
        # A new challenger that wins on the whole (harder) test split but scores worse than the
        # champion on the champion's own test samples: the scores the gate measures, stated.
        import cvops_dagster.registry.gate as gate

        scores = iter([(0.9, 0.5), (0.8, 0.9)])  # (all, previous): challenger first, then champion

        def measured(targets, pred, masks, labels):  # noqa: ANN001, ANN202
            overall, previous = next(scores)
            return {"all": {"accuracy": overall, "macro_f1": overall, "n": 20},
                    "previous": {"accuracy": previous, "macro_f1": previous, "n": 20}, "new": {"accuracy": None, "macro_f1": None, "n": 0}}  # fmt: skip

        monkeypatch.setattr(gate, "slice_metrics", measured)
        retrain = {"ops": {"trained_model": {"config": {**TINY["ops"]["trained_model"]["config"], "seed": 1}}}}
        again = defs.resolve_job_def("lifecycle_job").execute_in_process(
            instance=instance, run_config=retrain, raise_on_error=False,
            asset_selection=[AssetKey("trained_model"), AssetKey("production_model"), AssetKey("onnx_runtime")],
        )  # fmt: skip
        checks = {e.check_name: e.passed for e in again.get_asset_check_evaluations()}
        assert checks["check_production_model_no_regression"] is False
        # Blocking: the runtime was not rebuilt for a regressed production model.
        assert "check_onnx_runtime_parity" not in checks
        decided = collect_status(instance, defs)["production_model"]
        assert decided["decision"] == "promote" and decided["accepted"] is False
        # Nothing was published: pointers, history and served files are as they were.
        after = {p.relative_to(production): p.read_bytes() for p in production.rglob("*") if p.is_file() and "decisions" not in p.parts}
        assert after == before
        # A later run of onnx_runtime alone refuses the rejected decision too.
        later = defs.resolve_job_def("lifecycle_job").execute_in_process(
            instance=instance, asset_selection=[AssetKey("onnx_runtime")], raise_on_error=False
        )
        assert not later.success
        failure = next(e for e in later.all_events if e.event_type_value == "STEP_FAILURE")
        assert "failed its blocking check" in str(failure.event_specific_data.error)


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


def _cvops(*args: str, cwd: Path, env: dict[str, str]):  # noqa: ANN202
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith(("CVOPS_", "DAGSTER_HOME")) or k == REVIEW_PREFIX_ENV}
    full.update(env, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "cvops_dagster.cli", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=900)


def _publish_constant_champion(artifacts: Path, version: str) -> tuple[str, str]:
    """Save a model that always predicts the class rarest in the test split, and publish it through
    the gate as the first champion; returns (model id, its label)."""
    import torch

    from cvops_dagster.core.storage import ArtifactStorage
    from cvops_dagster.datasets.loading import load_dataset
    from cvops_dagster.registry.gate import decide_promotion
    from cvops_dagster.serving.publication import publish_decision
    from cvops_dagster.training.model_store import save_model
    from cvops_dagster.training.models import build_classifier, full_arch

    storage = ArtifactStorage(str(artifacts))
    data = load_dataset(storage, version)
    rarest = int(np.argmin(np.bincount(data.splits["test"].targets, minlength=len(data.labels))))
    arch = full_arch({"widths": [8, 16], "blocks_per_stage": 1})
    model = build_classifier(arch, len(data.labels), data.channels)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias[rarest] = 1.0
    saved = save_model(storage, model, arch=arch, labels=data.labels, input_spec=data.input_spec(), dataset_version=version,
                       hyperparameters={}, metrics={}, model_id="m-constant")  # fmt: skip
    decision = decide_promotion(storage, saved.model_id, version)
    assert publish_decision(storage, decision).published
    return saved.model_id, data.labels[rarest]


def test_rollback_restores_the_previous_champion_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two champions, `cvops rollback` (the rollback_job), then `cvops predict` serves the previous
    one, `cvops status` agrees, and the history is intact."""
    from cvops_dagster.core.instance import ensure_dagster_home

    landing, artifacts, home = tmp_path / "landing", tmp_path / "artifacts", tmp_path / "home"
    write_landing(landing, {"circle": 30, "hbar": 30, "vbar": 30})
    env = {"CVOPS_LANDING": str(landing), "CVOPS_ARTIFACT_ROOT": str(artifacts), "DAGSTER_HOME": str(home)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ensure_dagster_home()
    with DagsterInstance.get() as instance:  # the instance the `cvops` commands below use
        defs = build_definitions()
        instance.add_dynamic_partitions("image_batches", ["b1"])
        assert defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key="b1").success
        lifecycle = defs.resolve_job_def("lifecycle_job")
        assert lifecycle.execute_in_process(instance=instance, asset_selection=[AssetKey("cleaned_dataset")]).success
        version = collect_status(instance, defs)["cleaned_dataset"]["version"]
        first, label = _publish_constant_champion(artifacts, version)
        rest = [AssetKey(k) for k in ("hpo_study", "trained_model", "production_model", "onnx_runtime")]
        assert lifecycle.execute_in_process(instance=instance, run_config=TINY, asset_selection=rest).success
        second = collect_status(instance, defs)["production_model"]["model_id"]
    assert second != first
    serving_before = json.loads((artifacts / "production" / "serving.json").read_text())
    assert serving_before["model_id"] == second

    # --no-export with the restored model's runtime gone: refused, and nothing changes; the
    # rollback decided in that failed run is not completed by a later run that republishes.
    oldest = sorted((artifacts / "production" / "history").glob("*.json"))[0]
    runtime_file = artifacts / json.loads(oldest.read_text())["runtime"]["fp32_key"]
    runtime_file.rename(runtime_file.with_suffix(".away"))
    refused = _cvops("rollback", "--no-export", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and f"no runtime to reuse for model {first}" in refused.stderr and "--no-export" in refused.stderr
    later = _cvops("run", "--select", "onnx_runtime", cwd=tmp_path, env=env)
    assert later.returncode == 1 and "never published" in later.stderr
    assert json.loads((artifacts / "production" / "serving.json").read_text()) == serving_before
    assert len(list((artifacts / "production" / "history").glob("*.json"))) == 2
    runtime_file.with_suffix(".away").rename(runtime_file)

    rolled = _cvops("rollback", cwd=tmp_path, env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert f"production model is now {first} (rolled back from {second}" in rolled.stdout

    status = json.loads(_cvops("status", "--json", cwd=tmp_path, env=env).stdout)
    assert status["production_model"]["model_id"] == first and status["production_model"]["decision"] == "rollback"
    assert status["onnx_runtime"]["model_id"] == first and status["onnx_runtime"]["publication"] == "rollback"
    assert status["onnx_runtime"]["reused"]  # its runtime still verified: nothing rebuilt
    serving = json.loads((artifacts / "production" / "serving.json").read_text())
    assert serving["model_id"] == first and status["onnx_runtime"]["sha256"] == serving["fp32_sha256"]
    current = json.loads((artifacts / "production" / "current.json").read_text())
    assert current["model_id"] == first and current["previous_model_id"] == second

    images = sorted(str(p) for p in (landing / "b1").rglob("*.png") if p.name != "broken.png")[:6]
    predicted = _cvops("predict", "--json", *images, cwd=tmp_path, env=env)
    assert predicted.returncode == 0, predicted.stderr
    assert [r["label"] for r in json.loads(predicted.stdout)] == [label] * len(images)  # the constant champion serves

    events = [json.loads(p.read_text()) for p in sorted((artifacts / "production" / "history").glob("*.json"))]
    assert [(e["event"], e["model_id"], e["replaces"]) for e in events] == [
        ("promoted", first, None), ("promoted", second, first), ("rollback", first, second),
    ]  # fmt: skip
    assert events[2]["runtime"] == events[0]["runtime"] == serving

    # One champion left: a second rollback refuses, clearly, and changes nothing.
    refused = _cvops("rollback", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "no previous champion" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((artifacts / "production" / "serving.json").read_text()) == serving
    assert len(list((artifacts / "production" / "history").glob("*.json"))) == 3

    # A truncated serving.json: predict names it and the fix, and the fix works.
    pointer = artifacts / "production" / "serving.json"
    pointer.write_text(pointer.read_text()[:40])
    broken = _cvops("predict", *images[:1], cwd=tmp_path, env=env)
    assert broken.returncode == 1 and f"{pointer}: truncated or invalid JSON" in broken.stderr
    assert "cvops run --select onnx_runtime" in broken.stderr and "Traceback" not in broken.stderr
    repaired = _cvops("run", "--select", "onnx_runtime", cwd=tmp_path, env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert json.loads(pointer.read_text()) == serving
    assert _cvops("predict", *images[:1], cwd=tmp_path, env=env).returncode == 0


def test_interleaved_lifecycle_runs_each_keep_one_consistent_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A (dataset V1) is tuning when run B (a new batch: V2) goes through the whole graph.
    A must go on with its own V1 dataset and study; every card, study and runtime of each run
    names one chain."""
    import cvops_dagster.training.tuning as tuning

    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_landing(landing, {"circle": 30, "hbar": 30, "vbar": 30}, batch="b1")
    with instance_for_test() as instance:
        monkeypatch.setenv("CVOPS_LANDING", str(landing))
        monkeypatch.setenv("CVOPS_ARTIFACT_ROOT", str(artifacts))
        defs = build_definitions()
        instance.add_dynamic_partitions("image_batches", ["b1"])
        assert defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key="b1").success

        real_run_study = tuning.run_study
        b_results: list = []
        b_started: list[bool] = []

        def run_study_with_b_in_between(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if not b_started:  # only in run A: run B starts and finishes meanwhile
                b_started.append(True)
                write_landing(landing, {"circle": 12, "hbar": 12, "vbar": 12}, batch="b2", size=(24, 20))
                instance.add_dynamic_partitions("image_batches", ["b2"])
                assert defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key="b2").success
                b_results.append(defs.resolve_job_def("lifecycle_job").execute_in_process(instance=instance, run_config=TINY))
            return real_run_study(*args, **kwargs)

        monkeypatch.setattr(tuning, "run_study", run_study_with_b_in_between)
        a = defs.resolve_job_def("lifecycle_job").execute_in_process(instance=instance, run_config=TINY, raise_on_error=False)
        (b,) = b_results
        assert b.success
        chains = {name: _chain(instance, run.run_id) for name, run in (("A", a), ("B", b))}

    a_chain, b_chain = chains["A"], chains["B"]
    assert a_chain["cleaned_dataset"]["version"] != b_chain["cleaned_dataset"]["version"]
    for chain in (a_chain, b_chain):
        version = chain["cleaned_dataset"]["version"]
        assert chain["hpo_study"]["dataset_version"] == version
        assert chain["trained_model"]["dataset_version"] == version
        assert chain["trained_model"]["inputs"]["cleaned_dataset"]["version"] == version
        assert chain["trained_model"]["inputs"]["hpo_study"]["dataset_version"] == version
        card = json.loads((artifacts / "models" / chain["trained_model"]["model_id"] / "model_card.json").read_text())
        assert card["dataset_version"] == version
        assert chain["production_model"]["challenger_id"] == chain["trained_model"]["model_id"]
        if chain["onnx_runtime"] is not None and chain["onnx_runtime"].get("published"):
            assert chain["onnx_runtime"]["model_id"] == chain["production_model"]["target_model_id"]
    # Inside each run, every step built on what that run produced.
    assert a_chain["trained_model"]["inputs"]["cleaned_dataset"]["run_id"] == a.run_id
    assert a_chain["trained_model"]["inputs"]["hpo_study"]["run_id"] == a.run_id


def _chain(instance: DagsterInstance, run_id: str) -> dict[str, dict | None]:
    """Each asset's figures as materialized in run ``run_id``."""
    from dagster import DagsterEventType

    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    chain: dict[str, dict | None] = dict.fromkeys(("cleaned_dataset", "hpo_study", "trained_model", "production_model", "onnx_runtime"))
    for record in records:
        materialization = record.event_log_entry.asset_materialization
        chain[materialization.asset_key.to_user_string()] = {k: v.value for k, v in materialization.metadata.items()}
    return chain
