"""A real browser against a real Dagster webserver, for the end-to-end UI tests.

Chromium is the system one (Debian's ``chromium`` package; ``.ci/run`` installs it): Playwright
only drives it, its own browser download is never needed. Every wait here is bounded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cvops_dagster.core.processes import stop_process_tree

#: Set (to anything) where the browser must be there: the UI tests then fail instead of skipping.
REQUIRE_BROWSER_ENV = "CVOPS_REQUIRE_BROWSER"
#: A Chromium (or Chrome) executable to use instead of the ones looked for.
CHROMIUM_ENV = "CVOPS_CHROMIUM"

#: Headless, offline, no first-run or background traffic; ``--no-sandbox`` because CI runs as root.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """The Chromium to drive: ``$CVOPS_CHROMIUM``, ``/usr/bin/chromium``, else one on ``PATH``."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser_reason() -> str | None:
    """Why a UI test cannot run here (no Playwright, no Chromium), or None when it can."""
    if importlib.util.find_spec("playwright") is None:
        return "the `playwright` package is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return "no Chromium: install Debian's `chromium` (apt-get install chromium) or set CVOPS_CHROMIUM"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop the webserver and its code server (its process group) as `cvops ui` stops its own
    services: SIGINT, then SIGTERM, then SIGKILL (:func:`stop_process_tree`)."""
    if process.poll() is None:
        stop_process_tree(process.pid)
    process.wait(timeout=10)


@contextmanager
def dagster_webserver(
    env: Mapping[str, str], cwd: Path, log: Path, module: str = "cvops_dagster.definitions", timeout_s: float = 90.0
) -> Iterator[str]:
    """``dagster-webserver -m module`` on 127.0.0.1 and a free port; yields its base URL once
    ``/server_info`` answers (within ``timeout_s``), stops it (process group) on exit."""
    port = free_port()
    executable = Path(sys.executable).with_name("dagster-webserver")
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "dagster_webserver"]
    command += ["-m", module, "-h", "127.0.0.1", "-p", str(port)]
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dagster-webserver not up within {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(process)


@contextmanager
def chromium_page(
    user_data_dir: Path, width: int = 1280, height: int = 800, timeout_ms: int = 30_000
) -> Iterator[tuple[Any, list[str]]]:
    """A Playwright page in the system Chromium with a fresh profile (``user_data_dir``), the
    default timeout of every wait set to ``timeout_ms``, and the list that collects the page's
    uncaught exceptions."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError(missing_browser_reason() or "no Chromium")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
            timeout=60_000,
        )
        try:
            context.set_default_timeout(timeout_ms)
            context.set_default_navigation_timeout(timeout_ms)
            page = context.pages[0] if context.pages else context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
            yield page, errors
        finally:
            context.close()
