"""What every ``cvops`` command shares: the one-line error type, the roots it resolves, and lazy
access to the Dagster instance, the landing zone and the artifact store.

Dagster, the definitions and the storage libraries are imported inside these functions, so a
command that needs none of them (``cvops predict``) never loads them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cvops_dagster.core import settings
from cvops_dagster.core.instance import InstanceNotFoundError, ensure_dagster_home, existing_dagster_home


class CvopsError(Exception):
    """A failure to report to the user in one clear line (exit code 1)."""


def apply_overrides(args: argparse.Namespace) -> settings.Roots:
    """Resolve this command's roots and export them to this process and its children.

    ``--landing``/``--artifacts`` win over the environment, which wins over the project's
    defaults (see :mod:`cvops_dagster.core.settings`). The resolved roots are then exported as
    absolute ``$CVOPS_LANDING``, ``$CVOPS_ARTIFACT_ROOT``, ``$DAGSTER_HOME`` (and ``$CVOPS_HOME``
    when a project was found; a relative file path in ``$CVOPS_OPTUNA_STORAGE`` made absolute), so what this command starts (an in-process run, the code
    server and daemon of ``dagster dev``) resolves the same roots whatever its working folder.
    Nothing is created here.
    """
    if getattr(args, "landing", None):
        os.environ[settings.LANDING_ENV] = args.landing
    if getattr(args, "artifacts", None):
        os.environ[settings.ARTIFACT_ROOT_ENV] = args.artifacts
    roots = resolved_roots()
    if roots.project is not None:
        os.environ[settings.PROJECT_HOME_ENV] = str(roots.project)
    os.environ[settings.LANDING_ENV] = roots.landing
    os.environ[settings.ARTIFACT_ROOT_ENV] = roots.artifacts
    os.environ[settings.DAGSTER_HOME_ENV] = str(roots.dagster_home)
    if optuna := os.environ.get(settings.OPTUNA_STORAGE_ENV):
        os.environ[settings.OPTUNA_STORAGE_ENV] = settings.absolute_optuna_storage(optuna)
    # The FiftyOne App's local media folder (and the bundled mongod's), absolute as the roots are.
    os.environ[settings.REVIEW_MEDIA_ENV] = str(Path(settings.review_media_root()).expanduser().resolve())
    if fiftyone_dir := os.environ.get(settings.FIFTYONE_DIR_ENV):
        os.environ[settings.FIFTYONE_DIR_ENV] = str(Path(fiftyone_dir).expanduser().resolve())
    return roots


def resolved_roots() -> settings.Roots:
    """:func:`settings.resolve_roots`, a bad ``$CVOPS_HOME`` reported as a :class:`CvopsError`."""
    try:
        return settings.resolve_roots()
    except settings.ProjectError as exc:
        raise CvopsError(str(exc)) from exc


def dagster_home(create: bool = True) -> str:
    """The instance folder, made ready: created when missing (``create``), else required to exist."""
    if create:
        return str(ensure_dagster_home())
    try:
        return str(existing_dagster_home())
    except InstanceNotFoundError as exc:
        raise CvopsError(str(exc)) from exc


def load_instance(create: bool = True) -> tuple[Any, Any]:
    """The Dagster instance and definitions, loaded after the environment is final.

    ``create=False`` is for read-only commands: a missing instance is a :class:`CvopsError`
    (with what to do), never a new empty one.
    """
    settings.disable_telemetry()
    dagster_home(create)
    from dagster import DagsterInstance

    from cvops_dagster.definitions import defs

    return DagsterInstance.get(), defs


def landing_zone():  # noqa: ANN201 - LandingZone, imported lazily
    from cvops_dagster.ingestion.landing import LandingZone

    return LandingZone(settings.normalize_root(settings.landing_root()), settings.s3_endpoint_url())


def artifact_storage():  # noqa: ANN201 - ArtifactStorage, imported lazily
    from cvops_dagster.core.storage import ArtifactStorage

    return ArtifactStorage(settings.normalize_root(settings.artifact_root()), endpoint_url=settings.s3_endpoint_url())


def instance_only(create: bool = True) -> Any:
    """The Dagster instance alone (no definitions loaded), for quick bookkeeping."""
    dagster_home(create)
    from dagster import DagsterInstance

    return DagsterInstance.get()
