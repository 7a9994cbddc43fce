"""The `cvops` command line end to end, as a user runs it, in a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvops_dagster.core.settings import REVIEW_PREFIX_ENV  # kept: each test has its own review dataset (tests/conftest.py)

from cvops_dagster.cli import build_parser


def cvops(*args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CVOPS_", "DAGSTER_HOME")) or k == REVIEW_PREFIX_ENV}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "cvops_dagster.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cvops {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_help_lists_the_contract_commands() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"seed", "run", "status", "demo", "ui"} <= set(commands)


def test_run_without_batches_fails_clearly(tmp_path: Path) -> None:
    result = cvops("run", "--select", "raw_images", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "no complete batch" in result.stderr
    assert "Traceback" not in result.stderr
    # No DAGSTER_HOME given: the CLI made ./.dagster_home with our dagster.yaml.
    assert "concurrency" in (tmp_path / ".dagster_home" / "dagster.yaml").read_text()


def test_bad_selection_fails_clearly(tmp_path: Path) -> None:
    result = cvops("run", "--select", "no_such_asset", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "cvops: error:" in result.stderr


#: The bundled digits `cvops seed` writes as labelled batches: 1,797 less the production pool
#: (cvops_dagster.ingestion.sample_data.labelled_and_production_indices).
LABELLED_DIGITS = 1124
#: Images of the production stream (prod_001..prod_003; the drifted holdout is never written).
PRODUCTION_IMAGES = 150 + 120 + 240


def test_seed_run_status_ingestion(tmp_path: Path) -> None:
    out = cvops("seed", cwd=tmp_path)
    assert "seeded production/prod_003: 240 images, 204 delayed labels" in out.stdout
    batches = sorted(p.name for p in (tmp_path / "landing").iterdir())
    assert batches == ["batch_001", "batch_002", "batch_003", "production"]
    assert sum(1 for _ in (tmp_path / "landing").rglob("*.png")) == LABELLED_DIGITS + PRODUCTION_IMAGES
    assert sorted(p.name for p in (tmp_path / "landing" / "production").iterdir()) == ["prod_001", "prod_002", "prod_003"]
    out = cvops("run", "--select", "raw_images", cwd=tmp_path)
    assert "materialized raw_images [batch_003]" in out.stdout
    status = json.loads(cvops("status", "--json", cwd=tmp_path).stdout)
    raw = status["raw_images"]
    assert raw["batches"] == 3
    assert raw["files"] == LABELLED_DIGITS
    assert raw["rejected"] == 0 and raw["rejected_reasons"] == {}
    assert (tmp_path / ".cvops" / "manifests" / "raw" / "batch_001.parquet").exists()
    _assert_runs_belong_to_the_code_location(tmp_path / ".dagster_home", "ingest_job", 3)


def _assert_runs_belong_to_the_code_location(home: Path, job: str, count: int) -> None:
    """The UI lists a run on the Overview timeline and its job's page by the repository label
    Dagster stores for runs created from the code location (execute_in_process has none)."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from cvops_dagster.cli.launch import LOCATION_NAME

    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(RunsFilter(job_name=job))
        labelled = instance.get_runs(RunsFilter(job_name=job, tags={".dagster/repository": f"__repository__@{LOCATION_NAME}"}))
        assert len(runs) == count and {r.run_id for r in labelled} == {r.run_id for r in runs}
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        assert all(r.remote_job_origin is not None and r.remote_job_origin.location_name == LOCATION_NAME for r in runs)
        # No daemon served this instance: cvops executed them itself, tagged with its process.
        assert all("cvops/pid" in r.tags for r in runs)


