"""Classification metrics, their plots (PNG bytes, matplotlib's Agg backend), and the classical
baseline every trained model is reported beside."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support  # noqa: E402
from torch import nn  # noqa: E402

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


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def confusion_matrix_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "Confusion matrix") -> bytes:
    """A labelled confusion-matrix heat map."""
    m = np.asarray(matrix)
    size = min(12.0, 2.0 + 0.45 * len(labels))
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    for key in ("train_loss", "val_loss"):
        values = [h.get(key, np.nan) for h in history]
        left.plot(epochs, values, marker=".", label=key)
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    for key in ("train_acc", "val_acc"):
        values = [h.get(key, np.nan) for h in history]
        right.plot(epochs, values, marker=".", label=key)
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    right.legend()
    fig.suptitle("Learning curves")
    return _png(fig)


def optimization_history_png(values: Sequence[float | None], maximize: bool = True) -> bytes:
    """Objective value per trial (pruned/failed trials left out) and the best so far."""
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [i for i, v in enumerate(values) if v is not None]
    ys = [float(v) for v in values if v is not None]
    ax.scatter(xs, ys, label="objective", s=18)
    if ys:
        best = np.maximum.accumulate(ys) if maximize else np.minimum.accumulate(ys)
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Optimization history")
    ax.legend()
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
