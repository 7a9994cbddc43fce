"""Synthetic cleaned datasets for training tests (written per docs/contracts.md).

``digits_dataset`` uses scikit-learn's bundled digits (no download); ``shapes_dataset`` draws
simple shapes in grayscale or RGB at any size, so tests cover other modes and sizes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cvops_dagster.core.storage import ArtifactStorage
from tests.synthetic_data import digits_images, write_cleaned_dataset

SHAPES = ("hbar", "vbar", "circle", "cross", "square", "triangle")


def shape_image(kind: str, size: tuple[int, int], mode: str, rng: np.random.Generator) -> Image.Image:
    """One shape at a random position/scale on a noisy background."""
    width, height = size
    background = rng.integers(0, 60, size=(height, width, 3 if mode == "RGB" else 1), dtype=np.uint8)
    image = Image.fromarray(background.squeeze(-1) if mode == "L" else background, mode=mode)
    draw = ImageDraw.Draw(image)
    s = min(width, height)
    r = int(rng.integers(max(2, s // 5), max(3, s // 3)))
    cx = int(rng.integers(r, width - r))
    cy = int(rng.integers(r, height - r))
    color = tuple(int(c) for c in rng.integers(160, 256, size=3)) if mode == "RGB" else int(rng.integers(160, 256))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif kind == "hbar":
        draw.rectangle((cx - r, cy - max(1, r // 3), cx + r, cy + max(1, r // 3)), fill=color)
    elif kind == "vbar":
        draw.rectangle((cx - max(1, r // 3), cy - r, cx + max(1, r // 3), cy + r), fill=color)
    else:
        t = max(1, r // 4)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=color)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=color)
    return image


def shapes_dataset(
    storage: ArtifactStorage,
    version: str = "shapes",
    n_classes: int = 3,
    per_class: int = 40,
    size: tuple[int, int] = (24, 24),
    mode: str = "L",
    seed: int = 0,
) -> dict:
    """Write ``n_classes`` x ``per_class`` shape images as a cleaned dataset version."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(n_classes):
        for _ in range(per_class):
            images.append(shape_image(SHAPES[k % len(SHAPES)], size, mode, rng))
            labels.append(SHAPES[k % len(SHAPES)] if k < len(SHAPES) else f"{SHAPES[k % len(SHAPES)]}{k}")
    return write_cleaned_dataset(storage, version, images, labels)


def digits_dataset(storage: ArtifactStorage, version: str = "digits", size: int = 32, limit: int | None = None) -> dict:
    """The bundled digits (optionally only the first ``limit``) as a cleaned dataset."""
    images, labels = digits_images(size)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return write_cleaned_dataset(storage, version, images, labels)
