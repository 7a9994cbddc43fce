"""Environment contract (DESIGN.md): variable names and their embedded defaults."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

LANDING_ENV = "CVOPS_LANDING"
ARTIFACT_ROOT_ENV = "CVOPS_ARTIFACT_ROOT"
S3_ENDPOINT_ENV = "CVOPS_S3_ENDPOINT_URL"
DAGSTER_HOME_ENV = "DAGSTER_HOME"

DEFAULT_LANDING = "./landing"
DEFAULT_ARTIFACT_ROOT = "./.cvops"
DEFAULT_DAGSTER_HOME = "./.dagster_home"

#: Telemetry and analytics switches set in every process this system starts (offline by design).
TELEMETRY_OFF: dict[str, str] = {
    "FIFTYONE_DO_NOT_TRACK": "true",
    "FIFTYONE_DATABASE_VALIDATION": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DAGSTER_DISABLE_TELEMETRY": "1",
}


def disable_telemetry() -> None:
    """Turn analytics off for this process and its children, keeping explicit user choices."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


def landing_root() -> str:
    return os.environ.get(LANDING_ENV) or DEFAULT_LANDING


def artifact_root() -> str:
    return os.environ.get(ARTIFACT_ROOT_ENV) or DEFAULT_ARTIFACT_ROOT


def s3_endpoint_url() -> str | None:
    return os.environ.get(S3_ENDPOINT_ENV) or None


def normalize_root(root: str) -> str:
    """Absolute path for a local folder, the URL unchanged for ``s3://`` and other schemes."""
    if "://" in root:
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not every CPU of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def step_threads(configured: int | None) -> int:
    """The torch thread count a step uses: the configured one, else the CPUs it may use.

    Set on purpose and recorded in the step's metadata, so two steps sharing a machine can be
    given a share each instead of both taking every core (torch's default).
    """
    return max(1, int(configured)) if configured else available_cpus()


def params_digest(params: dict[str, Any] | None) -> str:
    """A short stable hash of a parameter dict (data versions, run keys)."""
    text = json.dumps(params or {}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
