"""Drift: a production batch against its model's reference, with a controlled false-alarm rate.

The statistical core of the ``drift_report`` asset. A :class:`DriftReference` holds what the
production model produced on its own held-out data (image features, embeddings, predicted
classes, confidences) plus what makes a per-batch report cheap (the reference subsample and
bandwidth of the embedding test, the outlier threshold). :func:`drift_report` runs a family of
two-sample tests of a batch against it and declares drift with Holm's step-down procedure.

The family, each test giving a p-value that is valid (uniform or conservative) when the batch
and the reference come from the same distribution:

- ``feature:<name>``: two-sample Kolmogorov-Smirnov test per image feature (the columns of
  :func:`cvops_dagster.imaging.features.compute_features`). Exact/asymptotic null distribution
  for continuous features; conservative for discrete ones (width, height, channels).
- ``embedding_mmd``: unbiased MMD² between the model's embeddings, Gaussian kernel with the
  median-heuristic bandwidth of the reference, permutation p-value ``(b + 1) / (B + 1)``.
  Valid for any number of permutations B (the observed split is one of the equally likely
  splits under the null); B = 1000 by default.
- ``predicted_class``: chi-square test of homogeneity on the 2 x K table of predicted-class
  counts (reference row, batch row). Classes whose smallest expected count would be under 5
  are pooled into one cell first (Cochran's rule), so the asymptotic p-value holds; a class
  absent from the batch (or new in it) is counted, never divided by.
- ``confidence``: two-sample KS test of the max-softmax confidence, the univariate softmax
  test that "Failing Loudly" (Rabanser et al., 2019) found strongest at small sample sizes.
- ``outlier_share``: the share of batch images whose k-NN distance to the reference (in
  embedding space) exceeds the reference's own leave-one-out ``outlier_quantile`` distance.
  The threshold is an order statistic of a finite reference, so the chance of exceeding it is
  itself random, Beta(r, n - r + 1), and the count is tested against the beta-binomial
  distribution this implies rather than a plain binomial at 1 - quantile (which ignores the
  threshold's own noise and over-alarms on large batches). Reference scores are leave-one-out,
  which makes the threshold slightly high: conservative.

Aggregate: Holm–Bonferroni over every test that ran holds the family-wise false-alarm rate at
``alpha`` (default 0.05) under any dependence between the tests. ``score`` is one minus the
smallest Holm-adjusted p-value and ``threshold`` is ``1 - alpha``: ``drift`` is exactly
``score >= threshold``. All rates are over draws of batch and reference; the embedding test
caps both of its samples (documented defaults in :class:`DriftConfig`) so one report stays
well under a second.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from cvops_dagster.imaging.features import FEATURE_COLUMNS

logger = logging.getLogger(__name__)

#: Written into every cached reference; :meth:`DriftReference.from_arrays` refuses others.
REFERENCE_FORMAT = "cvops-drift-reference/1"

MMD_TEST = "embedding_mmd"
CLASS_TEST = "predicted_class"
CONFIDENCE_TEST = "confidence"
OUTLIER_TEST = "outlier_share"
FEATURE_PREFIX = "feature:"

VERDICT_DRIFT = "drift"
VERDICT_NO_DRIFT = "no drift"
VERDICT_TOO_FEW = "too few images"

# Rows of batch points per block of the k-NN distance computation: bounds memory and keeps a
# block in cache (measured ~2x faster than one 5000 x 2000 matrix).
_KNN_BLOCK = 256
# Permutations per block of the MMD test: a (block x N) float32 indicator matrix.
_PERMUTATION_BLOCK = 250
# Cochran's rule for the chi-square approximation.
_MIN_EXPECTED = 5.0


@dataclass(frozen=True)
class DriftConfig:
    """Settings of the drift tests; every field has a documented default.

    Attributes:
        alpha: family-wise false-alarm rate held by Holm–Bonferroni over all tests (0.05).
        permutations: permutations B of the embedding MMD test (1000); the p-value
            ``(b + 1) / (B + 1)`` is valid for any B, but it is never below ``1 / (B + 1)``, so
            with m tests in the family the embedding test can only fire when
            ``m / (B + 1) <= alpha`` (a report notes it when not).
        mmd_max_reference: most reference embeddings the MMD test uses (1000), a seeded
            subsample fixed when the reference is built. Build-time setting.
        mmd_max_batch: most batch embeddings the MMD test uses (1000), a seeded subsample.
            The permutation cost grows as B x (reference + batch)²; these caps keep it ~0.1 s.
        knn_k: the k of the k-NN distance of the outlier test (5). Build-time setting.
        knn_max_reference: most reference embeddings the outlier test compares with (2000),
            a seeded subsample. Build-time setting.
        outlier_quantile: a batch image is an outlier beyond this quantile of the reference's
            leave-one-out k-NN distances (0.99). Build-time setting.
        min_batch: smallest batch (and smallest sample per test) that gets a verdict (30);
            below it the report says "too few images" and ``drift`` is ``None``.
        features: image features to test; ``None`` (default) tests every numeric feature of
            the reference.
        top_features: how many features ``top_features`` lists (5).
        seed: seeds the reference subsamples and the batch subsample and permutations (0):
            the same inputs and seed give the same report.

    Build-time settings shape the reference; :func:`drift_report` refuses a config whose
    build-time settings differ from the reference's (rebuild the reference instead).
    """

    alpha: float = 0.05
    permutations: int = 1000
    mmd_max_reference: int = 1000
    mmd_max_batch: int = 1000
    knn_k: int = 5
    knn_max_reference: int = 2000
    outlier_quantile: float = 0.99
    min_batch: int = 30
    features: tuple[str, ...] | None = None
    top_features: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if not 0.0 < self.outlier_quantile < 1.0:
            raise ValueError(f"outlier_quantile must lie in (0, 1), got {self.outlier_quantile}")
        for name in ("permutations", "knn_k", "top_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("mmd_max_reference", "mmd_max_batch", "knn_max_reference", "min_batch"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")
        if self.features is not None:
            object.__setattr__(self, "features", tuple(self.features))


@dataclass(eq=False)  # holds arrays: compare fields, not objects
class DriftSample:
    """Model outputs and image features of a set of images: a reference set or a batch.

    Attributes:
        features: feature name -> one value per image (the frame of
            :func:`~cvops_dagster.imaging.features.compute_features` works as is);
            non-numeric columns are ignored, NaN/inf values are dropped per feature.
        embeddings: float ``[N, D]`` embeddings of the model (rows with NaN/inf are dropped).
        predicted_classes: int ``[N]`` predicted class index into the model's labels.
        confidences: float ``[N]`` max-softmax probability (NaN/inf dropped).
    """

    features: Mapping[str, Any] | None
    embeddings: np.ndarray
    predicted_classes: np.ndarray
    confidences: np.ndarray


@dataclass(frozen=True)
class TestResult:
    """One test of the family.

    Attributes:
        name: ``feature:<name>``, ``embedding_mmd``, ``predicted_class``, ``confidence`` or
            ``outlier_share``.
        statistic: KS D, unbiased MMD², chi-square, or the outlier share.
        p_value: the test's own (unadjusted) p-value.
        drift: whether the test rejects: ``p_value <= alpha`` from a test function alone;
            in a :class:`DriftReport`, whether Holm rejects it at the family-wise alpha.
        p_adjusted: the Holm-adjusted p-value (set in a report; ``drift == p_adjusted <= alpha``).
    """

    __test__ = False  # not a pytest test class

    name: str
    statistic: float
    p_value: float
    drift: bool
    p_adjusted: float | None = None


@dataclass(frozen=True)
class FeatureShift:
    """How one image feature moved: its KS statistic and the two means."""

    name: str
    statistic: float
    p_value: float
    reference_mean: float
    batch_mean: float


@dataclass
class DriftReport:
    """The verdict on one batch.

    Attributes:
        drift: any test rejected by Holm at ``alpha``; ``None`` when the batch got no verdict.
        verdict: ``"drift"``, ``"no drift"`` or ``"too few images"``.
        score: one minus the smallest Holm-adjusted p-value, in [0, 1]; ``None`` without a
            verdict.
        threshold: ``1 - alpha``; ``drift`` is ``score >= threshold``.
        tests: test name -> result (Holm-adjusted), in the order run.
        top_features: the features with the largest KS statistics, largest first.
        n_reference: images in the reference.
        n_batch: images in the batch.
        method: one paragraph naming each test and the multiple-testing correction.
        notes: what was dropped or skipped and why (non-finite values, missing features...).
    """

    drift: bool | None
    verdict: str
    score: float | None
    threshold: float
    tests: dict[str, TestResult]
    top_features: list[FeatureShift]
    n_reference: int
    n_batch: int
    method: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form ``cvops status --json`` reports per batch (NaN/inf become null)."""
        return {
            "drift": self.drift,
            "verdict": self.verdict,
            "score": _json_float(self.score),
            "threshold": _json_float(self.threshold),
            "tests": {
                name: {
                    "statistic": _json_float(test.statistic),
                    "p_value": _json_float(test.p_value),
                    "p_adjusted": _json_float(test.p_adjusted),
                    "drift": bool(test.drift),
                }
                for name, test in self.tests.items()
            },
            "top_features": [
                {
                    "name": shift.name,
                    "statistic": _json_float(shift.statistic),
                    "p_value": _json_float(shift.p_value),
                    "reference_mean": _json_float(shift.reference_mean),
                    "batch_mean": _json_float(shift.batch_mean),
                }
                for shift in self.top_features
            ],
            "n_reference": int(self.n_reference),
            "n_batch": int(self.n_batch),
            "method": self.method,
            "notes": list(self.notes),
        }


