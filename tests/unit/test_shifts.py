"""Distribution shifts: modes, sizes and dtypes kept (or changed as documented), seeded
determinism, clipping, and the registry's names and errors."""

from __future__ import annotations

import numpy as np
import pytest

from cvops_dagster.monitoring import shifts
from cvops_dagster.monitoring.shifts import SHIFTS, apply_shift


def _digit_like(size: int = 32, channels: int | None = None) -> np.ndarray:
    """A bright ring on a black background, like the sample digits (gray or colour)."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    gray = np.where(np.abs(radius - size / 4) < size / 12, 220, 0).astype(np.uint8)
    return gray if channels is None else np.repeat(gray[..., None], channels, axis=2)


EXPECTED_NAMES = {"rotation_15", "rotation_30", "brightness_up_30", "brightness_down_30", "blur_1.5", "noise", "new_camera"}


def test_registry_names_exactly_the_documented_shifts() -> None:
    assert set(SHIFTS) == EXPECTED_NAMES


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
@pytest.mark.parametrize("channels", [None, 3])
def test_every_shift_keeps_dtype_and_mode_and_changes_the_image(name: str, channels: int | None) -> None:
    image = _digit_like(channels=channels)
    (out,) = apply_shift(name, [image], seed=0)
    assert out.dtype == np.uint8
    assert out.ndim == image.ndim and (out.ndim == 2 or out.shape[2] == 3)
    if name == "new_camera":
        assert out.shape[:2] == (40, 40)
    else:
        assert out.shape == image.shape
        assert not np.array_equal(out, image)
    assert np.array_equal(image, _digit_like(channels=channels)), "the input was modified"


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_same_seed_same_output_and_noise_depends_on_the_seed(name: str) -> None:
    images = [_digit_like(), _digit_like(24)]
    first, again = apply_shift(name, images, seed=7), apply_shift(name, images, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = apply_shift(name, images, seed=8)
    random = name in ("noise", "new_camera")
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True)) == random


def test_unknown_shift_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown shift 'fog'.*rotation_15.*new_camera"):
        apply_shift("fog", [_digit_like()], seed=0)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 4), dtype=np.uint8), np.zeros((4,), dtype=np.uint8)]
)
def test_bad_input_is_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        shifts.rotate(bad, 10)


def test_brightness_scales_and_clips() -> None:
    image = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    assert shifts.brightness(image, 1.3).tolist() == [[0, 130, 255, 255]]
    assert shifts.brightness(image, 0.7).tolist() == [[0, 70, 140, 178]]
    with pytest.raises(ValueError):
        shifts.brightness(image, -1)


def test_rotation_keeps_size_and_fills_with_the_background() -> None:
    image = np.full((20, 30), 90, dtype=np.uint8)
    image[8:12, 5:25] = 250
    out = shifts.rotate(image, 30)
    assert out.shape == image.shape
    assert out[0, 0] == out[-1, -1] == 90  # the uncovered corners take the border's value
    assert shifts.border_value(_digit_like(channels=3)) == (0, 0, 0)
    assert np.array_equal(shifts.rotate(image, 0), image)


def test_blur_smooths_and_sigma_zero_is_identity() -> None:
    image = _digit_like()
    blurred = shifts.gaussian_blur(image, 1.5)
    assert np.abs(np.diff(blurred.astype(int), axis=1)).max() < np.abs(np.diff(image.astype(int), axis=1)).max()
    assert np.array_equal(shifts.gaussian_blur(image, 0), image)


def test_noise_has_the_requested_spread() -> None:
    flat = np.full((100, 100), 128, dtype=np.uint8)
    out = shifts.additive_noise(flat, 20, np.random.default_rng(0)).astype(float)
    assert abs(out.std() - 20) < 1 and abs(out.mean() - 128) < 1
    assert np.array_equal(shifts.additive_noise(flat, 0, np.random.default_rng(0)), flat)


def test_new_camera_inverts_polarity_resizes_and_stays_gray() -> None:
    image = _digit_like()
    out = shifts.new_camera(image, np.random.default_rng(0))
    assert out.ndim == 2 and out.shape == (40, 40)
    # A dark background became a light one, and bright strokes dark ones.
    assert image[0, 0] == 0 and out[:3, :3].mean() > 200
    assert out.mean() > 255 - image.mean() - 30
    wide = shifts.new_camera(np.zeros((16, 24), dtype=np.uint8), np.random.default_rng(0))
    assert wide.shape == (20, 30)
    colour = shifts.new_camera(_digit_like(channels=3), np.random.default_rng(0))
    assert colour.shape == (40, 40, 3)
