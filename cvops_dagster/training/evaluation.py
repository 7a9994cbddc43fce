"""Classification metrics, their plots (PNG bytes, matplotlib's Agg backend), and the classical
baseline every trained model is reported beside."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support  # noqa: E402
from torch import nn  # noqa: E402

from cvops_dagster.core.figures import figure_png  # noqa: E402
from cvops_dagster.datasets.loading import LoadedDataset  # noqa: E402
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess  # noqa: E402


@torch.no_grad()
def predict(model: nn.Module, inputs: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predicted class indices of preprocessed float32 ``[N, C, H, W]`` inputs."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(inputs)
    out = [model(x[i : i + batch_size].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix (JSON-ready)."""
    idx = list(range(len(labels)))
    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=idx, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)) if len(y_true) else 0.0,
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "support": int(s)}
            for label, p, r, s in zip(labels, precision, recall, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist(),
        "n": int(len(y_true)),
    }


#: Plots are shown inline in asset metadata and stored with each model: small on purpose.
PLOT_DPI = 72


def _png(fig: Any) -> bytes:
    """The figure as a small PNG at this module's resolution (see :func:`figure_png`)."""
    return figure_png(fig, PLOT_DPI)


def confusion_matrix_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "Confusion matrix") -> bytes:
    """A labelled confusion-matrix heat map."""
    m = np.asarray(matrix)
    size = min(9.0, 2.5 + 0.35 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 10 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(labels) <= 25:
        threshold = m.max() / 2 if m.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8, color="white" if m[i, j] > threshold else "black")
    return _png(fig)


def learning_curves_png(history: Sequence[dict[str, float]]) -> bytes:
    """Loss and accuracy per epoch from a list of ``{epoch, train_loss, val_loss, val_acc}``."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 2.8))
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    for key in ("train_loss", "val_loss"):
        values = [h.get(key, np.nan) for h in history]
        left.plot(epochs, values, marker=".", label=key)
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend(fontsize=7)
    for key in ("train_acc", "val_acc"):
        values = [h.get(key, np.nan) for h in history]
        right.plot(epochs, values, marker=".", label=key)
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=7)
    fig.suptitle("Learning curves")
    return _png(fig)


@dataclass(frozen=True)
class TrialPoint:
    """One trial of a study as the optimization-history plot draws it.

    Attributes:
        number: the trial number (an integer, as Optuna numbers trials).
        state: ``complete``, ``pruned``, ``fail``, ``running`` or ``waiting``.
        value: the objective of a complete trial, the last intermediate value of a pruned one,
            else ``None``.
        intermediate: ``(step, value)`` reported per epoch, in step order.
    """

    number: int
    state: str
    value: float | None
    intermediate: tuple[tuple[int, float], ...] = ()


def optimization_history_png(points: Sequence[TrialPoint], maximize: bool = True, metric: str = "validation accuracy") -> bytes:
    """Every trial of a study, by integer trial number, in two panels.

    Left: the objective of complete trials (dots), pruned trials at their last intermediate
    value (crosses), failed trials as ticks on the axis, and the best so far. Right: the
    intermediate value per epoch of every trial (faint lines; pruned ones end in a cross).
    """
    fig, (history, curves) = plt.subplots(1, 2, figsize=(7, 2.8), gridspec_kw={"width_ratios": [3, 2]})
    complete = [p for p in points if p.state == "complete" and p.value is not None]
    pruned = [p for p in points if p.state == "pruned" and p.value is not None]
    failed = [p for p in points if p.state == "fail"]
    history.scatter([p.number for p in complete], [p.value for p in complete], s=16, color="tab:blue", label=f"complete ({len(complete)})", zorder=3)
    if pruned:
        history.scatter([p.number for p in pruned], [p.value for p in pruned], s=22, marker="x", color="tab:orange", label=f"pruned ({len(pruned)})", zorder=3)
    if failed:
        history.plot([p.number for p in failed], [0.0] * len(failed), "|", markersize=10, color="tab:gray",
                     transform=history.get_xaxis_transform(), label=f"failed ({len(failed)})", clip_on=False)  # fmt: skip
    if complete:
        values = [p.value for p in complete]
        best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
        xs = [p.number for p in complete]
        last = max(p.number for p in points)
        history.step([*xs, last], [*best, best[-1]], where="post", color="tab:red", linewidth=1, label="best so far")
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    if points:
        history.set_xlim(min(p.number for p in points) - 0.5, max(p.number for p in points) + 0.5)
    history.set_xlabel("trial")
    history.set_ylabel(metric)
    history.set_title(f"Optimization history ({len(points)} trials)", fontsize=9)
    history.legend(fontsize=6, loc="best", framealpha=0.6)
    for p in points:
        if p.intermediate:
            steps, values = zip(*p.intermediate, strict=True)
            color = {"pruned": "tab:orange", "fail": "tab:gray"}.get(p.state, "tab:blue")
            curves.plot(steps, values, color=color, alpha=0.35, linewidth=1)
            if p.state == "pruned":
                curves.scatter(steps[-1:], values[-1:], marker="x", s=14, color="tab:orange")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_xlabel("epoch")
    curves.set_title("Intermediate values", fontsize=9)
    return _png(fig)


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
