"""Environment contract (DESIGN.md): variable names, the project and the roots it implies.

Resolution (pure functions of the environment and the current folder; no Dagster import):

* **project root**: ``$CVOPS_HOME`` when set (it must be an existing folder), else the
  nearest folder from the current one upwards (itself included) holding a ``workspace.yaml``
  that loads ``cvops_dagster.definitions``, else none (outside any project: the current
  folder stands in, as the defaults below show).
* **landing zone**: ``$CVOPS_LANDING``, else ``<project>/landing``, else ``./landing``.
* **artifact root**: ``$CVOPS_ARTIFACT_ROOT``, else ``<project>/.cvops``, else ``./.cvops``.
* **Dagster instance**: ``$DAGSTER_HOME``, else ``<project>/.dagster_home``, else ``./.dagster_home``.

A relative path given in one of these variables is relative to the current folder (where the
command runs), not to the project. ``--landing``/``--artifacts`` set the variables for the
command (``cvops_dagster.cli.common.apply_overrides``), so they win over everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_HOME_ENV = "CVOPS_HOME"
LANDING_ENV = "CVOPS_LANDING"
ARTIFACT_ROOT_ENV = "CVOPS_ARTIFACT_ROOT"
S3_ENDPOINT_ENV = "CVOPS_S3_ENDPOINT_URL"
DAGSTER_HOME_ENV = "DAGSTER_HOME"

#: The file that marks a project folder, and the code location it must load to count.
WORKSPACE_FILE = "workspace.yaml"
DEFINITIONS_MODULE = "cvops_dagster.definitions"

#: Defaults, relative to the project root (or to the current folder outside any project).
LANDING_DIR = "landing"
ARTIFACT_DIR = ".cvops"
DAGSTER_HOME_DIR = ".dagster_home"
DEFAULT_LANDING = f"./{LANDING_DIR}"
DEFAULT_ARTIFACT_ROOT = f"./{ARTIFACT_DIR}"
DEFAULT_DAGSTER_HOME = f"./{DAGSTER_HOME_DIR}"


class ProjectError(ValueError):
    """The configured project cannot be used (``$CVOPS_HOME`` is not a folder)."""


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


def loads_cvops_definitions(workspace: Path) -> bool:
    """Whether ``workspace`` (a ``workspace.yaml``) loads the ``cvops_dagster.definitions`` module.

    An unreadable or malformed file, or one naming other code, does not make a project.
    """
    import yaml  # light, and only read when a workspace.yaml is found

    try:
        data = yaml.safe_load(workspace.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    entries = data.get("load_from") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        for kind in ("python_module", "python_package"):
            target = entry.get(kind)
            name = (target.get("module_name") or target.get("package_name")) if isinstance(target, dict) else target
            if name == DEFINITIONS_MODULE:
                return True
    return False


def find_project(start: Path) -> Path | None:
    """The nearest folder from ``start`` upwards (itself included) whose ``workspace.yaml``
    loads ``cvops_dagster.definitions``; None when there is none."""
    start = start.resolve()
    for folder in (start, *start.parents):
        candidate = folder / WORKSPACE_FILE
        if candidate.is_file() and loads_cvops_definitions(candidate):
            return folder
    return None


def project_root(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The project root: ``$CVOPS_HOME``, else the nearest project folder upwards, else None.

    Raises:
        ProjectError: ``$CVOPS_HOME`` is set but is not an existing folder.
    """
    env = os.environ if environ is None else environ
    if home := env.get(PROJECT_HOME_ENV):
        path = Path(home).expanduser()
        path = (cwd / path if cwd is not None and not path.is_absolute() else path).resolve()
        if not path.is_dir():
            raise ProjectError(
                f"{PROJECT_HOME_ENV}={home} is not a folder (point it at the project: the folder of {WORKSPACE_FILE})"
            )
        return path
    return find_project(cwd if cwd is not None else Path.cwd())


def _project_default(folder: str, environ: Mapping[str, str] | None, cwd: Path | None) -> str:
    root = project_root(environ, cwd)
    return str(root / folder) if root is not None else f"./{folder}"


