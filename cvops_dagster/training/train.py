"""Train the production-candidate classifier on a cleaned dataset version.

:func:`train_model` trains with given (tuned) or default hyperparameters under Lightning with
early stopping, checkpoints under ``checkpoints/<run-key>/`` (hash-verified, resumable after an
interruption), evaluates on the test split, trains a scikit-learn baseline on the same split
and saves the model as safetensors + model card.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from cvops_dagster.training.augmentation import AugmentConfig
from cvops_dagster.training.checkpoints import (
    CHECKPOINT_PREFIX,
    CheckpointFolder,
    HashedCheckpointIO,
    LastCheckpoint,
    LatestBestCheckpoint,
    load_verified,
)
from cvops_dagster.training.evaluation import (
    baseline_metrics,
    classification_metrics,
    confusion_matrix_png,
    learning_curves_png,
    predict,
)
from cvops_dagster.training.model_store import ModelIntegrityError, SavedModel, load_model, model_keys, save_model
from cvops_dagster.training.models import build_classifier
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess
from cvops_dagster.core.settings import step_threads
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.loading import LoadedDataset, load_dataset
from cvops_dagster.training.datamodule import ImageDataModule
from cvops_dagster.training.system import (
    MONITOR,
    MONITOR_MODE,
    ClassifierSystem,
    HistoryCallback,
    arch_from_params,
    quiet_trainer_kwargs,
    resolve_params,
)

logger = logging.getLogger(__name__)

# Lightning's advice about DataLoader workers does not apply: the data is already in memory.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)`.*")


@dataclass
class TrainConfig:
    """How to train (not what: hyperparameters come from the study or the defaults).

    Attributes:
        max_epochs: epoch budget; the one-cycle schedule spans it.
        patience: early-stopping patience in epochs on the monitored validation metric.
        seed: seeds Python, numpy, torch and the shuffling.
        num_threads: torch intra-op threads; ``None`` uses every CPU this process may use.
        accelerator: Lightning accelerator (``auto`` picks a GPU when present).
        augment: training augmentations (flips off unless labels allow them).
        resume: continue an interrupted run from its last checkpoint.
        restore_best: evaluate and save the best-validation checkpoint rather than the last.
        cache_dir: where a private local copy of the checkpoints is made when the artifact
            store is not local (default: the system temp folder); removed after the run.
        baseline: also train the scikit-learn baseline.
        baseline_max_train: train-set cap for the baseline (kernel SVMs scale quadratically).
        reuse_finished: a run whose inputs (dataset version, params, settings) already finished
            returns its model instead of training again, so unchanged data costs seconds.
    """

    max_epochs: int = 40
    patience: int = 15
    seed: int = 0
    num_threads: int | None = None
    accelerator: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resume: bool = True
    restore_best: bool = True
    cache_dir: str | None = None
    baseline: bool = True
    baseline_max_train: int = 5000
    reuse_finished: bool = True


@dataclass
class TrainResult:
    """What training produced; figures are plain JSON numbers for asset metadata."""

    model_id: str
    model_card_key: str
    weights_key: str
    dataset_version: str
    test_accuracy: float
    macro_f1: float
    baseline_accuracy: float | None
    baseline_macro_f1: float | None
    best_val_accuracy: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    confusion_matrix_png: bytes
    learning_curves_png: bytes
    history: list[dict[str, float]]
    params: dict[str, Any]
    epochs_trained: int
    resumed_from_epoch: int | None
    global_step: int
    run_key: str
    checkpoint_key: str
    train_seconds: float
    card: dict[str, Any]
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures without the plots and the card (for metadata / status)."""
        skip = {"confusion_matrix_png", "learning_curves_png", "card", "history"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for a block (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(step_threads(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def run_key(dataset_version: str, params: dict[str, Any], config: TrainConfig) -> str:
    """Stable id of a training run: same inputs -> same checkpoint folder, so a rerun resumes."""
    payload = {
        "dataset_version": dataset_version,
        "params": params,
        "max_epochs": config.max_epochs,
        "patience": config.patience,
        "seed": config.seed,
        "augment": config.augment.to_dict(),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe_version = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_version)
    return f"{safe_version}-{digest}"


def build_trainer(
    *,
    max_epochs: int,
    accelerator: str,
    callbacks: Sequence[pl.Callback],
    plugins: Sequence[Any] = (),
    default_root_dir: str | None = None,
    **extra: Any,
) -> pl.Trainer:
    """A lean Trainer: no progress bar, summary, logger or sanity pass; validation every epoch.

    ``extra`` goes to ``pl.Trainer`` unchanged (e.g. ``limit_val_batches``).
    """
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        callbacks=list(callbacks),
        plugins=list(plugins),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=default_root_dir,
        deterministic=False,
        **(quiet_trainer_kwargs() | extra),
    )


def train_model(
    storage: ArtifactStorage,
    dataset_version: str,
    params: dict[str, Any] | None,
    config: TrainConfig | None = None,
    *,
    data: LoadedDataset | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> TrainResult:
    """Train, evaluate and save a classifier for ``dataset_version``.

    Args:
        storage: artifact store holding the dataset; checkpoints and the model go there too.
        dataset_version: a cleaned dataset version (``datasets/<version>/``).
        params: tuned hyperparameters (e.g. ``StudyResult.best_params``); ``None`` uses
            :data:`cvops_dagster.training.system.DEFAULT_PARAMS`. Missing keys take defaults.
        config: training settings.
        data: an already decoded dataset (saves decoding it again).
        callbacks: extra Lightning callbacks (tests use one to simulate a crash).

    Returns:
        A :class:`TrainResult` with test metrics, the baseline's, plots and the model's keys.
    """
    config = config or TrainConfig()
    resolved = resolve_params(params)
    key = run_key(dataset_version, resolved, config)
    started = time.perf_counter()
    if config.reuse_finished and (finished := _finished_run(storage, key)) is not None:
        logger.info("run %s already finished as %s: reusing it", key, finished.model_id)
        return finished
    with torch_threads(config.num_threads):
        data = data or load_dataset(storage, dataset_version)
        if len(data.splits["test"]) == 0:
            raise ValueError(f"dataset {dataset_version!r} has no clean test rows to evaluate on")
        folder = CheckpointFolder(storage, key, config.cache_dir)
        try:
            fit = _fit(data, resolved, config, key, folder, callbacks)
        finally:
            folder.close()
        test_inputs = preprocess(data.splits["test"].images, fit.spec)
        metrics = classification_metrics(data.splits["test"].targets, predict(fit.model, test_inputs), data.labels)
        baseline = baseline_metrics(data, fit.spec, config.baseline_max_train, config.seed) if config.baseline else None
    elapsed = time.perf_counter() - started
    saved, cm_png, curves_png = _save(storage, dataset_version, data, fit, metrics, baseline, resolved, config, key)
    fit.folder.mark_complete({"model_id": saved.model_id, "history": fit.history, "global_step": fit.global_step})
    logger.info(
        "trained %s on %s: test acc %.4f (baseline %s), %d epochs in %.1fs",
        saved.model_id,
        dataset_version,
        metrics["accuracy"],
        f"{baseline['accuracy']:.4f}" if baseline else "n/a",
        fit.epochs,
        elapsed,
    )
    return TrainResult(
        model_id=saved.model_id,
        model_card_key=saved.card_key,
        weights_key=saved.weights_key,
        dataset_version=dataset_version,
        test_accuracy=metrics["accuracy"],
        macro_f1=metrics["macro_f1"],
        baseline_accuracy=baseline["accuracy"] if baseline else None,
        baseline_macro_f1=baseline["macro_f1"] if baseline else None,
        best_val_accuracy=fit.best_val,
        per_class=metrics["per_class"],
        confusion_matrix=metrics["confusion_matrix"],
        confusion_matrix_png=cm_png,
        learning_curves_png=curves_png,
        history=fit.history,
        params=resolved,
        epochs_trained=fit.epochs,
        resumed_from_epoch=fit.resumed_from,
        global_step=fit.global_step,
        run_key=key,
        checkpoint_key=f"{fit.folder.prefix}/last.ckpt",
        train_seconds=elapsed,
        card=saved.card,
    )


@dataclass
class _Fitted:
    """What :func:`_fit` leaves behind: the trained model (CPU, eval mode) and the run's facts."""

    model: torch.nn.Module
    spec: InputSpec
    arch: dict[str, Any]
    folder: CheckpointFolder
    history: list[dict[str, float]]
    best_val: float
    epochs: int
    global_step: int
    resumed_from: int | None


def _fit(
    data: LoadedDataset,
    resolved: dict[str, Any],
    config: TrainConfig,
    key: str,
    folder: CheckpointFolder,
    callbacks: Sequence[pl.Callback],
) -> _Fitted:
    """Fit under Lightning, resuming the run's last checkpoint, then restore the best epoch."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ImageDataModule(data, int(resolved["batch_size"]), config.augment, config.seed)
    arch = arch_from_params(resolved, data.image_size)
    model = build_classifier(arch, datamodule.num_classes, data.channels)
    system = ClassifierSystem(model, datamodule.num_classes, resolved)

    if folder.is_complete() or not config.resume:
        folder.reset()
    last = folder.path / "last.ckpt"
    ckpt_path = str(last) if config.resume and last.exists() else None
    resumed_from: int | None = None
    if ckpt_path:
        # Verified (path + sha256) and loaded weights-only, like every checkpoint load.
        resumed_from = int(load_verified(last, folder.path)["epoch"])
        logger.info("resuming run %s from %s (epoch %d)", key, last, resumed_from)

    history = HistoryCallback()
    checkpoint = LatestBestCheckpoint(
        dirpath=folder.path, filename="best", monitor=MONITOR, mode=MONITOR_MODE, save_top_k=1, save_last=False
    )
    early = EarlyStopping(monitor=MONITOR, mode=MONITOR_MODE, patience=config.patience)
    io = HashedCheckpointIO(folder.path, on_saved=folder.uploaded, on_removed=folder.removed)
    trainer = build_trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        callbacks=[checkpoint, LastCheckpoint(last), early, history, *callbacks],
        plugins=[io],
        default_root_dir=str(folder.path),
    )
    trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    if config.restore_best and best_path is not None and best_path.exists():
        system.load_state_dict(load_verified(best_path, folder.path)["state_dict"])
    system.cpu().eval()
    return _Fitted(
        model=system.model,
        spec=datamodule.spec,
        arch=arch,
        folder=folder,
        history=history.history,
        best_val=float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan"),
        epochs=int(trainer.current_epoch),
        global_step=int(trainer.global_step),
        resumed_from=resumed_from,
    )


def _save(
    storage: ArtifactStorage,
    dataset_version: str,
    data: LoadedDataset,
    fit: _Fitted,
    metrics: dict[str, Any],
    baseline: dict[str, Any] | None,
    resolved: dict[str, Any],
    config: TrainConfig,
    key: str,
) -> tuple[SavedModel, bytes, bytes]:
    """Save weights + model card, and the confusion-matrix and learning-curve plots beside them."""
    card_metrics = {
        "test_accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "test_n": metrics["n"],
        "best_val_accuracy": fit.best_val,
        "baseline_accuracy": baseline["accuracy"] if baseline else None,
        "baseline_macro_f1": baseline["macro_f1"] if baseline else None,
        "baseline_model": baseline["model"] if baseline else None,
        "epochs_trained": fit.epochs,
    }
    saved = save_model(
        storage,
        fit.model,
        arch=fit.arch,
        labels=data.labels,
        input_spec=fit.spec,
        dataset_version=dataset_version,
        hyperparameters={**resolved, "max_epochs": config.max_epochs, "seed": config.seed, "augment": config.augment.to_dict()},
        metrics=card_metrics,
        extra={"run_key": key, "checkpoint_prefix": fit.folder.prefix},
    )
    cm_png = confusion_matrix_png(metrics["confusion_matrix"], data.labels, f"Test confusion matrix ({saved.model_id})")
    curves_png = learning_curves_png(fit.history)
    storage.write_bytes(f"models/{saved.model_id}/confusion_matrix.png", cm_png)
    storage.write_bytes(f"models/{saved.model_id}/learning_curves.png", curves_png)
    return saved, cm_png, curves_png


def _finished_run(storage: ArtifactStorage, key: str) -> TrainResult | None:
    """The result of run ``key`` if it finished and its model is still intact, else ``None``."""
    record = CheckpointFolder.completion(storage, key)
    if not record or "model_id" not in record:
        return None
    model_id = str(record["model_id"])
    try:
        _, card = load_model(storage, model_id)  # verifies the weights against the card
        cm_png = storage.read_bytes(f"models/{model_id}/confusion_matrix.png")
        curves_png = storage.read_bytes(f"models/{model_id}/learning_curves.png")
    except (FileNotFoundError, ModelIntegrityError, ValueError) as error:
        logger.warning("finished run %s cannot be reused (%s): training again", key, error)
        return None
    metrics = card["metrics"]
    weights_key, card_key = model_keys(model_id)
    return TrainResult(
        model_id=model_id,
        model_card_key=card_key,
        weights_key=weights_key,
        dataset_version=card["dataset_version"],
        test_accuracy=metrics["test_accuracy"],
        macro_f1=metrics["macro_f1"],
        baseline_accuracy=metrics.get("baseline_accuracy"),
        baseline_macro_f1=metrics.get("baseline_macro_f1"),
        best_val_accuracy=metrics["best_val_accuracy"],
        per_class=metrics["per_class"],
        confusion_matrix=metrics["confusion_matrix"],
        confusion_matrix_png=cm_png,
        learning_curves_png=curves_png,
        history=list(record.get("history", [])),
        params={k: v for k, v in card["hyperparameters"].items() if k not in ("max_epochs", "seed", "augment")},
        epochs_trained=int(metrics["epochs_trained"]),
        resumed_from_epoch=None,
        global_step=int(record.get("global_step", 0)),
        run_key=key,
        checkpoint_key=f"{CHECKPOINT_PREFIX}/{key}/last.ckpt",
        train_seconds=0.0,
        card=card,
        reused=True,
    )
