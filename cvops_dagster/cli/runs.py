"""``cvops run`` and ``cvops rollback``: runs of the code location's jobs, with progress.

Runs are created through the code location, so the UI shows them on the Overview and their
job's page, and are executed in this process or, when a daemon serves the instance, queued
for it (see :mod:`cvops_dagster.cli.launch`).

Before a run starts, runs an earlier ``cvops`` process left behind (killed, crashed) are
failed and their pool slots freed; a step that must wait for the ``training`` pool says whose
run holds it, and SIGTERM stops the command like Ctrl-C does.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cvops_dagster.cli.common import CvopsError, artifact_storage, landing_zone, load_instance
from cvops_dagster.core import settings
from cvops_dagster.core.processes import process_identity, process_is_gone

logger = logging.getLogger("cvops")

TRAINING_POOL = "training"
#: Seconds between looks at a pool another run holds.
POOL_POLL_S = 5.0
#: Seconds a signalled command may take to stop by itself before it abandons its runs and exits.
STOP_GRACE_S = 15.0
STOP_GRACE_ENV = "CVOPS_STOP_GRACE_S"

PROGRESS_EVENTS = ("RUN_DEQUEUED", "STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION")


class _Progress:
    """Prints a run's step and materialization events as they land in the instance.

    ``owned`` runs execute in this process and carry its identity (so a later command can
    tell when it was killed); a run handed to the daemon's queue does not.
    """

    def __init__(self, instance: Any, label: str, owned: bool = True) -> None:
        import uuid

        self.instance = instance
        self.label = label
        #: Tagged onto the run this display follows, so runs the daemon starts meanwhile are not shown.
        self.tags = {"cvops/invocation": uuid.uuid4().hex, **(process_identity() if owned else {})}
        self.started = time.time()
        self._stop = threading.Event()
        self._cursor: str | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Progress:
        print(f"▶ {self.label}", flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - progress display must never break a run
                logger.debug("progress poll failed", exc_info=True)

    def _poll(self) -> None:
        with self._lock:
            self._poll_once()

    def _poll_once(self) -> None:
        from dagster import DagsterEventType, RunsFilter

        runs = self.instance.get_runs(RunsFilter(tags={"cvops/invocation": self.tags["cvops/invocation"]}), limit=1)
        if not runs:
            return
        types = {getattr(DagsterEventType, name) for name in PROGRESS_EVENTS}
        connection = self.instance.get_records_for_run(runs[0].run_id, cursor=self._cursor, of_type=types)
        self._cursor = connection.cursor
        for record in connection.records:
            self._print(record.event_log_entry)

    def _print(self, record: Any) -> None:
        event = record.dagster_event
        elapsed = time.time() - self.started
        name = event.event_type_value
        if name == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            part = f" [{mat.partition}]" if mat.partition else ""
            print(f"  {elapsed:6.1f}s  materialized {mat.asset_key.to_user_string()}{part}", flush=True)
        elif name == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            verdict = "passed" if ev.passed else ("WARNING" if ev.severity.value == "WARN" else "FAILED")
            print(f"  {elapsed:6.1f}s  check {ev.check_name}: {verdict}", flush=True)
        elif name == "STEP_FAILURE":
            message = _root_cause(event.event_specific_data.error)
            print(f"  {elapsed:6.1f}s  FAILED {event.step_key}: {message}", flush=True)
        elif name == "STEP_START":
            print(f"  {elapsed:6.1f}s  started {event.step_key}", flush=True)
        elif name == "RUN_DEQUEUED":
            print(f"  {elapsed:6.1f}s  dequeued by the Dagster daemon", flush=True)


# Progress comes from _Progress; failures are summarised by _root_cause and the full
# traceback stays in the run's event log (cvops ui).
_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def _root_cause(error: Any) -> str:
    """The innermost error of a step failure, in one line."""
    if error is None:
        return "unknown error"
    while error.cause is not None:
        error = error.cause
    lines = [line for line in error.message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error.cls_name or "unknown error"


def _failure_message(instance: Any, run_id: str) -> str:
    """Why a run failed, in one line: its step failures, else its run-level failure message."""
    from dagster import DagsterEventType

    steps = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
    failures = [f"{r.event_log_entry.dagster_event.step_key}: {_root_cause(r.event_log_entry.dagster_event.event_specific_data.error)}" for r in steps]
    if failures:
        return "; ".join(failures)
    ends = instance.get_records_for_run(run_id, of_type={DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED}).records
    for record in ends:
        data = record.event_log_entry.dagster_event.event_specific_data
        error = getattr(data, "error", None)
        return _root_cause(error) if error is not None else (record.event_log_entry.dagster_event.message or "run failed")
    return "run failed"


def _launch(
    launcher: Any, queued: bool, label: str, job_name: str, run_config: dict[str, Any], extra_tags: dict[str, str] | None = None, **selection: Any
) -> Any:
    """Create one run through the code location, execute it (here, or via the daemon's queue
    when ``queued``) with progress shown, and return the finished run."""
    from cvops_dagster.cli.launch import execution_config

    config = {**_QUIET_LOGS, **run_config} if queued else {**_QUIET_LOGS, **execution_config(), **run_config}
    _check_stop()
    with _Progress(launcher.instance, label, owned=not queued) as progress:
        run = launcher.create_run(job_name, run_config=config, tags={**(extra_tags or {}), **progress.tags}, **selection)
        if queued:
            print(f"  queued as run {run.run_id} for the Dagster daemon serving this instance", flush=True)
            return launcher.submit(run)
        finished = launcher.execute_here(run)
    _check_stop()  # interrupted inside the run: Dagster failed it; stop here, exit 130
    return finished


def run_lifecycle(
    select: str | None = None,
    echo: Callable[[str], None] = print,
    run_config: dict[str, Any] | None = None,
    production: bool = True,
) -> dict[str, Any]:
    """Materialize the graph (or a selection) over every complete batch.

    Raw batches run one ``ingest_job`` partition run each; everything downstream runs in one
    ``lifecycle_job`` run, so a blocking check failure stops the assets after it. Runs are
    created through the code location (see :mod:`cvops_dagster.cli.launch`): executed here, or
    queued for the daemon when one serves the instance. ``run_config`` is Dagster run config
    for the lifecycle run (e.g. ``{"ops": {"hpo_study": {"config": {"n_trials": 2}}}}``).
    """
    instance, defs = load_instance()
    from dagster import AssetKey, AssetSelection, DagsterRunStatus

    from cvops_dagster.cli.launch import CodeLocationLauncher, daemon_serves_queue

    for line in reap_dead_runs(instance):
        echo(line)

    graph = defs.resolve_asset_graph()
    try:
        selection = AssetSelection.from_string(select) if select else AssetSelection.all()
        keys = selection.resolve(graph)
    except Exception as exc:  # noqa: BLE001 - Dagster raises several types for a bad selection
        raise CvopsError(f"invalid selection {select!r}: {str(exc).splitlines()[0]}") from exc
    if not keys:
        raise CvopsError(f"selection {select!r} matches no asset")
    raw_key = AssetKey("raw_images")
    summary: dict[str, Any] = {"runs": []}
    batches: list[str] = []
    if raw_key in keys:
        batches = landing_zone().list_complete_batches()
        if not batches:
            raise CvopsError(
                f"no complete batch in the landing zone {settings.landing_root()!r} "
                "(a batch is <landing>/<batch_id>/<label>/<file> plus a _READY file; try `cvops seed`)"
            )
    production_keys = {k for k in keys if k.to_user_string() in PRODUCTION_ASSETS}
    rest = {k for k in keys if k != raw_key and k not in production_keys}
    if not production:  # the labelled side only (`cvops demo` lets the sensors do the rest)
        production_keys = set()
    production_batches: list[str] = []
    if production_keys:
        production_batches = landing_zone().list_complete_batches(production=True)

    with CodeLocationLauncher.open(instance) as launcher:
        queued = daemon_serves_queue(instance)
        if batches:
            from assets.partitions import image_batches

            known = set(instance.get_dynamic_partitions(image_batches.name))
            instance.add_dynamic_partitions(image_batches.name, [b for b in batches if b not in known])
        for i, batch in enumerate(batches, 1):
            run = _launch(
                launcher, queued, f"[{i}/{len(batches)}] raw_images partition {batch}", "ingest_job", {}, partition_key=batch
            )
            summary["runs"].append(run.run_id)
            if run.status != DagsterRunStatus.SUCCESS:
                raise CvopsError(f"ingesting batch {batch} failed: {_failure_message(instance, run.run_id)} (run {run.run_id})")

        if rest:
            names = ", ".join(sorted(k.to_user_string() for k in rest))
            if not queued and any(graph.get(k).pools for k in rest):
                wait_for_pool(instance, TRAINING_POOL, echo)
            run = _launch(launcher, queued, f"lifecycle run: {names}", "lifecycle_job", dict(run_config or {}), asset_selection=rest)
            summary["runs"].append(run.run_id)
            if run.status != DagsterRunStatus.SUCCESS:
                raise CvopsError(
                    f"lifecycle run failed: {_failure_message(instance, run.run_id)} (run {run.run_id}; `cvops ui` shows its full log)"
                )
        run_production_batches(launcher, queued, production_batches, production_keys, summary, echo)
    return summary


#: The production side's assets: one production_job run per complete production batch (the
#: same as production_job's selection in definitions.py; a test holds them equal).
PRODUCTION_ASSETS = ("batch_predictions", "drift_report", "edge_case_review", "review_feedback")


def run_production_batches(
    launcher: Any, queued: bool, batches: list[str], keys: set[Any], summary: dict[str, Any], echo: Callable[[str], None] = print
) -> None:
    """One ``production_job`` run per complete production batch, as production_batches_sensor
    requests them (the same job, partition and assets)."""
    from dagster import DagsterRunStatus

    from assets.partitions import production_batches

    if not batches or not keys:
        return
    instance = launcher.instance
    known = set(instance.get_dynamic_partitions(production_batches.name))
    instance.add_dynamic_partitions(production_batches.name, [b for b in batches if b not in known])
    names = ", ".join(sorted(k.to_user_string() for k in keys))
    for i, batch in enumerate(batches, 1):
        label = f"[{i}/{len(batches)}] production batch {batch}: {names}"
        run = _launch(launcher, queued, label, "production_job", {}, partition_key=batch, asset_selection=keys)
        summary["runs"].append(run.run_id)
        if run.status != DagsterRunStatus.SUCCESS:
            raise CvopsError(f"production batch {batch} failed: {_failure_message(instance, run.run_id)} (run {run.run_id})")


def read_run_config(path: str | None) -> dict[str, Any] | None:
    """Dagster run config from a YAML or JSON file, with a clear error for a bad one."""
    if not path:
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise CvopsError(f"cannot read run config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CvopsError(f"run config {path} must hold a mapping (e.g. ops: {{hpo_study: {{config: {{n_trials: 2}}}}}})")
    return config


def cmd_run(args: argparse.Namespace) -> int:
    started = time.time()
    summary = run_lifecycle(args.select, run_config=read_run_config(getattr(args, "config", None)))
    print(f"done in {time.time() - started:.1f}s ({len(summary['runs'])} runs); see `cvops status`")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Run ``rollback_job``: production_model decides to restore the previous champion,
    onnx_runtime publishes it with that model's runtime (reused when it still verifies)."""
    instance, _ = load_instance()
    from dagster import DagsterRunStatus

    from cvops_dagster.cli.launch import CodeLocationLauncher, daemon_serves_queue

    for line in reap_dead_runs(instance):
        print(line)
    run_config = {
        "ops": {
            "production_model": {"config": {"rollback": True}},
            "onnx_runtime": {"config": {"reuse_only": bool(args.no_export)}},
        },
    }
    with CodeLocationLauncher.open(instance) as launcher:
        queued = daemon_serves_queue(instance)
        run = _launch(launcher, queued, "rollback: production_model, onnx_runtime", "rollback_job", run_config)
    if run.status != DagsterRunStatus.SUCCESS:
        raise CvopsError(f"rollback failed: {_failure_message(instance, run.run_id)} (run {run.run_id})")
    from cvops_dagster.registry.history import replay_history

    champion = replay_history(artifact_storage()).champion
    assert champion is not None and champion.runtime is not None  # the job just published it
    print(
        f"production model is now {champion.model_id} (rolled back from {champion.previous_model_id}; "
        f"test accuracy {champion.metrics.get('accuracy')}); serving {champion.runtime['fp32_key']}"
    )
    return 0


