"""Hyperparameter search with Optuna on persistent storage, pruned through Lightning.

:func:`run_study` runs (or resumes) the study named after the dataset version. The study lives
in a persistent Optuna storage (SQLite file by default, any SQLAlchemy URL or a journal file),
so a rerun continues it: finished trials count against the budget and trials a crash left
RUNNING are marked failed first.

Failures are not hidden: a trial may fail only for a reason of its own (:class:`TrialFailed`:
no metric logged, a non-finite score); any other exception (a bug, running out of memory)
fails the study, and a study left with no completed trial raises :class:`StudyFailed` instead
of handing training empty parameters. Storage URLs are logged and recorded redacted.

Default storage: a SQLite file under a local artifact root. With a remote root (``s3://``) the
default is a journal file kept in the artifact store (``optuna/journal.log``), downloaded into a
private folder and uploaded after every trial, so every machine resumes the same study; that
suits one worker at a time. Several workers at once need a shared database
(``CVOPS_OPTUNA_STORAGE``, PostgreSQL).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from cvops_dagster.training.augmentation import AugmentConfig
from cvops_dagster.training.evaluation import TrialPoint, optimization_history_png
from cvops_dagster.training.models import build_classifier
from cvops_dagster.core.redaction import redact_url
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.training.train import build_trainer, torch_threads
from cvops_dagster.datasets.loading import LoadedDataset, load_dataset
from cvops_dagster.training.datamodule import ImageDataModule
from cvops_dagster.training.system import MONITOR, ClassifierSystem, HistoryCallback, arch_from_params, resolve_params

logger = logging.getLogger(__name__)

#: The study journal kept in a remote artifact store (see the module docstring).
REMOTE_JOURNAL_KEY = "optuna/journal.log"
#: The SQLite file of the default storage under a local artifact root's ``optuna/`` folder.
_DEFAULT_DB = "optuna.db"


class TrialFailed(RuntimeError):
    """A trial that could not produce a score for a reason of its own; the study goes on."""


class StudyFailed(RuntimeError):
    """The study has no completed trial after this run: there are no parameters to train with."""

#: Default search space: ``name -> (kind, low/choices, high, log)``. Narrow on purpose: every
#: point in it trains a good model, the study picks the best for this dataset.
DEFAULT_SEARCH_SPACE: dict[str, tuple] = {
    "lr": ("float", 1e-3, 1e-2, True),
    "weight_decay": ("float", 1e-5, 1e-2, True),
    "dropout": ("float", 0.0, 0.3, False),
    "label_smoothing": ("float", 0.0, 0.15, False),
    "width": ("categorical", (16, 24, 32)),
}


@dataclass
class StudyConfig:
    """Budget and search settings of a study.

    Attributes:
        n_trials: total finished (complete or pruned) trials wanted, counting earlier runs.
        timeout: seconds this call may spend optimising (``None``: no limit).
        max_epochs: epochs per trial (the pruner's maximum resource).
        seed: TPE sampler seed and training seed.
        pruner: ``successive_halving``, ``hyperband``, ``none`` or an Optuna pruner instance.
        min_resource: epochs before the first pruning decision.
        reduction_factor: pruner aggressiveness (keep 1/reduction_factor per rung).
        n_startup_trials: random trials before TPE models the space.
        search_space: overrides :data:`DEFAULT_SEARCH_SPACE`.
        fixed_params: hyperparameters held fixed in every trial.
        num_threads: torch threads (``None``: all available).
        accelerator: Lightning accelerator.
        augment: training augmentations.
        single_worker: when True every RUNNING trial found at start is a crash leftover and
            is marked failed; with several workers, set False (stale trials are then found by
            heartbeat, which needs an RDB storage).
        heartbeat_interval: seconds between trial heartbeats when ``single_worker`` is False.
        study_prefix: study name prefix; the name is ``<prefix><dataset_version>``.
    """

    n_trials: int = 8
    timeout: float | None = None
    max_epochs: int = 12
    seed: int = 0
    pruner: Any = "successive_halving"
    min_resource: int = 2
    reduction_factor: int = 3
    n_startup_trials: int = 4
    search_space: dict[str, tuple] | None = None
    fixed_params: dict[str, Any] = field(default_factory=dict)
    num_threads: int | None = None
    accelerator: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    single_worker: bool = True
    heartbeat_interval: int = 60
    study_prefix: str = "cvops-"


@dataclass
class StudyResult:
    """Outcome of a study (all trials so far, not only this call's)."""

    study_name: str
    storage_url: str
    best_params: dict[str, Any]
    best_value: float | None
    n_complete: int
    n_pruned: int
    n_failed: int
    n_trials_this_run: int
    epochs_consumed: int
    trials: pd.DataFrame
    history_png: bytes
    seconds: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no DataFrame, no plot)."""
        return {
            "study_name": self.study_name,
            "storage_url": self.storage_url,
            "best_params": self.best_params,
            "best_value": self.best_value,
            "n_complete": self.n_complete,
            "n_pruned": self.n_pruned,
            "n_failed": self.n_failed,
            "n_trials_this_run": self.n_trials_this_run,
            "epochs_consumed": self.epochs_consumed,
            "seconds": self.seconds,
        }


def default_storage_url(folder: str | Path) -> str:
    """SQLite file ``<folder>/optuna.db`` (created if needed)."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / _DEFAULT_DB}"


def study_storage_uri(storage: ArtifactStorage, storage_url: str | None) -> str:
    """Where the study of ``storage_url`` (see :func:`run_study`) persists, to show a user: a
    SQLite or journal file's path, the journal's key in a remote store, else the URL with its
    password masked."""
    if storage_url is None:
        return storage.uri(f"optuna/{_DEFAULT_DB}" if storage.is_local else REMOTE_JOURNAL_KEY)
    if storage_url.startswith("sqlite:///"):
        return storage_url.removeprefix("sqlite:///")  # sqlite:////abs/path -> /abs/path
    if "://" not in storage_url:
        return str(Path(storage_url).expanduser().resolve())
    return redact_url(storage_url) or ""


def open_storage(url: str, heartbeat_interval: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a SQLAlchemy URL, a ``.log``/``.journal`` file or a ``.db`` path.

    ``heartbeat_interval`` (seconds, RDB only) lets several workers detect each other's
    crashed trials (failed after twice the interval without a beat).
    """
    if "://" in url:
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": 2 * heartbeat_interval} if heartbeat_interval else {}
        engine_kwargs = None if url.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    path = Path(url).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".log", ".journal", ".jsonl"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(f"sqlite:///{path}")


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    """The configured pruner; epochs are the resource."""
    if isinstance(config.pruner, optuna.pruners.BasePruner):
        return config.pruner
    if config.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=config.min_resource, reduction_factor=config.reduction_factor)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=config.min_resource, max_resource=config.max_epochs, reduction_factor=config.reduction_factor
        )
    if config.pruner in ("none", None):
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {config.pruner!r}")


def suggest_params(trial: optuna.Trial, space: dict[str, tuple], fixed: dict[str, Any]) -> dict[str, Any]:
    """Draw one hyperparameter set from ``space`` (fixed values win)."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if name in fixed:
            continue
        kind = spec[0]
        if kind == "float":
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=bool(spec[3]) if len(spec) > 3 else False)
        elif kind == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2], log=bool(spec[3]) if len(spec) > 3 else False)
        elif kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec[1]))
        else:
            raise ValueError(f"unknown search-space kind {kind!r} for {name}")
    params.update(fixed)
    return params


