"""Hyperparameter search with Optuna on persistent storage, pruned through Lightning.

:func:`run_study` runs (or resumes) the study named after the dataset version. The study lives
in a persistent Optuna storage (SQLite file by default, any SQLAlchemy URL or a journal file),
so a rerun continues it: finished trials count against the budget, and trials a crash left
RUNNING are failed first (see "Crashed trials" below).

Failures are not hidden: a trial may fail only for a reason of its own (:class:`TrialFailed`:
no metric logged, a non-finite score); any other exception (a bug, running out of memory)
fails the study, and a study left with no completed trial raises :class:`StudyFailed` instead
of handing training empty parameters. Storage URLs are logged and recorded redacted.

Several workers (``StudyConfig.workers`` > 1): that many worker processes (spawned, each with
``threads // workers`` torch threads) share the study through its storage. Each claims one
trial of the budget at a time from a counter the workers share, so the study ends with exactly
``n_trials`` finished trials (Optuna's ``MaxTrialsCallback`` alone lets each concurrent worker
start one more), balanced however long each trial takes; each samples with its own seed
(``seed + worker index``: equal seeds would draw the same start-up trials). One worker keeps
today's in-process path, reproducible for a given seed. Every trial records the ``worker``
(index) and ``worker_id`` (``<host>/<run token>/<index>``) that ran it. A worker that raises
stops the others and fails the study with its error; one that dies (a signal, the OOM
killer) has its running trial failed and its slot given back; the study fails only if no
trial completed. The parent never blocks on a worker: it polls their exit.

Crashed trials: every trial in a database storage (SQLite, PostgreSQL) records heartbeats
(``heartbeat_interval``), so a later or concurrent run can tell a live trial from a crashed
one; Optuna's ``fail_stale_trials`` fails those silent for twice the interval. Only a storage
this call uses alone (``single_worker`` with one worker, or the private journal copy below)
fails every RUNNING trial it finds instead. Journal storages keep no heartbeats (Optuna 5.0):
there, with several workers, a crashed trial stays RUNNING unless its worker was ours.

Default storage: a SQLite file under a local artifact root, whatever the number of workers
(SQLite serializes the workers' short writes; they wait up to a minute for the lock), so a
study started with one worker continues with several. With a remote root (``s3://``) the
default is a journal file kept in the artifact store (``optuna/journal.log``), downloaded into a
private folder (the workers share it through Optuna's file lock) and uploaded after every trial,
so every machine resumes the same study; that suits one step at a time. Several steps or
machines at once need a shared database (``CVOPS_OPTUNA_STORAGE``, PostgreSQL).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import pickle
import shutil
import socket
import tempfile
import time
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
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
from cvops_dagster.core.settings import step_threads
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
#: Trial user attributes naming who ran a trial: the worker's index in its run, and
#: ``<host>/<run token>/<index>`` (unique across runs and machines).
WORKER_ATTR = "worker"
WORKER_ID_ATTR = "worker_id"
#: Seconds SQLite waits for another process's write lock before "database is locked".
_SQLITE_BUSY_TIMEOUT_S = 60
#: Seconds between the parent's checks on its workers.
_POLL_S = 1.0
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialFailed(RuntimeError):
    """A trial that could not produce a score for a reason of its own; the study goes on."""


class StudyFailed(RuntimeError):
    """The study has no completed trial after this run: there are no parameters to train with."""


class WorkerFailed(RuntimeError):
    """A study worker process raised (a bug, out of memory): the study fails as it would in process."""

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
        single_worker: the storage is this call's alone: with one worker, every RUNNING
            trial found at start is a crash leftover and is failed. False (a storage shared
            with other steps or machines), or ``workers`` > 1: only trials whose heartbeat
            stopped are failed (``fail_stale_trials``; database storages only).
        heartbeat_interval: seconds between trial heartbeats (database storages); a trial
            silent for twice as long counts as crashed.
        study_prefix: study name prefix; the name is ``<prefix><dataset_version>``.
        workers: worker processes optimising the study at once; 1 runs in this process.
        worker_grace_s: with ``timeout`` and several workers, how long past the timeout a
            worker may finish its last trial before it is stopped (its trial failed).
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
    workers: int = 1
    worker_grace_s: float = 600.0


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
    workers: int = 1
    trials_per_worker: dict[str, int] = field(default_factory=dict)
    worker_exit_codes: dict[str, int] = field(default_factory=dict)

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
            "workers": self.workers,
            "trials_per_worker": self.trials_per_worker,
            "worker_exit_codes": self.worker_exit_codes,
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

    ``heartbeat_interval`` (seconds, database storages only: Optuna 5's journal storage has
    no heartbeats) makes each running trial beat, so a trial silent for twice the interval
    can be failed as crashed (:func:`fail_leftover_trials`). SQLite waits up to a minute for
    another process's write lock, so several workers can share one file.
    """
    if "://" not in url:
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".log", ".journal", ".jsonl"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        url = f"sqlite:///{path}"
    heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": 2 * heartbeat_interval} if heartbeat_interval else {}
    if url.startswith("sqlite"):
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": _SQLITE_BUSY_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


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
    """Fail trials that crashed workers left RUNNING; returns how many were failed.

    ``single_worker`` (the storage is this caller's alone, nothing else is running): every
    RUNNING trial is a leftover. Otherwise only those whose heartbeat stopped, through
    Optuna's ``fail_stale_trials``; a storage without heartbeats (a journal) fails none.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return 0
    if single_worker:
        for trial in running:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)  # left RUNNING by an interrupted run
        count = len(running)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # returns None: count the trials it failed
        numbers = {trial.number for trial in running}
        count = sum(t.number in numbers for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    if count:
        logger.warning("study %s: failed %d trial(s) a crashed worker left running", study.study_name, count)
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


def make_sampler(config: StudyConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded TPE; worker ``i`` of several uses ``seed + i`` (equal seeds would make the
    workers draw the same start-up trials). Optuna 5's TPE penalizes the points of running
    trials (``constant_liar``), so concurrent workers spread out."""
    return optuna.samplers.TPESampler(seed=config.seed + worker, n_startup_trials=config.n_startup_trials)


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
        config: budget and search settings; ``config.workers`` > 1 runs that many worker
            processes at once (see the module docstring).
        storage_url: Optuna storage: SQLAlchemy URL, a journal file (``.log``) or a SQLite
            path; ``None`` puts ``optuna/optuna.db`` under a local artifact root, or keeps a
            journal in a remote one (see the module docstring).
        data: an already decoded dataset.

    Returns:
        A :class:`StudyResult`; ``best_params`` feeds :func:`cvops_dagster.training.train.train_model`.

    Raises:
        StudyFailed: no trial of the study has completed (all failed or were pruned).
        WorkerFailed: a worker process raised (several workers); the others were stopped.
    """
    config = config or StudyConfig()
    if config.workers < 1:
        raise ValueError(f"workers must be at least 1, not {config.workers}")
    if storage_url is None and not storage.is_local:
        with _journal_in_store(storage) as (journal, upload):
            return _run_study(storage, dataset_version, config, journal, data, upload, private=True)
    if storage_url is None:
        storage_url = default_storage_url(storage.local_path("optuna"))  # type: ignore[arg-type]
    return _run_study(storage, dataset_version, config, storage_url, data, None, private=False)


@contextlib.contextmanager
def _journal_in_store(storage: ArtifactStorage) -> Iterator[tuple[str, Callable[..., None]]]:
    """A private local copy of the store's study journal, and a function that uploads it back."""
    from optuna.storages.journal import JournalFileSymlinkLock

    folder = Path(tempfile.mkdtemp(prefix="cvops-optuna-"))
    local = folder / "journal.log"
    if storage.exists(REMOTE_JOURNAL_KEY):
        local.write_bytes(storage.read_bytes(REMOTE_JOURNAL_KEY))
    # The lock Optuna's JournalFileBackend takes around each append: a copy taken under it
    # never ends in half a record, whichever worker is writing.
    lock = JournalFileSymlinkLock(str(local))

    def upload(*_: Any) -> None:
        if local.exists():
            lock.acquire()
            try:
                content = local.read_bytes()
            finally:
                lock.release()
            storage.write_bytes(REMOTE_JOURNAL_KEY, content)

    try:
        yield str(local), upload
        upload()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Objective:
    """One trial: draw parameters, train, report; records which worker ran it."""

    def __init__(self, data: LoadedDataset, config: StudyConfig, worker: int, worker_id: str) -> None:
        self.data = data
        self.config = config
        self.space = config.search_space or DEFAULT_SEARCH_SPACE
        self.worker = worker
        self.worker_id = worker_id

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, self.worker)
        trial.set_user_attr(WORKER_ID_ATTR, self.worker_id)
        params = suggest_params(trial, self.space, self.config.fixed_params)
        trial.set_user_attr("params", params)
        value, epochs = train_trial(
            trial,
            self.data,
            params,
            max_epochs=self.config.max_epochs,
            seed=self.config.seed,
            accelerator=self.config.accelerator,
            augment=self.config.augment,
        )
        trial.set_user_attr("epochs", epochs)
        return value


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=_FINISHED))