def reap_dead_runs(instance: Any) -> list[str]:
    """Fail the runs whose ``cvops`` process is gone, and free the pool slots ended runs hold.

    A ``cvops run`` killed with SIGKILL (or a crash, or a reboot) leaves its run STARTED and
    its ``training`` slot claimed; nothing else would free it without the daemon. Only runs
    this host's ``cvops`` started are judged (see :mod:`cvops_dagster.core.processes`).

    Returns:
        One line per run failed or slot freed, for the user.
    """
    from dagster import RunsFilter

    lines = []
    for run in instance.get_runs(filters=RunsFilter(statuses=_unfinished())):
        # A re-execution or an automatic retry copies its parent's tags, cvops's process
        # identity among them, but a run worker executes it: judge only runs cvops executed.
        executed_by_worker = run.parent_run_id is not None or ".dagster/grpc_info" in run.tags
        if not executed_by_worker and process_is_gone(run.tags) is True:
            instance.report_run_failed(
                run, f"its cvops process (pid {run.tags.get('cvops/pid')}) is gone: killed or crashed; failed by a later cvops command"
            )
            lines.append(f"run {run.run_id}: its process is gone (killed?); marked failed")
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in sorted(storage.get_concurrency_run_ids()):
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
                lines.append(f"run {run_id}: ended but still held pool slots; freed them")
    return lines


