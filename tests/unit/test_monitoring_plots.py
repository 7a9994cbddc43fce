"""Monitoring plots: every function returns a small, valid PNG for normal inputs and for what a
monitoring run can hand it (empty, NaN/inf, one value, constant), leaves no figure open, and
the embedding projection is deterministic and uses the reference's axes."""

from __future__ import annotations

import io
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from cvops_dagster.monitoring.plots import (
    accuracy_over_batches_png,
    class_bars_png,
    confidence_histogram_png,
    embedding_projection_png,
    feature_histograms_png,
    pca_2d,
)

# The plots must not warn either (division by zero in a density, degenerate axis limits).
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.filterwarnings("error::UserWarning")]

MAX_BYTES = 80_000
RNG = np.random.default_rng(7)
FEATURES = ("brightness", "contrast", "sharpness", "width", "height", "channels", "saturation")


def assert_png(data: bytes) -> None:
    """A PNG that Pillow reads, of a sane pixel size and under the byte budget."""
    assert isinstance(data, bytes)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) < MAX_BYTES, len(data)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        width, height = image.size
    assert 50 <= width <= 1000 and 50 <= height <= 1000, image.size


@pytest.fixture(autouse=True)
def no_figure_left_open() -> object:
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


def feature_table(n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    return {name: RNG.normal(loc=i + shift, scale=1.0, size=n) for i, name in enumerate(FEATURES)}


# --- confidence -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "reference"),
    [
        (RNG.beta(8, 2, size=200), RNG.beta(9, 1.5, size=3000)),
        (RNG.beta(8, 2, size=200), None),
        (np.array([]), None),
        (np.array([]), np.array([])),
        (np.array([]), RNG.beta(9, 1.5, size=100)),
        (np.array([0.7]), np.array([0.9])),
        (np.full(50, 0.99), np.full(80, 1.0)),
        (np.array([np.nan, np.inf, -np.inf, 0.5, 1.2, -0.1]), np.array([np.nan, np.nan])),
    ],
)
def test_confidence_histogram(batch: np.ndarray, reference: np.ndarray | None) -> None:
    assert_png(confidence_histogram_png(batch, reference, title="Confidence, batch 3"))


# --- feature histograms -----------------------------------------------------------------------


def test_feature_histograms_normal_with_statistics() -> None:
    stats = {"brightness": 0.41, "feature:contrast": 0.12, "sharpness": float("nan")}
    assert_png(feature_histograms_png(feature_table(2000), feature_table(100, shift=0.5), FEATURES, stats))


@pytest.mark.parametrize(
    ("reference", "batch", "names"),
    [
        ({}, {}, ["brightness"]),  # nothing on either side
        (feature_table(50), feature_table(50), []),  # no names
        ({"brightness": np.arange(5.0)}, {"contrast": np.arange(5.0)}, ["brightness", "contrast"]),  # disjoint
        ({"a": np.array([])}, {"a": np.array([])}, ["a"]),  # empty columns
        ({"a": np.array([np.nan, np.inf])}, {"a": np.array([1.0, np.nan])}, ["a"]),  # NaN/inf dropped
        ({"a": np.array([3.0])}, {"a": np.array([3.0])}, ["a"]),  # one value each
        ({"a": np.full(40, 28.0), "b": np.zeros(10)}, {"a": np.full(9, 28.0), "b": np.zeros(3)}, ["a", "b"]),  # constant
        ({"a": np.array([1e12, 1e12])}, {"a": np.array([-1e-12])}, ["a"]),  # extreme scales
        ({"a": np.array([1, 2, 3], dtype=np.int64)}, {"a": np.array([], dtype=np.int64)}, ["a"]),  # one side empty
    ],
)
def test_feature_histograms_edge_cases(reference: dict[str, np.ndarray], batch: dict[str, np.ndarray], names: list[str]) -> None:
    assert_png(feature_histograms_png(reference, batch, names, statistics={"a": 0.3}))


