"""``cvops ui`` and ``cvops watch``: long-running Dagster services that stop on request.

Each service runs as a child in a session (process group) of its own, so a terminal's Ctrl-C
and a service manager's SIGTERM both reach ``cvops`` alone, which then stops the child and
everything it started (webserver, daemon, code servers, run workers) within
:data:`STOP_BUDGET_S` seconds; see :func:`cvops_dagster.core.processes.stop_process_tree`.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from cvops_dagster.core.processes import process_tree, stop_process_tree

logger = logging.getLogger("cvops")

#: Seconds a service gets to shut down by itself after SIGINT before it is terminated, and
#: then killed 2 s later: together well inside the 15 s a service manager is promised.
GRACEFUL_STOP_S = 6.0
#: The most a stop may take (graceful + SIGTERM + SIGKILL), documented in the README.
STOP_BUDGET_S = 15.0
#: ``dagster dev`` tells every start to "use dg dev"; `dg` is a separate project tool this
#: project does not use, so that one warning (matched by the start of its text: ``-W`` cannot
#: name Dagster's warning class, which is imported after the option is read) is silenced in
#: the supervisor process only.
QUIET_DAGSTER_WARNINGS = ["-W", "ignore:Function `dev_command` is superseded"]


def dagster_command(*args: str) -> list[str]:
    """``python -m dagster ARGS`` with this interpreter (the project's environment)."""
    return [sys.executable, *QUIET_DAGSTER_WARNINGS, "-m", "dagster", *args]


def run_service(command: Sequence[str], name: str, after_stop: Callable[[set[int]], None] | None = None) -> int:
    """Run ``command`` until it exits or this process gets SIGTERM, SIGINT or SIGHUP.

    ``after_stop`` gets the pids of every process the service had when it was stopped (to end
    the runs whose workers were among them).

    Returns:
        The service's exit status when it ended by itself; 0 when it was stopped on request.
    """
    requested = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)  # repeats are ignored: the stop below is already bounded
        requested.set()

    # Handlers first: a stop request that arrives while the child starts is not lost. They
    # stay until the stop is done, so a second Ctrl-C cannot cut it short.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        _say(" ".join(command))
        child = subprocess.Popen(list(command), start_new_session=True)
        while child.poll() is None and not requested.wait(0.5):
            pass
        if not requested.is_set():
            stop_process_tree(child.pid, grace_s=1.0, term_s=1.0)  # anything it left behind
            return int(child.returncode or 0)
        _say(f"cvops: stopping {name} (signal {received[0]})...", err=True)
        pids = {p.pid for p in process_tree(child.pid)}
        try:
            killed = stop_process_tree(child.pid, grace_s=GRACEFUL_STOP_S)
        finally:
            child.wait(timeout=5)
        if killed:
            logger.warning("%s: killed %d process(es) that did not stop in time: %s", name, len(killed), killed)
        if after_stop is not None:
            try:
                after_stop(pids)
            except Exception:  # noqa: BLE001 - the service is stopped; bookkeeping must not hang or fail that
                logger.warning("could not end the runs of %s's workers", name, exc_info=True)
        _say(f"cvops: {name} stopped", err=True)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _say(text: str, err: bool = False) -> None:
    """Print, best effort: after SIGHUP the terminal may be gone (EIO), and the stop goes on."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except OSError:
        pass