# Over ~60 lines: one place decides how leftovers are judged, splits the budget and
# collects who ran what, so the one-worker and several-worker paths visibly share it.
def _run_study(
    storage: ArtifactStorage,
    dataset_version: str,
    config: StudyConfig,
    storage_url: str,
    data: LoadedDataset | None,
    after_trial: Callable[..., None] | None,
    *,
    private: bool,
) -> StudyResult:
    started = time.perf_counter()
    shown_url = redact_url(storage_url) or ""
    study_name = f"{config.study_prefix}{dataset_version}"
    # Names this call's workers in the trials: host, a token unique to the call, then the index.
    run_prefix = f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}/"
    optuna_storage = open_storage(storage_url, config.heartbeat_interval)
    study = optuna.create_study(
        study_name=study_name,
        storage=optuna_storage,
        sampler=make_sampler(config, 0),
        pruner=make_pruner(config),
        direction="maximize",
        load_if_exists=True,
    )
    study.set_user_attr("dataset_version", dataset_version)
    study.set_user_attr("monitor", MONITOR)
    # A storage this call has alone (the private journal copy; single_worker with one worker)
    # holds no live trial now: whatever is RUNNING crashed. Otherwise heartbeats decide.
    exclusive = private or (config.single_worker and config.workers == 1)
    fail_leftover_trials(study, exclusive)
    if not exclusive and isinstance(optuna_storage, optuna.storages.JournalStorage):
        logger.warning(
            "study %s: a journal storage keeps no heartbeats, so trials a crashed worker left RUNNING stay RUNNING; "
            "a database URL (PostgreSQL) lets every worker fail them",
            study_name,
        )
    done = _finished(study)
    remaining = max(0, config.n_trials - done)
    logger.info(
        "study %s at %s: %d finished trial(s), running %d more with %d worker(s)", study_name, shown_url, done, remaining, config.workers
    )
    exit_codes: dict[int, int] = {}
    if remaining:
        data = data or load_dataset(storage, dataset_version)
        if config.workers == 1:
            with torch_threads(config.num_threads):
                study.optimize(
                    _Objective(data, config, 0, f"{run_prefix}0"),
                    n_trials=remaining,
                    timeout=config.timeout,
                    # Stops this call once other workers sharing the storage filled the budget.
                    callbacks=[
                        optuna.study.MaxTrialsCallback(config.n_trials, states=_FINISHED),
                        *([after_trial] if after_trial is not None else []),
                    ],
                    # Only a trial's own failure is caught; anything else fails the asset.
                    catch=(TrialFailed,),
                    gc_after_trial=True,
                )
        else:
            exit_codes = _run_workers(study, storage_url, config, data, remaining, run_prefix, after_trial)
    mine = [t for t in study.get_trials(deepcopy=False) if str(t.user_attrs.get(WORKER_ID_ATTR, "")).startswith(run_prefix)]
    per_worker = Counter(int(t.user_attrs[WORKER_ATTR]) for t in mine)
    result = summarize_study(study, shown_url, len(mine), time.perf_counter() - started)
    result.workers = config.workers
    result.trials_per_worker = {str(i): per_worker.get(i, 0) for i in range(config.workers)}
    result.worker_exit_codes = {str(i): code for i, code in sorted(exit_codes.items())}
    if result.n_complete == 0 and config.n_trials > 0:
        crashed = {i: code for i, code in result.worker_exit_codes.items() if code != 0}
        raise StudyFailed(
            f"study {study_name}: no trial completed ({result.n_failed} failed, {result.n_pruned} pruned"
            + (f"; worker exit codes {crashed}" if crashed else "")
            + "); see the trials' fail reasons in the log, fix the cause and materialize hpo_study again"
        )
    return result


