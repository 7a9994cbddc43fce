"""Who runs a run: an identity for this process that survives only as long as the process.

A run executed in process by ``cvops run`` has no run launcher the Dagster daemon could ask
about its worker. It is tagged with this process's identity (host, pid and start time, so a
reused pid is not mistaken for it); a later ``cvops run`` on the same host can then tell a run
whose process is gone (killed, crashed, the machine rebooted) from one still running.
"""

from __future__ import annotations

import os
import socket

import psutil

HOST_TAG = "cvops/host"
PID_TAG = "cvops/pid"
STARTED_TAG = "cvops/process_started"


def process_identity() -> dict[str, str]:
    """Tags naming this process: host name, pid and the process's start time."""
    me = psutil.Process(os.getpid())
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(me.pid), STARTED_TAG: f"{me.create_time():.3f}"}


def process_is_gone(tags: dict[str, str]) -> bool | None:
    """Whether the process a run's tags name has exited.

    Returns:
        ``True`` when it certainly has (same host, and no process with that pid and start
        time), ``False`` when it is alive, ``None`` when the tags do not say (another host,
        or a run not started by ``cvops run``).
    """
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return None
    try:
        process = psutil.Process(int(tags[PID_TAG]))
        started = float(tags.get(STARTED_TAG, "nan"))
        return not abs(process.create_time() - started) < 1e-3 or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except (ValueError, psutil.Error):
        return None