def end_runs_of_stopped_workers(instance: Any, pids: set[int], reason: str) -> list[str]:
    """Cancel the unfinished runs whose run worker was one of ``pids`` (a stopped ``cvops
    ui``/``watch`` took them down) and free their pool slots, so none stays STARTED forever:
    the instance's default run launcher cannot tell the daemon that a worker died."""
    from dagster import DagsterEventType, RunsFilter

    lines = []
    for run in instance.get_runs(filters=RunsFilter(statuses=_unfinished())):
        records = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ENGINE_EVENT).records
        workers = set()
        for record in records:
            metadata = getattr(record.event_log_entry.dagster_event.event_specific_data, "metadata", None) or {}
            value = getattr(metadata.get("pid"), "value", None)
            if value is not None and str(value).isdigit():
                workers.add(int(value))
        if workers & pids:
            instance.report_run_canceled(run, reason)
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            lines.append(f"run {run.run_id}: its worker was stopped with the service; marked canceled")
    return lines


def wait_for_pool(instance: Any, pool: str, echo: Callable[[str], None] = print, poll_s: float = POOL_POLL_S) -> None:
    """Wait (sleeping, interruptible) while other live runs hold every slot of ``pool``.

    Dagster's in-process executor would otherwise wait inside the run, polling at full speed
    and without saying for whom. Runs whose process is gone are failed and freed meanwhile.
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    announced: set[str] = set()
    while True:
        info = storage.get_concurrency_info(pool)
        limit = info.limit if info.limit is not None else info.slot_count
        holders = sorted(info.active_run_ids)
        if not limit or len(info.claimed_slots) < limit:
            return
        if set(holders) - announced:
            echo(f"waiting for pool {pool!r}: its {limit} slot(s) held by run(s) {', '.join(holders)} (Ctrl-C to stop)")
            announced.update(holders)
        time.sleep(poll_s)
        reap_dead_runs(instance)


#: Set once SIGTERM or SIGINT reached this process, whoever's handler ran (see below).
STOP_REQUESTED = threading.Event()


def install_stop_handlers(instance_getter: Callable[[], Any]) -> None:
    """SIGTERM stops the command like Ctrl-C; if it has not stopped within :data:`STOP_GRACE_S`
    seconds (``$CVOPS_STOP_GRACE_S``; a step blocked inside Dagster), its unfinished runs are
    marked canceled, their slots freed, and the process exits, so a service manager can always
    stop it.

    While a run executes in this process, Dagster swaps in its own SIGINT/SIGTERM handlers
    (they interrupt the step and fail the run). The signal is still seen here through
    ``signal.set_wakeup_fd``, which the interpreter writes to whichever Python handler is
    installed: the grace timer is armed all the same, and :data:`STOP_REQUESTED` tells the
    command to stop after the interrupted run instead of starting the next one.
    """
    import os
    import signal

    armed = threading.Lock()

    def stop(signum: int) -> None:
        STOP_REQUESTED.set()
        if armed.acquire(blocking=False):  # one grace timer, whichever path saw the signal first
            threading.Thread(target=_abandon_after_grace, args=(instance_getter, signum), daemon=True).start()

    def on_signal(signum: int, frame: Any) -> None:
        stop(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        raise KeyboardInterrupt

    def watch_wakeups(read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    stop(signum)

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    # A forked child (a decode worker pebble terminates, say) must not report its signals here.
    os.register_at_fork(after_in_child=lambda: signal.set_wakeup_fd(-1))
    threading.Thread(target=watch_wakeups, args=(read_fd,), daemon=True, name="cvops-signals").start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)


def _check_stop() -> None:
    """Stop between runs once a signal arrived (Dagster may have consumed it inside a run)."""
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt


def _abandon_after_grace(instance_getter: Callable[[], Any], signum: int) -> None:
    import os

    time.sleep(float(os.environ.get(STOP_GRACE_ENV) or STOP_GRACE_S))
    try:
        from dagster import RunsFilter

        instance = instance_getter()
        mine = process_identity()  # host, pid and start time: never another host's run with this pid
        for run in instance.get_runs(filters=RunsFilter(tags=mine, statuses=_unfinished())):
            instance.report_run_canceled(run, f"cvops stopped by signal {signum}")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    finally:
        os._exit(128 + signum)


def _unfinished() -> list[Any]:
    """Run statuses of a run some process still owns (Dagster imported on use): NOT_STARTED
    too, for a run created by a cvops process that died before executing it."""
    from dagster import DagsterRunStatus

    return [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
