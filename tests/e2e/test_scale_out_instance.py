"""The scale-out instance (deploy/dagster.yaml) as a user runs it: `cvops` against a real
PostgreSQL (runs, events, pool slots) with step logs in S3 (moto's server).

The artifacts stay in the project's local folder here: S3 artifacts have their own test
(test_s3_lifecycle.py) and would double this one's time against moto."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest
import yaml

from tests.services import AWS_TEST_ENV, PostgresServer, postgres, s3_endpoint  # noqa: F401 - fixtures
from tests.test_cli import cvops

pytestmark = pytest.mark.slow

DEPLOY_YAML = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"
LOGS_BUCKET = "cvops"
LOGS_PREFIX = "dagster-logs"
#: The whole labelled lifecycle on the smallest budget: this test is about where the instance
#: lives, the search and the training have their own tests.
TINY = (
    "ops:\n"
    "  hpo_study: {config: {n_trials: 1, max_epochs: 1}}\n"
    "  trained_model: {config: {max_epochs: 2, accuracy_floor: 0.0}}\n"
)
LIFECYCLE_ASSETS = {"raw_images", "cleaned_dataset", "hpo_study", "trained_model", "production_model", "onnx_runtime"}


def _scale_out_env(home: Path, server: PostgresServer, db_name: str, endpoint: str) -> dict[str, str]:
    """What a deployment sets beside DAGSTER_HOME (the variables deploy/dagster.yaml reads)."""
    return {
        **AWS_TEST_ENV,
        "DAGSTER_HOME": str(home),
        "DAGSTER_POSTGRES_HOST": server.host,
        "DAGSTER_POSTGRES_PORT": str(server.port),
        "DAGSTER_POSTGRES_USER": server.user,
        "DAGSTER_POSTGRES_PASSWORD": server.password,
        "DAGSTER_POSTGRES_DB": db_name,
        "DAGSTER_COMPUTE_LOGS_BUCKET": LOGS_BUCKET,
        "DAGSTER_COMPUTE_LOGS_PREFIX": LOGS_PREFIX,
        "CVOPS_S3_ENDPOINT_URL": endpoint,
    }


@pytest.mark.timeout(600)
def test_cvops_runs_on_postgres_with_step_logs_in_s3(
    tmp_path: Path, postgres: PostgresServer, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    db_name = postgres.create_database("dagster")
    env = _scale_out_env(home, postgres, db_name, s3_endpoint)
    (tmp_path / "tiny.yaml").write_text(TINY)

    cvops("seed", "--no-production", cwd=tmp_path, env=env)
    out = cvops("run", "--select", "raw_images", cwd=tmp_path, env=env)
    assert "materialized raw_images [batch_003]" in out.stdout
    cvops("run", "--config", "tiny.yaml", cwd=tmp_path, env=env)
    status = json.loads(cvops("status", "--json", cwd=tmp_path, env=env).stdout)
    assert status["raw_images"]["batches"] == 3
    assert status["trained_model"]["dataset_version"] == status["cleaned_dataset"]["version"]
    assert status["onnx_runtime"]["model_id"] == status["production_model"]["model_id"]

    # cvops kept the user's instance file and wrote no SQLite storage beside it.
    assert (home / "dagster.yaml").read_bytes() == DEPLOY_YAML.read_bytes()
    assert sorted(p.name for p in home.rglob("*.db")) == []

    # The runs and the materializations are rows of PostgreSQL.
    connection = postgres.connect(db_name)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pipeline_name, status FROM runs")
            runs = sorted(cursor.fetchall())
            cursor.execute("SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
            materialized = {json.loads(key)[0] for (key,) in cursor.fetchall()}
    finally:
        connection.close()
    # Three ingest_job runs of the selection, three again (unchanged data, skipped or rerun) of
    # the whole graph, then the lifecycle run.
    assert ("lifecycle_job", "SUCCESS") in runs, runs
    assert all(state == "SUCCESS" for _, state in runs), runs
    assert sum(job == "ingest_job" for job, _ in runs) >= 3, runs
    assert LIFECYCLE_ASSETS <= materialized, materialized

    # The same instance through Dagster's API, as the UI and the daemon load it.
    from dagster import AssetKey, DagsterEventType, DagsterInstance, RunsFilter
    from dagster._core.storage.compute_log_manager import ComputeIOType
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    instance = DagsterInstance.from_config(str(home))
    # The logs' local scratch folder (shared by every instance of the file): this test's runs leave it.
    local_dir = yaml.safe_load(DEPLOY_YAML.read_text())["compute_logs"]["config"]["local_dir"]
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        logs = instance.compute_log_manager
        assert isinstance(logs, S3ComputeLogManager)
        assert instance.get_latest_materialization_event(AssetKey("onnx_runtime")) is not None
        # The training step claimed its slot of the `training` pool here (one slot, released).
        training = instance.event_log_storage.get_concurrency_info("training")
        assert training.slot_count == 1 and not training.claimed_slots, training

        # The trained_model step's logs: the key its run recorded (the UI's log view reads the
        # LOGS_CAPTURED event for it), uploaded under the prefix, read back from S3.
        (lifecycle,) = instance.get_runs(filters=RunsFilter(job_name="lifecycle_job"))
        captured = [
            event.dagster_event.logs_captured_data
            for event in instance.all_logs(lifecycle.run_id, of_type=DagsterEventType.LOGS_CAPTURED)
        ]
        (capture,) = [c for c in captured if "trained_model" in c.step_keys]
        log_key = logs.build_log_key_for_run(lifecycle.run_id, capture.file_key)
        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        stored = {
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=LOGS_BUCKET, Prefix=f"{LOGS_PREFIX}/")
            for o in page.get("Contents", [])
        }
        err_key = f"{LOGS_PREFIX}/storage/{lifecycle.run_id}/compute_logs/{capture.file_key}.err"
        out_key = f"{LOGS_PREFIX}/storage/{lifecycle.run_id}/compute_logs/{capture.file_key}.out"
        assert {err_key, out_key} <= stored, sorted(stored)
        # Nothing left locally once uploaded: what follows comes from the bucket.
        assert not logs.has_local_file(log_key, ComputeIOType.STDERR)
        data = logs.get_log_data(log_key)
        uploaded = client.get_object(Bucket=LOGS_BUCKET, Key=err_key)["Body"].read()
        assert data.stderr == uploaded
        assert data.stdout == client.get_object(Bucket=LOGS_BUCKET, Key=out_key)["Body"].read()
        # What `cvops run` printed while the run executed in it: the step's progress.
        assert b"trained_model" in data.stdout, data.stdout[-2000:]
        assert logs.is_capture_complete(log_key)
    finally:
        for run in instance.get_runs():
            shutil.rmtree(Path(local_dir) / run.run_id, ignore_errors=True)
        instance.dispose()
