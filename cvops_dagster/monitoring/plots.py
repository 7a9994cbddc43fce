"""Small PNG plots for the metadata of the monitoring assets (``batch_predictions``, ``drift_report``).

Each function draws one figure with matplotlib's Agg backend and returns it as PNG bytes, in
the style of :mod:`cvops_dagster.training.evaluation`: about 5 x 3 inches at 80 dpi, reduced to
a 64-colour palette, so a plot stays a few tens of kilobytes and can sit inline in the Dagster
UI for every batch. Figures are closed once saved, so a long-running code server does not
accumulate them.

The plots are for people looking at a batch, not for decisions: they never raise on what a
monitoring run can hand them. Empty inputs give a labelled "no data" panel, NaN and inf values
(or embedding rows containing them) are dropped, and single values and constant columns are
drawn with a widened range instead of a degenerate one.

No Dagster import: the assets wrap the bytes in ``MetadataValue`` themselves. Figures become
PNGs through :func:`cvops_dagster.core.figures.figure_png`, as the training plots do (without
importing the training module, which would pull in torch to draw a histogram).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cvops_dagster.core.figures import figure_png  # noqa: E402

#: Plots are shown inline in asset metadata for every batch: small on purpose.
PLOT_DPI = 80
#: The default figure size in inches (width, height).
FIGSIZE = (5.0, 3.0)
#: Histogram bins of the confidence plot and of each feature panel.
N_BINS = 20
#: At most this many feature panels in :func:`feature_histograms_png`.
MAX_FEATURE_PANELS = 6

_REFERENCE_COLOR = "tab:blue"
_BATCH_COLOR = "tab:orange"


def _png(fig: Any) -> bytes:
    """The figure as a small PNG at this module's resolution (see :func:`figure_png`)."""
    return figure_png(fig, PLOT_DPI)


def _finite(values: Any) -> np.ndarray:
    """The finite entries of ``values`` as a flat float64 array (``None`` gives an empty one)."""
    if values is None:
        return np.zeros(0, dtype=np.float64)
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _no_data(ax: Any, text: str = "no data") -> None:
    """Mark an axes as empty with a centred grey note, so an empty plot reads as deliberate."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="tab:gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _densities(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram densities of ``values`` over ``edges`` (zeros, not NaN, when nothing falls in).

    Computed by hand instead of ``np.histogram(density=True)``, which divides by zero (and
    warns) for an empty sample.
    """
    counts, _ = np.histogram(values, bins=edges)
    total = counts.sum()
    if total == 0:
        return np.zeros(len(edges) - 1, dtype=np.float64)
    return counts / (total * np.diff(edges))


def _common_edges(*samples: np.ndarray, bins: int = N_BINS) -> np.ndarray | None:
    """Equal-width bin edges spanning every sample; widened around a single value, ``None`` if all empty."""
    nonempty = [s for s in samples if s.size]
    if not nonempty:
        return None
    low = float(min(s.min() for s in nonempty))
    high = float(max(s.max() for s in nonempty))
    if high <= low:
        half = max(abs(low) * 0.05, 0.5)
        low, high = low - half, high + half
    return np.linspace(low, high, bins + 1)


def _short(label: str, width: int = 14) -> str:
    """``label`` cut to ``width`` characters with an ellipsis, so tick labels stay readable."""
    return label if len(label) <= width else label[: width - 1] + "…"