def fail_leftover_trials(study: optuna.Study, single_worker: bool) -> int:
    """Mark trials a crashed run left RUNNING as failed; returns how many were."""
    if not single_worker:
        return len(optuna.storages.fail_stale_trials(study) or []) if hasattr(optuna.storages, "fail_stale_trials") else 0
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)  # left RUNNING by an interrupted run
        count += 1
    if count:
        logger.warning("study %s: marked %d interrupted trial(s) as failed", study.study_name, count)
    return count


def train_trial(
    trial: optuna.Trial | None,
    data: LoadedDataset,
    params: dict[str, Any],
    *,
    max_epochs: int,
    seed: int,
    accelerator: str,
    augment: AugmentConfig,
) -> tuple[float, int]:
    """Train one configuration; report each epoch's validation accuracy to ``trial``'s pruner.

    Returns:
        (best validation accuracy, epochs run). Raises ``optuna.TrialPruned`` when pruned.
    """
    import lightning.pytorch as pl

    resolved = resolve_params(params)
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = ImageDataModule(data, int(resolved["batch_size"]), augment, seed)
    model = build_classifier(arch_from_params(resolved, data.image_size), datamodule.num_classes, data.channels)
    system = ClassifierSystem(model, datamodule.num_classes, resolved)
    history = HistoryCallback()
    callbacks: list[Any] = [history]
    if trial is not None:
        callbacks.append(PyTorchLightningPruningCallback(trial, monitor=MONITOR))
    trainer = build_trainer(max_epochs=max_epochs, accelerator=accelerator, callbacks=callbacks)
    trainer.fit(system, datamodule=datamodule)
    scores = [h[MONITOR] for h in history.history if MONITOR in h]
    if not scores:
        raise TrialFailed(f"no {MONITOR} was logged")
    best = max(scores)
    if not math.isfinite(best):
        raise TrialFailed(f"{MONITOR} is not finite ({best}): the configuration diverged")
    return best, len(scores)


