"""Drift tests: false alarms held at the family-wise level, each kind of drift found by its own
test, edge cases answered clearly, and a reference that caches bit for bit."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from cvops_dagster.imaging.features import compute_features
from cvops_dagster.monitoring.drift import (
    CLASS_TEST,
    CONFIDENCE_TEST,
    MMD_TEST,
    OUTLIER_TEST,
    VERDICT_TOO_FEW,
    DriftConfig,
    DriftReference,
    DriftSample,
    build_reference,
    class_test,
    drift_report,
    holm_adjust,
    knn_distances,
    mmd_test,
    outlier_rank,
    outlier_test,
)

LABELS = ("cat", "dog", "bird", "fish", "frog", "horse")
CLASS_P = np.array([0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
DIM = 16
STATUS_KEYS = {"drift", "score", "threshold", "tests", "top_features", "n_reference", "n_batch", "method", "verdict", "notes"}


def make_sample(
    n: int,
    rng: np.random.Generator,
    *,
    brightness_shift: float = 0.0,
    embedding_shift: float = 0.0,
    class_p: np.ndarray = CLASS_P,
    confidence_beta: tuple[float, float] = (8.0, 2.0),
    outlier_share: float = 0.0,
) -> DriftSample:
    """Synthetic model outputs: Gaussian features and embeddings, categorical classes, Beta confidences."""
    features = {
        "width": rng.integers(30, 35, n),
        "height": np.full(n, 32),
        "aspect_ratio": np.ones(n),
        "brightness": rng.normal(0.5 + brightness_shift, 0.1, n),
        "contrast": rng.normal(0.2, 0.05, n),
        "sharpness": rng.gamma(2.0, 100.0, n),
    }
    scales = np.linspace(0.5, 2.0, DIM)
    embeddings = rng.normal(size=(n, DIM)) * scales
    embeddings[:, 0] += embedding_shift  # along the first axis only: the features do not move
    far = rng.random(n) < outlier_share
    embeddings[far] += 12.0 * scales
    classes = rng.choice(len(class_p), size=n, p=class_p / class_p.sum())
    confidences = rng.beta(*confidence_beta, size=n)
    return DriftSample(features, embeddings.astype(np.float32), classes, confidences)


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    return build_reference(make_sample(1000, np.random.default_rng(11)), LABELS, model_id="m-1")


def fired(report) -> set[str]:
    return {name for name, test in report.tests.items() if test.drift}


# --------------------------------------------------------------------------- error rates


def test_family_wise_false_alarm_rate_is_held_at_n100() -> None:
    # 200 in-distribution batches against one reference. Alarms ~ Binomial(200, <= 0.05), whose
    # 99th percentile is 18; without the Holm correction the same batches alarm far more often
    # (checked below, so the test can fail). Speed: a 400-image reference and B = 200
    # permutations instead of 1000. The permutation p-value (b + 1) / (B + 1) is valid for any B,
    # and 1 / 201 is still below Holm's first bound 0.05 / 10, so the MMD test can still alarm.
    rng = np.random.default_rng(2024)
    config = DriftConfig(seed=5, permutations=200)
    ref = build_reference(make_sample(400, rng), LABELS, config)
    alarms = uncorrected = 0
    for _ in range(200):
        report = drift_report(ref, make_sample(100, rng), config)
        alarms += bool(report.drift)
        uncorrected += any(t.p_value <= config.alpha for t in report.tests.values())
        assert len(report.tests) == 10
    limit = stats.binom.ppf(0.99, 200, config.alpha)
    assert alarms <= limit, f"{alarms} false alarms in 200 batches (limit {limit:.0f})"
    assert uncorrected > limit, "the uncorrected family should alarm more often: the check has no power"


def test_outlier_p_value_accounts_for_the_estimated_threshold() -> None:
    # Under exchangeability the count beyond the r-th largest of n reference scores is
    # beta-binomial: its p-value is uniform-or-conservative over fresh references, whereas a
    # binomial test at 1 - quantile treats the threshold as exact and over-alarms.
    rng = np.random.default_rng(3)
    n_ref, n_batch, rank = 400, 2000, outlier_rank(400, 0.99)
    beta_binomial = binomial = 0
    for _ in range(300):
        scores = rng.random(n_ref)
        threshold = np.sort(scores)[n_ref - rank]
        result = outlier_test(rng.random(n_batch), threshold, rank, n_ref)
        beta_binomial += result.drift
        binomial += stats.binomtest(round(result.statistic * n_batch), n_batch, 0.01, alternative="greater").pvalue <= 0.05
    assert beta_binomial <= stats.binom.ppf(0.99, 300, 0.05)
    assert binomial > stats.binom.ppf(0.99, 300, 0.05)


def test_mmd_permutation_p_value_is_b_plus_one_over_b_plus_one() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 4))
    far = mmd_test(x, rng.normal(size=(50, 4)) + 3.0, 2.0, permutations=99, seed=1)
    assert far.p_value == pytest.approx(1 / 100) and far.drift
    same = mmd_test(x, rng.normal(size=(50, 4)), 2.0, permutations=99, seed=1)
    assert (same.p_value * 100) == pytest.approx(round(same.p_value * 100))
    assert same.p_value > 0.05 and not same.drift


def test_mmd_matches_the_direct_unbiased_estimate() -> None:
    rng = np.random.default_rng(5)
    x, y, bandwidth = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) + 0.5, 1.7

    def gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * bandwidth**2))

    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    direct = (
        (kxx.sum() - 30) / (30 * 29) + (kyy.sum() - 20) / (20 * 19) - 2 * kxy.mean()
    )
    assert mmd_test(x, y, bandwidth, permutations=10).statistic == pytest.approx(direct, rel=1e-5)


def test_holm_adjustment() -> None:
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, 0.5])
    assert holm_adjust([]).size == 0


# --------------------------------------------------------------------------- detection at n = 500


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        ({"brightness_shift": 0.05}, {"feature:brightness"}),
        ({"embedding_shift": 1.0}, {MMD_TEST}),
        ({"class_p": np.array([0.12, 0.2, 0.2, 0.12, 0.2, 0.16])}, {CLASS_TEST}),
        ({"confidence_beta": (5.0, 2.0)}, {CONFIDENCE_TEST}),
        ({"outlier_share": 0.05}, {OUTLIER_TEST}),
    ],
    ids=["feature", "embedding", "classes", "confidence", "outliers"],
)
def test_each_drift_is_found_by_its_own_test(reference: DriftReference, shift: dict, expected: set[str]) -> None:
    report = drift_report(reference, make_sample(500, np.random.default_rng(77), **shift))
    assert report.drift is True and report.verdict == "drift"
    assert expected <= fired(report)
    # Embedding outliers also move the embedding distribution; nothing else moved.
    allowed = expected | ({MMD_TEST} if expected == {OUTLIER_TEST} else set())
    assert fired(report) <= allowed, fired(report)
    assert report.score >= report.threshold


def test_top_features_name_the_moved_feature(reference: DriftReference) -> None:
    report = drift_report(reference, make_sample(500, np.random.default_rng(78), brightness_shift=0.05))
    top = report.top_features[0]
    assert top.name == "brightness"
    assert top.batch_mean - top.reference_mean == pytest.approx(0.05, abs=0.02)
    assert len(report.top_features) == 5
    statistics = [shift.statistic for shift in report.top_features]
    assert statistics == sorted(statistics, reverse=True)


def test_in_distribution_batch_is_not_drift(reference: DriftReference) -> None:
    report = drift_report(reference, make_sample(500, np.random.default_rng(79)))
    assert report.drift is False and report.verdict == "no drift"
    assert report.score < report.threshold == pytest.approx(0.95)
    assert not fired(report)


# --------------------------------------------------------------------------- report form


def test_report_dict_has_the_status_keys_and_is_json_safe(reference: DriftReference) -> None:
    sample = make_sample(200, np.random.default_rng(80))
    sample.features["sharpness"][:3] = np.nan
    data = drift_report(reference, sample).to_dict()
    assert set(data) == STATUS_KEYS
    json.dumps(data, allow_nan=False)
    assert isinstance(data["drift"], bool)
    assert data["n_reference"] == 1000 and data["n_batch"] == 200
    for test in data["tests"].values():
        assert set(test) == {"statistic", "p_value", "p_adjusted", "drift"}
        assert test["p_adjusted"] >= test["p_value"]
        assert test["drift"] == (test["p_adjusted"] <= 0.05)
    assert set(data["top_features"][0]) == {"name", "statistic", "p_value", "reference_mean", "batch_mean"}
    assert "Holm" in data["method"]


def test_same_seed_gives_the_same_report(reference: DriftReference) -> None:
    sample = make_sample(300, np.random.default_rng(81), embedding_shift=0.2)
    first = drift_report(reference, sample, DriftConfig(seed=3)).to_dict()
    assert drift_report(reference, sample, DriftConfig(seed=3)).to_dict() == first


def test_features_from_compute_features_are_tested_by_name() -> None:
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(40)]
    frame = compute_features(images, file_sizes=[100 + i for i in range(39)] + [None], formats=["PNG"] * 40)
    sample = make_sample(40, rng)
    ref = build_reference(replace(sample, features=frame), LABELS)
    # format is text: not a test; file_size's missing value is dropped and counted.
    assert "format" not in ref.features and ref.dropped == {"file_size": 1}
    assert list(ref.features) == ["width", "height", "aspect_ratio", "channels", "brightness", "contrast", "sharpness", "file_size"]
    darker = [(image // 2).astype(np.uint8) for image in images]
    report = drift_report(ref, replace(sample, features=compute_features(darker)))
    assert report.tests["feature:brightness"].drift
    # compute_features without file sizes gives an all-missing column: noted, not tested.
    assert "feature 'file_size': 40 non-finite batch values dropped" in report.notes
    assert "feature:file_size" not in report.tests


# --------------------------------------------------------------------------- edge cases


def test_too_few_images_get_no_verdict(reference: DriftReference) -> None:
    report = drift_report(reference, make_sample(10, np.random.default_rng(82)))
    assert report.drift is None and report.score is None and report.tests == {}
    assert report.verdict == VERDICT_TOO_FEW
    assert report.to_dict()["drift"] is None and "too few images" in report.notes[0]


def test_non_finite_values_are_dropped_and_counted(reference: DriftReference) -> None:
    sample = make_sample(200, np.random.default_rng(83))
    sample.features["brightness"][:5] = np.inf
    sample.features["contrast"][:190] = np.nan
    sample.embeddings[:2, 0] = np.nan
    sample.confidences[0] = np.nan
    report = drift_report(reference, sample)
    assert report.drift is False
    assert "feature 'brightness': 5 non-finite batch values dropped" in report.notes
    assert "feature:contrast" not in report.tests  # 10 finite values < min_batch
    assert any("'contrast': 10 finite values < min_batch" in note for note in report.notes)
    assert "embeddings: 2 rows with non-finite values dropped" in report.notes
    assert "confidences: 1 non-finite values dropped" in report.notes
    assert MMD_TEST in report.tests and CONFIDENCE_TEST in report.tests


def test_constant_features_are_tested_without_division_by_zero(reference: DriftReference) -> None:
    same = drift_report(reference, make_sample(100, np.random.default_rng(84)))
    assert same.tests["feature:height"].statistic == 0.0 and same.tests["feature:height"].p_value == 1.0
    moved = make_sample(100, np.random.default_rng(84))
    moved.features["height"] = np.full(100, 48)  # a new camera
    report = drift_report(reference, moved)
    assert report.tests["feature:height"].statistic == 1.0 and report.tests["feature:height"].drift
    assert report.top_features[0].name == "height"


def test_missing_and_unknown_features_are_noted(reference: DriftReference) -> None:
    sample = make_sample(100, np.random.default_rng(85))
    del sample.features["sharpness"]
    config = DriftConfig(features=("brightness", "sharpness", "hue"))
    report = drift_report(reference, sample, config)
    assert [name for name in report.tests if name.startswith("feature:")] == ["feature:brightness"]
    assert "feature 'sharpness' is missing from the batch or not numeric: not tested" in report.notes
    assert "feature 'hue' is not in the reference: not tested" in report.notes


def test_mismatched_inputs_raise_clear_errors(reference: DriftReference) -> None:
    rng = np.random.default_rng(86)
    sample = make_sample(100, rng)
    with pytest.raises(ValueError, match="dimension 8, the reference 16"):
        drift_report(reference, replace(sample, embeddings=sample.embeddings[:, :8]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        drift_report(reference, replace(sample, predicted_classes=np.full(100, 6)))
    with pytest.raises(ValueError, match="one row per image"):
        drift_report(reference, replace(sample, confidences=sample.confidences[:50]))
    with pytest.raises(ValueError, match="knn_k: reference 5, config 7"):
        drift_report(reference, sample, DriftConfig(knn_k=7))
    with pytest.raises(ValueError, match="alpha"):
        DriftConfig(alpha=0.0)
    with pytest.raises(ValueError, match="at least 30"):
        build_reference(make_sample(20, rng), LABELS)


def test_class_test_handles_absent_and_rare_classes() -> None:
    reference = np.array([500, 300, 150, 40, 8, 2, 0])
    same = class_test(reference, np.array([50, 30, 15, 4, 1, 0, 0]))
    assert not same.drift and 0.0 <= same.p_value <= 1.0 and np.isfinite(same.statistic)
    new_class = class_test(reference, np.array([40, 20, 10, 4, 1, 0, 60]))  # a class the reference never predicted
    assert new_class.drift
    assert class_test(np.array([10, 0]), np.array([7, 0])) == class_test(np.array([10, 0]), np.array([7, 0]))
    assert class_test(np.array([10, 0]), np.array([7, 0])).p_value == 1.0  # one class: nothing to compare


def test_knn_leave_one_out_skips_the_point_itself() -> None:
    points = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    np.testing.assert_allclose(knn_distances(points, points, 1, leave_one_out=True), [1.0, 1.0, 2.0])
    np.testing.assert_allclose(knn_distances(points, points, 1), [0.0, 0.0, 0.0], atol=1e-6)


# --------------------------------------------------------------------------- caching


def test_reference_round_trips_bit_identically(reference: DriftReference) -> None:
    arrays = reference.to_arrays()
    assert all(array.dtype != object for array in arrays.values())
    again = DriftReference.from_arrays(arrays)
    data = reference.to_npz()
    loaded = DriftReference.from_npz(data)
    for copy in (again, loaded):
        for name, array in copy.to_arrays().items():
            assert array.dtype == arrays[name].dtype and array.tobytes() == arrays[name].tobytes(), name
        assert copy.labels == reference.labels and copy.model_id == "m-1"
        assert copy.bandwidth == reference.bandwidth and copy.outlier_threshold == reference.outlier_threshold
    assert loaded.to_npz() == data  # deterministic bytes: content-addressable
    sample = make_sample(200, np.random.default_rng(87), embedding_shift=0.3)
    assert drift_report(loaded, sample).to_dict() == drift_report(reference, sample).to_dict()


def test_reference_file_rejects_other_content(reference: DriftReference) -> None:
    with pytest.raises(ValueError, match="not a drift reference"):
        DriftReference.from_npz(b"not a zip")
    arrays = reference.to_arrays()
    arrays["meta"] = np.array(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        DriftReference.from_arrays(arrays)


def test_reference_precomputations(reference: DriftReference) -> None:
    assert len(reference.mmd_indices) == 1000 and len(reference.knn_indices) == 1000
    capped = build_reference(make_sample(300, np.random.default_rng(12)), LABELS, DriftConfig(mmd_max_reference=100))
    assert len(capped.mmd_indices) == 100 and set(capped.mmd_indices) <= set(capped.knn_indices)
    assert reference.class_counts.sum() == 1000 and reference.bandwidth > 0
    # The threshold is the reference's own leave-one-out 99th percentile.
    knn = reference.embeddings[reference.knn_indices]
    scores = knn_distances(knn, knn, reference.knn_k, leave_one_out=True)
    assert reference.outlier_rank == 10  # the 10th largest of 1000
    assert np.sum(scores >= reference.outlier_threshold) == 10
    assert np.sum(scores > reference.outlier_threshold) == 9



def test_too_few_permutations_for_the_family_are_noted(reference: DriftReference) -> None:
    sample = make_sample(100, np.random.default_rng(88))
    # 10 tests: Holm's first bound is 0.05 / 10, above 1 / 1001 but below 1 / 101.
    assert not any(MMD_TEST in note for note in drift_report(reference, sample).notes)
    notes = drift_report(reference, sample, DriftConfig(permutations=100)).notes
    assert "raise permutations to at least 199" in " ".join(notes)
