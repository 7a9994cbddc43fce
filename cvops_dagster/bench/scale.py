"""Benchmark: what adding one batch costs, against the size of the dataset it joins.

Owns ``cvops bench scale``. For each size ``n`` (default 6,000, 60,000 and 120,000 images) a
dataset of ``n`` small colour photos (16-32 px a side, JPEG and PNG: the generator of
``cvops bench cleaning``, :func:`~cvops_dagster.bench.cleaning.build_photo_files`) is built
untimed, as the product builds it: landed and ingested in batches of ``base_batch`` images
(``ingest_batch``), then cleaned once (``clean_dataset``, which fills the decode cache). Then
one new batch of ``new`` images (the same files for every size) is added the way the
``raw_images`` and ``cleaned_dataset`` assets add it, timed:

* ``ingest``: ``ingest_batch`` of the new batch (landing zone -> content-addressed images and
  its raw manifest);
* ``read``: ``read_raw_manifests`` of every batch (what ``cleaned_dataset`` reads first);
* ``clean``: ``clean_dataset`` over all of them (decode cache, decoding of the new files,
  duplicates, splits, canonical PNGs, the new dataset version's manifest and dataset.json),
  with its own phases (``decode``, ``dedup``, ``canonical``, ``write``);
* ``validate`` (reported apart, not in ``add_batch_seconds``): the asset's Great Expectations
  suite over the new version's manifest, which checks the whole dataset by design.

``add_batch_seconds_<n>`` is ingest + read + clean, the best of ``repeats`` adds, each in a
fresh interpreter (so ``peak_rss_mb_<n>`` is that add's own peak: ``ru_maxrss``) on a copy of
the built storage (raw and canonical images hard-linked: content-addressed, never written in
place). The interpreter first loads the Dagster code location, so it is the size of the
Dagster step (``rss_before_add_mb_<n>``). ``add_batch_growth`` is the largest size's seconds
over the smallest's (target <= 1.5); memory should grow at most linearly in the manifest and
stay under 2 GB at the largest size.

The base is built in a child interpreter of its own, with ``os.fsync`` a no-op there: it is
untimed and thrown away, and the product fsyncs every file it writes (~4 ms each on the
development machine, so ~15 minutes for the 240k files of a 120k base). The timed adds fsync as
the product does. Everything lives in one temporary folder, deleted at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cvops_dagster.bench.cleaning import _build_in_subprocess, _copy_storage, _ingest, _rss_mb, _wait_for_workers
from cvops_dagster.core.contracts import CANONICAL_PREFIX, IMAGES_PREFIX
from cvops_dagster.core.settings import available_cpus
from cvops_dagster.core.storage import ArtifactStorage

logger = logging.getLogger(__name__)

SIZES: tuple[int, ...] = (6000, 60000, 120000)
NEW = 600
BASE_BATCH = 6000
#: Small photos: the dataset's bookkeeping, not decoding, is what grows with it.
SIDE = (16, 32)
GROWTH_TARGET = 1.5
PEAK_RSS_TARGET_MB = 2048.0
#: Memory is "at most linear" when the MB per 1,000 records between the two largest sizes is
#: at most this many times that between the two smallest (noise in RSS is a few MB).
RSS_SLOPE_TOLERANCE = 1.25
NEW_BATCH = "new"
#: The new batch's photo indices: far from any base's, so they are the same files at every size.
NEW_FIRST_INDEX = 10_000_000
#: ``cvops bench scale --quick``: to see it work (the figures mean little at these sizes).
QUICK: dict[str, Any] = {"sizes": (300, 1200), "new": 60, "base_batch": 600, "repeats": 1}

_CHILD = "import json, sys; from cvops_dagster.bench import scale; scale._child_main(sys.argv[1], sys.argv[2], sys.argv[3])"


def _base_batches(size: int, base_batch: int) -> dict[str, tuple[int, int]]:
    """Batch id -> photo index range of a base of ``size`` photos."""
    return {f"base-{k:04d}": (start, min(start + base_batch, size)) for k, start in enumerate(range(0, size, base_batch))}


@contextlib.contextmanager
def _without_fsync() -> Iterator[None]:
    """``os.fsync`` a no-op meanwhile: for the untimed base, in its own throwaway interpreter."""
    fsync = os.fsync
    os.fsync = lambda fd: None  # type: ignore[assignment]
    try:
        yield
    finally:
        os.fsync = fsync


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


def build_base(store: str, landing: str, size: int, base_batch: int, seed: int, jobs: int, workers: int | None) -> dict[str, Any]:
    """Generate, ingest and clean a base of ``size`` photos in ``store`` (in a child: see
    :func:`_run_child`); return what it took, untimed as far as the benchmark goes."""
    from cvops_dagster.bench.cleaning import build_photo_files
    from cvops_dagster.datasets.cleaning import clean_dataset
    from cvops_dagster.ingestion.ingest import read_raw_manifests

    storage = ArtifactStorage(store)
    seconds = {"generate": 0.0, "ingest": 0.0, "clean": 0.0}
    with _without_fsync():
        for batch, (start, stop) in _base_batches(size, base_batch).items():
            mark = time.perf_counter()
            build_photo_files(Path(landing) / batch, start, stop, seed=seed, jobs=jobs, side=SIDE)
            seconds["generate"] += time.perf_counter() - mark
            mark = time.perf_counter()
            _ingest(Path(landing), storage, [batch])  # and deletes the landed copy
            seconds["ingest"] += time.perf_counter() - mark
        mark = time.perf_counter()
        result = clean_dataset(storage, read_raw_manifests(storage), workers=workers)
        seconds["clean"] = time.perf_counter() - mark
    _wait_for_workers()
    return {
        **{f"{step}_seconds": value for step, value in seconds.items()},
        "counts": result.counts, "peak_rss_mb": _peak_rss_mb(),
    }  # fmt: skip


def add_batch(base: str, run: str, landing: str, workers: int | None, code_location: bool, validate: bool) -> dict[str, Any]:
    """Add the landed new batch to a copy of the base storage, as the assets do, timed by step
    (in a fresh child interpreter: see :func:`_run_child`)."""
    if code_location:
        import cvops_dagster.definitions  # noqa: F401 - the process is then the size of the Dagster step
    from cvops_dagster.datasets.cleaning import clean_dataset
    from cvops_dagster.ingestion.ingest import RAW_MANIFEST_PREFIX, ingest_batch, read_raw_manifests
    from cvops_dagster.ingestion.landing import LandingZone

    storage = _copy_storage(ArtifactStorage(base), Path(run), everything=True, linked=(IMAGES_PREFIX, CANONICAL_PREFIX))
    figures: dict[str, Any] = {"rss_before_add_mb": _rss_mb()}
    started = time.perf_counter()
    ingested = ingest_batch(LandingZone(landing), storage, NEW_BATCH)
    figures["ingest_seconds"] = time.perf_counter() - started
    mark = time.perf_counter()
    # The asset names the batches Dagster knows as materialized: here, every manifest there is.
    batches = sorted(key.rsplit("/", 1)[-1].removesuffix(".parquet") for key in storage.list(RAW_MANIFEST_PREFIX))
    raw = read_raw_manifests(storage, batch_ids=batches)
    figures["read_seconds"] = time.perf_counter() - mark
    mark = time.perf_counter()
    result = clean_dataset(storage, raw, workers=workers)
    figures["clean_seconds"] = time.perf_counter() - mark
    figures["add_batch_seconds"] = time.perf_counter() - started
    _wait_for_workers()
    figures["peak_rss_mb"] = _peak_rss_mb()
    figures["workers_peak_rss_mb"] = _peak_rss_mb(resource.RUSAGE_CHILDREN)
    figures["clean_phases"] = {name.removesuffix("_s"): value for name, value in result.timings.items() if name != "total_s"}
    new = result.manifest[result.manifest["batch_id"] == NEW_BATCH]
    figures.update(
        new_files=ingested.files, new_batch_records=len(new), new_batch_outcomes=new["outcome"].value_counts().to_dict(),
        counts=result.counts, version=result.version, batches=len(batches), decoded=result.cache.decoded,
        from_decode_cache=result.cache.hits, in_version_batches=NEW_BATCH in result.dataset_info["batches"],
    )  # fmt: skip
    if validate:
        from cvops_dagster.datasets.validation import validate_dataset

        mark = time.perf_counter()
        validate_dataset(result.manifest)
        figures["validate_seconds"] = time.perf_counter() - mark
        figures["peak_rss_mb_with_validation"] = _peak_rss_mb()
    return figures


def _child_main(function: str, kwargs: str, out: str) -> None:
    """A child interpreter's entry: run ``function`` and write its figures to ``out``."""
    figures = globals()[function](**json.loads(kwargs))
    Path(out).write_text(json.dumps(figures, default=str))


