"""Image features: the one definition shared by dataset cleaning and drift reports.

Cleaning stores these per image in the dataset manifest; drift computes the same columns on
production images and compares the distributions. Both call :func:`compute_features`, so a
change of definition can never make training-time and serving-time figures disagree.

Definitions (all on the canonical 8-bit image):

- ``width``, ``height``: pixels; ``aspect_ratio``: width / height.
- ``channels``: 1 (grayscale) or 3 (RGB).
- ``brightness``: mean luma scaled to [0, 1].
- ``contrast``: RMS contrast, the standard deviation of luma scaled to [0, 1].
- ``sharpness``: variance of the 4-neighbour Laplacian of luma on the 0-255 scale (the usual
  "variance of the Laplacian" blur measure; 0 for images smaller than 3x3).
- ``file_size``: bytes of the source file, ``format``: the decoder's format name.

Luma of an RGB image uses Pillow's own fixed-point ITU-R 601 weights, so it equals
``image.convert("L")`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

FEATURE_COLUMNS: tuple[str, ...] = (
    "width",
    "height",
    "aspect_ratio",
    "channels",
    "brightness",
    "contrast",
    "sharpness",
    "file_size",
    "format",
)
"""Column order of the frame :func:`compute_features` returns."""

# Images up to this many pixels are stacked per shape and processed in one numpy call each;
# per-call overhead dominates for tiny images such as 32x32 digits.
_STACK_MAX_PIXELS = 256 * 256


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A uint8 array of shape (H, W) or (H, W, 3) for a canonical image."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image)
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"features need 8-bit images, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"features need (H, W) or (H, W, 3) arrays, got shape {array.shape}")
    return array


def _luma(stack: np.ndarray) -> np.ndarray:
    """Luma of a stack (N, H, W[, 3]) as float32 on the 0-255 scale, equal to Pillow's "L"."""
    if stack.ndim == 3:
        return stack.astype(np.float32)
    rgb = stack.astype(np.uint32)
    # Pillow's L conversion: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.float32)


def _moments(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean and (population) variance of a 2-D array, in one pass of dot products.

    Sums of float32 rows go through a matrix-vector product: the values here are integers
    (pixels, Laplacians) whose row sums stay below 2**24, so the float32 sum is exact, and
    BLAS does it several times faster than a reduction with a float64 accumulator.
    """
    count = flat.shape[1]
    if flat.dtype == np.float32 and count * 1020 < 2**24:
        total = (flat @ np.ones(count, dtype=np.float32)).astype(np.float64)
    else:
        total = flat.sum(axis=1, dtype=np.float64)
    mean = total / count
    square = np.einsum("ij,ij->i", flat, flat).astype(np.float64) / count
    return mean, np.maximum(square - mean * mean, 0.0)


def _stack_stats(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brightness, contrast and Laplacian variance of a float stack (N, H, W) on 0-255."""
    n, height, width = gray.shape
    # float32 is exact enough for small images and twice as fast; large ones use float64.
    gray = gray.astype(np.float32 if height * width <= 4096 else np.float64, copy=False)
    mean, variance = _moments(gray.reshape(n, -1))
    brightness = mean / 255.0
    contrast = np.sqrt(variance) / 255.0
    if height >= 3 and width >= 3:
        # Accumulated in place: each temporary of a chunk's stack is a fresh allocation
        # large enough to be page-faulted in on every call.
        laplacian = np.add(gray[:, :-2, 1:-1], gray[:, 2:, 1:-1])
        laplacian += gray[:, 1:-1, :-2]
        laplacian += gray[:, 1:-1, 2:]
        center = np.multiply(gray[:, 1:-1, 1:-1], 4.0)
        laplacian -= center
        _, sharpness = _moments(laplacian.reshape(n, -1))
    else:
        sharpness = np.zeros(n, dtype=np.float64)
    return brightness, contrast, sharpness


def pixel_features(arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The pixel features of canonical uint8 arrays, as numpy columns.

    The core of :func:`compute_features` (which adds file size and format and returns a
    frame); decoding workers call it directly on the arrays they already hold.

    Args:
        arrays: uint8 arrays of shape (H, W) or (H, W, 3).

    Returns:
        ``width``, ``height``, ``channels`` (int64) and ``aspect_ratio``, ``brightness``,
        ``contrast``, ``sharpness`` (float64), one entry per array.
    """
    n = len(arrays)
    shapes = [a.shape for a in arrays]
    heights = np.array([shape[0] for shape in shapes], dtype=np.int64)
    widths = np.array([shape[1] for shape in shapes], dtype=np.int64)
    channels = np.array([1 if len(shape) == 2 else 3 for shape in shapes], dtype=np.int64)
    brightness = np.zeros(n, dtype=np.float64)
    contrast = np.zeros(n, dtype=np.float64)
    sharpness = np.zeros(n, dtype=np.float64)

    if n and len(set(shapes)) == 1 and shapes[0][0] * shapes[0][1] <= _STACK_MAX_PIXELS:
        groups: dict[tuple[int, ...], list[int]] = {shapes[0]: list(range(n))}  # the usual case
    else:
        groups = {}
        for index, shape in enumerate(shapes):
            if shape[0] * shape[1] <= _STACK_MAX_PIXELS:
                groups.setdefault(shape, []).append(index)
            else:
                groups[(-index - 1,)] = [index]  # a group of its own
    for indices in groups.values():
        stack = np.stack([arrays[i] for i in indices]) if len(indices) > 1 else arrays[indices[0]][None]
        b, c, s = _stack_stats(_luma(stack))
        if len(indices) == n:
            brightness, contrast, sharpness = b, c, s
        else:
            brightness[indices] = b
            contrast[indices] = c
            sharpness[indices] = s

    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(heights > 0, widths / np.maximum(heights, 1), np.nan)
    return {
        "width": widths,
        "height": heights,
        "aspect_ratio": aspect.astype(np.float64),
        "channels": channels,
        "brightness": np.asarray(brightness, dtype=np.float64),
        "contrast": np.asarray(contrast, dtype=np.float64),
        "sharpness": np.asarray(sharpness, dtype=np.float64),
    }


def compute_features(
    images: Sequence[Image.Image | np.ndarray],
    file_sizes: Sequence[int | None] | None = None,
    formats: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """Compute the image features of a batch of canonical images.

    Small images of equal shape are stacked and measured together, which keeps the cost per
    image to a few microseconds; large images are measured one by one to bound memory.

    Args:
        images: canonical images, PIL images (any mode; non-L/RGB are converted to RGB) or
            uint8 arrays of shape (H, W) or (H, W, 3).
        file_sizes: source file size per image, or ``None`` when unknown.
        formats: source format name per image (``PNG``, ``JPEG``...), or ``None``.

    Returns:
        One row per image, columns :data:`FEATURE_COLUMNS`, in input order.

    Raises:
        ValueError: an image is not 8-bit or has an unsupported shape, or the side lists do
            not match ``images`` in length.
    """
    n = len(images)
    if file_sizes is not None and len(file_sizes) != n:
        raise ValueError("file_sizes must have one entry per image")
    if formats is not None and len(formats) != n:
        raise ValueError("formats must have one entry per image")
    columns: dict[str, object] = dict(pixel_features([_as_array(image) for image in images]))
    columns["file_size"] = pd.array(list(file_sizes) if file_sizes is not None else [None] * n, dtype="Int64")
    columns["format"] = pd.array(list(formats) if formats is not None else [None] * n, dtype="string")
    return pd.DataFrame(columns, columns=list(FEATURE_COLUMNS))
