"""A run's process identity: alive, gone, reused pid, or not ours to judge."""

from __future__ import annotations

import subprocess
import sys

from cvops_dagster.core.processes import HOST_TAG, PID_TAG, STARTED_TAG, process_identity, process_is_gone


def test_this_process_is_alive() -> None:
    assert process_is_gone(process_identity()) is False


def test_an_exited_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "from cvops_dagster.core.processes import process_identity as p; import json; print(json.dumps(p()))"], stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)
    import json

    assert process_is_gone(json.loads(out)) is True


def test_a_reused_pid_is_not_mistaken_for_the_run_process() -> None:
    tags = process_identity()
    tags[STARTED_TAG] = str(float(tags[STARTED_TAG]) - 3600)  # same pid, another process's start
    assert process_is_gone(tags) is True


def test_other_hosts_and_untagged_runs_are_not_judged() -> None:
    assert process_is_gone({HOST_TAG: "elsewhere", PID_TAG: "1", STARTED_TAG: "0"}) is None
    assert process_is_gone({}) is None
