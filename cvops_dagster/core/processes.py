"""Who runs a run: an identity for this process that survives only as long as the process.

A run executed in process by ``cvops run`` has no run launcher the Dagster daemon could ask
about its worker. It is tagged with this process's identity (host, pid and start time, so a
reused pid is not mistaken for it); a later ``cvops run`` on the same host can then tell a run
whose process is gone (killed, crashed, the machine rebooted) from one still running.

:func:`stop_process_tree` stops a service ``cvops`` started (``dagster dev``, the daemon) with
everything below it, so ``cvops ui`` and ``cvops watch`` leave no code server or run worker
behind when a service manager stops them.
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


def stop_process_tree(pid: int, grace_s: float = 8.0, term_s: float = 2.0) -> list[int]:
    """Stop a supervisor process and everything it started, within ``grace_s + term_s`` seconds
    plus a moment for SIGKILL.

    The supervisor (``pid``, the leader of its own process group) gets SIGINT first: its Ctrl-C
    path (``dagster dev``'s, say) shuts its children down in order. What is still alive after
    ``grace_s`` (the supervisor, its descendants, and any member of its process group, so a
    child it left behind is found too) gets SIGTERM, then SIGKILL after ``term_s``.

    Returns:
        The pids that had to be killed with SIGKILL (for the caller's message).
    """
    import signal

    def members() -> list[psutil.Process]:
        return process_tree(pid)

    def send(processes: list[psutil.Process], signum: int) -> None:
        for process in processes:
            try:
                process.send_signal(signum)
            except psutil.Error:
                pass

    tracked = members()
    send([p for p in tracked if p.pid == pid] or tracked, signal.SIGINT)
    _, alive = psutil.wait_procs(tracked, timeout=grace_s)
    alive = {p.pid: p for p in alive} | {p.pid: p for p in members()}
    send(list(alive.values()), signal.SIGTERM)
    _, alive_after = psutil.wait_procs(list(alive.values()), timeout=term_s)
    leftovers = [p for p in alive_after if _alive(p)] + [p for p in members() if p.pid not in alive]
    send(leftovers, signal.SIGKILL)
    psutil.wait_procs(leftovers, timeout=1.0)
    return sorted(p.pid for p in leftovers)


def process_tree(pid: int) -> list[psutil.Process]:
    """The live process ``pid``, its descendants, and the members of the process group it
    leads (which finds a child whose parent already exited)."""
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(pid)
        found[root.pid] = root
        found.update({c.pid: c for c in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pid:
                found.setdefault(process.pid, process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return [p for p in found.values() if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
