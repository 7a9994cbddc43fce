"""Duplicate detection: exact by pixels, near by pHash + thumbnail check, digits kept apart."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cvops_dagster.imaging.decode import decode_image
from cvops_dagster.imaging.hashes import perceptual_hashes, pixel_hash
from cvops_dagster.datasets.duplicates import NearDuplicateConfig, find_duplicates

from tests.unit.rawdata import digit_images, encode


def _smooth(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(-3, 3, 3)
    field = np.sin(a * x * 3 + b * y * 3) + np.cos(c * x * y * 6)
    return np.clip((field + 2) * 60, 0, 255).astype(np.uint8)


def _thumb(array: np.ndarray) -> np.ndarray:
    image = Image.fromarray(array)
    return np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX))


def _dedup(arrays: list[np.ndarray], config: NearDuplicateConfig = NearDuplicateConfig()):
    phash, compare = perceptual_hashes(np.stack([_thumb(a) for a in arrays]))
    return find_duplicates([pixel_hash(a) for a in arrays], phash, compare, config)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF"])
def test_lossless_reencode_is_an_exact_duplicate(fmt: str) -> None:
    original = _smooth(1)
    png = decode_image(encode(Image.fromarray(original))).image
    other = decode_image(encode(Image.fromarray(original), fmt)).image
    keep, kind = _dedup([np.asarray(png), np.asarray(other), _smooth(2)])
    assert keep.tolist() == [0, 0, 2]
    assert kind == [None, "exact", None]


@pytest.mark.parametrize("quality", [95, 75, 40])
def test_jpeg_reencode_is_a_near_duplicate(quality: int) -> None:
    original = _smooth(3)
    buffer = io.BytesIO()
    Image.fromarray(original).save(buffer, "JPEG", quality=quality)
    reencoded = np.asarray(Image.open(buffer).convert("L"))
    keep, kind = _dedup([original, _smooth(4), reencoded])
    assert keep.tolist() == [0, 1, 0]
    assert kind == [None, None, "near"]


def test_the_first_copy_is_kept() -> None:
    a, b = _smooth(5), _smooth(6)
    keep, kind = _dedup([b, a, b.copy(), a.copy()])
    assert keep.tolist() == [0, 1, 0, 1]
    assert kind == [None, None, "exact", "exact"]


def test_negative_threshold_turns_near_detection_off() -> None:
    original = _smooth(7)
    shifted = np.clip(original.astype(int) + 1, 0, 255).astype(np.uint8)
    assert _dedup([original, shifted])[0].tolist() == [0, 0]
    assert _dedup([original, shifted], NearDuplicateConfig(hamming_threshold=-1))[0].tolist() == [0, 1]


def test_near_duplicates_do_not_chain() -> None:
    # b is near a and c is near b, but c is not near a: c must not join a through b.
    base = _smooth(8).astype(np.int16)
    a = base.astype(np.uint8)
    b = np.clip(base + 3, 0, 255).astype(np.uint8)
    c = np.clip(base + 6, 0, 255).astype(np.uint8)
    keep, _ = _dedup([a, b, c], NearDuplicateConfig(hamming_threshold=64, max_thumbnail_mae=4.0))
    assert keep.tolist() == [0, 0, 2]


def test_distinct_sklearn_digits_are_not_near_duplicates() -> None:
    images, _ = digit_images()
    keep, kind = _dedup(images)
    flagged = sum(k is not None for k in kind)
    # Measured: 0 of 1,797 with the default thresholds; allow a tiny margin.
    assert flagged / len(images) < 0.002, f"{flagged} digits flagged as duplicates"
    assert len(set(keep.tolist())) >= len(images) - 3


def test_hash_has_64_bits_and_is_stable() -> None:
    images, _ = digit_images(20)
    thumbs = np.stack([_thumb(a) for a in images])
    first, compare = perceptual_hashes(thumbs)
    second, _ = perceptual_hashes(thumbs.copy())
    assert first.dtype == np.uint64 and compare.shape == (20, 16, 16)
    assert np.array_equal(first, second)
    assert len(set(first.tolist())) > 15


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0), (1, 3), (2, 6), (3, 8), (4, 12), (5, 6)])
def test_candidate_pairs_equal_the_exhaustive_comparison(seed: int, threshold: int) -> None:
    from cvops_dagster.datasets.duplicates import _candidate_pairs

    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**63, 40, dtype=np.uint64) * np.uint64(2) + np.uint64(seed % 2)
    hashes = centres[rng.integers(0, 40, 400)]
    for _ in range(int(rng.integers(0, 9))):  # flip a few random bits per hash
        hashes = hashes ^ (np.uint64(1) << rng.integers(0, 64, 400).astype(np.uint64))
    if seed == 5:
        hashes[:150] = 0  # one crowded value: falls back to the plain comparison
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= threshold
    expected_i, expected_j = np.nonzero(np.triu(close, 1))
    found_i, found_j = _candidate_pairs(hashes, threshold)
    np.testing.assert_array_equal(found_i, expected_i)
    np.testing.assert_array_equal(found_j, expected_j)


@pytest.mark.parametrize(("distinct", "threshold"), [(5, 0), (30, 4), (400, 6), (60, 10)])
def test_candidate_pairs_with_repeated_hashes_equal_the_exhaustive_comparison(distinct: int, threshold: int) -> None:
    """Many images sharing one hash value (re-encodes): every pair among them and with
    their close neighbours is found exactly once."""
    from cvops_dagster.datasets.duplicates import _candidate_pairs

    rng = np.random.default_rng(distinct)
    values = rng.integers(0, 2**63, distinct, dtype=np.uint64) & np.uint64(0xFF0000FF0000FFFF)
    hashes = values[rng.integers(0, distinct, 300)]
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= threshold
    expected_i, expected_j = np.nonzero(np.triu(close, 1))
    found_i, found_j = _candidate_pairs(hashes, threshold)
    np.testing.assert_array_equal(found_i, expected_i)
    np.testing.assert_array_equal(found_j, expected_j)


def test_large_sets_are_searched_with_wider_bands_one_bit_apart() -> None:
    """Seven exact bands of 9 bits pair ~1/73 of all hashes by chance (~100 million pairs at
    120k images); four bands of 16 bits probed one bit apart find the same pairs from far fewer."""
    from cvops_dagster.datasets.duplicates import _band_layout

    assert _band_layout(1_000, 6) == (7, 0)
    assert _band_layout(120_000, 6) == (4, 1)
    assert _band_layout(120_000, 0) == (1, 0)
    assert _band_layout(120_000, 16) is None  # bands under 8 bits: the plain comparison


@pytest.mark.parametrize("threshold", [6, 7, 12])
def test_one_bit_probing_equals_the_exhaustive_comparison(threshold: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from cvops_dagster.datasets import duplicates

    monkeypatch.setattr(duplicates, "_band_layout", lambda n, t: (t // 2 + 1, 1))
    rng = np.random.default_rng(threshold)
    centres = rng.integers(0, 2**63, 60, dtype=np.uint64)
    hashes = centres[rng.integers(0, 60, 500)]
    for _ in range(5):  # up to five flipped bits: pairs at every distance around the threshold
        hashes = hashes ^ (np.uint64(1) << rng.integers(0, 64, 500).astype(np.uint64))
    hashes = np.unique(hashes)  # distinct values, as _candidate_pairs passes them
    rng.shuffle(hashes)
    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= threshold
    expected_i, expected_j = np.nonzero(np.triu(close, 1))
    found_i, found_j = duplicates._value_pairs(hashes, threshold)
    assert len(expected_i) > 50
    np.testing.assert_array_equal(found_i, expected_i)
    np.testing.assert_array_equal(found_j, expected_j)