#: Loggers whose level the worker processes take from the parent (their own default is chatty).
_CHILD_LOGGERS = ("cvops_dagster", "lightning.pytorch", "lightning.fabric")


@dataclass(frozen=True)
class _WorkerJob:
    """What a worker process needs; pickled to it (spawned, so nothing else is inherited)."""

    index: int
    worker_id: str
    storage_url: str
    study_name: str
    config: StudyConfig
    data_path: str  # the pickled LoadedDataset (see _run_workers)
    threads: int
    deadline: float | None  # time.time() after which no trial starts
    log_levels: dict[str, int]


def _study_worker(job: _WorkerJob, budget: Any, errors: Any) -> None:
    """A worker process: claim one trial of the shared budget at a time and run it through
    ``study.optimize`` (heartbeats, stale-trial checks, pruning), until the budget is spent,
    the study holds ``n_trials`` finished trials (other steps may be filling it too) or the
    deadline passed. An exception is sent to the parent, then the process exits with 1."""
    try:
        import torch

        for name, level in job.log_levels.items():
            logging.getLogger(name).setLevel(level)
        optuna.logging.set_verbosity(job.log_levels.get("optuna", logging.WARNING))
        torch.set_num_threads(job.threads)
        config = job.config
        study = optuna.load_study(
            study_name=job.study_name,
            storage=open_storage(job.storage_url, config.heartbeat_interval),
            sampler=make_sampler(config, job.index),
            pruner=make_pruner(config),
        )
        with open(job.data_path, "rb") as file:
            data = pickle.load(file)  # written by this worker's parent a moment ago
        objective = _Objective(data, config, job.index, job.worker_id)
        while (job.deadline is None or time.time() < job.deadline) and _finished(study) < config.n_trials:
            with budget.get_lock():
                if budget.value <= 0:
                    break
                budget.value -= 1
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)
    except Exception:
        errors.put((job.index, traceback.format_exc()[-4000:]))  # small: the pipe never fills
        raise SystemExit(1) from None


