"""The project's Dagster instance: where runs, events and schedules are stored.

Kept free of Dagster imports so the CLI and the Makefile can prepare ``DAGSTER_HOME`` before
Dagster is loaded. Where the instance is: :func:`cvops_dagster.core.settings.dagster_home`
(``$DAGSTER_HOME``, else ``<project>/.dagster_home``, else ``./.dagster_home``).

Commands that write (seed, run, demo, ui, watch, rollback) call :func:`ensure_dagster_home`,
which creates the instance when it is missing; read-only ones (status) call
:func:`existing_dagster_home`, which never creates anything and says what to do instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from cvops_dagster.core import settings

#: SQLite storage (the default when no storage is configured), telemetry and the UI's
#: newsletter prompt off, run monitoring on so crashed run workers are marked failed and the
#: pool slots of finished (or failed-by-monitoring) runs are freed, crashed run workers retried
#: once (a failed step is not: it would fail the same way), and pools limited to one slot by
#: default: at most one training step (pool `training`) and one build of the FiftyOne review
#: dataset (pool `review`: two production runs would otherwise upsert the same samples at once)
#: run at a time.
DAGSTER_YAML = """\
# Written by cvops: the project-local Dagster instance (SQLite storage under this folder).
telemetry:
  enabled: false
nux:
  enabled: false
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 30
run_retries:
  enabled: true
  max_retries: 1
  retry_on_asset_or_op_failure: false
concurrency:
  pools:
    default_limit: 1
"""


class InstanceNotFoundError(FileNotFoundError):
    """A read-only command found no Dagster instance where the settings point."""


def ensure_dagster_home(path: str | None = None) -> Path:
    """Make sure ``DAGSTER_HOME`` points at a folder holding our ``dagster.yaml``; create it if needed.

    Uses ``path`` when given, else :func:`settings.dagster_home`; an existing dagster.yaml is
    left alone (a user may have pointed it at PostgreSQL). Sets ``$DAGSTER_HOME`` to the
    absolute folder for this process and its children.
    """
    home = Path(path).expanduser().resolve() if path else settings.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ[settings.DAGSTER_HOME_ENV] = str(home)
    return home


def existing_dagster_home(path: str | None = None) -> Path:
    """The resolved instance folder when it exists with a ``dagster.yaml``; never creates anything.

    Sets ``$DAGSTER_HOME`` to it for this process (Dagster reads the variable).

    Raises:
        InstanceNotFoundError: the folder or its ``dagster.yaml`` is missing, with what to do.
    """
    home = Path(path).expanduser().resolve() if path else settings.dagster_home()
    if not (home / "dagster.yaml").is_file():
        missing = "no Dagster instance" if not home.exists() else "no dagster.yaml"
        raise InstanceNotFoundError(
            f"{missing} at {home}: run `cvops demo` (or `cvops run`) in the project first, "
            f"or set {settings.DAGSTER_HOME_ENV} / {settings.PROJECT_HOME_ENV}"
        )
    os.environ[settings.DAGSTER_HOME_ENV] = str(home)
    return home