def run_study(
    storage: ArtifactStorage,
    dataset_version: str,
    config: StudyConfig | None = None,
    storage_url: str | None = None,
    *,
    data: LoadedDataset | None = None,
) -> StudyResult:
    """Run or resume the hyperparameter study of ``dataset_version``.

    Args:
        storage: artifact store holding the cleaned dataset.
        dataset_version: the version to tune on; the study is named after it.
        config: budget and search settings.
        storage_url: Optuna storage: SQLAlchemy URL, a journal file (``.log``) or a SQLite
            path; ``None`` puts ``optuna/optuna.db`` under a local artifact root, or keeps a
            journal in a remote one (see the module docstring).
        data: an already decoded dataset.

    Returns:
        A :class:`StudyResult`; ``best_params`` feeds :func:`cvops_dagster.training.train.train_model`.

    Raises:
        StudyFailed: no trial of the study has completed (all failed or were pruned).
    """
    config = config or StudyConfig()
    if storage_url is None and not storage.is_local:
        with _journal_in_store(storage) as (journal, upload):
            return _run_study(storage, dataset_version, config, journal, data, upload)
    if storage_url is None:
        storage_url = default_storage_url(storage.local_path("optuna"))  # type: ignore[arg-type]
    return _run_study(storage, dataset_version, config, storage_url, data, None)