def confidence_histogram_png(confidences: np.ndarray, reference: np.ndarray | None = None, title: str = "Confidence") -> bytes:
    """Histogram of the batch's max-softmax confidences on [0, 1], beside the reference's.

    A drop in confidence is the earliest visible sign of a shift (and the quantity of the
    ``confidence`` drift test), so the batch is drawn as filled bars and the reference, when
    given, as a step outline over the same 20 bins. Both are densities, so a batch of 50 and a
    reference of 5000 compare directly.

    Args:
        confidences: the batch's max-softmax confidences; NaN/inf dropped, values clipped to [0, 1].
        reference: the reference's confidences, or ``None`` to draw the batch alone.
        title: the axes title.

    Returns:
        PNG bytes.
    """
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    batch = np.clip(_finite(confidences), 0.0, 1.0)
    ref = None if reference is None else np.clip(_finite(reference), 0.0, 1.0)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if batch.size == 0 and (ref is None or ref.size == 0):
        _no_data(ax)
    else:
        ax.stairs(_densities(batch, edges), edges, fill=True, color=_BATCH_COLOR, alpha=0.6, label=f"batch (n={batch.size})")
        if ref is not None:
            ax.stairs(_densities(ref, edges), edges, color=_REFERENCE_COLOR, linewidth=1.5, label=f"reference (n={ref.size})")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("max softmax confidence")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _ks_value(statistics: Mapping[str, float] | None, name: str) -> float | None:
    """The KS statistic of feature ``name``, keyed by the bare name or as ``feature:<name>``."""
    if not statistics:
        return None
    for key in (name, f"feature:{name}"):
        value = statistics.get(key)
        if value is not None:
            try:
                number = float(value)
            except (TypeError, ValueError):
                return None
            return number if math.isfinite(number) else None
    return None


def feature_histograms_png(
    reference: Mapping[str, np.ndarray],
    batch: Mapping[str, np.ndarray],
    names: Sequence[str],
    statistics: Mapping[str, float] | None = None,
) -> bytes:
    """One small reference-vs-batch histogram per image feature, for the features that moved most.

    The drift report names its top features; these panels show *how* each moved (a shift, a
    spread, a new mode), which a KS statistic alone does not. Each panel bins both samples over
    common edges and draws densities, so different sample sizes compare.

    Args:
        reference: feature name -> the reference's values.
        batch: feature name -> the batch's values.
        names: the features to draw, in order; at most the first 6 present on both sides are
            drawn, names missing from either side are skipped.
        statistics: feature name (or ``feature:<name>``) -> KS statistic, shown in the panel
            title when given.

    Returns:
        PNG bytes.
    """
    shown = [name for name in names if name in reference and name in batch][:MAX_FEATURE_PANELS]
    if not shown:
        fig, ax = plt.subplots(figsize=FIGSIZE)
        _no_data(ax, "no features to compare")
        ax.set_title("Feature distributions", fontsize=10)
        return _png(fig)
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(FIGSIZE[0], 1.6 * rows + 0.4), squeeze=False)
    for ax in axes.ravel()[len(shown) :]:
        ax.set_visible(False)
    legend_drawn = False
    for ax, name in zip(axes.ravel(), shown, strict=False):
        ref = _finite(reference[name])
        cur = _finite(batch[name])
        ks = _ks_value(statistics, name)
        title = _short(name, 18) + (f"  KS={ks:.2f}" if ks is not None else "")
        ax.set_title(title, fontsize=7)
        edges = _common_edges(ref, cur)
        if edges is None:
            _no_data(ax)
            continue
        ax.stairs(_densities(ref, edges), edges, fill=True, color=_REFERENCE_COLOR, alpha=0.45, label="reference")
        ax.stairs(_densities(cur, edges), edges, color=_BATCH_COLOR, linewidth=1.3, label="batch")
        ax.set_xlim(edges[0], edges[-1])
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
        if not legend_drawn:
            ax.legend(fontsize=6, loc="upper right", framealpha=0.6)
            legend_drawn = True
    fig.suptitle("Feature distributions (density)", fontsize=9)
    return _png(fig)


