"""The FiftyOne App on the review dataset (or one of its saved views), headless, until stopped.

``cvops review`` runs on servers: the App is served on ``127.0.0.1`` and never opened in a
browser here (a *remote* session); its URL is handed to ``ready``. SIGINT (Ctrl-C) and SIGTERM
stop it cleanly: the session is closed, which stops FiftyOne's App server service (a
``service/main.py`` wrapper and its ``server/main.py`` child, in a process group of their own, so
a Ctrl-C at the terminal never reaches them directly); whatever of that tree is still alive a
few seconds later is killed, so nothing is orphaned. The bundled ``mongod`` is FiftyOne's shared
service: it stops by itself once its last client process (this one, the App server) is gone.

Call :func:`cvops_dagster.review.connection.configure` before anything here. No Dagster import.
"""

from __future__ import annotations

import errno
import logging
import shlex
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import psutil

logger = logging.getLogger(__name__)

#: The App's port unless ``--port`` says otherwise (FiftyOne's own default).
DEFAULT_PORT = 5151
#: Loopback only: the App has no authentication.
DEFAULT_ADDRESS = "127.0.0.1"
#: How long the session close (which stops the App server) may take before what is left is killed.
CLOSE_TIMEOUT_S = 10.0
#: SIGTERM to SIGKILL for whatever of the App server survived the close.
KILL_GRACE_S = 3.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ReviewAppError(RuntimeError):
    """The App cannot be served as asked (no dataset, unknown view, port in use); one clear line."""


def app_command(view: str | None = None, port: int | None = None) -> str:
    """The command line that opens the App on the review dataset (or ``view``), for messages
    such as ``cvops status``'s next steps: ``cvops review [--view NAME] [--port N]``."""
    parts = ["cvops", "review"]
    if view:
        parts += ["--view", view]
    if port is not None and port != DEFAULT_PORT:
        parts += ["--port", str(port)]
    return shlex.join(parts)