@contextlib.contextmanager
def _journal_in_store(storage: ArtifactStorage) -> Iterator[tuple[str, Any]]:
    """A private local copy of the store's study journal, and a function that uploads it back."""
    folder = Path(tempfile.mkdtemp(prefix="cvops-optuna-"))
    local = folder / "journal.log"
    if storage.exists(REMOTE_JOURNAL_KEY):
        local.write_bytes(storage.read_bytes(REMOTE_JOURNAL_KEY))

    def upload(*_: Any) -> None:
        if local.exists():
            storage.write_bytes(REMOTE_JOURNAL_KEY, local.read_bytes())

    try:
        yield str(local), upload
        upload()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_study(
    storage: ArtifactStorage,
    dataset_version: str,
    config: StudyConfig,
    storage_url: str,
    data: LoadedDataset | None,
    after_trial: Any,
) -> StudyResult:
    started = time.perf_counter()
    shown_url = redact_url(storage_url) or ""
    study_name = f"{config.study_prefix}{dataset_version}"
    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.n_startup_trials)
    study = optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage_url, None if config.single_worker else config.heartbeat_interval),
        sampler=sampler,
        pruner=make_pruner(config),
        direction="maximize",
        load_if_exists=True,
    )
    study.set_user_attr("dataset_version", dataset_version)
    study.set_user_attr("monitor", MONITOR)
    fail_leftover_trials(study, config.single_worker)
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    remaining = max(0, config.n_trials - done)
    logger.info("study %s at %s: %d finished trial(s), running %d more", study_name, shown_url, done, remaining)
    space = config.search_space or DEFAULT_SEARCH_SPACE
    before = len(study.trials)

    if remaining:
        data = data or load_dataset(storage, dataset_version)

        def objective(trial: optuna.Trial) -> float:
            params = suggest_params(trial, space, config.fixed_params)
            trial.set_user_attr("params", params)
            value, epochs = train_trial(
                trial,
                data,
                params,
                max_epochs=config.max_epochs,
                seed=config.seed,
                accelerator=config.accelerator,
                augment=config.augment,
            )
            trial.set_user_attr("epochs", epochs)
            return value

        with torch_threads(config.num_threads):
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=config.timeout,
                # Stops every worker once the shared budget is reached.
                callbacks=[
                    optuna.study.MaxTrialsCallback(config.n_trials, states=finished_states),
                    *([after_trial] if after_trial is not None else []),
                ],
                # Only a trial's own failure is caught; anything else fails the asset.
                catch=(TrialFailed,),
                gc_after_trial=True,
            )
    result = summarize_study(study, shown_url, len(study.trials) - before, time.perf_counter() - started)
    if result.n_complete == 0 and config.n_trials > 0:
        raise StudyFailed(
            f"study {study_name}: no trial completed ({result.n_failed} failed, {result.n_pruned} pruned); "
            "see the trials' fail reasons in the log, fix the cause and materialize hpo_study again"
        )
    return result


def trial_epochs(trial: optuna.trial.FrozenTrial) -> int:
    """Epochs a trial trained: the intermediate values it reported (one per epoch)."""
    return int(trial.user_attrs.get("epochs", len(trial.intermediate_values)))


def history_points(trials: list[optuna.trial.FrozenTrial]) -> list[TrialPoint]:
    """Every trial as the optimization-history plot draws it (see :class:`TrialPoint`).

    A pruned trial's value is its last intermediate value (what the pruner judged it on); a
    failed or unfinished trial has none but is still listed.
    """
    points = []
    for trial in sorted(trials, key=lambda t: t.number):
        intermediate = tuple(
            (int(step), float(value)) for step, value in sorted(trial.intermediate_values.items()) if value is not None and math.isfinite(value)
        )
        if trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value):
            value: float | None = float(trial.value)
        elif trial.state == TrialState.PRUNED and intermediate:
            value = intermediate[-1][1]
        else:
            value = None
        points.append(TrialPoint(int(trial.number), trial.state.name.lower(), value, intermediate))
    return points


def summarize_study(study: optuna.Study, storage_url: str, ran: int, seconds: float) -> StudyResult:
    """Collect a :class:`StudyResult` from a study's trials."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best_params: dict[str, Any] = {}
    best_value = None
    if complete:
        best = study.best_trial
        best_params = dict(best.user_attrs.get("params", best.params))
        best_value = float(best.value) if best.value is not None else None
    frame = study.trials_dataframe()
    if len(frame):
        frame["epochs"] = [trial_epochs(t) for t in trials]  # one row per trial, in number order
    return StudyResult(
        study_name=study.study_name,
        storage_url=storage_url,
        best_params=best_params,
        best_value=best_value,
        n_complete=len(complete),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        n_trials_this_run=ran,
        epochs_consumed=sum(trial_epochs(t) for t in trials),
        trials=frame,
        history_png=optimization_history_png(history_points(trials), maximize=True),
        seconds=seconds,
    )