def _embedding_rows(values: Any) -> np.ndarray:
    """``values`` as a float64 ``[n, d]`` matrix of finite rows.

    A 1-D array is read as ``n`` one-dimensional embeddings; more than two dimensions are
    flattened per row. Rows holding any NaN or inf are dropped.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        array = array.reshape(1, 1)
    elif array.ndim == 1:
        array = array.reshape(-1, 1)
    elif array.ndim > 2:
        array = array.reshape(array.shape[0], -1)
    return array[np.isfinite(array).all(axis=1)]


def pca_2d(reference: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project reference and batch embeddings onto the reference's first two principal axes.

    The axes are fitted on the reference alone (centred by its mean, thin SVD), and the batch
    is projected with the same mean and axes: a batch that drifted then shows up as displaced
    from the reference cloud instead of pulling the axes towards itself. Each axis's sign is
    fixed (its largest-magnitude loading is positive), so the projection is deterministic.
    If the reference has no finite rows, the axes are fitted on the batch instead.

    Args:
        reference: ``[n, d]`` reference embeddings (1-D: ``n`` scalars); non-finite rows dropped.
        batch: ``[m, d]`` batch embeddings, same ``d``; non-finite rows dropped.

    Returns:
        ``(ref_xy, batch_xy, explained)``: ``[n', 2]`` and ``[m', 2]`` coordinates of the
        finite rows, and the share of the fitting sample's variance along each axis (``[2]``,
        zeros for a constant sample). With fewer than two dimensions the missing axis is 0.

    Raises:
        ValueError: when both sides are non-empty but their dimensions differ.
    """
    ref = _embedding_rows(reference)
    cur = _embedding_rows(batch)
    if ref.shape[0] and cur.shape[0] and ref.shape[1] != cur.shape[1]:
        raise ValueError(f"reference embeddings have {ref.shape[1]} dimensions, the batch {cur.shape[1]}")
    fit = ref if ref.shape[0] else cur
    if fit.shape[0] == 0 or fit.shape[1] == 0:
        return np.zeros((ref.shape[0], 2)), np.zeros((cur.shape[0], 2)), np.zeros(2)
    mean = fit.mean(axis=0)
    _, singular, vt = np.linalg.svd(fit - mean, full_matrices=False)
    components = np.zeros((2, fit.shape[1]))
    k = min(2, vt.shape[0])
    components[:k] = vt[:k]
    for row in components:
        pivot = row[np.argmax(np.abs(row))]
        if pivot < 0:
            row *= -1.0
    variance = singular**2
    total = float(variance.sum())
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = variance[:k] / total

    def project(rows: np.ndarray) -> np.ndarray:
        return (rows - mean) @ components.T if rows.shape[0] else np.zeros((0, 2))

    return project(ref), project(cur), explained


