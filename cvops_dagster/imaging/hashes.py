"""Image hashes: exact (decoded-pixel) and perceptual, computed once per decoded image.

Cleaning uses them to find exact and near duplicates (:mod:`cvops_dagster.datasets.duplicates`);
they are image facts, so they live with decoding and are computed in the decode workers.

The perceptual hash (pHash) is the sign of the 8x8 lowest DCT frequencies of a 32x32
box-filtered luma thumbnail against their median; a 16x16 thumbnail is kept beside it to
confirm candidate pairs.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image


THUMB_SIZE = 32
"""Side of the luma thumbnail the perceptual hash is computed from."""
COMPARE_SIZE = 16
"""Side of the thumbnail used to confirm a near-duplicate candidate."""


@lru_cache(maxsize=1)
def _dct_rows(n: int = THUMB_SIZE, k: int = 8) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n``."""
    freq = np.arange(k)[:, None]
    pos = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * pos + 1) * freq / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


def low_frequencies(thumbs: np.ndarray) -> np.ndarray:
    """The 8x8 lowest DCT-II coefficients of each 32x32 thumbnail, as float32 (N, 64).

    ``dct @ X @ dct.T`` per thumbnail as a batched matmul, so each thumbnail's coefficients
    are exactly the same whatever else is in the batch: one large product over the stacked
    batch rounds differently with the batch size, which flipped pHash bits of near-flat
    images between chunks of the decode workers (and between cached and fresh facts).
    """
    stack = np.asarray(thumbs).reshape(-1, THUMB_SIZE, THUMB_SIZE).astype(np.float32)
    dct = _dct_rows()
    return np.matmul(np.matmul(dct, stack), dct.T).reshape(stack.shape[0], 64)


def perceptual_hashes(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Perceptual hashes and comparison thumbnails of 32x32 luma thumbnails.

    Args:
        thumbs: uint8 or float array (N, 32, 32): box-downscaled luma of each image.

    Returns:
        ``(phash, compare)``: uint64 array (N,) of 64-bit pHashes, and uint8 array
        (N, 16, 16) of 2x2-averaged thumbnails for confirming candidates.
    """
    raw = np.asarray(thumbs).reshape(-1, THUMB_SIZE, THUMB_SIZE)
    n = raw.shape[0]
    low = low_frequencies(raw)
    # The median of the 63 AC terms (DC excluded, as in pHash) is the 32nd smallest.
    median = np.sort(low[:, 1:], axis=1)[:, 31:32]
    bits = np.packbits(low > median, axis=1, bitorder="little")  # bit k = coefficient k
    phash = np.ascontiguousarray(bits).view("<u8").reshape(n).astype(np.uint64)
    # 2x2 means by four strided sums (a reshape-and-mean over two axes is ~10x slower).
    wide = raw.astype(np.float32) if raw.dtype != np.uint8 else raw.astype(np.uint16)
    total = wide[:, 0::2, 0::2] + wide[:, 1::2, 0::2] + wide[:, 0::2, 1::2] + wide[:, 1::2, 1::2]
    compare = np.rint(total.astype(np.float32) * 0.25)
    return phash, compare.astype(np.uint8)


def pixel_hash(image: Image.Image | np.ndarray) -> str:
    """Hash of the decoded pixels (mode, size and bytes): equal for lossless re-encodes.

    Accepts the canonical image or its uint8 array ((H, W) is "L", (H, W, 3) is "RGB").
    """
    array = image if type(image) is np.ndarray and image.flags.c_contiguous else np.ascontiguousarray(np.asarray(image))
    prefix = _HASH_PREFIXES.get(array.shape)
    if prefix is None:
        mode = "L" if array.ndim == 2 else "RGB"
        prefix = hashlib.blake2b(f"{mode}:{array.shape[1]}x{array.shape[0]}:".encode(), digest_size=16)
        if len(_HASH_PREFIXES) < 4096:
            _HASH_PREFIXES[array.shape] = prefix
    digest = prefix.copy()
    digest.update(array.data)
    return digest.hexdigest()


# BLAKE2b states that have hashed the mode-and-size header, by array shape (copied per image).
_HASH_PREFIXES: dict[tuple[int, ...], Any] = {}