def test_feature_histograms_at_most_six_panels() -> None:
    """Seven requested features still make a valid plot (six panels; the seventh is dropped)."""
    many = feature_histograms_png(feature_table(300), feature_table(30), FEATURES)
    six = feature_histograms_png(feature_table(300), feature_table(30), FEATURES[:6])
    assert_png(many)
    with Image.open(io.BytesIO(many)) as a, Image.open(io.BytesIO(six)) as b:
        assert a.size == b.size


# --- embedding projection ---------------------------------------------------------------------


def test_pca_recovers_the_dominant_direction() -> None:
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    direction /= np.linalg.norm(direction)
    t = rng.normal(scale=10.0, size=(500, 1))
    reference = t * direction + rng.normal(scale=0.1, size=(500, 8)) + 5.0
    ref_xy, batch_xy, explained = pca_2d(reference, reference[:10])
    assert ref_xy.shape == (500, 2) and batch_xy.shape == (10, 2)
    assert explained[0] > 0.99 and 0 <= explained[1] < 0.01
    # PC1 coordinate is the position along the direction up to sign (and the centring).
    corr = np.corrcoef(ref_xy[:, 0], t[:, 0])[0, 1]
    assert abs(corr) > 0.999
    np.testing.assert_allclose(ref_xy.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(batch_xy, ref_xy[:10])


def test_pca_projects_the_batch_on_the_reference_axes() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(400, 3)) * np.array([5.0, 1.0, 0.1])
    batch = rng.normal(size=(50, 3)) * np.array([0.1, 0.1, 20.0]) + np.array([3.0, 0.0, 0.0])
    ref_xy, batch_xy, explained = pca_2d(reference, batch)
    # Fitted on the reference, the axes are (near) e1 and e2: the batch's huge spread along e3
    # is invisible and its mean offset along e1 shows on PC1.
    mean = reference.mean(axis=0)
    _, _, vt = np.linalg.svd(reference - mean, full_matrices=False)
    expected = (batch - mean) @ vt[:2].T
    np.testing.assert_allclose(np.abs(batch_xy), np.abs(expected), atol=1e-9)
    assert abs(batch_xy[:, 0].mean()) > 2.0
    assert batch_xy.std(axis=0).max() < 1.0
    assert explained[0] > explained[1] > 0
    # Adding the batch does not change the reference's coordinates.
    ref_again, _, _ = pca_2d(reference, batch[:1])
    np.testing.assert_array_equal(ref_again, ref_xy)


def test_pca_is_deterministic_and_sign_fixed() -> None:
    reference = np.random.default_rng(2).normal(size=(100, 6))
    first = pca_2d(reference, reference[:5])
    second = pca_2d(-(-reference), reference[:5].copy())
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("reference", "batch", "n_ref", "n_batch"),
    [
        (np.zeros((0, 4)), np.zeros((0, 4)), 0, 0),
        (np.array([]), np.array([]), 0, 0),
        (np.array([]), np.ones((3, 4)), 0, 3),  # no reference: fitted on the batch
        (np.ones((1, 4)), np.ones((1, 4)), 1, 1),  # one row
        (np.full((20, 4), 2.5), np.full((5, 4), 2.5), 20, 5),  # constant
        (np.arange(10.0), np.arange(3.0), 10, 3),  # 1-D: n scalars
        (np.array([[1.0, np.nan], [2.0, 1.0], [np.inf, 0.0], [3.0, 3.0]]), np.array([[np.nan, np.nan]]), 2, 0),
    ],
)
def test_pca_edge_cases(reference: np.ndarray, batch: np.ndarray, n_ref: int, n_batch: int) -> None:
    ref_xy, batch_xy, explained = pca_2d(reference, batch)
    assert ref_xy.shape == (n_ref, 2) and batch_xy.shape == (n_batch, 2)
    assert explained.shape == (2,)
    assert np.isfinite(ref_xy).all() and np.isfinite(batch_xy).all() and np.isfinite(explained).all()
    assert 0.0 <= explained.sum() <= 1.0 + 1e-12


