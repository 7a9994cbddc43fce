"""Image features: known values on constructed images, batching that preserves order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cvops_dagster.imaging.features import FEATURE_COLUMNS, compute_features


@pytest.mark.parametrize("value", [0, 17, 128, 255])
def test_flat_image_has_its_brightness_and_no_contrast_or_sharpness(value: int) -> None:
    row = compute_features([np.full((10, 12), value, np.uint8)]).iloc[0]
    assert row["brightness"] == pytest.approx(value / 255)
    assert row["contrast"] == pytest.approx(0.0, abs=1e-6)
    assert row["sharpness"] == pytest.approx(0.0, abs=1e-6)
    assert (row["width"], row["height"], row["channels"]) == (12, 10, 1)
    assert row["aspect_ratio"] == pytest.approx(1.2)


def test_half_black_half_white_has_rms_contrast_one_half() -> None:
    image = np.zeros((8, 8), np.uint8)
    image[:, 4:] = 255
    row = compute_features([image]).iloc[0]
    assert row["brightness"] == pytest.approx(0.5)
    assert row["contrast"] == pytest.approx(0.5)


def test_sharpness_is_the_variance_of_the_laplacian() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    g = image.astype(np.float64)
    laplacian = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    assert compute_features([image]).iloc[0]["sharpness"] == pytest.approx(laplacian.var(), rel=1e-4)


def test_blurred_image_is_less_sharp() -> None:
    from PIL import ImageFilter

    sharp = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8))
    blurred = sharp.filter(ImageFilter.GaussianBlur(2))
    a, b = compute_features([sharp, blurred])["sharpness"]
    assert b < a / 5


def test_rgb_luma_matches_pillow_grayscale() -> None:
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    from_rgb = compute_features([rgb]).iloc[0]
    from_l = compute_features([rgb.convert("L")]).iloc[0]
    assert from_rgb["channels"] == 3 and from_l["channels"] == 1
    for name in ("brightness", "contrast", "sharpness"):
        assert from_rgb[name] == pytest.approx(from_l[name], rel=1e-6, abs=1e-9)


def test_mixed_shapes_keep_input_order_and_side_columns() -> None:
    rng = np.random.default_rng(3)
    images = [
        np.full((4, 4), 10, np.uint8),
        rng.integers(0, 256, (300, 300), dtype=np.uint8),  # measured alone (large)
        np.full((6, 2, 3), 200, np.uint8),
        np.full((4, 4), 50, np.uint8),
        np.full((2, 2), 90, np.uint8),  # too small for a Laplacian
    ]
    frame = compute_features(images, file_sizes=[1, 2, 3, 4, None], formats=["PNG", "JPEG", "BMP", "GIF", None])
    assert list(frame.columns) == list(FEATURE_COLUMNS)
    assert frame["width"].tolist() == [4, 300, 2, 4, 2]
    assert frame["brightness"].round(6).tolist()[0] == round(10 / 255, 6)
    assert frame["brightness"].round(6).tolist()[3] == round(50 / 255, 6)
    assert frame["sharpness"].iloc[4] == 0.0
    assert frame["file_size"].iloc[1] == 2 and frame["format"].iloc[2] == "BMP"


def test_non_8_bit_arrays_are_refused() -> None:
    with pytest.raises(ValueError):
        compute_features([np.zeros((4, 4), np.uint16)])
    with pytest.raises(ValueError):
        compute_features([np.zeros((4, 4), np.uint8)], file_sizes=[1, 2])