@dataclass(eq=False)  # holds arrays: compare fields, not objects
class DriftReference:
    """A production model's reference: its outputs on its own held-out data, precomputed.

    Build with :func:`build_reference`; cache with :meth:`to_npz` / :meth:`from_npz` (no pickle).

    Attributes:
        labels: the model's class labels; predicted classes index into them.
        features: feature name -> its finite values (float64), NaN/inf dropped at build.
        embeddings: float32 ``[N, D]`` embeddings as given.
        predicted_classes: int64 ``[N]``.
        confidences: float64 ``[N]`` as given (non-finite ones are skipped by the tests).
        class_counts: int64 ``[K]`` predicted-class counts.
        mmd_indices: rows of ``embeddings`` in the MMD subsample (finite rows only).
        bandwidth: median-heuristic Gaussian bandwidth: the median pairwise Euclidean distance
            in the MMD subsample.
        knn_indices: rows of ``embeddings`` the outlier test compares with.
        outlier_threshold: the ``outlier_rank``-th largest leave-one-out k-NN distance within
            the k-NN subsample, i.e. its ``outlier_quantile`` quantile.
        outlier_rank: r = max(1, floor((1 - outlier_quantile) * (n_knn + 1))).
        knn_k, outlier_quantile, mmd_max_reference, knn_max_reference: the build-time settings.
        dropped: non-finite values dropped at build, per feature, ``embeddings``,
            ``confidences`` (only non-zero counts).
        model_id: the model this reference belongs to (informational).
    """

    labels: tuple[str, ...]
    features: dict[str, np.ndarray]
    embeddings: np.ndarray
    predicted_classes: np.ndarray
    confidences: np.ndarray
    class_counts: np.ndarray
    mmd_indices: np.ndarray
    bandwidth: float
    knn_indices: np.ndarray
    outlier_threshold: float
    outlier_rank: int
    knn_k: int
    outlier_quantile: float
    mmd_max_reference: int
    knn_max_reference: int
    dropped: dict[str, int] = field(default_factory=dict)
    model_id: str = ""

    @property
    def n(self) -> int:
        """Images in the reference."""
        return int(len(self.predicted_classes))

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.embeddings.shape[1])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric/string arrays, no objects: :meth:`from_arrays` restores bit-identically."""
        names = list(self.features)
        meta = {
            "format": REFERENCE_FORMAT,
            "labels": list(self.labels),
            "feature_names": names,
            "outlier_rank": int(self.outlier_rank),
            "knn_k": int(self.knn_k),
            "mmd_max_reference": int(self.mmd_max_reference),
            "knn_max_reference": int(self.knn_max_reference),
            "dropped": {k: int(v) for k, v in self.dropped.items()},
            "model_id": self.model_id,
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(meta, sort_keys=True)),
            # Floats kept as arrays, not JSON, so they come back bit for bit.
            "scalars": np.array([self.bandwidth, self.outlier_threshold, self.outlier_quantile], dtype=np.float64),
            "embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32),
            "predicted_classes": np.asarray(self.predicted_classes, dtype=np.int64),
            "confidences": np.asarray(self.confidences, dtype=np.float64),
            "class_counts": np.asarray(self.class_counts, dtype=np.int64),
            "mmd_indices": np.asarray(self.mmd_indices, dtype=np.int64),
            "knn_indices": np.asarray(self.knn_indices, dtype=np.int64),
        }
        for i, name in enumerate(names):
            arrays[f"feature_{i}"] = np.asarray(self.features[name], dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> DriftReference:
        """The reference :meth:`to_arrays` wrote.

        Raises:
            ValueError: the arrays are not a reference of this format or are inconsistent.
        """
        try:
            meta = json.loads(str(np.asarray(arrays["meta"])[()]))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a drift reference: no readable meta ({exc})") from exc
        if meta.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"not a drift reference of format {REFERENCE_FORMAT}: {meta.get('format')!r}")
        try:
            scalars = np.asarray(arrays["scalars"], dtype=np.float64)
            reference = cls(
                labels=tuple(meta["labels"]),
                features={name: np.asarray(arrays[f"feature_{i}"]) for i, name in enumerate(meta["feature_names"])},
                embeddings=np.asarray(arrays["embeddings"]),
                predicted_classes=np.asarray(arrays["predicted_classes"]),
                confidences=np.asarray(arrays["confidences"]),
                class_counts=np.asarray(arrays["class_counts"]),
                mmd_indices=np.asarray(arrays["mmd_indices"]),
                bandwidth=float(scalars[0]),
                knn_indices=np.asarray(arrays["knn_indices"]),
                outlier_threshold=float(scalars[1]),
                outlier_rank=int(meta["outlier_rank"]),
                knn_k=int(meta["knn_k"]),
                outlier_quantile=float(scalars[2]),
                mmd_max_reference=int(meta["mmd_max_reference"]),
                knn_max_reference=int(meta["knn_max_reference"]),
                dropped={k: int(v) for k, v in meta["dropped"].items()},
                model_id=str(meta["model_id"]),
            )
        except (KeyError, IndexError) as exc:
            raise ValueError(f"drift reference is incomplete: missing {exc}") from exc
        n = len(reference.predicted_classes)
        if reference.embeddings.ndim != 2 or len(reference.embeddings) != n or len(reference.confidences) != n:
            raise ValueError("drift reference arrays disagree in length")
        for indices in (reference.mmd_indices, reference.knn_indices):
            if len(indices) and (indices.min() < 0 or indices.max() >= n):
                raise ValueError("drift reference subsample indices out of range")
        return reference

    def to_npz(self) -> bytes:
        """The reference as ``.npz`` bytes, deterministic (fixed zip timestamps): equal
        references give equal bytes, so the file can be content-addressed."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in self.to_arrays().items():
                member = io.BytesIO()
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, member.getvalue())
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> DriftReference:
        """The reference :meth:`to_npz` wrote (loaded with ``allow_pickle=False``).

        Raises:
            ValueError: the bytes are not such a file.
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not a drift reference file: {exc}") from exc
        return cls.from_arrays(arrays)


# --------------------------------------------------------------------------- inputs


def _json_float(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _numeric_column(values: Any) -> np.ndarray | None:
    """A 1-D float64 copy of a column (NA -> NaN), or ``None`` when it is not numeric."""
    try:
        if hasattr(values, "to_numpy"):  # pandas Series, nullable dtypes included
            array = values.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            array = np.asarray(values)
            if array.dtype.kind not in "biuf":
                array = np.asarray(values, dtype=np.float64)  # None -> NaN; text raises
            array = array.astype(np.float64)
    except (TypeError, ValueError):
        return None
    if array.ndim != 1:
        raise ValueError(f"a feature column must be 1-D, got shape {array.shape}")
    return array


def _numeric_features(features: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """Numeric columns of ``features``, known image features first in their canonical order."""
    columns: dict[str, np.ndarray] = {}
    if features is None:
        return columns
    for name in features.keys():
        column = _numeric_column(features[name])
        if column is None:
            logger.debug("feature %r is not numeric: not tested", name)
            continue
        columns[str(name)] = column
    order = [n for n in FEATURE_COLUMNS if n in columns] + [n for n in columns if n not in FEATURE_COLUMNS]
    return {name: columns[name] for name in order}


def _model_outputs(sample: DriftSample, n_labels: int, dim: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated embeddings (float32), classes (int64), confidences (float64) of a sample."""
    embeddings = np.asarray(sample.embeddings)
    classes = np.asarray(sample.predicted_classes)
    confidences = np.asarray(sample.confidences, dtype=np.float64).reshape(-1)
    if embeddings.ndim == 1 and embeddings.size == 0:
        embeddings = embeddings.reshape(0, dim or 0)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    if dim is not None and embeddings.shape[1] != dim:
        raise ValueError(f"batch embeddings have dimension {embeddings.shape[1]}, the reference {dim}: not the same model?")
    if classes.ndim != 1 or (classes.size and classes.dtype.kind not in "iu"):
        raise ValueError(f"predicted_classes must be a 1-D integer array, got {classes.dtype} {classes.shape}")
    if not len(embeddings) == len(classes) == len(confidences):
        raise ValueError(
            f"embeddings ({len(embeddings)}), predicted_classes ({len(classes)}) and confidences "
            f"({len(confidences)}) must have one row per image"
        )
    classes = classes.astype(np.int64)
    if classes.size and (classes.min() < 0 or classes.max() >= n_labels):
        raise ValueError(f"predicted class indices must lie in [0, {n_labels}), got [{classes.min()}, {classes.max()}]")
    return embeddings.astype(np.float32, copy=False), classes, confidences


