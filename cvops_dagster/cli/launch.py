"""Runs of ``cvops run``/``demo``/``rollback`` created through the code location, as the UI's.

A run made by ``JobDefinition.execute_in_process`` carries no code-location origin, so the
Dagster UI lists it only on the Runs page: not on the Overview timeline, not on its job's
page, and it cannot be re-executed from there. Here every run is created the way the UI and
the sensors create theirs: from the code location's job (``cvops_dagster.definitions``, the
location ``workspace.yaml`` names), with its origin. Then:

* when a Dagster daemon serves this instance's run queue (``cvops ui`` or ``cvops watch`` is
  running), the run is **submitted to the queue**: it waits its turn beside sensor-launched
  runs under the same queue and pool limits, and the daemon's run worker executes it while
  this command follows its events;
* else this process **executes the run itself**, as a run worker does (``dagster api
  execute_run``), with the in-process executor: one process, one set of imports, and pool
  slots claimed by each step as in any run. When the deployment names a step executor
  (``CVOPS_EXECUTOR=celery``: :mod:`resources.deployment`), this process is the run worker
  and the steps go where that executor sends them (the Celery workers, ``cvops worker``).

Either way ``cvops`` streams the run's progress and returns its final status.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cvops_dagster.core import settings

logger = logging.getLogger("cvops")

#: The code location's name: the module ``workspace.yaml`` loads (Dagster names a location
#: after its module when the workspace gives no ``location_name``).
LOCATION_NAME = "cvops_dagster.definitions"
#: The repository Dagster makes of a module's ``Definitions``.
REPOSITORY_NAME = "__repository__"
#: A daemon whose run-queue heartbeat is older than this is taken as stopped (it beats every 30 s).
DAEMON_STALE_S = 90.0
#: Run config that picks the in-process executor for a run this process executes.
IN_PROCESS_EXECUTION = {"execution": {"config": {"in_process": {}}}}

#: Seconds between looks at a run another process executes.
FOLLOW_POLL_S = 1.0


def execution_config() -> dict[str, Any]:
    """Run config for the executor of a run this process executes: the in-process executor
    under Dagster's default one; nothing when the deployment names a step executor
    (``CVOPS_EXECUTOR``, :func:`resources.deployment.selected_executor`), whose config is
    complete in the code location and whose steps run elsewhere."""
    from resources.deployment import selected_executor

    return {} if selected_executor() else dict(IN_PROCESS_EXECUTION)


def project_directory() -> str:
    """The folder the code location is loaded from: the project root, else the current folder."""
    root = settings.project_root()
    return str(root) if root is not None else os.getcwd()


def daemon_serves_queue(instance: Any, now: float | None = None) -> bool:
    """Whether runs submitted to ``instance``'s queue will be dequeued: a queued run
    coordinator and a live daemon heartbeat from its run-queue loop."""
    from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator

    if not isinstance(instance.run_coordinator, QueuedRunCoordinator):
        # A coordinator that launches at once (DefaultRunCoordinator) would hand the run to the
        # run launcher, which cannot start a run of this in-process location: execute it here.
        return False
    beat = instance.get_daemon_heartbeats().get("QUEUED_RUN_COORDINATOR")
    return beat is not None and (now if now is not None else time.time()) - beat.timestamp < DAEMON_STALE_S


class CodeLocationLauncher:
    """Creates and executes runs of one code location's jobs against one instance."""

    def __init__(self, instance: Any, workspace: Any) -> None:
        self.instance = instance
        self._workspace = workspace

    @classmethod
    @contextmanager
    def open(cls, instance: Any) -> Iterator[CodeLocationLauncher]:
        """Load the code location in this process (no code server) for the duration."""
        from dagster._core.remote_origin import InProcessCodeLocationOrigin
        from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
        from dagster._core.workspace.context import WorkspaceProcessContext
        from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

        origin = InProcessCodeLocationOrigin(
            loadable_target_origin=LoadableTargetOrigin(
                executable_path=sys.executable, module_name=LOCATION_NAME, working_directory=project_directory()
            ),
            location_name=LOCATION_NAME,
        )
        with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget([origin])) as workspace:
            location_errors = workspace.create_request_context().get_code_location_error(LOCATION_NAME)
            if location_errors is not None:
                raise RuntimeError(f"the code location {LOCATION_NAME} failed to load: {location_errors.message}")
            yield cls(instance, workspace)

    def create_run(
        self,
        job_name: str,
        *,
        asset_selection: set[Any] | None = None,
        partition_key: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Any:
        """A NOT_STARTED run of ``job_name`` (optionally a subset and a partition) with the
        code location's origin, as the UI's launchpad creates one."""
        from dagster._core.definitions.selector import JobSubsetSelector
        from dagster._core.storage.dagster_run import DagsterRunStatus
        from dagster._core.storage.tags import PARTITION_NAME_TAG

        context = self._workspace.create_request_context()
        location = context.get_code_location(LOCATION_NAME)
        selector = JobSubsetSelector(
            location_name=LOCATION_NAME,
            repository_name=REPOSITORY_NAME,
            job_name=job_name,
            op_selection=None,
            asset_selection=frozenset(asset_selection) if asset_selection else None,
            asset_check_selection=None,
        )
        remote_job = location.get_job(selector)
        config = dict(run_config or {})
        plan = location.get_execution_plan(
            remote_job, config, step_keys_to_execute=None, known_state=None, instance=self.instance
        )
        run_tags = {**remote_job.tags, **(tags or {})}
        if partition_key is not None:
            run_tags[PARTITION_NAME_TAG] = partition_key
        return self.instance.create_run(
            job_name=job_name,
            run_id=None,
            run_config=config,
            status=DagsterRunStatus.NOT_STARTED,
            tags=run_tags,
            root_run_id=None,
            parent_run_id=None,
            step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
            execution_plan_snapshot=plan.execution_plan_snapshot,
            job_snapshot=remote_job.job_snapshot,
            parent_job_snapshot=remote_job.parent_job_snapshot,
            asset_selection=selector.asset_selection,
            asset_check_selection=None,
            resolved_op_selection=None,
            op_selection=None,
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
            asset_graph=context.asset_graph,
        )

    def submit(self, run: Any) -> Any:
        """Hand ``run`` to the instance's run coordinator (the queue) and follow it to its end.

        Ctrl-C or SIGTERM cancels it (dequeued, or its worker terminated). A run left queued
        after the daemon stopped is canceled with a clear error rather than waited on forever.
        """
        from dagster import DagsterRunStatus

        try:
            self.instance.submit_run(run.run_id, self._workspace.create_request_context())
            while True:
                current = self.instance.get_run_by_id(run.run_id)
                if current.is_finished:
                    return current
                if not daemon_serves_queue(self.instance):
                    if current.status == DagsterRunStatus.QUEUED:
                        self.instance.report_run_canceled(current, "the Dagster daemon stopped while this run waited in its queue")
                        raise RuntimeError(
                            f"the Dagster daemon serving this instance stopped while run {run.run_id} waited in its queue; "
                            "it was canceled: start `cvops watch` (or stop it for good) and run the command again"
                        )
                    raise RuntimeError(
                        f"the Dagster daemon serving this instance stopped while run {run.run_id} was {current.status.value}; "
                        "no longer following it: `cvops status` or `cvops ui` show how it ends"
                    )
                time.sleep(FOLLOW_POLL_S)
        except KeyboardInterrupt:
            logger.warning("canceling run %s", run.run_id)
            self.instance.run_coordinator.cancel_run(run.run_id)
            raise

    def execute_here(self, run: Any) -> Any:
        """Execute ``run`` in this process, as a run worker would, and return it finished."""
        from dagster._utils.hosted_user_process import recon_job_from_origin
        from dagster._core.execution.api import execute_run

        execute_run(recon_job_from_origin(run.job_code_origin), run, self.instance)
        return self.instance.get_run_by_id(run.run_id)
