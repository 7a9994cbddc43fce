"""``cvops worker``: a Celery worker that executes the steps of runs (``CVOPS_EXECUTOR=celery``).

With ``CVOPS_EXECUTOR=celery`` a run worker (``cvops run`` executing a run itself, or the
daemon's run worker) sends each step of the run as a task to the Celery broker
(``CVOPS_CELERY_BROKER``, dagster-celery's ``celery_executor``); a ``cvops worker`` on any machine
takes one, loads the code location, executes the step against the run's Dagster instance and
sends its events back through the result backend. What a step needs to be shared is shared by
URL, never by a folder: the instance (PostgreSQL, ``deploy/dagster.yaml``), the step logs and
the artifacts (S3), the Optuna study (``CVOPS_OPTUNA_STORAGE``). So a worker gets the same
environment as ``cvops run``: this command resolves and exports the roots as every ``cvops``
command does (:func:`cvops_dagster.cli.common.apply_overrides`).

Each worker runs one step at a time, in its own main process (Celery's ``solo`` pool, see
:data:`resources.deployment.CELERY_WORKER_POOL`), so a step may start processes of its own (the
parallel HPO workers). More steps at once: more workers.

The worker is a child process in a session of its own (:func:`cvops_dagster.cli.services.run_service`):
Ctrl-C or SIGTERM stops it, and whatever the step it was running had started, within 15 s. A
step it was running then fails, with the reason, instead of leaving its run waiting for a
result that would never come: the worker records each task it takes in a state file, and
after the stop (or after the worker died by itself: the OOM killer, a crash) that task, if the
result backend holds no result for it, is marked failed there.

The child is :mod:`cvops_dagster.cli.celery_worker`: the Celery worker itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from cvops_dagster.cli.common import CvopsError
from cvops_dagster.core import settings


def worker_app() -> Any:
    """The Celery app (:func:`resources.deployment.celery_worker_app`), bad settings as one line."""
    try:
        from resources.deployment import celery_worker_app

        return celery_worker_app()
    except ValueError as exc:
        raise CvopsError(str(exc)) from exc
    except ImportError as exc:
        raise CvopsError(f"the Celery worker needs the `celery` extra (pip install '.[celery]'): {exc}") from exc


def _redacted(url: str) -> str:
    """A broker URL without its password, to print."""
    from cvops_dagster.core.redaction import redact_url

    return redact_url(url) or url


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker for the steps of runs, until Ctrl-C or SIGTERM."""
    from resources.deployment import CELERY_QUEUE, CELERY_WORKER_POOL

    from cvops_dagster.cli.services import run_service

    settings.disable_telemetry()
    app = worker_app()  # the settings checked here, before anything starts
    name = args.name or f"cvops-{uuid.uuid4().hex[:6]}"
    queues = args.queue or [CELERY_QUEUE]
    fd, state = tempfile.mkstemp(prefix=f"cvops-worker-{name}-", suffix=".json")
    os.close(fd)
    try:
        print(
            f"Celery worker {name}@{socket.gethostname()}: steps from {_redacted(app.conf.broker_url)}, queue(s) "
            f"{', '.join(queues)}, one at a time ({CELERY_WORKER_POOL} pool); artifacts {os.environ[settings.ARTIFACT_ROOT_ENV]} "
            "(Ctrl-C or SIGTERM stops it)",
            flush=True,
        )
        command = [sys.executable, "-m", "cvops_dagster.cli.celery_worker", name, ",".join(queues), args.loglevel, state]
        code = run_service(command, f"the Celery worker {name}")
        # Stopped on request, or ended by itself (the OOM killer, a crash): either way a step it
        # was running will not send its result.
        fail_interrupted_step(app, state, name)
        return code
    finally:
        Path(state).unlink(missing_ok=True)


def fail_interrupted_step(app: Any, state_file: str, name: str) -> str | None:
    """Mark the step the stopped worker was running (if any) failed in the result backend, so
    the run worker waiting on it fails the step with this reason instead of waiting forever.

    The state file names the last task the worker took; it was running when the worker
    stopped if the backend holds no result for it. Returns the task id marked."""
    try:
        record = json.loads(Path(state_file).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return None
    task_id = record.get("task_id")
    if not task_id or app.AsyncResult(task_id).ready():
        return None
    step = record.get("step") or "a step of a run"
    error = RuntimeError(f"the Celery worker {name} was stopped while it ran {step}")
    app.backend.mark_as_failure(task_id, error)
    print(f"cvops: {step} (task {task_id}) was interrupted: marked failed for its run", file=sys.stderr, flush=True)
    return task_id