def _fail_running_trials(study: optuna.Study, worker_id: str) -> int:
    """Fail the RUNNING trials of a worker that is gone; returns how many there were."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ID_ATTR) == worker_id:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            count += 1
    return count


# Over ~60 lines: starting, watching and stopping the workers stay together so every way out
# (all done, a worker's error, the grace after the timeout, an interrupt) ends the same way.
def _run_workers(
    study: optuna.Study,
    storage_url: str,
    config: StudyConfig,
    data: LoadedDataset,
    remaining: int,
    run_prefix: str,
    after_trial: Callable[..., None] | None,
) -> dict[int, int]:
    """Run ``remaining`` trials in ``min(config.workers, remaining)`` spawned processes;
    returns each worker's exit code. Raises :class:`WorkerFailed` when one raised."""
    count = min(config.workers, remaining)
    threads = max(1, step_threads(config.num_threads) // count)
    deadline = time.time() + config.timeout if config.timeout is not None else None
    levels = {name: logging.getLogger(name).getEffectiveLevel() for name in (*_CHILD_LOGGERS, "optuna")}
    # Spawned, not forked: a fork of a process holding torch's thread pools, a SQLAlchemy
    # engine and Lightning state is not safe; spawn starts clean and imports what it needs.
    context = multiprocessing.get_context("spawn")
    budget = context.Value("i", remaining)
    errors = context.SimpleQueue()
    exit_codes: dict[int, int] = {}
    failures: list[tuple[int, str]] = []
    with tempfile.TemporaryDirectory(prefix="cvops-hpo-") as folder:
        # The dataset goes through a private file, not the start pipe: CPython writes a spawned
        # process's start payload into a pipe whose read end it holds itself until the write
        # ends, so a child dying while it starts (a failing import, a main module without the
        # __main__ guard) would block Process.start() forever on a payload over 64 KiB.
        data_path = str(Path(folder) / "dataset.pickle")
        with open(data_path, "wb") as file:
            pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL)
        alive: dict[int, Any] = {}
        for index in range(count):
            job = _WorkerJob(index, f"{run_prefix}{index}", storage_url, study.study_name, config, data_path, threads, deadline, levels)
            alive[index] = context.Process(target=_study_worker, args=(job, budget, errors), name=f"cvops-hpo-{index}", daemon=True)
        logger.info("study %s: %d worker processes, %d torch thread(s) each", study.study_name, count, threads)
        try:
            for process in alive.values():
                process.start()
            finished = _finished(study)
            while alive and not failures:
                multiprocessing.connection.wait([p.sentinel for p in alive.values()], timeout=_POLL_S)
                for index, process in list(alive.items()):
                    if process.exitcode is None:
                        continue
                    process.join()
                    exit_codes[index] = process.exitcode
                    del alive[index]
                    if process.exitcode != 0:
                        lost = _fail_running_trials(study, f"{run_prefix}{index}")
                        with budget.get_lock():
                            budget.value += lost  # its unfinished trial: another worker runs one instead
                        logger.warning(
                            "study %s: worker %d exited with code %d (%d running trial failed)", study.study_name, index, process.exitcode, lost
                        )
                while not errors.empty():
                    failures.append(errors.get())
                if after_trial is not None and _finished(study) != finished:
                    finished = _finished(study)
                    after_trial()
                if alive and deadline is not None and time.time() > deadline + config.worker_grace_s:
                    logger.warning(
                        "study %s: workers %s still running %.0f s after the timeout: stopped", study.study_name, sorted(alive), config.worker_grace_s
                    )
                    break
        finally:
            # Left running only when stopping early: a worker's error, the grace ran out, an interrupt.
            for process in alive.values():
                if process.pid is not None:
                    process.terminate()
            for index, process in alive.items():
                if process.pid is None:
                    continue  # never started: an interrupt or error while starting the others
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join()
                exit_codes[index] = process.exitcode
                _fail_running_trials(study, f"{run_prefix}{index}")
    if failures:
        index, text = failures[0]
        raise WorkerFailed(f"worker {index} of study {study.study_name} failed; the other workers were stopped:\n{text}")
    return exit_codes


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
        frame["worker"] = [t.user_attrs.get(WORKER_ATTR) for t in trials]
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