def _finite_rows(embeddings: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isfinite(embeddings).all(axis=1))


# --------------------------------------------------------------------------- building blocks


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values.

    Rejecting every hypothesis whose adjusted p-value is at most ``alpha`` holds the
    family-wise error rate (the chance of any false rejection) at ``alpha`` under arbitrary
    dependence between the tests, given each p-value is valid.

    Args:
        p_values: raw p-values.

    Returns:
        The adjusted p-values, in the input order, each in [0, 1] and never below its raw value.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def ks_test(name: str, reference: np.ndarray, batch: np.ndarray, alpha: float = 0.05) -> TestResult:
    """Two-sample Kolmogorov-Smirnov test (two-sided).

    False alarms: at most ``alpha`` when both samples come from one continuous distribution
    (scipy's exact distribution for small samples, the asymptotic one for large); with ties
    (discrete features) the test is conservative. Constant samples are fine: equal constants
    give D = 0, p = 1; different ones give D = 1.

    Args:
        name: the test's name.
        reference: finite reference values.
        batch: finite batch values.
        alpha: the level of the returned ``drift`` flag.
    """
    result = stats.ks_2samp(reference, batch)
    p = float(result.pvalue)
    return TestResult(name, float(result.statistic), p, p <= alpha)


def median_heuristic(embeddings: np.ndarray) -> float:
    """The median pairwise Euclidean distance, the Gaussian kernel's bandwidth.

    Falls back to the mean positive distance when over half the pairs coincide, and to 1.0
    when all points do, so the kernel is always defined.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) < 2:
        return 1.0
    distances = np.sqrt(_squared_distances(x, x)[np.triu_indices(len(x), k=1)])
    median = float(np.median(distances))
    if median > 0.0:
        return median
    positive = distances[distances > 0.0]
    return float(positive.mean()) if positive.size else 1.0


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (float64), clipped at 0 against rounding."""
    d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0, out=d2)


