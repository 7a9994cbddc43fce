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
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint

from cvops_dagster.training.augmentation import AugmentConfig
from cvops_dagster.training.checkpoints import HashedCheckpointIO, load_verified, sidecar_path
from cvops_dagster.training.evaluation import classification_metrics, confusion_matrix_png, learning_curves_png, predict
from cvops_dagster.registry.model_store import save_model
from cvops_dagster.training.models import build_classifier
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess
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

CHECKPOINT_PREFIX = "checkpoints"
_COMPLETE = "complete.json"

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
        cache_dir: local folder for checkpoints when the artifact store is not local.
        baseline: also train the scikit-learn baseline.
        baseline_max_train: train-set cap for the baseline (kernel SVMs scale quadratically).
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

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures without the plots and the card (for metadata / status)."""
        skip = {"confusion_matrix_png", "learning_curves_png", "card", "history"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for a block (restored afterwards)."""
    previous = torch.get_num_threads()
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = n or available
    torch.set_num_threads(max(1, int(wanted)))
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


class LastCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` at the end of every epoch, so a crash loses at most one epoch.

    (``ModelCheckpoint(save_last=True)`` only refreshes it when a top-k checkpoint is saved.)
    Subclassing :class:`Checkpoint` makes Lightning run it after early stopping has updated
    its state, like its own checkpoint callbacks.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimiser, loops


class LatestBestCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint, preferring the *later* epoch on ties.

    Small validation sets saturate (accuracy 1.0 for many epochs); the stock callback keeps
    the first epoch that reached the best value, mid-schedule at a high learning rate. On a
    tie the later epoch is the more converged model, so it replaces the earlier one.
    """

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None:
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        monitor_op = {"min": torch.le, "max": torch.ge}[self.mode]
        decision = bool(monitor_op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(decision)


class _CheckpointFolder:
    """Local checkpoint folder of a run, mirrored to object storage when the store is remote."""

    def __init__(self, storage: ArtifactStorage, key: str, cache_dir: str | None) -> None:
        self.storage = storage
        self.prefix = f"{CHECKPOINT_PREFIX}/{key}"
        if storage.is_local:
            path = storage.local_path(self.prefix)
            assert path is not None
            self.path = path
        else:
            self.path = Path(cache_dir or Path(tempfile.gettempdir()) / "cvops-checkpoints") / key
            self._download()
        self.path.mkdir(parents=True, exist_ok=True)

    def _download(self) -> None:
        for key in self.storage.list(self.prefix):
            target = self.path / key[len(self.prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.storage.read_bytes(key))

    def uploaded(self, path: Path) -> None:
        if self.storage.is_local:
            return
        relative = path.resolve().relative_to(self.path.resolve()).as_posix()
        self.storage.write_bytes(f"{self.prefix}/{relative}", path.read_bytes())
        sidecar = sidecar_path(path)
        if sidecar.exists():
            self.storage.write_bytes(f"{self.prefix}/{relative}{sidecar.suffix}", sidecar.read_bytes())

    def removed(self, path: Path) -> None:
        if self.storage.is_local:
            return
        relative = path.resolve().relative_to(self.path.resolve()).as_posix()
        self.storage.delete(f"{self.prefix}/{relative}")
        self.storage.delete(f"{self.prefix}/{relative}.sha256")

    def reset(self) -> None:
        """Forget a finished run's checkpoints so a new run starts from scratch."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.storage.is_local:
            for key in self.storage.list(self.prefix):
                self.storage.delete(key)

    def mark_complete(self, info: dict[str, Any]) -> None:
        self.storage.write_json(f"{self.prefix}/{_COMPLETE}", info)
        if not self.storage.is_local:
            (self.path / _COMPLETE).write_text(json.dumps(info))

    def is_complete(self) -> bool:
        return (self.path / _COMPLETE).exists() or self.storage.exists(f"{self.prefix}/{_COMPLETE}")


def baseline_metrics(data: LoadedDataset, spec: InputSpec, max_train: int = 5000, seed: int = 0) -> dict[str, Any]:
    """A classical baseline on the same split: an RBF SVM on the preprocessed pixels.

    The pixels go through the same :func:`preprocess` as the CNN; a kernel SVM on raw pixels
    is a strong reference on small, centred images such as digits.
    """
    from sklearn.svm import SVC

    train, test = data.splits["train"], data.splits["test"]
    x = preprocess(train.images, spec).reshape(len(train), -1)
    y = train.targets
    if len(x) > max_train:
        keep = np.random.default_rng(seed).choice(len(x), max_train, replace=False)
        x, y = x[keep], y[keep]
    classifier = SVC(C=10.0, gamma="scale")
    classifier.fit(x, y)
    pred = classifier.predict(preprocess(test.images, spec).reshape(len(test), -1))
    metrics = classification_metrics(test.targets, pred, data.labels)
    metrics["model"] = "SVC(rbf, C=10, gamma=scale) on preprocessed pixels"
    return metrics


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
    with torch_threads(config.num_threads):
        data = data or load_dataset(storage, dataset_version)
        if len(data.splits["test"]) == 0:
            raise ValueError(f"dataset {dataset_version!r} has no clean test rows to evaluate on")
        pl.seed_everything(config.seed, workers=True, verbose=False)
        datamodule = ImageDataModule(data, int(resolved["batch_size"]), config.augment, config.seed)
        arch = arch_from_params(resolved, data.image_size)
        model = build_classifier(arch, datamodule.num_classes, data.channels)
        system = ClassifierSystem(model, datamodule.num_classes, resolved)

        folder = _CheckpointFolder(storage, key, config.cache_dir)
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
            state = load_verified(best_path, folder.path)["state_dict"]
            system.load_state_dict(state)
        system.cpu().eval()
        model = system.model

        test_inputs = preprocess(data.splits["test"].images, datamodule.spec)
        metrics = classification_metrics(data.splits["test"].targets, predict(model, test_inputs), data.labels)
        baseline = baseline_metrics(data, datamodule.spec, config.baseline_max_train, config.seed) if config.baseline else None
    elapsed = time.perf_counter() - started
    best_val = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
    card_metrics = {
        "test_accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "test_n": metrics["n"],
        "best_val_accuracy": best_val,
        "baseline_accuracy": baseline["accuracy"] if baseline else None,
        "baseline_macro_f1": baseline["macro_f1"] if baseline else None,
        "baseline_model": baseline["model"] if baseline else None,
        "epochs_trained": int(trainer.current_epoch),
    }
    saved = save_model(
        storage,
        model,
        arch=arch,
        labels=data.labels,
        input_spec=datamodule.spec,
        dataset_version=dataset_version,
        hyperparameters={**resolved, "max_epochs": config.max_epochs, "seed": config.seed, "augment": config.augment.to_dict()},
        metrics=card_metrics,
        extra={"run_key": key, "checkpoint_prefix": folder.prefix},
    )
    cm_png = confusion_matrix_png(metrics["confusion_matrix"], data.labels, f"Test confusion matrix ({saved.model_id})")
    curves_png = learning_curves_png(history.history)
    storage.write_bytes(f"models/{saved.model_id}/confusion_matrix.png", cm_png)
    storage.write_bytes(f"models/{saved.model_id}/learning_curves.png", curves_png)
    folder.mark_complete({"model_id": saved.model_id})
    logger.info(
        "trained %s on %s: test acc %.4f (baseline %s), %d epochs in %.1fs",
        saved.model_id,
        dataset_version,
        metrics["accuracy"],
        f"{baseline['accuracy']:.4f}" if baseline else "n/a",
        trainer.current_epoch,
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
        best_val_accuracy=best_val,
        per_class=metrics["per_class"],
        confusion_matrix=metrics["confusion_matrix"],
        confusion_matrix_png=cm_png,
        learning_curves_png=curves_png,
        history=history.history,
        params=resolved,
        epochs_trained=int(trainer.current_epoch),
        resumed_from_epoch=resumed_from,
        global_step=int(trainer.global_step),
        run_key=key,
        checkpoint_key=f"{folder.prefix}/last.ckpt",
        train_seconds=elapsed,
        card=saved.card,
    )
