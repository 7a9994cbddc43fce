"""OptunaStorage: where hyperparameter studies persist (so a re-run resumes them)."""

import os

from dagster import ConfigurableResource, EnvVar

from cvops_dagster.core.settings import OPTUNA_STORAGE_ENV


class OptunaStorage(ConfigurableResource):
    """An Optuna storage URL: any SQLAlchemy URL (PostgreSQL for several workers), a journal
    file (``.log``), or ``None`` for the embedded SQLite file under the artifact root."""

    url: str | None = None


def optuna_storage_from_env() -> OptunaStorage:
    return OptunaStorage(url=EnvVar(OPTUNA_STORAGE_ENV) if os.environ.get(OPTUNA_STORAGE_ENV) else None)
