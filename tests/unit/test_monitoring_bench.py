"""The monitoring and drift benchmarks run end to end at tiny sizes and report every figure.

Not timed tests: they check that the figures are produced and consistent, not how fast or how
good. One small runtime (one epoch on the bundled digits) is trained once for the module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvops_dagster.bench.drift import Pool, bench_drift, clopper_pearson, measure
from cvops_dagster.bench.monitoring import (
    BenchRuntime,
    bench_monitoring,
    jitter,
    jittered_digits,
    production_pool,
    train_bench_runtime,
    write_production_batch,
)
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.ingestion.landing import LandingZone
from cvops_dagster.monitoring.predictions import NUMERIC_FEATURES, drift_inputs, predict_batch
from cvops_dagster.monitoring.shifts import SHIFTS


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> BenchRuntime:
    return train_bench_runtime(tmp_path_factory.mktemp("bench-runtime"), epochs=1, threads=1)


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        (0, 100, 0.0, 1.0 - 0.025 ** (1 / 100)),  # closed forms at the edges
        (100, 100, 0.025 ** (1 / 100), 1.0),
        (5, 100, 0.016431, 0.112834),  # the textbook values
    ],
)
def test_clopper_pearson(successes: int, trials: int, low: float, high: float) -> None:
    got = clopper_pearson(successes, trials)
    assert got == pytest.approx((low, high), abs=1e-5)


def test_jitter_keeps_shape_and_varies() -> None:
    sources, labels = production_pool()
    rng = np.random.default_rng(0)
    a, b = jitter(sources[0], rng), jitter(sources[0], rng)
    assert a.shape == b.shape == sources[0].shape and a.dtype == np.uint8
    assert not np.array_equal(a, b)
    images, truth = jittered_digits(sources, labels, 50, np.random.default_rng(1))
    assert len(images) == len(truth) == 50 and set(truth) <= set(labels)


def test_drift_bench_sees_what_batch_predictions_see(runtime: BenchRuntime, tmp_path: Path) -> None:
    """The drift study's features and outputs are the ones ``predict_batch`` writes."""
    sources, labels = production_pool()
    images, truth = jittered_digits(sources, labels, 20, np.random.default_rng(2))
    images[-1] = SHIFTS["new_camera"](images[-1], np.random.default_rng(3))  # another size too
    write_production_batch(tmp_path / "landing", images)
    result = predict_batch(
        LandingZone(str(tmp_path / "landing")), ArtifactStorage(str(tmp_path / "store")), "bench", runtime.predictor, workers=1
    )
    features, embeddings, classes, confidences = drift_inputs(result.frame.sort_values("path"))
    pool: Pool = measure(images, truth, runtime.predictor)
    for name in NUMERIC_FEATURES:
        np.testing.assert_allclose(pool.features[name], features[name], err_msg=name)
    np.testing.assert_array_equal(pool.classes, classes)
    np.testing.assert_allclose(pool.embeddings, embeddings, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pool.confidences, confidences, rtol=1e-5)


def test_monitoring_bench_reports_its_figures(runtime: BenchRuntime) -> None:
    figures = bench_monitoring(images=200, repeats=1, workers=1, runtime=runtime)
    assert figures["predicted"] == 200
    for key in ("predictions_vs_bare_ratio", "predictions_excluding_ingest_vs_bare_ratio", "drift_vs_predictions_time_ratio"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["predictions_vs_bare_ratio"] == pytest.approx(figures["predictions_images_per_s"] / figures["bare_images_per_s"])
    phases = sum(figures[f"predictions_{p}_seconds"] for p in ("ingest", "decode", "predict", "other"))
    assert phases == pytest.approx(figures["predictions_seconds"])
    assert isinstance(figures["predictions_target_met"], bool) and isinstance(figures["drift_target_met"], bool)
    assert figures["onnx_intra_op_threads"] == 1 and figures["decode_workers"] == 1


def test_drift_bench_reports_rates_with_bounds(runtime: BenchRuntime) -> None:
    sizes = (30, 60)
    figures = bench_drift(
        batches=5, sizes=sizes, reference_size=300, pool_size=400, shift_pool_size=150, runtime=runtime
    )
    keys = [f"false_alarm_rate_n{n}" for n in sizes] + [f"detection_rate_{s}_n{n}" for s in SHIFTS for n in sizes]
    for key in keys:
        rate, low, high = figures[key], figures[f"{key}_ci_low"], figures[f"{key}_ci_high"]
        assert 0.0 <= low <= rate <= high <= 1.0, key
        assert rate * 5 == pytest.approx(round(rate * 5)), key  # a count of 5 batches
    assert all(isinstance(figures[f"false_alarm_target_met_n{n}"], bool) for n in sizes)
    assert isinstance(figures["targets_met"], bool)
    assert "detection_target_met_rotation_30_n500" not in figures  # no n=500 in this run
    # A new camera changes the image size: every batch is flagged, far more than false alarms.
    for n in sizes:
        assert figures[f"detection_rate_new_camera_n{n}"] == 1.0
        assert figures[f"detection_rate_new_camera_n{n}"] > figures[f"false_alarm_rate_n{n}"]
    assert figures["diagnostics"]["new_camera"]["feature_means"]["width"] == 40.0
    assert figures["seconds"] > 0
