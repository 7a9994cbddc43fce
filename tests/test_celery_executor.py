"""The Celery step executor (``CVOPS_EXECUTOR=celery``): chosen from the environment, its config
checked with dagster-celery's own schema and Celery's own settings, the same app for the run
workers that send the steps and the ``cvops worker`` that receives them.

The executor run for real (Redis, two workers, a whole lifecycle) is
tests/e2e/test_scale_out_lifecycle.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery.app.defaults import flatten
from celery.app.defaults import NAMESPACES as CELERY_SETTINGS
from dagster._config import process_config
from dagster._core.execution.retries import RetryMode
from dagster_celery import celery_executor
from dagster_celery.config import TASK_EXECUTE_PLAN_NAME
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app

from resources.deployment import (
    CELERY_APP_CONFIG,
    CELERY_QUEUE,
    CELERY_WORKER_POOL,
    celery_executor_config,
    celery_worker_app,
    selected_executor,
    step_executor,
)

ROOT = Path(__file__).resolve().parents[1]
BROKER = "redis://redis.internal:6379/0"
CELERY_ENV = {"CVOPS_EXECUTOR": "celery", "CVOPS_CELERY_BROKER": BROKER}
KNOWN_SETTINGS = {name for name, _ in flatten(CELERY_SETTINGS)}


def test_the_executor_config_passes_dagster_celerys_schema() -> None:
    config = celery_executor_config(CELERY_ENV)
    result = process_config(celery_executor.config_schema.config_type, config)
    assert result.success, result.errors
    assert result.value["broker"] == BROKER and result.value["backend"] == BROKER  # the backend follows the broker
    executor = step_executor(CELERY_ENV)
    assert executor is not None and executor.name == celery_executor.name


def test_a_backend_of_its_own_and_the_schema_rejects_a_planted_key() -> None:
    config = celery_executor_config({**CELERY_ENV, "CVOPS_CELERY_BACKEND": "redis://results:6379/1"})
    assert config["backend"] == "redis://results:6379/1"
    assert not process_config(celery_executor.config_schema.config_type, {**config, "brokers": BROKER}).success


def test_the_app_settings_are_celerys_own() -> None:
    """config_source is a free mapping in dagster-celery's schema: its keys are checked against
    Celery's own settings instead, and a misspelt one is caught."""
    assert set(CELERY_APP_CONFIG) <= KNOWN_SETTINGS, set(CELERY_APP_CONFIG) - KNOWN_SETTINGS
    assert "worker_redirect_stdout" not in KNOWN_SETTINGS  # what a typo would look like


#: dagster-celery registers its step task on every app it makes (Celery shares it with later
#: apps too); a second app in one process gets Celery 5.7's duplicate-name warning for it.
SAME_TASK_AGAIN = "ignore:Task name 'execute_plan' is already registered"


@pytest.mark.filterwarnings(SAME_TASK_AGAIN)
def test_the_worker_takes_what_the_run_workers_send() -> None:
    """The app the executor builds to send steps (dagster-celery's core loop: make_app with the
    executor's app_args) and the app of `cvops worker` share broker, backend, queue and settings,
    and the worker has dagster-celery's step task."""
    worker = celery_worker_app(CELERY_ENV)
    config = process_config(celery_executor.config_schema.config_type, celery_executor_config(CELERY_ENV)).value
    executor = CeleryExecutor(
        retries=RetryMode.DISABLED, broker=config["broker"], backend=config["backend"], config_source=config["config_source"]
    )
    sender = make_app(executor.app_args())
    for app in (worker, sender):
        assert app.conf.broker_url == BROKER and app.conf.result_backend == BROKER
        assert app.conf.task_default_queue == CELERY_QUEUE
        for name, value in CELERY_APP_CONFIG.items():
            assert app.conf[name] == value, name
    assert TASK_EXECUTE_PLAN_NAME in worker.tasks
    assert [q.name for q in worker.conf.task_queues] == [CELERY_QUEUE]
    assert CELERY_WORKER_POOL == "solo"  # see resources/deployment.py: a prefork child may not start the HPO workers


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"CVOPS_EXECUTOR": ""}, None),
        ({"CVOPS_EXECUTOR": "Celery "}, "celery"),
        ({"CVOPS_EXECUTOR": "k8s"}, "k8s"),
        ({"CVOPS_K8S_EXECUTOR": "1"}, "k8s"),
        ({"CVOPS_EXECUTOR": "k8s", "CVOPS_K8S_EXECUTOR": "1"}, "k8s"),
        ({"CVOPS_EXECUTOR": "celery", "CVOPS_K8S_EXECUTOR": "0"}, "celery"),
    ],
)
def test_the_executor_the_environment_asks_for(env: dict[str, str], expected: str | None) -> None:
    assert selected_executor(env) == expected


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CVOPS_EXECUTOR": "celery", "CVOPS_K8S_EXECUTOR": "1", "CVOPS_CELERY_BROKER": BROKER}, "ask for two executors"),
        ({"CVOPS_EXECUTOR": "dask"}, "CVOPS_EXECUTOR"),
        ({"CVOPS_EXECUTOR": "celery"}, "CVOPS_CELERY_BROKER"),
        ({"CVOPS_EXECUTOR": "celery", "CVOPS_CELERY_BROKER": "  "}, "CVOPS_CELERY_BROKER"),
    ],
)
def test_bad_settings_fail_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        step_executor(env)


