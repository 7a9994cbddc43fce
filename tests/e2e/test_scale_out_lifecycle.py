"""The whole scale-out deployment on one machine, as a team runs it on several: `cvops` against a
real PostgreSQL (the Dagster instance of deploy/dagster.yaml and the Optuna study), Redis (the
Celery broker) and an S3 endpoint (moto's server: landing zone, artifacts, step logs), with the
lifecycle's steps executed by two `cvops worker` processes (CVOPS_EXECUTOR=celery) and
hpo_study's trials by two HPO worker processes inside one of them.

Nothing may go through a shared local folder: `cvops run` and each worker have a working folder
and a DAGSTER_HOME of their own, and the test checks that none of them received a file.

The issue's "done when" test; it also carries the checks of the scale-out instance (runs and
pool slots in PostgreSQL, no SQLite file, dagster.yaml untouched, a step's logs uploaded and
read back through the instance's compute log manager), so the suite runs one scale-out
lifecycle, not two."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import psutil
import pytest
import yaml

from tests.services import AWS_TEST_ENV, PostgresServer, postgres, redis, s3_endpoint  # noqa: F401 - fixtures
from tests.test_cli import cvops

pytestmark = pytest.mark.slow

DEPLOY_YAML = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"
BUCKET = "cvops"
LOGS_PREFIX = "dagster-logs"
WORKERS = ("cvops-a", "cvops-b")
#: Seconds a worker may take to connect to the broker and say it is ready.
WORKER_READY_S = 90
#: The whole labelled lifecycle on a tiny budget: the search runs two one-epoch trials in two
#: HPO worker processes (each claims one as soon as it has started: a trial takes longer than
#: the difference between their starts); this test is about where things run and live.
TINY = (
    "ops:\n"
    "  hpo_study: {config: {n_trials: 2, max_epochs: 1, hpo_workers: 2}}\n"
    "  trained_model: {config: {max_epochs: 1, accuracy_floor: 0.0}}\n"
)
LIFECYCLE_ASSETS = {"raw_images", "cleaned_dataset", "hpo_study", "trained_model", "production_model", "onnx_runtime"}


def _deployment_env(server: PostgresServer, dagster_db: str, optuna_db: str, broker: str, endpoint: str) -> dict[str, str]:
    """What every machine of the deployment sets (DAGSTER_HOME aside): the variables of
    deploy/dagster.yaml, the S3 roots, the shared Optuna study and the Celery executor."""
    return {
        **AWS_TEST_ENV,
        "DAGSTER_POSTGRES_HOST": server.host,
        "DAGSTER_POSTGRES_PORT": str(server.port),
        "DAGSTER_POSTGRES_USER": server.user,
        "DAGSTER_POSTGRES_PASSWORD": server.password,
        "DAGSTER_POSTGRES_DB": dagster_db,
        "DAGSTER_COMPUTE_LOGS_BUCKET": BUCKET,
        "DAGSTER_COMPUTE_LOGS_PREFIX": LOGS_PREFIX,
        "CVOPS_S3_ENDPOINT_URL": endpoint,
        "CVOPS_LANDING": f"s3://{BUCKET}/landing",
        "CVOPS_ARTIFACT_ROOT": f"s3://{BUCKET}/artifacts",
        # The driver dagster-postgres installs, named (a bare postgresql:// means psycopg 3).
        "CVOPS_OPTUNA_STORAGE": server.url(optuna_db).replace("postgresql://", "postgresql+psycopg2://", 1),
        "CVOPS_EXECUTOR": "celery",
        "CVOPS_CELERY_BROKER": broker,
    }


def _machine(root: Path, name: str) -> tuple[Path, Path]:
    """A folder standing for one machine: its working folder and its DAGSTER_HOME (holding a
    copy of deploy/dagster.yaml, as every machine of the deployment does)."""
    cwd, home = root / name / "work", root / name / "dagster_home"
    cwd.mkdir(parents=True)
    home.mkdir(parents=True)
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    return cwd, home


def _subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without the project's variables (as tests.test_cli.cvops does), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVOPS_", "DAGSTER_"))}
    return {**env, **extra}


@contextmanager
def celery_workers(root: Path, env: dict[str, str]) -> Iterator[Callable[[], dict[str, subprocess.Popen]]]:
    """Start one `cvops worker` per name in WORKERS, each on a "machine" of its own, and yield a
    function that waits until each is ready (bounded) and returns them; afterwards stop them
    (SIGTERM, as a service manager does) and make sure no process of theirs is left."""
    started: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for name in WORKERS:
            cwd, home = _machine(root, name)
            logs[name] = root / f"{name}.log"
            with logs[name].open("wb") as log:
                started[name] = subprocess.Popen(
                    [sys.executable, "-m", "cvops_dagster.cli", "worker", "--name", name],
                    cwd=cwd,
                    env=_subprocess_env({**env, "DAGSTER_HOME": str(home)}),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

        def wait_until_ready() -> dict[str, subprocess.Popen]:
            deadline = time.monotonic() + WORKER_READY_S
            waiting = set(WORKERS)
            while waiting:
                for name in sorted(waiting):
                    text = logs[name].read_text(errors="replace")
                    if f"{name}@" in text and " ready." in text:  # Celery's "<name>@<host> ready."
                        waiting.discard(name)
                    elif started[name].poll() is not None:
                        raise AssertionError(f"worker {name} exited with {started[name].returncode}:\n{text[-4000:]}")
                if waiting and time.monotonic() > deadline:
                    tails = "\n".join(logs[n].read_text(errors="replace")[-2000:] for n in sorted(waiting))
                    raise AssertionError(f"workers {sorted(waiting)} not ready in {WORKER_READY_S} s:\n{tails}")
                time.sleep(0.5)
            return started

        yield wait_until_ready
    finally:
        slow, left = _stop(started)
    # Reached only when the test passed (an error in it propagates from the yield above).
    assert not slow, f"workers {slow} did not stop within 30 s of SIGTERM"
    assert not left, f"processes of the workers left running (now killed): {left}"


def _stop(workers: dict[str, subprocess.Popen]) -> tuple[list[str], list[int]]:
    """SIGTERM each worker, wait (bounded), kill whatever of theirs is still alive; returns the
    workers that did not stop in time and the processes that had to be killed."""
    tree = {p.pid for w in workers.values() for p in _tree(w.pid)}
    for worker in workers.values():
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    slow = []
    for name, worker in workers.items():
        try:
            worker.wait(timeout=30)  # `cvops worker` stops everything of its own within 15 s
        except subprocess.TimeoutExpired:
            slow.append(name)
    left = sorted(p for p in tree if _alive(p))
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    for worker in workers.values():
        worker.wait(timeout=10)
    return slow, left


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _keys(client, bucket: str, prefix: str) -> set[str]:  # noqa: ANN001 - a boto3 S3 client
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.timeout(600)
def test_lifecycle_runs_on_celery_workers_with_postgres_redis_and_s3(
    tmp_path: Path,
    postgres: PostgresServer,  # noqa: F811
    redis: str,  # noqa: F811
    s3_endpoint: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dagster_db, optuna_db = postgres.create_database("dagster"), postgres.create_database("optuna")
    env = _deployment_env(postgres, dagster_db, optuna_db, redis, s3_endpoint)
    client_cwd, client_home = _machine(tmp_path, "client")
    client_env = {**env, "DAGSTER_HOME": str(client_home)}
    (client_cwd / "tiny.yaml").write_text(TINY)

    with celery_workers(tmp_path, env) as wait_until_ready:
        cvops("seed", "--no-production", cwd=client_cwd, env=client_env)  # while the workers start
        workers = wait_until_ready()
        # The workers' processes before the run: the supervisor and its Celery worker (the HPO
        # workers a step spawns come and go).
        worker_pids = {name: {p.pid for p in _tree(w.pid)} for name, w in workers.items()}
        out = cvops("run", "--config", "tiny.yaml", cwd=client_cwd, env=client_env)
        status = json.loads(cvops("status", "--json", cwd=client_cwd, env=client_env).stdout)
    assert "materialized raw_images [batch_003]" in out.stdout
    assert status["raw_images"]["batches"] == 3
    assert status["trained_model"]["dataset_version"] == status["cleaned_dataset"]["version"]
    assert status["onnx_runtime"]["model_id"] == status["production_model"]["model_id"]

    # --- nothing went through a local folder ---------------------------------------------
    # The artifacts, the landing zone and the step logs are objects of the bucket; no machine's
    # working folder or DAGSTER_HOME received a file (no `.cvops`, no IO-manager output, no
    # Optuna file, no SQLite instance), and each dagster.yaml is as deployed.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    artifacts = _keys(s3, BUCKET, "artifacts/")
    assert any(k.startswith("artifacts/runtimes/") and k.endswith(".onnx") for k in artifacts), sorted(artifacts)[:50]
    assert any(k.startswith("artifacts/models/") for k in artifacts), sorted(artifacts)[:50]
    assert not any("optuna" in k for k in artifacts)  # the study lives in PostgreSQL
    for name in ("client", *WORKERS):
        assert _files(tmp_path / name / "work") == (["tiny.yaml"] if name == "client" else []), name
        assert _files(tmp_path / name / "dagster_home") == ["dagster.yaml"], name
        assert (tmp_path / name / "dagster_home" / "dagster.yaml").read_bytes() == DEPLOY_YAML.read_bytes()

    # --- the runs, their events and the pool slot are rows of PostgreSQL ----------------------
    connection = postgres.connect(dagster_db)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pipeline_name, status FROM runs")
            runs = sorted(cursor.fetchall())
            cursor.execute("SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
            materialized = {json.loads(key)[0] for (key,) in cursor.fetchall()}
    finally:
        connection.close()
    assert runs == sorted([("ingest_job", "SUCCESS")] * 3 + [("lifecycle_job", "SUCCESS")]), runs
    assert LIFECYCLE_ASSETS <= materialized, materialized

    from dagster import AssetKey, DagsterEventType, DagsterInstance, RunsFilter
    from dagster._core.storage.compute_log_manager import ComputeIOType
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    for name, value in client_env.items():
        monkeypatch.setenv(name, value)
    instance = DagsterInstance.from_config(str(client_home))
    local_dir = yaml.safe_load(DEPLOY_YAML.read_text())["compute_logs"]["config"]["local_dir"]
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert instance.get_latest_materialization_event(AssetKey("onnx_runtime")) is not None
        training = instance.event_log_storage.get_concurrency_info("training")
        assert training.slot_count == 1 and not training.claimed_slots, training

        # --- every step ran on a Celery worker, and both workers ran steps -----------------
        step_workers: dict[str, set[str]] = {}
        step_pids: set[int] = set()
        for run in instance.get_runs():
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event is None or event.step_key is None:
                    continue
                if event.event_type == DagsterEventType.STEP_START:
                    step_pids.add(event.pid)
                metadata = getattr(event.event_specific_data, "metadata", None) or {}
                if "Celery worker" in metadata:  # dagster-celery's "Executing steps ... in celery worker"
                    node = str(getattr(metadata["Celery worker"], "value", metadata["Celery worker"]))
                    step_workers.setdefault(node.split("@")[0], set()).add(event.step_key)
        assert set(step_workers) == set(WORKERS), step_workers
        all_steps = set().union(*step_workers.values())
        assert {"raw_images", "cleaned_dataset", "hpo_study", "trained_model", "onnx_runtime"} <= all_steps, step_workers
        # The STEP_START events came from the workers' processes (Celery's solo pool: the
        # worker's own process), never from `cvops run`.
        assert step_pids and step_pids <= set().union(*worker_pids.values()), (step_pids, worker_pids)

        # --- the study: two HPO worker processes inside one step, trials from both ----------
        import optuna

        hpo = status["hpo_study"]
        assert hpo["hpo_workers"] == 2, hpo
        study = optuna.load_study(study_name=hpo["study_name"], storage=env["CVOPS_OPTUNA_STORAGE"])
        trials = study.get_trials(deepcopy=False)
        assert len(trials) == 2, trials
        assert {t.user_attrs["worker"] for t in trials} == {0, 1}, [t.user_attrs for t in trials]

        # --- a step's logs: uploaded by the worker, read back from S3 through the instance --
        logs = instance.compute_log_manager
        assert isinstance(logs, S3ComputeLogManager)
        (lifecycle,) = instance.get_runs(filters=RunsFilter(job_name="lifecycle_job"))
        captured = [
            event.dagster_event.logs_captured_data
            for event in instance.all_logs(lifecycle.run_id, of_type=DagsterEventType.LOGS_CAPTURED)
        ]
        (capture,) = [c for c in captured if "trained_model" in c.step_keys]
        log_key = logs.build_log_key_for_run(lifecycle.run_id, capture.file_key)
        err_key = f"{LOGS_PREFIX}/storage/{lifecycle.run_id}/compute_logs/{capture.file_key}.err"
        out_key = f"{LOGS_PREFIX}/storage/{lifecycle.run_id}/compute_logs/{capture.file_key}.out"
        assert {err_key, out_key} <= _keys(s3, BUCKET, f"{LOGS_PREFIX}/")
        assert not logs.has_local_file(log_key, ComputeIOType.STDERR)
        data = logs.get_log_data(log_key)
        assert data.stderr == s3.get_object(Bucket=BUCKET, Key=err_key)["Body"].read()
        assert data.stdout == s3.get_object(Bucket=BUCKET, Key=out_key)["Body"].read()
        assert data.stderr or data.stdout, "the trained_model step's output was not captured"
        assert logs.is_capture_complete(log_key)
    finally:
        for run in instance.get_runs():
            shutil.rmtree(Path(local_dir) / run.run_id, ignore_errors=True)
        instance.dispose()


# Celery 5.7's Redis result backend calls redis-py's setex, which redis-py 8 marks deprecated.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered")  # a second app in this process
def test_a_stopped_worker_fails_its_step_for_the_waiting_run(tmp_path: Path, redis: str) -> None:  # noqa: F811
    """The run worker waits on each step's Celery result: when `cvops worker` is stopped in the
    middle of a step it marks that task failed in the result backend (real Redis here), so the
    run fails the step with the reason instead of waiting forever."""
    import uuid

    from celery.result import AsyncResult
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app

    from cvops_dagster.cli.worker import fail_interrupted_step
    from resources.deployment import celery_executor_config, celery_worker_app

    env = {"CVOPS_EXECUTOR": "celery", "CVOPS_CELERY_BROKER": redis}
    worker = celery_worker_app(env)
    sender = make_app(CeleryExecutor.for_cli(**celery_executor_config(env)).app_args())  # as the executor's loop builds it
    task_id = str(uuid.uuid4())
    waiting = AsyncResult(task_id, app=sender)
    assert not waiting.ready()
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"task_id": task_id, "step": "step hpo_study of run r1"}))
    assert fail_interrupted_step(worker, str(state), "cvops-a") == task_id
    assert waiting.ready() and waiting.state == "FAILURE"
    with pytest.raises(RuntimeError, match="the Celery worker cvops-a was stopped while it ran step hpo_study of run r1"):
        waiting.get(timeout=10)
    # The last task it took had ended (its result is stored): nothing to fail, nothing overwritten.
    done = str(uuid.uuid4())
    worker.backend.mark_as_done(done, ["serialized events"])
    state.write_text(json.dumps({"task_id": done, "step": "step trained_model of run r1"}))
    assert fail_interrupted_step(worker, str(state), "cvops-a") is None
    assert AsyncResult(done, app=sender).get(timeout=10) == ["serialized events"]
    state.write_text("{}")  # never took a task
    assert fail_interrupted_step(worker, str(state), "cvops-a") is None
