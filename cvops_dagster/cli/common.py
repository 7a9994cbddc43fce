"""What every ``cvops`` command shares: the one-line error type, root overrides, and lazy access
to the Dagster instance, the landing zone and the artifact store.

Dagster, the definitions and the storage libraries are imported inside these functions, so a
command that needs none of them (``cvops predict``) never loads them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from cvops_dagster.core import settings
from cvops_dagster.core.instance import ensure_dagster_home


class CvopsError(Exception):
    """A failure to report to the user in one clear line (exit code 1)."""


def apply_overrides(args: argparse.Namespace) -> None:
    """``--landing``/``--artifacts`` win over the environment for this process and its children."""
    if getattr(args, "landing", None):
        os.environ[settings.LANDING_ENV] = args.landing
    if getattr(args, "artifacts", None):
        os.environ[settings.ARTIFACT_ROOT_ENV] = args.artifacts


def load_instance() -> tuple[Any, Any]:
    """The Dagster instance and definitions, loaded after the environment is final."""
    settings.disable_telemetry()
    ensure_dagster_home()
    from dagster import DagsterInstance

    from cvops_dagster.definitions import defs

    return DagsterInstance.get(), defs


def landing_zone():  # noqa: ANN201 - LandingZone, imported lazily
    from cvops_dagster.ingestion.landing import LandingZone

    return LandingZone(settings.normalize_root(settings.landing_root()), settings.s3_endpoint_url())


def artifact_storage():  # noqa: ANN201 - ArtifactStorage, imported lazily
    from cvops_dagster.core.storage import ArtifactStorage

    return ArtifactStorage(settings.normalize_root(settings.artifact_root()), endpoint_url=settings.s3_endpoint_url())


def instance_only() -> Any:
    """The Dagster instance alone (no definitions loaded), for quick bookkeeping."""
    ensure_dagster_home()
    from dagster import DagsterInstance

    return DagsterInstance.get()
