"""Benchmark: the cleaning pass against a bare Pillow open-and-load loop, side by side.

Owns ``cvops bench cleaning``: building its image sets, ingesting them with the product's own
ingestion, and timing :func:`~cvops_dagster.datasets.cleaning.clean_dataset` (safe decoding
in worker processes, normalisation, canonical PNGs, features, hashes, duplicates, splits,
manifest) against a loop that only opens and fully loads each file with Pillow, in one
process on the same files, so the ratios hold on any machine. The sets:

* ``sample``: the 1,797 sklearn digits as 32x32 grayscale PNGs (reported; it measures
  process start-up more than cleaning).
* ``tenx``: each digit in ten encodings (PNG twice, BMP, TIFF twice, GIF, WebP twice, JPEG
  twice): 17,970 files.
* ``large``: colour JPEG and PNG photos of 256 to 512 px a side: seeded random crops,
  rescales, flips and turns of scikit-image's bundled sample photos (none downloaded).
* ``incremental``: a batch of 600 photos added to 6,000 already cleaned (the decode cache,
  kept in the artifact storage, at work) against cleaning all 6,600 from scratch.

The files are made in a child interpreter (scikit-learn and scikit-image never load into the
timed process) and ingested untimed. Each timed cleaning gets a fresh storage holding only
what ingestion wrote (:func:`_copy_storage`), so no run sees another's outputs or cache,
except the incremental run, which sees the base dataset's, cleaned there untimed just before.
``cvops bench cleaning`` loads the Dagster code location first, so the process starting the
decode workers is the size of the Dagster step that cleans (``parent_rss_mb``). Each figure
is the best of ``repeats`` timings, as usual for throughput on a shared machine.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cvops_dagster.core.contracts import IMAGES_PREFIX
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.cleaning import CleaningConfig, CleaningResult, clean_dataset
from cvops_dagster.ingestion.ingest import RAW_MANIFEST_PREFIX, ingest_batch, read_raw_manifests
from cvops_dagster.ingestion.landing import READY_MARKER, LandingZone

logger = logging.getLogger(__name__)

SETS: tuple[str, ...] = ("sample", "tenx", "large", "incremental")
#: ``cvops bench cleaning --quick``: every set, small, to see it work (the figures are noisy).
QUICK: dict[str, Any] = {"digits": 200, "large_count": 300, "incremental_base": 600, "incremental_new": 60, "repeats": 1}

_DIGIT_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("png", "PNG", {"compress_level": 6}), ("png", "PNG", {"compress_level": 1}), ("bmp", "BMP", {}),
    ("tif", "TIFF", {}), ("tif", "TIFF", {"compression": "tiff_adobe_deflate"}), ("gif", "GIF", {}),
    ("webp", "WEBP", {"lossless": True}), ("webp", "WEBP", {"quality": 90}),
    ("jpg", "JPEG", {"quality": 95}), ("jpg", "JPEG", {"quality": 80}),
)  # fmt: skip

#: Colour photos shipped inside the scikit-image package (``skimage/data``), loaded offline.
PHOTO_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
PHOTO_SIDE = (256, 512)


def build_sample_files(folder: Path | str, scale: int = 1, limit: int | None = None) -> list[tuple[Path, str]]:
    """Write the digits as an ImageFolder, ``scale`` variants per digit (1 = plain PNG).

    Args:
        folder: where ``<label>/digit_<index>_<variant>.<ext>`` go.
        scale: variants per digit, 1 to 10.
        limit: the first ``limit`` digits only (``None``: all 1,797).

    Returns:
        ``(path, label)`` per file.
    """
    from cvops_dagster.ingestion.sample_data import digit_images

    if not 1 <= scale <= len(_DIGIT_VARIANTS):
        raise ValueError(f"scale must be between 1 and {len(_DIGIT_VARIANTS)}")
    images, labels = digit_images()
    files: list[tuple[Path, str]] = []
    for index, (array, label) in enumerate(zip(images[:limit], labels[:limit], strict=True)):
        image = Image.fromarray(array, mode="L")
        for variant, (ext, fmt, params) in enumerate(_DIGIT_VARIANTS[:scale]):
            buffer = io.BytesIO()
            image.save(buffer, fmt, **params)
            path = Path(folder) / str(label) / f"digit_{index:04d}_{variant}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())
            files.append((path, str(label)))
    return files


@functools.cache
def _photo_sources() -> dict[str, np.ndarray]:
    import skimage.data  # only in the child that builds the files, never in the timed process

    return {name: getattr(skimage.data, name)() for name in PHOTO_SOURCES}


def _photo(index: int, seed: int, side: tuple[int, int] = PHOTO_SIDE) -> tuple[str, Image.Image, str, str, dict[str, Any]]:
    """Photo ``index``: a random crop of a random source, rescaled to ``side`` px a side (256-512), in one of
    the eight orientations (flips and their compositions), saved as PNG or JPEG; a function of
    ``(seed, index)`` alone, so any split of the indices between processes gives the same files.
    Crops of 50-100% of the source's short side, turned, make <1% near duplicates of 6,600
    (crops of most of a small source, only mirrored, made 24%)."""
    rng = np.random.default_rng([seed, index])
    name = PHOTO_SOURCES[int(rng.integers(len(PHOTO_SOURCES)))]
    source = _photo_sources()[name]
    height, width = (int(length) for length in rng.integers(side[0], side[1] + 1, size=2))
    scale = rng.uniform(0.5, 1.0) * min(source.shape[:2]) / max(height, width)  # source px per output px
    crop_h, crop_w = min(source.shape[0], round(height * scale)), min(source.shape[1], round(width * scale))
    top, left = int(rng.integers(source.shape[0] - crop_h + 1)), int(rng.integers(source.shape[1] - crop_w + 1))
    crop = Image.fromarray(source[top : top + crop_h, left : left + crop_w])
    image = crop.resize((width, height), Image.Resampling.BILINEAR)  # shrinks or enlarges
    orientation = int(rng.integers(8))
    if orientation:
        image = image.transpose(tuple(Image.Transpose)[orientation - 1])
    if rng.random() < 0.5:
        # zlib level 1 keeps the build short; decoding costs about the same at any level.
        return name, image, "png", "PNG", {"compress_level": 1}
    return name, image, "jpg", "JPEG", {"quality": int(rng.integers(75, 96))}


def _write_photos(folder: str, indices: Iterable[int], seed: int, side: tuple[int, int] = PHOTO_SIDE) -> list[tuple[str, str]]:
    written = []
    for index in indices:
        label, image, ext, fmt, params = _photo(index, seed, side)
        path = Path(folder) / label / f"photo_{index:05d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, fmt, **params)
        written.append((str(path), label))
    return written


def build_photo_files(
    folder: Path | str, start: int, stop: int, seed: int = 0, jobs: int = 1, side: Sequence[int] = PHOTO_SIDE
) -> list[tuple[Path, str]]:
    """Write photos ``start`` to ``stop - 1`` as an ImageFolder (label: the source photo's name).

    Args:
        folder: where ``<label>/photo_<index>.<ext>`` go.
        start, stop: the photo indices (the same index always gives the same file).
        seed: the generator's seed.
        jobs: processes writing them.
        side: the smallest and largest side in px (``cvops bench scale`` makes small ones).

    Returns:
        ``(path, label)`` per file, in index order.
    """
    sides = (int(side[0]), int(side[1]))
    chunks = [range(i, min(i + 64, stop)) for i in range(start, stop, 64)]
    _photo_sources()  # loaded once, before forking, so the writers share them
    if jobs <= 1 or len(chunks) <= 1:
        written = [w for chunk in chunks for w in _write_photos(str(folder), chunk, seed, sides)]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = pool.map(_write_photos, [str(folder)] * len(chunks), chunks, [seed] * len(chunks), [sides] * len(chunks))
            written = [w for part in parts for w in part]
    return [(Path(path), label) for path, label in written]


def _build_in_subprocess(function: str, **kwargs: Any) -> None:
    """Call one of this module's builders in a child interpreter: the digits load scikit-learn
    and the photos scikit-image, which a Dagster step that cleans never holds."""
    code = "import json, sys; from cvops_dagster.bench import cleaning as c; getattr(c, sys.argv[1])(**json.loads(sys.argv[2]))"
    result = subprocess.run([sys.executable, "-c", code, function, json.dumps(kwargs)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the benchmark files failed: {result.stderr.strip()[-2000:]}")


def _ingest(landing_root: Path, storage: ArtifactStorage, batches: Sequence[str]) -> pd.DataFrame:
    """Ingest the built batches as the product does; then drop the landing copies (disk)."""
    landing = LandingZone(str(landing_root))
    for batch in batches:
        (landing_root / batch / READY_MARKER).touch()
        ingest_batch(landing, storage, batch)
    shutil.rmtree(landing_root)
    return read_raw_manifests(storage, batch_ids=list(batches))


def _copy_storage(
    source: ArtifactStorage, root: Path, everything: bool = False, linked: Sequence[str] = (IMAGES_PREFIX,)
) -> ArtifactStorage:
    """A new storage at ``root`` holding what ingestion wrote to ``source`` (or all it holds).

    The files under ``linked`` prefixes (raw images; ``cvops bench scale`` adds the canonical
    PNGs) are hard-linked: they are content-addressed and written once by renaming a
    temporary file over the key, never in place, so a run in the copy cannot change them,
    and linking 18k files takes a fraction of a second. Everything else (outputs, the decode
    cache) is copied, whatever way its writer updates it.
    """
    shared = [Path(source.root) / prefix for prefix in linked]

    def link_or_copy(src: str, dst: str) -> None:
        os.link(src, dst) if any(Path(src).is_relative_to(p) for p in shared) else shutil.copy2(src, dst)

    for prefix in ("",) if everything else (IMAGES_PREFIX, RAW_MANIFEST_PREFIX):
        if (Path(source.root) / prefix).exists():
            shutil.copytree(Path(source.root) / prefix, root / prefix, copy_function=link_or_copy)
    return ArtifactStorage(str(root))


def _wait_for_workers(timeout_s: float = 10.0) -> None:
    """Wait until the last pass's workers have exited: a pool may let them exit in the
    background, and the next timed pass should not share the CPUs with them."""
    deadline = time.monotonic() + timeout_s
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.005)


def _timed_clean(
    source: ArtifactStorage, scratch: Path, manifest: pd.DataFrame, config: CleaningConfig, workers: int, everything: bool = False
) -> tuple[float, CleaningResult]:
    """Seconds of one cleaning of ``manifest`` in a copy of ``source`` (see
    :func:`_copy_storage`), and its result."""
    storage = _copy_storage(source, scratch / uuid.uuid4().hex, everything)
    try:
        started = time.perf_counter()
        result = clean_dataset(storage, manifest, config, workers=workers)
        elapsed = time.perf_counter() - started
        _wait_for_workers()
    finally:
        shutil.rmtree(storage.root, ignore_errors=True)
    return elapsed, result


def _best(repeats: int, run: Callable[[], tuple[float, Any]]) -> tuple[float, Any]:
    """The fastest of ``repeats`` runs (seconds) and the last run's result."""
    timings = [run() for _ in range(max(1, repeats))]
    return min(seconds for seconds, _ in timings), timings[-1][1]


def _bare_loop(paths: Sequence[Path]) -> tuple[float, None]:
    """Seconds to open and load each file with Pillow; a file Pillow cannot read is passed over."""
    started = time.perf_counter()
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001, S112 - a broken file must not end the loop
            continue
    return time.perf_counter() - started, None


def _distinct_paths(storage: ArtifactStorage, manifest: pd.DataFrame) -> list[Path]:
    """Each distinct ingested file once, grouped by format (stable within a format): the bare
    loop gets the same decoder locality a format-grouped pass gets."""
    keys = pd.unique(manifest.loc[manifest["status"] == "ingested", "image_key"])
    paths = [storage.local_path(str(key)) for key in keys]
    return sorted((p for p in paths if p is not None), key=lambda p: p.suffix)


def _measure_set(
    ingested: ArtifactStorage, scratch: Path, manifest: pd.DataFrame, workers: Sequence[int], repeats: int, config: CleaningConfig
) -> dict[str, Any]:
    """Bare-loop and cleaning rates on one set, and their ratios (cleaning rate / bare rate)."""
    paths = _distinct_paths(ingested, manifest)
    bare_s, _ = _best(repeats, lambda: _bare_loop(paths))
    figures: dict[str, Any] = {"files": len(manifest), "distinct_files": len(paths)}
    figures.update(bare_seconds=bare_s, bare_images_per_s=len(paths) / bare_s)
    for count in workers:
        seconds, result = _best(repeats, lambda n=count: _timed_clean(ingested, scratch, manifest, config, n))
        suffix = "1_worker" if count == 1 else f"{count}_workers"
        figures[f"cleaning_seconds_{suffix}"] = seconds
        figures[f"cleaning_images_per_s_{suffix}"] = len(paths) / seconds
        figures[f"ratio_{suffix}"] = figures[f"cleaning_images_per_s_{suffix}"] / figures["bare_images_per_s"]
        figures["outcomes"] = {k: v for k, v in result.counts.items() if k != "input"}
    return figures


def _measure_incremental(
    ingested: ArtifactStorage, scratch: Path, base: pd.DataFrame, both: pd.DataFrame, workers: int, repeats: int, config: CleaningConfig
) -> dict[str, Any]:
    """Cleaning ``both`` in a copy of a storage where ``base`` was cleaned, against from scratch."""
    full_s, _ = _best(repeats, lambda: _timed_clean(ingested, scratch, both, config, workers))
    cleaned = _copy_storage(ingested, scratch / "base")
    clean_dataset(cleaned, base, config, workers=workers)
    _wait_for_workers()
    incremental_s, result = _best(repeats, lambda: _timed_clean(cleaned, scratch, both, config, workers, True))
    return {
        "base_files": len(base), "new_files": len(both) - len(base), "workers": workers,
        "full_seconds": full_s, "seconds": incremental_s, "speedup": full_s / incremental_s,
        "outcomes": {k: v for k, v in result.counts.items() if k != "input"},
    }  # fmt: skip


def _prepare_digits(work: Path, digits: int | None) -> tuple[ArtifactStorage, pd.DataFrame]:
    """The ten-variant digits, ingested as batch ``tenx``; variant 0 is the sample set's PNG."""
    _build_in_subprocess("build_sample_files", folder=str(work / "landing-digits" / "tenx"), scale=10, limit=digits)
    storage = ArtifactStorage(str(work / "digits"))
    return storage, _ingest(work / "landing-digits", storage, ["tenx"])


def _prepare_photos(work: Path, batches: dict[str, tuple[int, int]], seed: int) -> tuple[ArtifactStorage, pd.DataFrame]:
    """Photo batches (name -> index range), ingested; rows in photo-index order."""
    for batch, (start, stop) in batches.items():
        folder = str(work / "landing-photos" / batch)
        _build_in_subprocess("build_photo_files", folder=folder, start=start, stop=stop, seed=seed, jobs=os.cpu_count() or 1)
    storage = ArtifactStorage(str(work / "photos"))
    manifest = _ingest(work / "landing-photos", storage, list(batches))
    order = manifest["path"].str.rsplit("/", n=1).str[-1]
    return storage, manifest.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


def _photo_batches(large_count: int, base: int, new: int, sets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The large set is the first ``large_count`` photos; the incremental base and new batch
    the first ``base`` and the next ``new``: built once, shared."""
    total = max(large_count if "large" in sets else 0, base + new if "incremental" in sets else 0)
    if "incremental" not in sets:
        return {"photos": (0, total)} if total else {}
    batches = {"base": (0, base), "new": (base, base + new)}
    if total > base + new:
        batches["extra"] = (base + new, total)
    return batches


def _rss_mb() -> float | None:
    """This process's resident memory in MB (Linux): forking workers costs more from a larger one."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def run_cleaning_benchmark(
    *, digits: int | None = None, large_count: int = 2000, incremental_base: int = 6000, incremental_new: int = 600,
    workers: Sequence[int] = (1, 2), repeats: int = 3, sets: Sequence[str] = SETS,
    config: CleaningConfig = CleaningConfig(), seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Time the cleaning pass against a bare Pillow loop on each set; see the module docstring.

    Args:
        digits: digits in the ``sample`` and ``tenx`` sets (``None``: all 1,797).
        large_count: photos in the ``large`` set.
        incremental_base, incremental_new: photos already cleaned, and in the new batch.
        workers: worker counts the sets are cleaned with; the incremental case uses the largest.
        repeats: timings of each figure; the fastest is kept.
        sets: which of :data:`SETS` to run.
        config: cleaning settings.
        seed: the photo generator's seed.

    Returns:
        One flat dict: per set ``<set>_bare_images_per_s``, ``<set>_ratio_1_worker``,
        ``<set>_ratio_2_workers`` (cleaning rate / bare rate, on the same distinct files),
        ``<set>_cleaning_images_per_s_<n>_worker(s)``, seconds, file counts and outcomes;
        ``incremental_speedup`` (full re-clean seconds / incremental seconds) with its
        seconds; ``parent_rss_mb``, ``load_average_1m`` and ``prepare_seconds`` (untimed build).
    """
    unknown = set(sets) - set(SETS)
    if unknown:
        raise ValueError(f"unknown benchmark sets {sorted(unknown)}; choose from {list(SETS)}")
    work = Path(tempfile.mkdtemp(prefix="cvops-cleaning-bench-"))
    figures: dict[str, Any] = {"repeats": repeats}
    try:
        started = time.perf_counter()
        results: dict[str, dict[str, Any]] = {}
        photo_batches = _photo_batches(large_count, incremental_base, incremental_new, sets)
        digit_store, digit_rows = _prepare_digits(work, digits) if {"sample", "tenx"} & set(sets) else (None, None)
        photo_store, photo_rows = _prepare_photos(work, photo_batches, seed) if photo_batches else (None, None)
        figures["prepare_seconds"] = time.perf_counter() - started
        figures["parent_rss_mb"] = _rss_mb()
        # Other processes on the machine skew the parallel figures most: record the load.
        figures["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        store, rows = (digit_store, digit_rows) if digit_store is not None else (photo_store, photo_rows)
        if store is not None:  # untimed warm-up: first imports and calls in this process
            _timed_clean(store, work / "warm-up", rows.head(16), config, 1)
        scratch = work / "runs"
        if digit_store is not None:
            sample = digit_rows[digit_rows["path"].str.endswith("_0.png")]
            for name, manifest in (("sample", sample), ("tenx", digit_rows)):
                if name in sets:
                    results[name] = _measure_set(digit_store, scratch, manifest, workers, repeats, config)
        if "large" in sets and photo_store is not None:
            large = photo_rows.head(large_count)
            results["large"] = _measure_set(photo_store, scratch, large, workers, repeats, config)
            results["large"]["formats"] = large["ext"].value_counts().to_dict()
        if "incremental" in sets and photo_store is not None:
            base_rows = photo_rows[photo_rows["batch_id"] == "base"]
            both_rows = photo_rows[photo_rows["batch_id"].isin(["base", "new"])]
            results["incremental"] = _measure_incremental(
                photo_store, scratch, base_rows, both_rows, max(workers), repeats, config
            )
        for name, part in results.items():
            figures.update({f"{name}_{key}": value for key, value in part.items()})
        logger.info("cleaning benchmark: %s", figures)
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["PHOTO_SOURCES", "QUICK", "SETS", "build_photo_files", "build_sample_files", "run_cleaning_benchmark"]
