"""Environment contract (DESIGN.md): variable names and their embedded defaults."""

from __future__ import annotations

import os
from pathlib import Path

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