def test_workspace_names_the_location_cvops_creates_runs_in() -> None:
    """`cvops run` creates runs in the location `workspace.yaml` defines (the daemon and the UI
    find a run's location by that name)."""
    import yaml

    from cvops_dagster.cli.launch import LOCATION_NAME

    workspace = yaml.safe_load((Path(__file__).resolve().parents[1] / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    module = entry["python_module"]
    assert (module if isinstance(module, str) else module["module_name"]) == LOCATION_NAME
    assert isinstance(module, str) or module.get("location_name", LOCATION_NAME) == LOCATION_NAME


def test_daemon_serves_the_queue_only_with_a_fresh_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from dagster import DagsterInstance

    from cvops_dagster.cli.launch import DAEMON_STALE_S, daemon_serves_queue
    from cvops_dagster.core.instance import ensure_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))  # restored after the test
    home = ensure_dagster_home(str(tmp_path / "home"))
    with DagsterInstance.from_config(str(home)) as instance:
        assert not daemon_serves_queue(instance)  # the queued coordinator, no daemon ever ran
        beats = {"QUEUED_RUN_COORDINATOR": SimpleNamespace(timestamp=1000.0)}
        instance.get_daemon_heartbeats = lambda: beats  # type: ignore[method-assign]
        assert daemon_serves_queue(instance, now=1000.0 + DAEMON_STALE_S - 1)
        assert not daemon_serves_queue(instance, now=1000.0 + DAEMON_STALE_S + 1)


def test_seed_without_production_or_without_labels(tmp_path: Path) -> None:
    out = cvops("seed", "--landing", str(tmp_path / "plain"), "--no-production", cwd=tmp_path)
    assert "seeded production/" not in out.stdout
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["batch_001", "batch_002", "batch_003"]
    out = cvops("seed", "--landing", str(tmp_path / "unlabelled"), "--no-labels", cwd=tmp_path)
    assert "seeded production/prod_001: 150 images, no labels" in out.stdout
    assert (tmp_path / "unlabelled" / "production" / "prod_003" / "_READY").exists()
    assert not list((tmp_path / "unlabelled").rglob("labels.csv"))


def test_landing_and_artifacts_flags_override_environment(tmp_path: Path) -> None:
    env = {"CVOPS_LANDING": str(tmp_path / "wrong"), "CVOPS_ARTIFACT_ROOT": str(tmp_path / "wrong-art")}
    cvops("seed", "--landing", str(tmp_path / "in"), cwd=tmp_path, env=env)
    cvops("run", "--select", "raw_images", "--landing", str(tmp_path / "in"), "--artifacts", str(tmp_path / "art"), cwd=tmp_path, env=env)
    assert (tmp_path / "art" / "manifests" / "raw" / "batch_002.parquet").exists()
    assert not (tmp_path / "wrong-art").exists()


def _first_materialization(home: Path, asset: str) -> dict:
    """The figures of ``asset``'s first materialization in the instance at ``home``."""
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        record = instance.fetch_materializations(AssetKey(asset), limit=1, ascending=True).records[0]
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}


