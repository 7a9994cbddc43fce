"""The decode step of cleaning: facts of every distinct raw image, cached or decoded now.

For each distinct raw key, the facts come from the decode cache when its sample id is known
under the current policy (:mod:`cvops_dagster.datasets.decode_cache`); the other files are
decoded in the sandbox (:mod:`cvops_dagster.imaging.sandbox`). Workers read local files: on
a local storage the raw files themselves, and they write canonical PNGs straight into
``canonical/``; on a remote storage (``s3://``) the raw files are first copied into a
scratch folder, which also receives the canonical PNGs (cleaning uploads the ones it keeps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cvops_dagster.core.contracts import CANONICAL_PREFIX
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.decode_cache import CacheStats, DecodeCache
from cvops_dagster.imaging.policy import DecodeConfig
from cvops_dagster.imaging.sandbox import DecodedFiles, PoolStats, decode_files

logger = logging.getLogger(__name__)

KEEP_PIXELS_BYTES = 64 * 64 * 3
"""Images up to this many bytes of canonical pixels come back from the workers as pixels and
are encoded only if they end up clean (duplicates never need a canonical file); larger ones
are encoded by the workers, in parallel."""


@dataclass
class ImageFacts:
    """Decode facts of the distinct raw keys of one cleaning run.

    Attributes:
        facts: one row per key, in the order asked: ``key``, ``sample_id`` and the
            decode facts (see :func:`~cvops_dagster.imaging.facts.facts_frame`).
        pixels: kept canonical pixels of small images decoded now, else ``None``.
        fresh: which rows were decoded in this run (the others came from the cache).
        out_dir: the local folder the workers wrote canonical PNGs into.
        pool, cache: what the sandbox and the cache did.
        learnt: which rows got a canonical PNG name after decoding (the caller sets it):
            with the fresh rows, what the cache is told at the end of the run.
    """

    facts: pd.DataFrame
    pixels: list[np.ndarray | None]
    fresh: np.ndarray
    out_dir: Path
    pool: PoolStats = field(default_factory=PoolStats)
    cache: CacheStats = field(default_factory=CacheStats)
    learnt: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __post_init__(self) -> None:
        if len(self.learnt) != len(self.facts):
            self.learnt = np.zeros(len(self.facts), dtype=bool)


def output_dir(storage: ArtifactStorage, scratch: Path | None) -> Path:
    """Where workers write canonical PNGs: ``canonical/`` itself on a local storage."""
    local = storage.local_path(CANONICAL_PREFIX)
    if local is not None:
        return local
    assert scratch is not None, "a remote storage needs a scratch folder"
    return scratch / CANONICAL_PREFIX


def decode_keys(
    storage: ArtifactStorage,
    keys: list[str],
    config: DecodeConfig,
    workers: int | None,
    scratch: Path | None,
    keep_pixels_up_to: int = KEEP_PIXELS_BYTES,
) -> DecodedFiles:
    """Decode the raw files at ``keys`` in the sandbox (see :func:`decode_files`).

    Raises:
        ValueError: a key is not a valid artifact key (it could reach outside the storage).
    """
    if storage.is_local:
        items = [(key, storage.uri(key)) for key in keys]  # a local file's path; validates each key
    else:
        assert scratch is not None, "a remote storage needs a scratch folder"
        (scratch / "raw").mkdir(parents=True, exist_ok=True)

        def stage(numbered: tuple[int, str]) -> tuple[str, str]:
            n, key = numbered
            target = scratch / "raw" / str(n)
            try:
                target.write_bytes(storage.read_bytes(key))
            except FileNotFoundError:
                pass  # the worker reports the missing file as `missing_image`
            return key, str(target)

        # Downloads overlap on a bounded thread pool (one GET each).
        items = storage.map_transfers(stage, list(enumerate(keys)))
    return decode_files(items, output_dir(storage, scratch), config, workers, keep_pixels_up_to=keep_pixels_up_to)


def gather_facts(
    storage: ArtifactStorage,
    keys: list[str],
    sample_ids: list[str | None],
    config: DecodeConfig,
    workers: int | None,
    scratch: Path | None,
    use_cache: bool = True,
) -> ImageFacts:
    """Decode facts of every key: from the cache where known, decoded in the sandbox else.

    Args:
        storage: the artifact storage holding the raw files.
        keys: distinct raw keys.
        sample_ids: the sample id (sha256 of the bytes) of each key, ``None`` if unknown.
        config: decode settings.
        workers: decode processes (``None``: one per core).
        scratch: a local folder for a remote storage's files (``None`` when local).
        use_cache: read the decode cache (results are the same either way).

    Returns:
        The facts in the order of ``keys``; the caller saves the fresh ones to the cache
        once it knows which canonical PNGs it published (see :func:`save_to_cache`).
    """
    cache = DecodeCache(storage, config)
    cached = cache.load([s for s in sample_ids if s]) if use_cache and keys else None
    known = set() if cached is None else set(cached["sample_id"])
    fresh = np.array([sample_id not in known for sample_id in sample_ids], dtype=bool).reshape(-1)
    to_decode = [key for key, new in zip(keys, fresh.tolist(), strict=True) if new]
    decoded = decode_keys(storage, to_decode, config, workers, scratch)
    stats = CacheStats(hits=int((~fresh).sum()), decoded=len(to_decode), policy_key=cache.key)
    parts = [decoded.facts.drop(columns="key")]
    if cached is not None and len(known):
        by_id = cached.drop(columns="sample_id").set_index(cached["sample_id"])
        parts.append(by_id.loc[[s for s, new in zip(sample_ids, fresh.tolist(), strict=True) if not new]])
    # Fresh rows first, then cached ones; put back in the order of `keys`.
    rows = np.concatenate([np.flatnonzero(fresh), np.flatnonzero(~fresh)])
    facts = pd.concat([part.reset_index(drop=True) for part in parts], ignore_index=True)
    facts = facts.iloc[np.argsort(rows, kind="stable")].reset_index(drop=True)
    facts.insert(0, "sample_id", pd.Series(sample_ids, dtype=object))
    facts.insert(0, "key", pd.Series(keys, dtype=object))
    pixels: list[np.ndarray | None] = [None] * len(keys)
    for row, array in zip(np.flatnonzero(fresh).tolist(), decoded.pixels, strict=True):
        pixels[row] = array
    if stats.hits:
        logger.info("decode cache %s: %d files known, %d to decode", cache.key, stats.hits, stats.decoded)
    return ImageFacts(facts, pixels, fresh, output_dir(storage, scratch), decoded.stats, stats)


def save_to_cache(storage: ArtifactStorage, config: DecodeConfig, gathered: ImageFacts) -> None:
    """Tell the decode cache what this run learnt: facts decoded now, and canonical PNG names
    made now for files known before (see :class:`DecodeCache`)."""
    new = gathered.facts[gathered.fresh | gathered.learnt]
    if len(new):
        gathered.cache.written = DecodeCache(storage, config).save(new)