def test_a_worker_needs_the_celery_executor() -> None:
    with pytest.raises(ValueError, match="CVOPS_EXECUTOR=celery"):
        celery_worker_app({"CVOPS_CELERY_BROKER": BROKER})


_WIRING_PROBE = """
import json
from dagster._config import process_config
from cvops_dagster import definitions
from cvops_dagster.cli.launch import execution_config
job = definitions.defs.resolve_job_def("lifecycle_job")
run_config = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}, **execution_config(),
              "ops": {"hpo_study": {"config": {"n_trials": 2, "hpo_workers": 2}}}}
checked = process_config(job.run_config_schema.config_type, run_config)
print(json.dumps({"executor": job.executor_def.name, "execution_config": execution_config(),
                  "valid": checked.success, "errors": [str(e.message) for e in checked.errors or []]}))
"""


def _probe(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CVOPS_EXECUTOR", "CVOPS_K8S_", "CVOPS_CELERY_"))}
    out = subprocess.run(
        [sys.executable, "-c", _WIRING_PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_code_location_runs_steps_on_celery_and_cvops_run_config_fits() -> None:
    """With CVOPS_EXECUTOR=celery the loaded code location's jobs use the Celery executor, and the
    run config `cvops run` gives a run it executes passes the job's schema (no in-process
    executor forced on it); without it, `cvops run` still picks the in-process executor."""
    celery = _probe(CELERY_ENV)
    assert celery == {"executor": celery_executor.name, "execution_config": {}, "valid": True, "errors": []}, celery
    default = _probe({})
    assert default["executor"] != celery_executor.name and default["valid"], default
    assert default["execution_config"] == {"execution": {"config": {"in_process": {}}}}


def test_the_worker_keeps_the_step_it_takes_in_its_state_file(tmp_path: Path) -> None:
    """What `cvops worker` reads after a stop to fail the interrupted step (the failure itself,
    through a real Redis result backend, is in tests/e2e/test_scale_out_lifecycle.py)."""
    from celery.signals import task_postrun, task_prerun
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import pack_value

    from cvops_dagster.cli.celery_worker import _record_running_task

    state = tmp_path / "state.json"
    started = _record_running_task(str(state))
    try:
        pointer = ModuleCodePointer("cvops_dagster.definitions", "defs", str(ROOT))
        origin = JobPythonOrigin("lifecycle_job", RepositoryPythonOrigin(sys.executable, pointer))
        packed = pack_value(ExecuteStepArgs(job_origin=origin, run_id="run-1", step_keys_to_execute=["hpo_study"]))
        kwargs = {"execute_step_args_packed": packed, "executable_dict": {}}
        task_prerun.send(sender=None, task_id="task-1", task=None, args=(), kwargs=kwargs)
        assert json.loads(state.read_text()) == {"task_id": "task-1", "step": "step hpo_study of run run-1"}
        # Kept after the task: whether it ended is the result backend's to say.
        task_postrun.send(sender=None, task_id="task-1", task=None, args=(), kwargs=kwargs, retval=None, state="SUCCESS")
        assert json.loads(state.read_text())["task_id"] == "task-1"
    finally:
        task_prerun.disconnect(started)