def test_pca_rejects_mismatched_dimensions() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        pca_2d(np.ones((3, 4)), np.ones((2, 5)))


def test_embedding_projection_normal_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(3000, 32))
    batch = rng.normal(loc=0.5, size=(400, 32))
    first = embedding_projection_png(reference, batch, max_points=500, seed=11)
    assert_png(first)
    assert embedding_projection_png(reference, batch, max_points=500, seed=11) == first


@pytest.mark.parametrize(
    ("reference", "batch"),
    [
        (np.zeros((0, 8)), np.zeros((0, 8))),
        (np.array([]), np.array([])),
        (np.zeros((0, 8)), np.ones((4, 8))),
        (np.ones((1, 8)), np.ones((1, 8))),
        (np.full((30, 8), 0.25), np.full((3, 8), 0.25)),
        (np.array([[np.nan] * 8, [np.inf] * 8]), np.array([[1.0] * 8])),
        (np.arange(20.0), np.arange(5.0)),
        (np.ones((3, 4)), np.ones((2, 5))),  # mismatched: a note, not an exception
    ],
)
def test_embedding_projection_edge_cases(reference: np.ndarray, batch: np.ndarray) -> None:
    assert_png(embedding_projection_png(reference, batch, max_points=1))
    assert_png(embedding_projection_png(reference, batch))


# --- class shares -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "reference_counts", "batch_counts"),
    [
        (["cat", "dog", "bird"], np.array([300, 250, 450]), np.array([10, 30, 2])),
        ([f"class-with-a-long-name-{i}" for i in range(20)], RNG.integers(0, 100, 20), RNG.integers(0, 10, 20)),
        ([str(i) for i in range(100)], RNG.integers(0, 100, 100), RNG.integers(0, 10, 100)),
        ([], np.array([]), np.array([])),
        (["cat", "dog"], np.array([]), np.array([])),
        (["cat", "dog"], np.array([0, 0]), np.array([0, 0])),
        (["cat", "dog"], np.array([5, 7]), np.array([])),  # batch has no predictions yet
        (["cat"], np.array([5]), np.array([1])),
        (["cat", "dog"], np.array([np.nan, 3.0]), np.array([np.inf, -1.0])),
        (["cat"], np.array([1, 2, 3]), np.array([0, 1])),  # more counts than labels
    ],
)
def test_class_bars(labels: list[str], reference_counts: np.ndarray, batch_counts: np.ndarray) -> None:
    assert_png(class_bars_png(labels, reference_counts, batch_counts))


# --- accuracy over batches --------------------------------------------------------------------


@pytest.mark.parametrize(
    "points",
    [
        [("2024-05-01", 0.91), ("2024-05-02", 0.88), ("2024-05-03", None), ("2024-05-04", 0.79)],
        [(f"batch-{i:04d}-with-a-long-id", None if i % 5 == 0 else 0.8 + 0.01 * (i % 7)) for i in range(60)],
        [],
        [("only", 0.5)],
        [("only", None)],
        [("a", None), ("b", None)],
        [("a", 0.9), ("b", 0.9), ("c", 0.9)],
        [("a", float("nan")), ("b", float("inf")), ("c", 1.5), ("d", -0.2)],
    ],
)
def test_accuracy_over_batches(points: list[tuple[str, float | None]]) -> None:
    assert_png(accuracy_over_batches_png(points))


@pytest.mark.parametrize(
    "plot",
    [
        lambda: confidence_histogram_png(np.array([0.5])),
        lambda: feature_histograms_png({"a": np.ones(3)}, {"a": np.ones(3)}, ["a"]),
        lambda: embedding_projection_png(np.ones((2, 2)), np.ones((2, 2))),
        lambda: class_bars_png(["a"], np.array([1]), np.array([1])),
        lambda: accuracy_over_batches_png([("a", 1.0)]),
    ],
)
def test_plots_are_byte_stable(plot: Callable[[], bytes]) -> None:
    """The same inputs give the same bytes, so re-materialising an asset does not churn its metadata."""
    assert plot() == plot()