def mmd_test(
    reference: np.ndarray,
    batch: np.ndarray,
    bandwidth: float,
    *,
    permutations: int = 1000,
    max_batch: int = 1000,
    seed: int | Sequence[int] = 0,
    alpha: float = 0.05,
    name: str = MMD_TEST,
) -> TestResult:
    """Kernel two-sample test: unbiased MMD² with a Gaussian kernel and a permutation p-value.

    The kernel is ``exp(-|x - y|² / (2 bandwidth²))``; the bandwidth comes from the reference
    alone, so the kernel does not depend on the batch. The kernel matrix of the pooled sample
    is computed once; each permutation relabels it, and a block of permutations is one matrix
    product (the unbiased MMD² of a split only needs ``aᵀKa`` and ``aᵀK1`` for the split's
    indicator ``a``).

    False alarms: the p-value ``(b + 1) / (B + 1)``, b = permutations with MMD² at least the
    observed one, is valid (super-uniform) for any B when reference and batch are exchangeable,
    so rejecting at ``p <= alpha`` errs at most ``alpha`` of the time.

    Args:
        reference: finite reference embeddings ``[m, D]`` (already capped by the caller).
        batch: finite batch embeddings ``[n, D]``; a seeded subsample of ``max_batch`` rows is
            used when larger.
        bandwidth: Gaussian kernel bandwidth (> 0).
        permutations: B.
        max_batch: cap on batch rows used.
        seed: seeds the subsample and the permutations.
        alpha: the level of the returned ``drift`` flag.
        name: the test's name.

    Raises:
        ValueError: fewer than 2 rows on either side, different dimensions, or bandwidth <= 0.
    """
    if reference.ndim != 2 or batch.ndim != 2 or reference.shape[1] != batch.shape[1]:
        raise ValueError(f"embedding shapes differ: {reference.shape} vs {batch.shape}")
    if len(reference) < 2 or len(batch) < 2:
        raise ValueError("the MMD test needs at least 2 embeddings on each side")
    if not bandwidth > 0.0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    rng = np.random.default_rng(seed)
    if len(batch) > max_batch:
        batch = batch[np.sort(rng.choice(len(batch), size=max_batch, replace=False))]
    m, n = len(reference), len(batch)
    size = m + n
    pooled = np.concatenate([reference, batch]).astype(np.float64)
    kernel = _squared_distances(pooled, pooled)
    kernel *= -1.0 / (2.0 * bandwidth * bandwidth)
    np.exp(kernel, out=kernel)
    np.fill_diagonal(kernel, 1.0)
    row_sums = kernel.sum(axis=1)
    total = float(row_sums.sum())
    kernel32 = kernel.astype(np.float32)  # the permutation products in float32: 2x faster, error ~1e-8 on MMD²
    del kernel

    def mmd2(first: np.ndarray) -> np.ndarray:
        """Unbiased MMD² of the splits whose first sample is each row of ``first`` (indices)."""
        rows = len(first)
        indicator = np.zeros((rows, size), dtype=np.float32)
        indicator[np.arange(rows)[:, None], first] = 1.0
        a_k_a = np.einsum("ij,ij->i", indicator @ kernel32, indicator, dtype=np.float64)
        a_k_1 = row_sums[first].sum(axis=1)
        within_x = a_k_a - m  # off-diagonal sums: the Gaussian kernel's diagonal is 1
        within_y = total - 2.0 * a_k_1 + a_k_a - n
        between = a_k_1 - a_k_a
        return within_x / (m * (m - 1)) + within_y / (n * (n - 1)) - 2.0 * between / (m * n)

    observed = float(mmd2(np.arange(m)[None, :])[0])
    exceed = 0
    done = 0
    while done < permutations:
        block = min(_PERMUTATION_BLOCK, permutations - done)
        order = rng.permuted(np.broadcast_to(np.arange(size), (block, size)), axis=1)
        exceed += int((mmd2(order[:, :m]) >= observed).sum())
        done += block
    p = (exceed + 1) / (permutations + 1)
    return TestResult(name, observed, p, p <= alpha)


