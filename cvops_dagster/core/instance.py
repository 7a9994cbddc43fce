"""The project-local Dagster instance: where runs, events and schedules are stored.

Kept free of Dagster imports so the CLI and the Makefile can prepare ``DAGSTER_HOME`` before
Dagster is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from cvops_dagster.core import settings

#: SQLite storage (the default when no storage is configured), telemetry and the UI's
#: newsletter prompt off, run monitoring on so crashed run workers are marked failed and the
#: pool slots of finished (or failed-by-monitoring) runs are freed, crashed run workers retried
#: once (a failed step is not: it would fail the same way), and pools limited to one slot by
#: default: `training` is the only pool, so at most one training step runs at a time.
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


def ensure_dagster_home(path: str | None = None) -> Path:
    """Make sure ``DAGSTER_HOME`` points at a folder holding our ``dagster.yaml``.

    Uses ``$DAGSTER_HOME`` when set, else ``./.dagster_home``; an existing dagster.yaml is
    left alone (a user may have pointed it at PostgreSQL).
    """
    home = Path(path or os.environ.get(settings.DAGSTER_HOME_ENV) or settings.DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ[settings.DAGSTER_HOME_ENV] = str(home)
    return home
