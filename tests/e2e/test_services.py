"""`cvops watch` and `cvops ui` as a service manager runs them: the real Dagster daemon and UI,
runs handed to the daemon's queue by `cvops run`, and a stop on SIGTERM or Ctrl-C (SIGINT)
that leaves no process behind within 15 seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cvops_dagster.core.settings import REVIEW_PREFIX_ENV  # kept: each test has its own review dataset (tests/conftest.py)

from tests.e2e.browser import free_port
from tests.test_cli import cvops

pytestmark = pytest.mark.slow

#: What the issue promises a service manager.
STOP_LIMIT_S = 15.0
REPOSITORY_LABEL = "__repository__@cvops_dagster.definitions"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVOPS_", "DAGSTER_HOME")) or k == REVIEW_PREFIX_ENV}
    env.update(
        PYTHONUNBUFFERED="1",
        DAGSTER_HOME=str(tmp_path / ".dagster_home"),
        CVOPS_LANDING=str(tmp_path / "landing"),
        CVOPS_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
    )
    return env


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{args[0]}-{time.monotonic_ns()}.log"
    handle = open(log, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "cvops_dagster.cli", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    return process, log


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # it ended meanwhile
        return []


def _stop_and_time(process: subprocess.Popen, signum: int, log: Path) -> list[str]:
    """Send ``signum``; assert the command and every process below it are gone within the limit.

    Returns:
        The command lines of the processes it had started.
    """
    tree = _descendants(process.pid)
    commands = [" ".join(_cmdline(p)) for p in tree]
    started = time.monotonic()
    process.send_signal(signum)  # first: a failed assertion below must not leave the service running
    try:
        process.wait(timeout=STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"cvops did not stop within {STOP_LIMIT_S}s of signal {signum}:\n{log.read_text()}") from None
    _, alive = psutil.wait_procs(tree, timeout=max(0.1, STOP_LIMIT_S - (time.monotonic() - started)))
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"left running {STOP_LIMIT_S}s after signal {signum}: {[_cmdline(p) for p in alive]}"
    assert process.returncode == 0, log.read_text()
    assert tree, f"the service started no process:\n{log.read_text()}"
    return commands


def _wait_for_daemon(tmp_path: Path, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Until the daemon's run-queue loop has sent a heartbeat to the instance."""
    from dagster import DagsterInstance

    deadline = time.monotonic() + timeout_s
    # The service creates the instance's SQLite storage; opening it here at the same time races
    # Dagster's schema creation (two alembic heads: the service crashed). The daemon logs this
    # line once the storage exists (cvops opens the instance before it starts the daemon).
    while "Instance is configured with the following daemons" not in log.read_text():
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()
        time.sleep(0.5)
    while time.monotonic() < deadline:
        try:
            # The service creates the SQLite storage meanwhile: opening it can race that once.
            with DagsterInstance.from_config(str(tmp_path / ".dagster_home")) as instance:
                if "QUEUED_RUN_COORDINATOR" in instance.get_daemon_heartbeats():
                    return
        except Exception:  # noqa: BLE001 - retried until the deadline
            pass
        if process.poll() is not None:
            raise AssertionError(f"the service ended:\n{log.read_text()}")
        time.sleep(1)
    raise AssertionError(f"no daemon heartbeat within {timeout_s}s:\n{log.read_text()}")


def _study_in_progress(instance: object) -> str | None:
    """The id of a run the daemon's worker is executing that has started its hpo_study step."""
    from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):  # type: ignore[attr-defined]
        starts = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_START).records  # type: ignore[attr-defined]
        if any(r.event_log_entry.dagster_event.step_key == "hpo_study" for r in starts):
            return run.run_id
    return None


def test_watch_runs_the_queue_for_cvops_run_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`cvops run` queues its runs for the daemon `cvops watch` runs; the daemon's automation
    then builds the dataset and starts the study by itself; SIGTERM to `cvops watch` in the
    middle stops every process within 15 s, and the run its worker was executing ends
    (failed as interrupted, or canceled by cvops), never left STARTED."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    env = _env(tmp_path)
    cvops("seed", cwd=tmp_path, env=env)
    watch, log = _start(tmp_path, "watch")
    study_run = None
    try:
        _wait_for_daemon(tmp_path, watch, log)
        out = cvops("run", "--select", "raw_images", cwd=tmp_path, env=env).stdout
        assert "queued as run" in out and "for the Dagster daemon" in out, out
        assert "materialized raw_images [batch_003]" in out, out

        with DagsterInstance.from_config(str(tmp_path / ".dagster_home")) as instance:
            mine = instance.get_runs(RunsFilter(job_name="ingest_job", tags={".dagster/repository": REPOSITORY_LABEL}))
            # Three batches, each ingested once by `cvops run` through the queue (the sensor
            # may ingest some too; its runs belong to the location as well).
            assert len([r for r in mine if "cvops/invocation" in r.tags]) == 3
            assert all(r.status == DagsterRunStatus.SUCCESS for r in mine)
            # The daemon's worker executed them, not the cvops process: no process identity tag.
            assert not any("cvops/pid" in r.tags for r in mine)

            deadline = time.monotonic() + 300
            while (study_run := _study_in_progress(instance)) is None:
                assert watch.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(1)
        time.sleep(3)  # inside the study
    finally:
        if watch.poll() is None:
            _stop_and_time(watch, signal.SIGTERM, log)
    assert "the Dagster daemon stopped" in log.read_text()
    with DagsterInstance.from_config(str(tmp_path / ".dagster_home")) as instance:
        run = instance.get_run_by_id(study_run)
        assert run is not None and run.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED), run
        if run.status == DagsterRunStatus.CANCELED:
            assert "its worker was stopped with the service" in log.read_text()
        unfinished = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]))
        assert not unfinished, [(r.run_id, r.job_name, r.status) for r in unfinished]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_ui_stops_everything_it_started(tmp_path: Path, signum: int) -> None:
    port = free_port()
    ui, log = _start(tmp_path, "ui", "--port", str(port))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                if ui.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the UI did not come up:\n{log.read_text()}") from None
                time.sleep(1)
        _wait_for_daemon(tmp_path, ui, log)  # dagster dev's daemon and its code server are up too
        commands = " ".join(_stop_and_time(ui, signum, log))
        assert "dagster_webserver" in commands and "dagster._daemon" in commands
    finally:
        if ui.poll() is None:
            ui.kill()
    text = log.read_text()
    assert "usage is discouraged" not in text  # dagster dev's "use dg dev" warning is not shown to cvops users