def _subsample(rows: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_points`` rows of ``rows``, drawn without replacement, kept in their order."""
    if rows.shape[0] <= max_points:
        return rows
    return rows[np.sort(rng.choice(rows.shape[0], size=max_points, replace=False))]


def embedding_projection_png(reference: np.ndarray, batch: np.ndarray, max_points: int = 1000, seed: int = 0) -> bytes:
    """Scatter of reference and batch embeddings on the reference's first two principal axes.

    The picture behind the ``embedding_mmd`` and ``outlier_share`` tests: a batch off the
    reference cloud, or filling only part of it, is visible at a glance. Each side is first
    subsampled (seeded, at most ``max_points`` rows) so the plot is cheap and the same for the
    same inputs; the axes are then fitted on the reference sample (see :func:`pca_2d`) and the
    axis labels give the share of variance each explains.

    Args:
        reference: ``[n, d]`` reference embeddings.
        batch: ``[m, d]`` batch embeddings.
        max_points: the most points drawn per side (at least 1).
        seed: seeds the subsample.

    Returns:
        PNG bytes.
    """
    rng = np.random.default_rng(seed)
    limit = max(int(max_points), 1)
    ref = _subsample(_embedding_rows(reference), limit, rng)
    cur = _subsample(_embedding_rows(batch), limit, rng)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.set_title("Embeddings, PCA of the reference", fontsize=10)
    try:
        ref_xy, cur_xy, explained = pca_2d(ref, cur)
    except ValueError:
        _no_data(ax, "embedding dimensions differ")
        return _png(fig)
    if ref_xy.shape[0] == 0 and cur_xy.shape[0] == 0:
        _no_data(ax)
        return _png(fig)
    ax.scatter(ref_xy[:, 0], ref_xy[:, 1], s=6, alpha=0.35, color=_REFERENCE_COLOR, linewidths=0, label=f"reference (n={ref_xy.shape[0]})")
    ax.scatter(cur_xy[:, 0], cur_xy[:, 1], s=8, alpha=0.6, color=_BATCH_COLOR, linewidths=0, label=f"batch (n={cur_xy.shape[0]})")
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)", fontsize=8)
    ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="best", framealpha=0.6, markerscale=2)
    return _png(fig)


def _counts(values: Any, size: int) -> np.ndarray:
    """``values`` as ``size`` non-negative finite counts (padded with zeros; NaN, inf, negatives -> 0)."""
    array = np.zeros(size, dtype=np.float64)
    given = np.asarray(values if values is not None else [], dtype=np.float64).ravel()[:size]
    given = np.where(np.isfinite(given) & (given > 0), given, 0.0)
    array[: given.size] = given
    return array


def _shares(counts: np.ndarray) -> np.ndarray:
    """Counts as shares of their total (zeros when the total is zero)."""
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def class_bars_png(labels: Sequence[str], reference_counts: np.ndarray, batch_counts: np.ndarray) -> bytes:
    """Grouped bars of the predicted-class shares, reference beside batch.

    Shares rather than counts, because a batch is far smaller than the reference: the bars
    show the prior shift the ``predicted_class`` test measures. Counts beyond ``labels`` get
    their index as label; missing counts are zero.

    Args:
        labels: the class names, in the order of the counts.
        reference_counts: predicted-class counts on the reference.
        batch_counts: predicted-class counts in the batch.

    Returns:
        PNG bytes.
    """
    n_ref = np.asarray(reference_counts if reference_counts is not None else []).size
    n_cur = np.asarray(batch_counts if batch_counts is not None else []).size
    size = max(len(labels), n_ref, n_cur)
    names = [str(label) for label in labels] + [str(i) for i in range(len(labels), size)]
    ref = _counts(reference_counts, size)
    cur = _counts(batch_counts, size)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.set_title("Predicted-class shares", fontsize=10)
    if size == 0 or (ref.sum() == 0 and cur.sum() == 0):
        _no_data(ax)
        return _png(fig)
    x = np.arange(size)
    width = 0.4
    ax.bar(x - width / 2, _shares(ref), width, color=_REFERENCE_COLOR, alpha=0.8, label=f"reference (n={int(ref.sum())})")
    ax.bar(x + width / 2, _shares(cur), width, color=_BATCH_COLOR, alpha=0.8, label=f"batch (n={int(cur.sum())})")
    if size <= 40:
        ax.set_xticks(x, [_short(name, 12) for name in names], rotation=90 if size > 6 else 0, fontsize=6 if size > 15 else 8)
    else:
        ax.set_xlabel("class index")
    ax.set_xlim(-0.6, size - 0.4)
    ax.set_ylabel("share of predictions")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    return _png(fig)


def accuracy_over_batches_png(points: Sequence[tuple[str, float | None]]) -> bytes:
    """Realised accuracy per production batch, in the order given.

    Accuracy is only known once a batch's delayed labels arrive; a batch still waiting
    (``None``, or a non-finite value) keeps its tick on the x axis but has no marker, and the
    line breaks there instead of interpolating an accuracy nobody measured. Values are
    clipped to the [0, 1] y range.

    Args:
        points: ``(batch id, accuracy or None)`` per batch.

    Returns:
        PNG bytes.
    """
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.set_title("Realised accuracy per batch", fontsize=10)
    if not points:
        _no_data(ax, "no batches yet")
        return _png(fig)
    ids = [str(batch_id) for batch_id, _ in points]
    values = np.array([np.nan if value is None else float(value) for _, value in points], dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    values = np.clip(values, 0.0, 1.0)  # NaN stays NaN
    x = np.arange(len(points))
    ax.plot(x, values, marker="o", markersize=4, linewidth=1.2, color=_REFERENCE_COLOR)
    labelled = int(np.isfinite(values).sum())
    if labelled == 0:
        ax.text(0.5, 0.5, "no labels yet", transform=ax.transAxes, ha="center", va="center", fontsize=9, color="tab:gray")
    stride = max(1, math.ceil(len(points) / 12))
    ticks = x[::stride]
    ax.set_xticks(ticks, [_short(ids[i], 12) for i in ticks], rotation=45 if len(ticks) > 4 else 0, ha="right" if len(ticks) > 4 else "center", fontsize=6)
    for tick, i in zip(ax.get_xticklabels(), ticks, strict=True):
        if not np.isfinite(values[i]):
            tick.set_color("tab:gray")
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"batch ({labelled} of {len(points)} labelled)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