def class_test(
    reference_counts: np.ndarray, batch_counts: np.ndarray, alpha: float = 0.05, name: str = CLASS_TEST
) -> TestResult:
    """Chi-square test of homogeneity of two predicted-class distributions (2 x K table).

    Both sides are samples, so the reference's own sampling noise is part of the null (a
    goodness-of-fit test against fixed reference proportions would over-alarm on batches as
    large as the reference). Classes predicted by neither side are dropped; classes whose
    smallest expected count would be under 5 are pooled into one cell (with the next smallest
    class until the pooled cell reaches it), so every expected count is at least 5 and the
    asymptotic chi-square p-value holds. One cell left means nothing to compare: statistic 0,
    p-value 1.

    False alarms: at most ``alpha`` asymptotically (Cochran's rule) when both samples share a
    class distribution.

    Args:
        reference_counts: int ``[K]`` counts per class in the reference.
        batch_counts: int ``[K]`` counts per class in the batch.
        alpha: the level of the returned ``drift`` flag.
        name: the test's name.
    """
    table = np.vstack([np.asarray(reference_counts, np.float64), np.asarray(batch_counts, np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    sizes = table.sum(axis=1)
    if table.shape[1] < 2 or sizes.min() <= 0:
        return TestResult(name, 0.0, 1.0, False)
    # A column's smallest expected count is its total x (smaller row / grand total).
    needed = _MIN_EXPECTED * sizes.sum() / sizes.min()
    totals = table.sum(axis=0)
    order = np.argsort(totals, kind="stable")
    pooled = [i for i in order if totals[i] < needed]
    kept = [i for i in order if totals[i] >= needed]
    while pooled and kept and totals[pooled].sum() < needed:
        pooled.append(kept.pop(0))
    columns = [table[:, kept]] + ([table[:, pooled].sum(axis=1, keepdims=True)] if pooled else [])
    merged = np.hstack(columns)
    if merged.shape[1] < 2:
        return TestResult(name, 0.0, 1.0, False)
    result = stats.chi2_contingency(merged, correction=False)
    p = float(result.pvalue)
    return TestResult(name, float(result.statistic), p, p <= alpha)


def knn_distances(points: np.ndarray, reference: np.ndarray, k: int, *, leave_one_out: bool = False) -> np.ndarray:
    """Euclidean distance from each point to its k-th nearest reference point.

    Args:
        points: ``[n, D]``.
        reference: ``[m, D]``.
        k: which neighbour (1 = nearest).
        leave_one_out: ``points`` is ``reference`` itself: a point is not its own neighbour.

    Returns:
        float64 ``[n]``.
    """
    points32 = np.ascontiguousarray(points, dtype=np.float32)
    reference32 = np.ascontiguousarray(reference, dtype=np.float32)
    available = len(reference32) - (1 if leave_one_out else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} needs at least {k + int(leave_one_out)} reference points, got {len(reference32)}")
    reference_norms = (reference32.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    out = np.empty(len(points32))
    for start in range(0, len(points32), _KNN_BLOCK):
        block = points32[start : start + _KNN_BLOCK]
        # |x|² is the same along a row, so it is added after the partition.
        d2 = block @ reference32.T
        d2 *= -2.0
        d2 += reference_norms
        if leave_one_out:
            rows = np.arange(len(block))
            d2[rows, start + rows] = np.inf
        kth = np.partition(d2, k - 1, axis=1)[:, k - 1].astype(np.float64)
        kth += (block.astype(np.float64) ** 2).sum(axis=1)
        out[start : start + len(block)] = np.sqrt(np.maximum(kth, 0.0))
    return out


def outlier_rank(n_reference: int, quantile: float) -> int:
    """r such that the r-th largest of n reference scores is their ``quantile`` quantile."""
    return int(min(n_reference, max(1, math.floor((1.0 - quantile) * (n_reference + 1)))))


def outlier_test(
    batch_distances: np.ndarray,
    threshold: float,
    rank: int,
    n_reference: int,
    alpha: float = 0.05,
    name: str = OUTLIER_TEST,
) -> TestResult:
    """Is the share of batch points beyond the reference's outlier threshold too large?

    ``threshold`` is the ``rank``-th largest of ``n_reference`` reference scores. When batch
    and reference scores are exchangeable, a batch point exceeds it with probability
    P ~ Beta(rank, n_reference - rank + 1) (an order statistic of uniforms), so the count of
    exceeding batch points is beta-binomial; the p-value is its upper tail. A plain binomial
    test at the nominal 1 - quantile would ignore that the threshold itself is estimated.

    False alarms: at most ``alpha`` under exchangeability; the leave-one-out reference scores
    (k-th neighbour among n - 1 others, a batch point has n) lift the threshold slightly, which
    errs on the conservative side.

    Args:
        batch_distances: finite k-NN distances of the batch points to the reference.
        threshold: the reference's leave-one-out quantile distance.
        rank: its rank from the top among the reference scores.
        n_reference: number of reference scores.
        alpha: the level of the returned ``drift`` flag.
        name: the test's name.

    Returns:
        The share of batch points beyond the threshold as the statistic.
    """
    m = len(batch_distances)
    exceed = int(np.count_nonzero(batch_distances > threshold))
    p = float(stats.betabinom.sf(exceed - 1, m, rank, n_reference - rank + 1)) if exceed else 1.0
    p = min(1.0, max(0.0, p))
    return TestResult(name, exceed / m if m else 0.0, p, p <= alpha)


# --------------------------------------------------------------------------- reference


def build_reference(
    sample: DriftSample, labels: Sequence[str], config: DriftConfig | None = None, *, model_id: str = ""
) -> DriftReference:
    """The drift reference of a model from its predictions on its own held-out data.

    Draws the seeded embedding subsamples (MMD: ``mmd_max_reference`` rows, k-NN:
    ``knn_max_reference`` rows, nested, finite rows only), the median-heuristic bandwidth,
    and the leave-one-out k-NN outlier threshold; drops NaN/inf feature values and records
    how many.

    Args:
        sample: features, embeddings, predicted classes and confidences of the held-out data.
        labels: the model's class labels.
        config: build-time settings (defaults: :class:`DriftConfig`).
        model_id: recorded in the reference.

    Raises:
        ValueError: inconsistent inputs, or fewer finite embeddings than ``min_batch`` or
            than ``knn_k + 1``.
    """
    config = config or DriftConfig()
    labels = tuple(str(label) for label in labels)
    if not labels:
        raise ValueError("a reference needs the model's labels")
    embeddings, classes, confidences = _model_outputs(sample, len(labels), None)
    finite = _finite_rows(embeddings)
    needed = max(config.min_batch, config.knn_k + 1)
    if len(finite) < needed:
        raise ValueError(f"a reference needs at least {needed} images with finite embeddings, got {len(finite)}")
    dropped: dict[str, int] = {}
    features: dict[str, np.ndarray] = {}
    for name, column in _numeric_features(sample.features).items():
        keep = np.isfinite(column)
        if not keep.all():
            dropped[name] = int((~keep).sum())
        if keep.any():
            features[name] = column[keep]
    if len(finite) < len(embeddings):
        dropped["embeddings"] = len(embeddings) - len(finite)
    if not np.isfinite(confidences).all():
        dropped["confidences"] = int((~np.isfinite(confidences)).sum())

    rng = np.random.default_rng([config.seed, 0])
    shuffled = finite[rng.permutation(len(finite))]
    # Nested subsamples, each sorted so the reference reads in input order.
    mmd_indices = np.sort(shuffled[: config.mmd_max_reference])
    knn_indices = np.sort(shuffled[: config.knn_max_reference])
    knn_set = embeddings[knn_indices]
    scores = knn_distances(knn_set, knn_set, config.knn_k, leave_one_out=True)
    rank = outlier_rank(len(scores), config.outlier_quantile)
    threshold = float(np.sort(scores)[len(scores) - rank])
    reference = DriftReference(
        labels=labels,
        features=features,
        embeddings=np.ascontiguousarray(embeddings),
        predicted_classes=classes,
        confidences=confidences,
        class_counts=np.bincount(classes, minlength=len(labels)).astype(np.int64),
        mmd_indices=mmd_indices.astype(np.int64),
        bandwidth=median_heuristic(embeddings[mmd_indices]),
        knn_indices=knn_indices.astype(np.int64),
        outlier_threshold=threshold,
        outlier_rank=rank,
        knn_k=config.knn_k,
        outlier_quantile=config.outlier_quantile,
        mmd_max_reference=config.mmd_max_reference,
        knn_max_reference=config.knn_max_reference,
        dropped=dropped,
        model_id=model_id,
    )
    logger.info(
        "drift reference for %s: %d images, %d features, embeddings %s, bandwidth %.4g, outlier threshold %.4g",
        model_id or "a model", reference.n, len(features), embeddings.shape, reference.bandwidth, threshold,
    )
    return reference


# --------------------------------------------------------------------------- report


def _check_build_settings(reference: DriftReference, config: DriftConfig) -> None:
    mismatched = [
        f"{name}: reference {getattr(reference, name)}, config {getattr(config, name)}"
        for name in ("knn_k", "outlier_quantile", "mmd_max_reference", "knn_max_reference")
        if getattr(reference, name) != getattr(config, name)
    ]
    if mismatched:
        raise ValueError(f"the reference was built with other settings ({'; '.join(mismatched)}): rebuild it")


def describe_method(config: DriftConfig, n_tests: int) -> str:
    """The ``method`` paragraph of a report."""
    return (
        f"Holm-Bonferroni over {n_tests} tests at family-wise alpha {config.alpha:g}; "
        f"score = 1 - smallest Holm-adjusted p-value, drift when score >= threshold = 1 - alpha. "
        f"Image features: two-sample Kolmogorov-Smirnov per feature. "
        f"Embeddings: unbiased MMD^2, Gaussian kernel with the reference's median-heuristic bandwidth, "
        f"permutation p-value (b+1)/(B+1) with B={config.permutations}, at most {config.mmd_max_reference} "
        f"reference and {config.mmd_max_batch} batch embeddings (seeded subsamples). "
        f"Predicted class: chi-square test of homogeneity (2 x K), classes with expected count < 5 pooled. "
        f"Confidence: two-sample Kolmogorov-Smirnov on the max-softmax probability. "
        f"Outlier share: batch share beyond the reference's leave-one-out {config.outlier_quantile:g} quantile "
        f"of the {config.knn_k}-NN embedding distance (at most {config.knn_max_reference} reference points), "
        f"beta-binomial p-value."
    )


def drift_report(reference: DriftReference, batch: DriftSample, config: DriftConfig | None = None) -> DriftReport:
    """Test a batch against the reference; one verdict with the family-wise false-alarm rate
    held at ``config.alpha`` (Holm–Bonferroni over every test that ran).

    Tests that cannot run say why in ``notes`` and stay out of the family: a feature missing
    from the batch or the reference, or with fewer than ``min_batch`` finite values.
    A batch with fewer than ``min_batch`` images gets no verdict (``drift`` is ``None``).

    Args:
        reference: the production model's reference (see :func:`build_reference`).
        batch: the batch's features and the model's outputs on it.
        config: thresholds and sizes (defaults: :class:`DriftConfig`); its build-time
            settings must match the reference's.

    Returns:
        The report; ``report.to_dict()`` is what ``cvops status --json`` shows.

    Raises:
        ValueError: the batch's embedding dimension differs from the reference's, its classes
            fall outside the labels, its arrays disagree in length, or the config's build-time
            settings differ from the reference's.
    """
    config = config or DriftConfig()
    _check_build_settings(reference, config)
    embeddings, classes, confidences = _model_outputs(batch, len(reference.labels), reference.dim)
    n_batch = len(classes)
    threshold = 1.0 - config.alpha
    notes: list[str] = []
    if n_batch < config.min_batch:
        notes.append(f"too few images: {n_batch} < min_batch {config.min_batch}; no verdict")
        return DriftReport(None, VERDICT_TOO_FEW, None, threshold, {}, [], reference.n, n_batch, describe_method(config, 0), notes)

    results: list[TestResult] = []
    shifts: dict[str, tuple[float, float]] = {}

    # Image features.
    batch_features = _numeric_features(batch.features)
    names = config.features if config.features is not None else tuple(reference.features)
    for name in dict.fromkeys(names):  # each feature once, in order
        if name not in reference.features:
            notes.append(f"feature {name!r} is not in the reference: not tested")
            continue
        if name not in batch_features:
            notes.append(f"feature {name!r} is missing from the batch or not numeric: not tested")
            continue
        column = batch_features[name]
        values = column[np.isfinite(column)]
        if len(values) < len(column):
            notes.append(f"feature {name!r}: {len(column) - len(values)} non-finite batch values dropped")
        if len(values) < config.min_batch:
            notes.append(f"feature {name!r}: {len(values)} finite values < min_batch {config.min_batch}: not tested")
            continue
        ref_values = reference.features[name]
        results.append(ks_test(FEATURE_PREFIX + name, ref_values, values, config.alpha))
        shifts[FEATURE_PREFIX + name] = (float(ref_values.mean()), float(values.mean()))

    # Embeddings: MMD and outlier share.
    finite = _finite_rows(embeddings)
    if len(finite) < len(embeddings):
        notes.append(f"embeddings: {len(embeddings) - len(finite)} rows with non-finite values dropped")
    if len(finite) < config.min_batch:
        notes.append(f"embeddings: {len(finite)} finite rows < min_batch {config.min_batch}: not tested")
    else:
        batch_embeddings = embeddings[finite]
        results.append(
            mmd_test(
                reference.embeddings[reference.mmd_indices],
                batch_embeddings,
                reference.bandwidth,
                permutations=config.permutations,
                max_batch=config.mmd_max_batch,
                seed=[config.seed, 1],
                alpha=config.alpha,
            )
        )
        distances = knn_distances(batch_embeddings, reference.embeddings[reference.knn_indices], reference.knn_k)
        results.append(
            outlier_test(distances, reference.outlier_threshold, reference.outlier_rank, len(reference.knn_indices), config.alpha)
        )

    # Predictions: classes and confidences.
    batch_counts = np.bincount(classes, minlength=len(reference.labels))
    results.append(class_test(reference.class_counts, batch_counts, config.alpha))
    ref_conf = reference.confidences[np.isfinite(reference.confidences)]
    conf = confidences[np.isfinite(confidences)]
    if len(conf) < len(confidences):
        notes.append(f"confidences: {len(confidences) - len(conf)} non-finite values dropped")
    if len(ref_conf) < 2:
        notes.append("confidences: the reference has fewer than 2 finite confidences: not tested")
    elif len(conf) < config.min_batch:
        notes.append(f"confidences: {len(conf)} finite values < min_batch {config.min_batch}: not tested")
    else:
        results.append(ks_test(CONFIDENCE_TEST, ref_conf, conf, config.alpha))

    # Holm over the family. The permutation p-value is at least 1 / (B + 1), and Holm's first
    # step needs m * p <= alpha: with too few permutations the embedding test could never fire.
    if any(r.name == MMD_TEST for r in results) and len(results) / (config.permutations + 1) > config.alpha:
        enough = math.ceil(len(results) / config.alpha) - 1
        enough += len(results) / (enough + 1) > config.alpha  # against rounding of the division
        notes.append(
            f"embedding_mmd: its smallest p-value 1/{config.permutations + 1} cannot pass Holm's first "
            f"bound alpha/{len(results)}: raise permutations to at least {enough}"
        )
    adjusted = holm_adjust([r.p_value for r in results])
    tests = {
        r.name: replace(r, p_adjusted=float(q), drift=bool(q <= config.alpha)) for r, q in zip(results, adjusted, strict=True)
    }
    smallest = float(adjusted.min())
    drift = smallest <= config.alpha
    score = 1.0 - smallest
    if not drift and score >= threshold:  # 1 - p rounded onto 1 - alpha: keep score and verdict agreeing
        score = float(np.nextafter(threshold, 0.0))
    top = sorted(
        (tests[name] for name in shifts), key=lambda r: (-r.statistic, r.p_value, r.name)
    )[: config.top_features]
    top_features = [
        FeatureShift(r.name[len(FEATURE_PREFIX) :], r.statistic, r.p_value, *shifts[r.name]) for r in top
    ]
    report = DriftReport(
        drift=drift,
        verdict=VERDICT_DRIFT if drift else VERDICT_NO_DRIFT,
        score=score,
        threshold=threshold,
        tests=tests,
        top_features=top_features,
        n_reference=reference.n,
        n_batch=n_batch,
        method=describe_method(config, len(tests)),
        notes=notes,
    )
    logger.info(
        "drift report: %s (score %.4f, threshold %.4f, %d tests, %d rejected)",
        report.verdict, score, threshold, len(tests), sum(t.drift for t in tests.values()),
    )
    return report
