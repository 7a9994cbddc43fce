"""Bundled sample data: scikit-learn's 1,797 handwritten digits as a three-batch landing zone.

The digits ship inside scikit-learn, so seeding needs no download. Each 8x8 image (values
0..16) is scaled to 0..255 and upscaled to 32x32 grayscale, the smallest size at which a
small CNN has room for a few pooling stages.

The digits are split once, by a fixed rule (:func:`labelled_and_production_indices`), into the
labelled part written here as batches and a production pool that only the production stream
(:mod:`cvops_dagster.monitoring.sample_stream`) uses, so the model never trains on a digit it
later meets in production. The rule lives here because ingestion may not import monitoring.
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
#: A digit whose rank among the digits of its class (in dataset order), modulo
#: :data:`POOL_PERIOD`, is one of :data:`POOL_SLOTS` belongs to the production pool: 3 in 8
#: (about 37%, 673 digits), spread over the whole dataset and every class.
POOL_PERIOD = 8
POOL_SLOTS = frozenset({1, 4, 6})


def digit_images(size: int = SAMPLE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 ``size`` x ``size`` arrays and their integer labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for raw in digits.images:
        small = Image.fromarray(np.clip(raw * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
        images.append(np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(images), digits.target.astype(int)


def class_ranks(labels: np.ndarray) -> np.ndarray:
    """Each item's rank among the items of its label, in order (0 for the first ``3``, ...)."""
    labels = np.asarray(labels)
    ranks = np.zeros(len(labels), dtype=int)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        ranks[where] = np.arange(len(where))
    return ranks


def labelled_and_production_indices(labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of the digit indices into the labelled part and the production pool.

    Stratified by class: a digit goes to the pool when its rank within its class falls on
    one of :data:`POOL_SLOTS` (modulo :data:`POOL_PERIOD`), so every digit is in both parts in
    the same proportion and the pool samples the whole dataset (writers included), not a block
    of it. Deterministic: no random number is drawn.

    Args:
        labels: the digits' labels; ``None`` loads the bundled ones (:func:`digit_images`).

    Returns:
        ``(labelled, pool)``: sorted, disjoint index arrays covering every digit.
    """
    if labels is None:
        labels = digit_labels()
    in_pool = np.isin(class_ranks(labels) % POOL_PERIOD, sorted(POOL_SLOTS))
    return np.flatnonzero(~in_pool), np.flatnonzero(in_pool)


def labelled_batches(labels: np.ndarray, batches: tuple[str, ...] = SAMPLE_BATCHES) -> dict[str, np.ndarray]:
    """The labelled digits dealt into ``batches``: the ``k``-th labelled digit of a class goes
    to batch ``k % len(batches)``, so every batch holds every digit in about equal numbers."""
    labelled, _ = labelled_and_production_indices(labels)
    turn = class_ranks(labels[labelled]) % len(batches)
    return {batch: labelled[turn == b] for b, batch in enumerate(batches)}


def digit_labels() -> np.ndarray:
    """The digits' integer labels alone (cheaper than :func:`digit_images`)."""
    from sklearn.datasets import load_digits

    return load_digits().target.astype(int)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def seed_landing(root: str, endpoint_url: str | None = None, batches: tuple[str, ...] = SAMPLE_BATCHES) -> dict[str, int]:
    """Write the labelled digits into ``root`` as complete batches (``_READY`` written last).

    Only the labelled part of :func:`labelled_and_production_indices` is written (the
    production pool is the production stream's); :func:`labelled_batches` deals it so that
    every batch holds every digit. Files are ``<batch>/<label>/digit_<index>.png``.

    Returns:
        The number of images written per batch.
    """
    protocol, base = split_protocol(root)
    fs = open_filesystem(protocol, endpoint_url)
    images, labels = digit_images()
    counts: dict[str, int] = {}
    for batch, indices in labelled_batches(labels, batches).items():
        for i in indices:
            path = f"{base}/{batch}/{labels[i]}/digit_{i:04d}.png"
            if protocol == "file":
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(path, png_bytes(images[i]))
        fs.pipe_file(f"{base}/{batch}/{READY_MARKER}", b"")
        counts[batch] = len(indices)
        logger.info("seeded %s with %d images", batch, counts[batch])
    return counts