def landing_root(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """``$CVOPS_LANDING``, else ``<project>/landing``, else ``./landing`` (not normalized)."""
    env = os.environ if environ is None else environ
    return env.get(LANDING_ENV) or _project_default(LANDING_DIR, environ, cwd)


def artifact_root(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """``$CVOPS_ARTIFACT_ROOT``, else ``<project>/.cvops``, else ``./.cvops`` (not normalized)."""
    env = os.environ if environ is None else environ
    return env.get(ARTIFACT_ROOT_ENV) or _project_default(ARTIFACT_DIR, environ, cwd)


def dagster_home(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The Dagster instance folder: ``$DAGSTER_HOME``, else ``<project>/.dagster_home``, else
    ``./.dagster_home``; absolute (a relative variable is taken from the current folder)."""
    env = os.environ if environ is None else environ
    raw = env.get(DAGSTER_HOME_ENV) or _project_default(DAGSTER_HOME_DIR, environ, cwd)
    path = Path(raw).expanduser()
    if cwd is not None and not path.is_absolute():
        path = cwd / path
    return path.resolve()


@dataclass(frozen=True)
class Roots:
    """Every root a command uses, resolved, with where each came from (for ``cvops status``)."""

    project: Path | None
    project_source: str  # "$CVOPS_HOME", "workspace.yaml" or "none"
    dagster_home: Path
    dagster_home_source: str  # "$DAGSTER_HOME", "project" or "current folder"
    landing: str
    landing_source: str
    artifacts: str
    artifacts_source: str


def resolve_roots(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Roots:
    """The project, instance, landing and artifact roots as this process resolves them."""
    env = os.environ if environ is None else environ
    project = project_root(env, cwd)
    fallback = "project" if project is not None else "current folder"

    def source(name: str) -> str:
        return f"${name}" if env.get(name) else fallback

    def normalized(root: str) -> str:
        if cwd is not None and "://" not in root and not Path(root).expanduser().is_absolute():
            root = str(cwd / root)
        return normalize_root(root)

    return Roots(
        project=project,
        project_source=f"${PROJECT_HOME_ENV}" if env.get(PROJECT_HOME_ENV) else (WORKSPACE_FILE if project else "none"),
        dagster_home=dagster_home(env, cwd),
        dagster_home_source=source(DAGSTER_HOME_ENV),
        landing=normalized(landing_root(env, cwd)),
        landing_source=source(LANDING_ENV),
        artifacts=normalized(artifact_root(env, cwd)),
        artifacts_source=source(ARTIFACT_ROOT_ENV),
    )


OPTUNA_STORAGE_ENV = "CVOPS_OPTUNA_STORAGE"


def absolute_optuna_storage(url: str, cwd: Path | None = None) -> str:
    """``url`` with a relative file path made absolute against ``cwd`` (the current folder):
    a plain path (SQLite ``.db`` or a journal ``.log``) or ``sqlite:///relative.db``. Other
    URLs (PostgreSQL, ``sqlite://`` in memory, absolute paths) are returned unchanged.

    ``cvops`` exports it so every process it starts (runs, code servers, the daemon) opens the
    same study whatever its working folder.
    """
    base = cwd if cwd is not None else Path.cwd()
    if "://" not in url:
        path = Path(url).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and len(url) > len(prefix):
        rest = url[len(prefix):]
        return prefix + str((base / rest).resolve())
    return url


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


RETRAIN_ON_ENV = "CVOPS_RETRAIN_ON"
#: What may start a retraining: ``new_data`` (a new or changed labelled landing batch, through
#: Dagster's automation) and ``drift`` (drift_retrain_sensor, once labels of the drifted stream exist).
RETRAIN_TRIGGERS: tuple[str, ...] = ("new_data", "drift")
RETRAIN_CONFIG_ENV = "CVOPS_RETRAIN_CONFIG"


def retrain_triggers(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """``$CVOPS_RETRAIN_ON``: a comma-separated subset of :data:`RETRAIN_TRIGGERS`, or ``none``;
    default both.

    Raises:
        ValueError: an unknown trigger (the code location then fails to load, naming the variable).
    """
    value = (environ if environ is not None else os.environ).get(RETRAIN_ON_ENV, "").strip().lower()
    if not value:
        return frozenset(RETRAIN_TRIGGERS)
    if value == "none":
        return frozenset()
    triggers = {part.strip() for part in value.split(",") if part.strip()}
    unknown = sorted(triggers - set(RETRAIN_TRIGGERS))
    if unknown:
        raise ValueError(f"{RETRAIN_ON_ENV}={value!r}: unknown trigger(s) {unknown}; use a comma list of {list(RETRAIN_TRIGGERS)} or 'none'")
    return frozenset(triggers)


def retrain_run_config_path(environ: Mapping[str, str] | None = None) -> str | None:
    """``$CVOPS_RETRAIN_CONFIG``: a Dagster run config file (YAML/JSON) for the retraining runs
    drift_retrain_sensor requests (the search budget, epochs); ``None`` for the assets' defaults."""
    value = (environ if environ is not None else os.environ).get(RETRAIN_CONFIG_ENV, "").strip()
    return value or None


# --------------------------------------------------------------------------- review (FiftyOne)

#: A MongoDB the user runs for FiftyOne (FiftyOne's own variable); unset: the bundled mongod.
FIFTYONE_URI_ENV = "FIFTYONE_DATABASE_URI"
#: Where the bundled mongod keeps its data (FiftyOne's own variable); unset: FiftyOne's default.
FIFTYONE_DIR_ENV = "FIFTYONE_DATABASE_DIR"
#: Prefix of the deployment's review dataset name (``<prefix>_review``); default ``cvops``.
REVIEW_PREFIX_ENV = "CVOPS_REVIEW_DATASET_PREFIX"
DEFAULT_REVIEW_PREFIX = "cvops"
#: Local folder of the images the FiftyOne App shows (FiftyOne reads local files only).
REVIEW_MEDIA_ENV = "CVOPS_REVIEW_MEDIA"
REVIEW_MEDIA_DIR = ".cvops-media"


def review_prefix(environ: Mapping[str, str] | None = None) -> str:
    """``$CVOPS_REVIEW_DATASET_PREFIX``, else ``cvops``."""
    return ((environ if environ is not None else os.environ).get(REVIEW_PREFIX_ENV) or "").strip() or DEFAULT_REVIEW_PREFIX


def review_media_root(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """``$CVOPS_REVIEW_MEDIA``, else ``<project>/.cvops-media``, else ``./.cvops-media``."""
    env = os.environ if environ is None else environ
    return env.get(REVIEW_MEDIA_ENV) or _project_default(REVIEW_MEDIA_DIR, environ, cwd)
