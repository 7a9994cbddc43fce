"""The Lightning "system" around a classifier: loss, metrics, optimiser and LR schedule.

Hyperparameters are one flat JSON dict (what Optuna tunes and model cards record);
:func:`resolve_params` fills defaults and :func:`arch_from_params` derives the network.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

logger = logging.getLogger(__name__)

#: The metric that checkpointing, early stopping, pruning and the study all monitor.
MONITOR = "val_acc"
MONITOR_MODE = "max"

#: Defaults used when no tuned parameters are given. Chosen on the bundled digits:
#: a small residual net, AdamW with a one-cycle schedule and mild label smoothing.
DEFAULT_PARAMS: dict[str, Any] = {
    "width": 32,
    "blocks_per_stage": 1,
    "dropout": 0.1,
    "norm": "batch",
    "residual": True,
    "stem_stride": "auto",
    "optimizer": "adamw",
    "lr": 0.004,
    "weight_decay": 5e-4,
    "scheduler": "onecycle",
    "label_smoothing": 0.05,
    "batch_size": 64,
}


def resolve_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` over :data:`DEFAULT_PARAMS`; unknown keys are rejected to catch typos."""
    merged = dict(DEFAULT_PARAMS)
    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    merged.update(params or {})
    return merged


def arch_from_params(params: dict[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
    """Three stages doubling in width from ``width``.

    ``stem_stride`` ``"auto"`` halves the resolution in the stem for inputs of 32 pixels or
    more (4x less compute; the three stages still see 16, 8 and 4 pixels on 32x32 inputs)
    and keeps full resolution for smaller images.
    """
    width = int(params["width"])
    stem_stride = params.get("stem_stride", "auto")
    if stem_stride == "auto":
        stem_stride = 2 if min(image_size) >= 32 else 1
    return {
        "stem_stride": int(stem_stride),
        "widths": [width, 2 * width, 4 * width],
        "blocks_per_stage": int(params["blocks_per_stage"]),
        "dropout": float(params["dropout"]),
        "norm": str(params["norm"]),
        "residual": bool(params["residual"]),
    }


class ClassifierSystem(pl.LightningModule):
    """Trains an ``nn.Module`` classifier with cross-entropy, logs loss and accuracy.

    Args:
        model: the network (``forward(x) -> logits``).
        num_classes: number of classes.
        params: resolved hyperparameters (see :data:`DEFAULT_PARAMS`).
    """

    def __init__(self, model: nn.Module, num_classes: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.params = dict(params)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=float(self.params["label_smoothing"]))
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(f"{prefix}_acc", metric, on_step=False, on_epoch=True, batch_size=len(y))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        params = self.params
        lr, wd = float(params["lr"]), float(params["weight_decay"])
        if params["optimizer"] == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=wd)
        elif params["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
        else:
            raise ValueError(f"unknown optimizer {params['optimizer']!r}")
        scheduler = params["scheduler"]
        if scheduler == "none":
            return optimizer
        if scheduler == "onecycle":
            # OneCycle needs a few steps per phase; tiny runs get a schedule they do not finish.
            total = max(int(self.trainer.estimated_stepping_batches), 10)
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.25)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(self.trainer.max_epochs or 1), 1))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        raise ValueError(f"unknown scheduler {scheduler!r}")


class HistoryCallback(pl.Callback):
    """Records per-epoch metrics; its state is saved in checkpoints so curves survive resumes."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": float(trainer.current_epoch)}
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                row[key] = float(value)
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]


def quiet_trainer_kwargs() -> dict[str, Any]:
    """Trainer options that keep the loop lean: no progress bar, summary, logger or sanity pass."""
    return {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "num_sanity_val_steps": 0,
    }