def app_url(dataset_name: str, port: int = DEFAULT_PORT, address: str = DEFAULT_ADDRESS, view_slug: str | None = None) -> str:
    """The URL the App opens on ``dataset_name`` (and its saved view ``view_slug``): the App's own
    routes, ``/datasets/<name>`` and ``?view=<slug>`` (a saved view's slug, not its name)."""
    host = f"[{address}]" if ":" in address else address  # an IPv6 literal
    url = f"http://{host}:{port}/datasets/{quote(dataset_name, safe='')}"
    return f"{url}?view={quote(view_slug, safe='')}" if view_slug else url


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (the previous handlers restored
    after it). Enter it early, so a signal during a slow start still ends in a clean stop.

    Must run in the main thread (Python delivers signals there only).
    """
    stop = threading.Event()
    previous = {}

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        stop.set()

    for signum in signals:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def check_port_free(port: int, address: str = DEFAULT_ADDRESS) -> None:
    """Raise :class:`ReviewAppError` when ``address:port`` cannot be bound.

    Checked up front because FiftyOne would otherwise attach to any App server already answering
    there (whatever database it serves) or wait a minute for its own to fail to bind.
    """
    if not 0 < port < 65536:
        raise ReviewAppError(f"port {port}: use 1-65535")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the App server binds (asyncio sets SO_REUSEADDR): a port left in TIME_WAIT by the
        # previous `cvops review` is free, one something listens on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ReviewAppError(f"port {port} on {address} is in use: stop what listens there or pass --port N") from exc
            raise ReviewAppError(f"cannot listen on {address}:{port}: {exc.strerror}") from exc


def load_review(dataset_name: str, view: str | None) -> tuple[Any, str | None]:
    """The review dataset, or its saved view ``view`` with that view's URL slug.

    Returns:
        ``(dataset, None)``, or ``(saved view, its slug)`` when ``view`` is given.

    Raises:
        ReviewAppError: the dataset does not exist yet, or has no saved view named ``view``
            (the message lists those it has).
    """
    from cvops_dagster.review.connection import open_dataset

    dataset = open_dataset(dataset_name)
    if dataset is None:
        raise ReviewAppError(f"no review dataset {dataset_name} yet: run `cvops demo` or materialize edge_case_review")
    if view is None:
        return dataset, None
    names = dataset.list_saved_views()
    if view not in names:
        have = f"its saved views: {', '.join(sorted(names))}" if names else "it has no saved views"
        raise ReviewAppError(f"no saved view {view!r} in review dataset {dataset_name}; {have}")
    from fiftyone.core.utils import to_slug

    # FiftyOne stores a saved view's slug as to_slug(name) (save_view, and on rename).
    return dataset.load_saved_view(view), to_slug(view)


def serve_app(
    dataset_name: str,
    view: str | None = None,
    port: int = DEFAULT_PORT,
    address: str = DEFAULT_ADDRESS,
    ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve the FiftyOne App on ``dataset_name`` (or its saved view ``view``) until stopped.

    Args:
        dataset_name: the review dataset (``connection.dataset_name(prefix)``).
        view: a saved view of it to open on, or ``None`` for the whole dataset.
        port: the App's port on ``address``.
        address: where the App listens; keep the loopback default (no authentication).
        ready: called with the App's URL once it answers there.
        stop: the event that ends it; ``None``: SIGINT/SIGTERM (then call from the main thread).

    Returns:
        0 once stopped and the App server is gone.

    Raises:
        ReviewAppError: no such dataset or saved view, or the port is in use.
    """
    if stop is None:
        with stop_on_signals() as event:
            return serve_app(dataset_name, view, port, address, ready, event)
    check_port_free(port, address)
    target, view_slug = load_review(dataset_name, view)
    if stop.is_set():  # stopped while the database started: nothing launched yet
        return 0
    import fiftyone as fo

    before = _children()
    session = None
    quiet = _RemovedAppOptionsFilter()
    config_logger = logging.getLogger("fiftyone.core.config")
    config_logger.addFilter(quiet)
    try:
        # remote: never open a browser (servers); auto only matters in notebooks.
        session = fo.launch_app(target, port=port, address=address, auto=False, remote=True)
        # FiftyOne prints a "terminated shortly after it was started" hint when a session closes
        # within 2.5 s; a quick stop here is deliberate.
        session._disable_wait_warning = True
        url = app_url(dataset_name, port, address, view_slug)
        logger.info("FiftyOne App on %s (%s)", url, f"saved view {view}" if view else "whole dataset")
        if ready is not None:
            ready(url)
        while not stop.wait(0.5):
            pass
    finally:
        server = _app_server_tree(before)
        if session is not None:
            _close_bounded()
        _reap(server)
        config_logger.removeFilter(quiet)
    return 0


class _RemovedAppOptionsFilter(logging.Filter):
    """Drops FiftyOne 1.22's "The `show_label` App config option has been removed" warnings.

    The App's own state round-trip carries those keys, so the session logs three of them at
    every state update from a browser (selecting a sample, a view): nothing a user set or can change.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "App config option has been removed" not in str(record.msg)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def _app_server_tree(before: set[int]) -> list[psutil.Process]:
    """The App server service this call started: its wrapper (a new child running FiftyOne's
    ``service/main.py --51-service server``) and everything below it."""
    tree: list[psutil.Process] = []
    for child in psutil.Process().children():
        try:
            if child.pid in before or "server" not in _service_name(child.cmdline()):
                continue
            tree += [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
    return tree


def _service_name(cmdline: list[str]) -> str:
    """The ``--51-service`` name of a FiftyOne service wrapper's command line ('' otherwise)."""
    for flag, value in zip(cmdline, cmdline[1:]):
        if flag == "--51-service":
            return value
    return ""


def _close_bounded() -> None:
    """``fo.close_app()`` (the session, then its server service), waited for at most
    :data:`CLOSE_TIMEOUT_S`: FiftyOne waits for the service without a limit."""
    import fiftyone as fo

    closing = threading.Thread(target=fo.close_app, name="close-fiftyone-app", daemon=True)
    closing.start()
    closing.join(CLOSE_TIMEOUT_S)
    if closing.is_alive():
        logger.warning("the FiftyOne App did not close within %.0f s; stopping its server", CLOSE_TIMEOUT_S)


def _reap(processes: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL, whatever of ``processes`` is still alive (normally none)."""
    _, alive = psutil.wait_procs(processes, timeout=0.1)
    if not alive:
        return
    logger.warning("stopping %d App server process(es) left running", len(alive))
    for process in alive:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=KILL_GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=KILL_GRACE_S)