def _run_child(function: str, out: Path, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`build_base` or :func:`add_batch` in a fresh interpreter (its stderr goes to
    ours): its peak memory is its own, and no run sees another's imports or caches."""
    result = subprocess.run([sys.executable, "-c", _CHILD, function, json.dumps(kwargs), str(out)], stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"cvops bench scale: {function} failed (exit {result.returncode}); its error is above")
    return json.loads(out.read_text())


def _measure_size(
    work: Path, size: int, new: int, base_batch: int, repeats: int, seed: int, workers: int | None, code_location: bool, validate: bool
) -> dict[str, Any]:
    """Build a base of ``size`` photos, then add the new batch ``repeats`` times to copies of it."""
    base = work / f"base-{size}"
    built = _run_child(
        "build_base", work / f"built-{size}.json", store=str(base), landing=str(work / "landing-base"), size=size,
        base_batch=base_batch, seed=seed, jobs=os.cpu_count() or 1, workers=workers,
    )  # fmt: skip
    adds = []
    for repeat in range(max(1, repeats)):
        run = work / f"run-{size}-{repeat}"
        try:
            adds.append(_run_child(
                "add_batch", work / f"add-{size}-{repeat}.json", base=str(base), run=str(run),
                landing=str(work / "landing-new"), workers=workers, code_location=code_location, validate=validate,
            ))  # fmt: skip
        finally:
            shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    best = min(adds, key=lambda add: add["add_batch_seconds"])
    for add in adds:
        check_added(built["counts"], add, new)
    counts = best["counts"]
    figures = {key: value for key, value in best.items() if key not in ("counts", "in_version_batches")}
    figures.update(
        {f"base_{key}": value for key, value in built.items() if key != "counts"},
        base_counts=built["counts"], add_counts=counts, add_batch_seconds_all=[add["add_batch_seconds"] for add in adds],
        peak_rss_mb=max(add["peak_rss_mb"] for add in adds),
    )  # fmt: skip
    return figures


def check_added(base_counts: dict[str, int], add: dict[str, Any], new: int) -> None:
    """Raise unless the new batch entered the dataset version whole: its ``new`` records are in
    the manifest and dataset.json, and the version has exactly ``new`` more input records."""
    problems = []
    if add["new_files"] != new or add["new_batch_records"] != new:
        problems.append(f"{add['new_files']} files ingested and {add['new_batch_records']} records in the manifest of {new}")
    if add["counts"]["input"] != base_counts["input"] + new:
        problems.append(f"{add['counts']['input']} input records, not {base_counts['input']} + {new}")
    if not add["in_version_batches"]:
        problems.append("the batch is not in dataset.json's batches")
    if problems:
        raise RuntimeError(f"the new batch did not enter the dataset version: {'; '.join(problems)}")


def verdicts(sizes: Sequence[int], seconds: Sequence[float], peaks: Sequence[float]) -> dict[str, Any]:
    """The growth ratio and the memory figures, each against its target.

    Args:
        sizes: base sizes, smallest first; ``seconds`` and ``peaks``: the add's at each.
    """
    growth = seconds[-1] / seconds[0]
    slopes, linear = _rss_linear(sizes, peaks)
    return {
        "add_batch_growth": growth, "add_batch_growth_target": GROWTH_TARGET,
        "add_batch_growth_target_met": growth <= GROWTH_TARGET, "peak_rss_mb_per_1k_records": slopes,
        "peak_rss_linear_target_met": linear, "peak_rss_target_mb": PEAK_RSS_TARGET_MB,
        "peak_rss_target_met": peaks[-1] < PEAK_RSS_TARGET_MB,
    }  # fmt: skip


def _rss_linear(sizes: Sequence[int], peaks: Sequence[float]) -> tuple[list[float], bool | None]:
    """MB per 1,000 records between consecutive sizes, and whether memory grew at most
    linearly: the last slope at most :data:`RSS_SLOPE_TOLERANCE` times the first, plus 1 MB
    per 1,000 records of noise (``None`` with fewer than three sizes)."""
    slopes = [1000 * (b - a) / (m - n) for n, m, a, b in zip(sizes, sizes[1:], peaks, peaks[1:], strict=False)]
    if len(slopes) < 2:
        return slopes, None
    return slopes, slopes[-1] <= RSS_SLOPE_TOLERANCE * max(slopes[0], 0.0) + 1.0


def bench_scale(
    *, sizes: Sequence[int] = SIZES, new: int = NEW, base_batch: int = BASE_BATCH, repeats: int = 3, seed: int = 0,
    workers: int | None = None, code_location: bool = True, validate: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Time adding one batch of ``new`` images to datasets of each size; see the module docstring.

    Args:
        sizes: base dataset sizes (images), smallest first.
        new: images in the added batch.
        base_batch: images per base batch (the base is landed and ingested batch by batch).
        repeats: adds per size, each on a fresh copy of the base; the fastest is kept.
        seed: the photo generator's seed.
        workers: decode processes (``None``: one per core, as the asset does).
        code_location: load the Dagster code location in each timed interpreter first.
        validate: also time the asset's expectation suite (reported apart).

    Returns:
        One flat dict: per size ``add_batch_seconds_<n>`` with ``ingest_seconds_<n>``,
        ``read_seconds_<n>``, ``clean_seconds_<n>``, ``clean_phases_<n>``, ``peak_rss_mb_<n>``,
        the base's build figures and the counts; ``add_batch_growth`` (largest size over
        smallest) and the targets, each with whether it was met.

    Raises:
        RuntimeError: a child failed, or the new batch did not enter the dataset version.
    """
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] <= 0 or new <= 0 or base_batch <= 0:
        raise ValueError("sizes, new and base_batch must be positive")
    work = Path(tempfile.mkdtemp(prefix="cvops-scale-bench-"))
    figures: dict[str, Any] = {"sizes": sizes, "new": new, "base_batch": base_batch, "repeats": repeats, "cpus": available_cpus()}
    figures["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    try:
        mark = time.perf_counter()
        landing_new = work / "landing-new" / NEW_BATCH
        _build_in_subprocess(
            "build_photo_files", folder=str(landing_new), start=NEW_FIRST_INDEX, stop=NEW_FIRST_INDEX + new, seed=seed,
            jobs=os.cpu_count() or 1, side=list(SIDE),
        )  # fmt: skip
        (landing_new / "_READY").touch()
        figures["new_batch_generate_seconds"] = time.perf_counter() - mark
        for size in sizes:
            measured = _measure_size(work, size, new, base_batch, repeats, seed, workers, code_location, validate)
            figures.update({f"{key}_{size}": value for key, value in measured.items()})
            logger.info("scale benchmark, %d images: %.2f s to add %d", size, measured["add_batch_seconds"], new)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures.update(
        verdicts(sizes, [figures[f"add_batch_seconds_{n}"] for n in sizes], [figures[f"peak_rss_mb_{n}"] for n in sizes])
    )
    figures["total_seconds"] = time.perf_counter() - started
    logger.info("scale benchmark: %s", figures)
    return figures


__all__ = ["GROWTH_TARGET", "PEAK_RSS_TARGET_MB", "QUICK", "SIZES", "add_batch", "bench_scale", "build_base", "check_added", "verdicts"]