@pytest.mark.slow
def test_demo_meets_the_quality_bar_runs_the_drift_loop_and_predict_matches(demo_project) -> None:  # noqa: ANN001
    """`cvops demo` on the bundled digits with the default budget: the first champion meets the
    quality bar; the production stream's drifted batches are flagged, the in-distribution one is
    not; one retraining on the delivered labels raises accuracy on held-out drifted images; then
    `cvops predict` matches the runtime."""
    import re

    import pandas as pd

    from cvops_dagster.core.storage import ArtifactStorage
    from cvops_dagster.monitoring.sample_stream import delayed_labels
    from cvops_dagster.serving.predictor import Predictor

    tmp_path, out = demo_project.root, demo_project.stdout  # `cvops demo`, run once (tests/conftest.py)
    assert "UI:" in out and "artifacts:" in out
    assert "cvops review --view edge_cases" in out and "review dataset demo_project_review:" in out
    assert "waiting for new labels (no labelled production images yet)" in out  # the drift sensor before the labels
    first_data = _first_materialization(tmp_path / ".dagster_home", "cleaned_dataset")
    first = _first_materialization(tmp_path / ".dagster_home", "trained_model")
    assert first_data["input"] == LABELLED_DIGITS and first_data["review_feedback_samples"] == 0
    # The quality bar, on the first champion: >= 0.985 and at least the scikit-learn baseline,
    # give or take one image of the ~110-image test split (the baseline often scores 1.0 on it).
    assert first["test_accuracy"] >= 0.985
    assert first["test_accuracy"] >= first["baseline_accuracy"] - 1 / 100

    status = json.loads(cvops("status", "--json", cwd=tmp_path).stdout)
    reports = status["drift_report"]["batches"]
    assert reports["prod_001"]["drift"] is False
    assert reports["prod_002"]["drift"] is True and reports["prod_003"]["drift"] is True
    requests = status["retraining"]["requests"]
    assert len(requests) == 1 and requests[0]["status"] == "SUCCESS", requests
    labelled = sum(len(delayed_labels(b)) for b in ("prod_001", "prod_002", "prod_003"))
    assert status["review_feedback"]["labelled_samples"] == labelled
    cleaned, production, runtime = (status[k] for k in ("cleaned_dataset", "production_model", "onnx_runtime"))
    assert cleaned["input"] == LABELLED_DIGITS + labelled
    assert cleaned["clean"] + cleaned["duplicates"] + cleaned["quarantined"] == cleaned["input"]
    assert sum(cleaned["splits"].values()) == cleaned["clean"]
    accuracy = re.search(r"before: ([0-9.]+).*\n.*after: +([0-9.]+)", out)
    assert accuracy is not None, out
    before, after = float(accuracy.group(1)), float(accuracy.group(2))
    assert after > before + 0.2, out
    assert production["promoted"] and runtime["model_id"] == production["model_id"]
    assert runtime["parity_max_abs_diff"] <= 1e-4 and runtime["parity_argmax_agreement"] >= 0.999

    # cvops predict on the original files of the first dataset's test split == the runtime on the canonical images.
    store = ArtifactStorage(str(tmp_path / ".cvops"))
    manifest = store.read_parquet(f"datasets/{first_data['version']}/manifest.parquet")
    test = manifest[(manifest["outcome"] == "clean") & (manifest["split"] == "test")].head(40)
    files = [str(tmp_path / "landing" / b / p) for b, p in zip(test["batch_id"], test["path"], strict=True)]
    printed = json.loads(cvops("predict", "--json", *files, cwd=tmp_path).stdout)
    predictor = Predictor(runtime["path"])
    from PIL import Image

    expected = predictor.predict([Image.open(store.local_path(k)) for k in test["image_key"]])
    assert [p["label"] for p in printed] == list(expected.labels)
    assert [round(p["confidence"], 5) for p in printed] == [round(float(c), 5) for c in expected.confidences]
    assert (pd.Series([p["label"] for p in printed]) == test["label"].reset_index(drop=True)).mean() >= 0.9

    # Two champions now: a rollback restores the first.
    restored = cvops("rollback", cwd=tmp_path)
    assert "rolled back from" in restored.stdout


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("localhost", False), ("::1", False), ("0.0.0.0", True), ("10.1.2.3", True), ("my-box", True)])
def test_ui_warns_when_it_would_listen_beyond_this_machine(host: str, warned: bool) -> None:
    from cvops_dagster.cli.commands import exposure_warning

    warning = exposure_warning(host)
    assert (warning is not None) == warned
    if warned:
        assert "no authentication" in warning and host in warning


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "CVOPS_EXECUTOR=celery"),
        ({"CVOPS_EXECUTOR": "celery"}, "CVOPS_CELERY_BROKER"),
        ({"CVOPS_EXECUTOR": "celery", "CVOPS_K8S_EXECUTOR": "1", "CVOPS_CELERY_BROKER": "redis://127.0.0.1:1/0"}, "two executors"),
    ],
)
def test_worker_without_the_celery_settings_fails_clearly(tmp_path: Path, env: dict[str, str], named: str) -> None:
    """`cvops worker` checks its settings before it starts anything (the worker itself runs for
    real in tests/e2e/test_scale_out_lifecycle.py)."""
    result = cvops("worker", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1
    assert named in result.stderr and "cvops: error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing created: no instance, no folder


def test_help_lists_the_worker() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    help_text = commands["worker"].format_help()
    assert "CVOPS_CELERY_BROKER" in help_text and "--queue" in help_text and "solo" in help_text
