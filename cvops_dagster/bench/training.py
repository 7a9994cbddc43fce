"""Training speed benchmark (``cvops bench training``): figures, never a timed test.

Measured side by side in one process on the same data:

* Lightning overhead: seconds per training epoch under a lean Lightning Trainer (no progress
  bar, model summary, logger or checkpointing) vs a plain PyTorch loop over the same model
  architecture, DataLoader, augmentation, optimiser and schedule. Target ratio <= 1.15.
* Pruning: the same study (same seed; every trial drawn from the sampler's seeded start-up
  phase, so both studies train identical configurations) with Successive Halving vs without
  pruning: epochs consumed (target <= 0.4x) and best validation accuracy (within 1 point).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from cvops_dagster.training.models import build_classifier
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.cleaning import clean_dataset
from cvops_dagster.ingestion.ingest import ingest_batch, read_raw_manifests
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.ingestion.sample_data import SAMPLE_BATCHES, seed_landing
from cvops_dagster.training.train import build_trainer, torch_threads
from cvops_dagster.datasets.loading import LoadedDataset, load_dataset
from cvops_dagster.training.datamodule import ImageDataModule
from cvops_dagster.training.system import ClassifierSystem, arch_from_params, resolve_params
from cvops_dagster.training.tuning import StudyConfig, default_storage_url, run_study

logger = logging.getLogger(__name__)


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def _lightning_epochs(data: LoadedDataset, params: dict[str, Any], epochs: int, seed: int) -> list[float]:
    pl.seed_everything(seed, verbose=False)
    dm = ImageDataModule(data, int(params["batch_size"]), seed=seed)
    model = build_classifier(arch_from_params(params, data.image_size), dm.num_classes, data.channels)
    timer = _EpochTimer()
    # Training epochs only (no validation), like the plain loop.
    trainer = build_trainer(max_epochs=epochs, accelerator="cpu", callbacks=[timer], limit_val_batches=0)
    trainer.fit(ClassifierSystem(model, dm.num_classes, params), datamodule=dm)
    return timer.times


def _plain_epochs(data: LoadedDataset, params: dict[str, Any], epochs: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    dm = ImageDataModule(data, int(params["batch_size"]), seed=seed)
    dm.setup()
    model = build_classifier(arch_from_params(params, data.image_size), dm.num_classes, data.channels)
    loader = dm.train_dataloader()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=float(params["lr"]), total_steps=max(len(loader) * epochs, 10), pct_start=0.25
    )
    times = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in loader:
            x = dm.train_transform(x)
            loss = F.cross_entropy(model(x), y, label_smoothing=float(params["label_smoothing"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        times.append(time.perf_counter() - start)
    return times


def _sample_dataset(tmp: Path, storage: ArtifactStorage) -> str:
    """Clean the bundled sample digits into ``storage`` the way the product does; their version.

    Seeded into a landing folder under ``tmp``, ingested batch by batch and cleaned, so the
    benchmark trains on what ``cleaned_dataset`` would make of them.
    """
    landing = str(tmp / "landing")
    seed_landing(landing)
    zone = LandingZone(landing)
    for batch_id in SAMPLE_BATCHES:
        ingest_batch(zone, storage, batch_id)
    return clean_dataset(storage, read_raw_manifests(storage, batch_ids=list(SAMPLE_BATCHES))).version


# Over ~80 lines: the docstring names every reported figure, and the three timed runs stay in
# one function so they visibly share one dataset, thread count and seed.
def run_training_benchmark(
    storage: ArtifactStorage | None = None,
    dataset_version: str | None = None,
    *,
    epochs: int = 4,
    n_trials: int = 8,
    trial_epochs: int | None = None,
    num_threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure Lightning overhead and the pruning saving on a dataset (digits by default).

    Args:
        storage: artifact store holding ``dataset_version``; ``None`` cleans the bundled
            sample digits (seeded, ingested and cleaned as ``cvops demo`` does) into a
            temporary store.
        dataset_version: cleaned dataset to use; required with ``storage``, not allowed
            without it (the sample dataset's version is what cleaning makes it).
        epochs: training epochs timed per loop (the first is discarded as warm-up).
        n_trials: trials per study.
        trial_epochs: epochs per unpruned trial (the pruner's maximum resource); ``None`` uses
            the product's study budget, ``StudyConfig().max_epochs``, so the saving measured is
            the one ``hpo_study`` gets.
        num_threads: torch threads (``None``: all available).
        seed: seed of both studies and of the timed loops.

    Returns:
        A dict with ``lightning_vs_plain_epoch_ratio``, ``pruned_vs_unpruned_epochs_ratio``,
        ``pruned_best_val_accuracy``, ``unpruned_best_val_accuracy`` and the raw figures.
    """
    started = time.perf_counter()
    trial_epochs = trial_epochs or StudyConfig().max_epochs
    with tempfile.TemporaryDirectory(prefix="cvops-bench-") as tmp:
        if storage is None:
            if dataset_version is not None:
                raise ValueError("dataset_version names a version in a given storage; pass storage too")
            storage = ArtifactStorage(str(Path(tmp) / "artifacts"))
            dataset_version = _sample_dataset(Path(tmp), storage)
        if dataset_version is None:
            raise ValueError("dataset_version is required with a given storage")
        data = load_dataset(storage, dataset_version)
        params = resolve_params(None)
        with torch_threads(num_threads) as threads:
            # Alternate the two loops so drift in machine load hits both alike.
            lightning_times: list[float] = []
            plain_times: list[float] = []
            for _ in range(2):
                plain_times += _plain_epochs(data, params, epochs, seed)[1:]
                lightning_times += _lightning_epochs(data, params, epochs, seed)[1:]
        lightning_epoch = statistics.median(lightning_times)
        plain_epoch = statistics.median(plain_times)

        url = default_storage_url(Path(tmp) / "optuna")
        results = {}
        for name, pruner in (("pruned", "successive_halving"), ("unpruned", "none")):
            config = StudyConfig(
                n_trials=n_trials,
                max_epochs=trial_epochs,
                seed=seed,
                pruner=pruner,
                min_resource=1,
                reduction_factor=3,
                # Every trial comes from the seeded start-up sampler: both studies train the
                # same configurations, so only pruning differs.
                n_startup_trials=n_trials,
                num_threads=num_threads,
                study_prefix=f"bench-{name}-",
            )
            results[name] = run_study(storage, dataset_version, config, url, data=data)
    pruned, unpruned = results["pruned"], results["unpruned"]
    figures = {
        "lightning_vs_plain_epoch_ratio": lightning_epoch / plain_epoch,
        "lightning_epoch_seconds": lightning_epoch,
        "plain_epoch_seconds": plain_epoch,
        "pruned_vs_unpruned_epochs_ratio": pruned.epochs_consumed / max(unpruned.epochs_consumed, 1),
        "pruned_epochs": pruned.epochs_consumed,
        "unpruned_epochs": unpruned.epochs_consumed,
        "pruned_trials_pruned": pruned.n_pruned,
        "pruned_best_val_accuracy": pruned.best_value,
        "unpruned_best_val_accuracy": unpruned.best_value,
        "pruned_study_seconds": pruned.seconds,
        "unpruned_study_seconds": unpruned.seconds,
        "dataset_version": dataset_version,
        "train_images": len(data.splits["train"]),
        "torch_threads": threads,
        "n_trials": n_trials,
        "trial_epochs": trial_epochs,
        "total_seconds": time.perf_counter() - started,
    }
    logger.info("training benchmark: %s", figures)
    return figures
