"""Exact and near-duplicate detection for decoded images (numpy only, no imagehash).

Exact duplicates share the hash of their decoded pixels (mode, size and pixel bytes), so a
PNG and a lossless re-encode of it as BMP or TIFF are one image. Near duplicates are found
in two stages:

1. a 64-bit perceptual hash (pHash: the sign of the 8x8 lowest DCT frequencies of a 32x32
   box-filtered luma thumbnail against their median) within a Hamming threshold proposes
   candidate pairs;
2. each candidate is confirmed only if the mean absolute difference of the two 16x16 luma
   thumbnails is small.

Why two stages: on tiny images of similar shapes (the 8x8 sklearn digits upscaled to
32x32) any hash alone either misses JPEG re-encodes or merges distinct digits. Measured on
all 1,797 ``load_digits`` images: pHash within 6 bits pairs up about 20% of the distinct
digits, but their thumbnail MAE is never below 7.5 grey levels; JPEG re-encodes down to
quality 30 stay within 6 bits and below 2.8 levels. The defaults (6 bits, 4.0 levels) flag
none of the distinct digits and every one of those re-encodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NearDuplicateConfig:
    """Thresholds for near duplicates.

    Attributes:
        hamming_threshold: the largest pHash Hamming distance (of 64 bits) for a candidate;
            a negative value turns near-duplicate detection off.
        max_thumbnail_mae: the largest mean absolute difference, in grey levels (0-255),
            between the 16x16 thumbnails of a confirmed pair.
    """

    hamming_threshold: int = 6
    max_thumbnail_mae: float = 4.0


def _candidate_pairs(phash: np.ndarray, threshold: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``(i, j)``, ``i < j``, whose hashes differ in at most ``threshold`` bits.

    Pairs come sorted by ``(i, j)``. Equal hashes are frequent (re-encodes of one image,
    and tiny similar images such as digits), and the banded search below costs about the
    square of a band's crowding: so the search runs on the distinct hash values and its
    pairs are expanded to the images holding them (measured on the 10x digits set: 7,188
    images, 2,348 distinct hashes, 45 ms -> a few ms).
    """
    phash = np.asarray(phash, dtype=np.uint64)
    n = len(phash)
    if n < 2 or threshold < 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values, inverse = np.unique(phash, return_inverse=True)
    if len(values) == n:
        return _value_pairs(phash, threshold, block)
    members = np.argsort(inverse, kind="stable")  # image indices grouped by value
    sizes = np.bincount(inverse, minlength=len(values))
    starts = np.cumsum(sizes) - sizes
    ga, gb = _value_pairs(values, threshold, block)
    repeated = np.flatnonzero(sizes > 1)  # a value held by several images pairs with itself
    ga = np.concatenate([ga, repeated])
    gb = np.concatenate([gb, repeated])
    widths = sizes[gb]
    products = sizes[ga] * widths
    total = int(products.sum())
    if not total:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    which = np.repeat(np.arange(len(ga)), products)
    local = np.arange(total) - np.repeat(np.cumsum(products) - products, products)
    a = members[starts[ga][which] + local // widths[which]]
    b = members[starts[gb][which] + local % widths[which]]
    same = ga[which] == gb[which]
    keep = ~same | (a < b)  # within one value: each unordered pair once, no self pairs
    a, b = a[keep], b[keep]
    code = np.sort(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
    return code // n, code % n


#: Bands up to this many bits are looked up in a table of every value (2**bits entries).
_TABLE_BITS = 20
#: Cost of one probe of one hash in one band, in units of one candidate pair checked (both a
#: few numpy passes over an array; measured on this machine within a factor of two).
_PROBE_COST = 1.0


def _band_layout(n: int, threshold: int) -> tuple[int, int] | None:
    """``(bands, radius)`` of the cheapest banded search of ``n`` distinct hashes, or ``None``
    when the bands would be narrower than 8 bits (the plain comparison is then cheaper).

    Two hashes within ``threshold`` bits differ in at most ``threshold // bands`` bits in
    one of ``bands`` disjoint bands (pigeonhole): ``radius``. Radius 0 (``threshold + 1``
    exact bands) needs no probing but its narrow bands make candidates that grow with the
    square of ``n`` (pairs sharing a band value by chance: 2**-9 per band for 7 bands of 9
    bits, so ~100 million at 120k hashes); radius 1 has half as many bands, twice as wide,
    and probes each hash's band value with each bit flipped. The estimate is for hashes
    spread evenly, which pHashes of distinct images nearly are.
    """
    best: tuple[float, int, int] | None = None
    for radius in (0, 1):
        bands = threshold // (radius + 1) + 1
        widths = [len(range(band, 64, bands)) for band in range(bands)]
        if min(widths) < 8 or (radius and max(widths) > _TABLE_BITS):
            continue
        probes = [sum(math.comb(width, bits) for bits in range(radius + 1)) for width in widths]
        chance = sum(p / 2.0**w for p, w in zip(probes, widths, strict=True))
        cost = n * (n - 1) / 2 * chance + _PROBE_COST * n * sum(probes)
        if best is None or cost < best[0]:
            best = (cost, bands, radius)
    return None if best is None else best[1:]


def _value_pairs(phash: np.ndarray, threshold: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``(i, j)``, ``i < j``, whose hashes differ in at most ``threshold`` bits.

    Pairs come sorted by ``(i, j)``. Uses the pigeonhole principle (multi-index hashing):
    split the 64 bits into bands (see :func:`_band_layout`); two hashes within the threshold
    are within ``radius`` bits on at least one band, so only hashes whose band values are
    that close are compared. That is near-linear instead of quadratic; when bands are too
    narrow or too crowded to help it falls back to comparing every pair. Bands interleave
    the bits (band ``k`` holds bits ``k, k + bands, ...``): the lowest DCT coefficients
    agree most often between similar images, and contiguous bands put them all in one
    crowded band (measured on the digits: half the candidate pairs of contiguous bands).
    """
    phash = np.asarray(phash, dtype=np.uint64)
    n = len(phash)
    if n < 2 or threshold < 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    layout = _band_layout(n, threshold)
    if layout is not None:
        bands, radius = layout
        bits = np.unpackbits(phash.astype("<u8").view(np.uint8).reshape(n, 8), axis=1, bitorder="little")
        firsts, seconds = [], []
        total = 0
        for band in range(bands):
            packed = np.packbits(bits[:, band::bands], axis=1, bitorder="little")
            padded = np.zeros((n, 8), dtype=np.uint8)
            padded[:, : packed.shape[1]] = packed
            values = padded.view("<u8").reshape(n)
            order = np.argsort(values, kind="stable")
            ordered = values[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
            ends = np.r_[starts[1:], n]
            run_end = np.repeat(ends, ends - starts)
            # Equal band values: each hash with the later members of its run.
            matches = [(order, np.arange(1, n + 1), run_end - np.arange(n) - 1)]
            if radius:  # band values one bit apart: looked up in a table of every value
                tallies = np.bincount(values.astype(np.intp), minlength=1 << len(range(band, 64, bands)))
                first_at = np.cumsum(tallies) - tallies
                for bit in range(len(range(band, 64, bands))):
                    target = (values ^ np.uint64(1 << bit)).astype(np.intp)
                    matches.append((np.arange(n), first_at[target], tallies[target]))
            for source, at, counts in matches:
                pairs = int(counts.sum())
                total += pairs
                if total > n * (n - 1) // 4:  # crowded bands: the plain comparison is cheaper
                    break
                if not pairs:
                    continue
                # `source[k]` meets the `counts[k]` hashes at `order[at[k]:at[k] + counts[k]]`.
                offsets = np.repeat(at - np.cumsum(counts) + counts, counts) + np.arange(pairs)
                a, b = np.repeat(source, counts), order[offsets]
                close = np.bitwise_count(phash[a] ^ phash[b]) <= threshold  # few survive: keep only them
                a, b = a[close], b[close]
                firsts.append(np.minimum(a, b))
                seconds.append(np.maximum(a, b))
            else:
                continue
            break
        else:
            if not firsts:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            i, j = np.concatenate(firsts), np.concatenate(seconds)
            code = np.sort(i.astype(np.int64) * n + j)
            code = code[np.r_[True, code[1:] != code[:-1]]] if len(code) else code  # found in several bands
            return code // n, code % n
    firsts, seconds = [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = phash[start:stop, None]
        cols = phash[None, start:]
        close = np.bitwise_count(rows ^ cols) <= threshold
        # keep the strict upper triangle: column index (offset by start) > row index
        close &= np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]
        i, j = np.nonzero(close)
        firsts.append(i + start)
        seconds.append(j + start)
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def find_duplicates(
    pixel_hashes: Sequence[str],
    phash: np.ndarray,
    compare: np.ndarray,
    config: NearDuplicateConfig = NearDuplicateConfig(),
) -> tuple[np.ndarray, list[str | None]]:
    """Group images into duplicates, keeping the first of each group.

    Items are taken in the given order, so the caller decides which copy survives (cleaning
    orders by ingestion time, keeping existing samples stable when batches are added).
    Near duplicates use leader clustering: an image joins the closest earlier kept image
    within the thresholds, never a duplicate, so chains of small differences cannot merge
    distinct images.

    Args:
        pixel_hashes: hash of the decoded pixels per image.
        phash: uint64 pHash per image (see :func:`cvops_dagster.imaging.hashes.perceptual_hashes`).
        compare: uint8 (N, 16, 16) comparison thumbnails.
        config: near-duplicate thresholds.

    Returns:
        ``(keep, kind)``: ``keep[i]`` is the index of the image that ``i`` duplicates
        (``i`` itself for kept images); ``kind[i]`` is ``"exact"``, ``"near"`` or ``None``.
    """
    n = len(pixel_hashes)
    if len(phash) != n or len(compare) != n:
        raise ValueError("pixel_hashes, phash and compare must have the same length")
    keep = np.arange(n, dtype=np.int64)
    kind: list[str | None] = [None] * n
    if n == 0:
        return keep, kind

    code_of: dict[str, int] = {}
    codes = np.fromiter((code_of.setdefault(h, len(code_of)) for h in pixel_hashes), dtype=np.int64, count=n)
    # Codes are numbered in order of first appearance: the first image of code c is kept.
    running = np.maximum.accumulate(codes)
    first = np.flatnonzero(np.r_[True, running[1:] > running[:-1]])
    keep = first[codes]
    kinds = np.full(n, None, dtype=object)
    kinds[keep != np.arange(n)] = "exact"

    if config.hamming_threshold < 0:
        return keep, kinds.tolist()
    reps = np.sort(first)  # one image per distinct pixel content, in input order
    a, b = _candidate_pairs(np.asarray(phash, dtype=np.uint64)[reps], config.hamming_threshold)
    if len(a):
        # Integer sums of absolute differences (exact, and cheaper than float means); the
        # MAE is that sum over the pixel count, compared and ordered the same way.
        thumbs = np.asarray(compare)[reps].reshape(len(reps), -1)
        if thumbs.dtype == np.uint8:
            thumbs = thumbs.astype(np.int16)
            mae = np.abs(thumbs[a] - thumbs[b]).sum(axis=1, dtype=np.int32) / thumbs.shape[1]
        else:  # float thumbnails from another source
            thumbs = thumbs.astype(np.float32)
            mae = np.abs(thumbs[a] - thumbs[b]).mean(axis=1)
        ok = mae <= config.max_thumbnail_mae
        a, b, mae = a[ok], b[ok], mae[ok]
    leader = np.arange(len(reps), dtype=np.int64)  # index into reps
    if len(a):
        order = np.lexsort((mae, b))  # by later item, then closest first
        for first_i, second_i in zip(a[order].tolist(), b[order].tolist(), strict=True):
            if leader[second_i] != second_i:
                continue  # already joined a closer leader
            if leader[first_i] == first_i:  # join kept images only, never a duplicate
                leader[second_i] = first_i
    target_of = np.arange(n, dtype=np.int64)
    target_of[reps] = reps[leader]
    final = target_of[keep]
    kinds[(final != keep) & (kinds == None)] = "near"  # noqa: E711 - element-wise test
    return final, kinds.tolist()
