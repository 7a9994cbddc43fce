"""Bundled sample data: scikit-learn's 1,797 handwritten digits as a three-batch landing zone.

The digits ship inside scikit-learn, so seeding needs no download. Each 8x8 image (values
0..16) is scaled to 0..255 and upscaled to 32x32 grayscale, the smallest size at which a
small CNN has room for a few pooling stages.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from cvops_dagster.ingestion.landing import READY_MARKER
from cvops_dagster.core.storage import open_filesystem, split_protocol

logger = logging.getLogger(__name__)

SAMPLE_SIZE = 32
SAMPLE_BATCHES = ("batch_001", "batch_002", "batch_003")


def digit_images(size: int = SAMPLE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 ``size`` x ``size`` arrays and their integer labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for raw in digits.images:
        small = Image.fromarray(np.clip(raw * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        images.append(np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(images), digits.target.astype(int)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def seed_landing(root: str, endpoint_url: str | None = None, batches: tuple[str, ...] = SAMPLE_BATCHES) -> dict[str, int]:
    """Write the digits into ``root`` as complete batches (``_READY`` written last).

    Image ``i`` goes to batch ``i % len(batches)``, so every batch holds every digit.
    Returns the number of files written per batch.
    """
    protocol, base = split_protocol(root)
    fs = open_filesystem(protocol, endpoint_url)
    images, labels = digit_images()
    counts: dict[str, int] = {}
    for b, batch in enumerate(batches):
        indices = range(b, len(images), len(batches))
        for i in indices:
            path = f"{base}/{batch}/{labels[i]}/digit_{i:04d}.png"
            if protocol == "file":
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(path, png_bytes(images[i]))
        fs.pipe_file(f"{base}/{batch}/{READY_MARKER}", b"")
        counts[batch] = len(indices)
        logger.info("seeded %s with %d images", batch, counts[batch])
    return counts
