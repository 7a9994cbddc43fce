"""The process ``cvops worker`` supervises: Celery's worker on this deployment's app.

``python -m cvops_dagster.cli.celery_worker NAME QUEUES LOGLEVEL STATE_FILE``: the worker named
``NAME@<host>`` takes steps from the comma-separated ``QUEUES`` one at a time, in this process
(Celery's ``solo`` pool), and keeps the last task it took in ``STATE_FILE`` so that
``cvops worker`` can fail it for its run when the worker is stopped in the middle of it (see
:mod:`cvops_dagster.cli.worker`). A module of its own, so that ``-m`` runs it fresh, and the
``__main__`` guard keeps the processes a step spawns (the HPO workers) from starting a worker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cvops_dagster.cli.worker import worker_app


def _record_running_task(state_file: str) -> Any:
    """In the worker: keep the last task it took (id and step) in ``state_file``, written before
    the task runs. Whether it ended is the result backend's to say, not this file's: a task cut
    short by a signal may pass Celery's post-run hooks without its result ever being stored.
    Returns the signal receiver (to disconnect)."""
    from celery.signals import task_prerun

    def started(task_id: str | None = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
        Path(state_file).write_text(json.dumps({"task_id": task_id, "step": _step_of(kwargs or {})}), encoding="utf-8")

    task_prerun.connect(started, weak=False)
    return started


def _step_of(kwargs: dict[str, Any]) -> str | None:
    """``step <key> of run <id>`` from dagster-celery's task arguments (packed ExecuteStepArgs),
    for the message of an interrupted step; None when they cannot be read."""
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import unpack_value

    try:
        args = unpack_value(kwargs["execute_step_args_packed"], as_type=ExecuteStepArgs)
    except Exception:  # noqa: BLE001 - only a message is at stake
        return None
    return f"step {', '.join(args.step_keys_to_execute or [])} of run {args.run_id}"


def worker_main(name: str, queues: str, loglevel: str, state_file: str) -> None:
    """The child: Celery's worker on this deployment's app, one step at a time in this process."""
    from resources.deployment import CELERY_WORKER_POOL

    app = worker_app()
    # The code location every step loads, loaded now: a worker whose environment cannot load it
    # (a variable the definitions reject, a missing package) fails at start rather than at its
    # first step, and its first step starts warm.
    import cvops_dagster.definitions  # noqa: F401

    _record_running_task(state_file)
    app.worker_main(
        [
            "worker",
            f"--pool={CELERY_WORKER_POOL}",
            "--concurrency=1",
            f"--hostname={name}@%h",
            f"--queues={queues}",
            f"--loglevel={loglevel}",
        ]
    )


if __name__ == "__main__":  # the child `cvops worker` starts; also guards spawned processes' imports
    worker_main(*sys.argv[1:5])
