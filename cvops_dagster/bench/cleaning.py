"""Benchmark: the cleaning pass against a bare Pillow open-and-load loop, side by side.

Both run in one process on the same files, in the same order (grouped by format, as the
cleaning pass schedules them), so the ratio is meaningful on any machine. The bare loop
only opens and fully loads each image; the cleaning pass is the whole
:func:`~cvops_dagster.datasets.cleaning.clean_dataset` call (safe decoding in worker processes,
normalisation, canonical PNGs, features, hashes, duplicates, splits, manifest writing).

Without ``files`` it builds the sample data (the 1,797 sklearn digits as 32x32 grayscale
PNGs, in a child process: see :func:`_build_in_subprocess`), and with ``scale=10`` a 10x
larger set made by re-encoding each digit in ten
variants (PNG at two compression levels, BMP, TIFF raw and deflate, GIF, lossless and
lossy WebP, JPEG at two qualities) in a temporary folder.

``cvops bench cleaning`` loads the Dagster code location (:mod:`cvops_dagster.definitions`)
before calling it, so the process forking the decode workers is as large as the Dagster step
that runs the cleaning (forking costs grow with the parent's memory); ``parent_rss_mb``
reports the size.
One untimed warm-up run pays the once-per-process costs (first imports, and the
forkserver when that start method is configured); each timed run then starts its own
workers and writes into an empty canonical folder. A pass returns while its workers are
still exiting (they are reaped in the background); the next timed pass waits until they
are gone, as back-to-back passes do not happen in a real run.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from cvops_dagster.datasets.cleaning import CleaningConfig, clean_dataset
from cvops_dagster.imaging.decoding import schedule_order, wait_for_exited_workers
from cvops_dagster.core.storage import ArtifactStorage

logger = logging.getLogger(__name__)

_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("png", "PNG", {"compress_level": 6}),
    ("png", "PNG", {"compress_level": 1}),
    ("bmp", "BMP", {}),
    ("tif", "TIFF", {}),
    ("tif", "TIFF", {"compression": "tiff_adobe_deflate"}),
    ("gif", "GIF", {}),
    ("webp", "WEBP", {"lossless": True}),
    ("webp", "WEBP", {"quality": 90}),
    ("jpg", "JPEG", {"quality": 95}),
    ("jpg", "JPEG", {"quality": 80}),
)


def build_sample_files(folder: Path, scale: int = 1) -> list[tuple[Path, str]]:
    """Write the digits as image files; ``scale`` variants per digit (1 = plain PNG).

    Returns:
        ``(path, label)`` per file.
    """
    from cvops_dagster.ingestion.sample_data import digit_images

    if not 1 <= scale <= len(_VARIANTS):
        raise ValueError(f"scale must be between 1 and {len(_VARIANTS)}")
    images, labels = digit_images()
    files: list[tuple[Path, str]] = []
    for index, (array, label) in enumerate(zip(images, labels, strict=True)):
        image = Image.fromarray(array, mode="L")
        for variant, (ext, fmt, params) in enumerate(_VARIANTS[:scale]):
            buffer = io.BytesIO()
            image.save(buffer, fmt, **params)
            path = folder / str(label) / f"digit_{index:04d}_{variant}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())
            files.append((path, str(label)))
    return files


def _build_in_subprocess(folder: Path, scale: int) -> list[tuple[Path, str]]:
    """:func:`build_sample_files` run in a child interpreter.

    Making the digits loads scikit-learn (~70 MB), which a Dagster step that cleans never
    holds; building them elsewhere keeps the timed process the size of such a step.
    """
    import subprocess
    import sys

    code = "import sys; from pathlib import Path; from cvops_dagster.bench.cleaning import build_sample_files; "
    code += "files = build_sample_files(Path(sys.argv[1]), int(sys.argv[2])); "
    code += "print('\\n'.join(f'{p}\\t{label}' for p, label in files))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(scale)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the sample files failed: {result.stderr.strip()[-2000:]}")
    return [(Path(path), label) for path, label in (line.split("\t") for line in result.stdout.splitlines() if line)]


def _raw_manifest(storage: ArtifactStorage, files: Sequence[tuple[Path, str]]) -> pd.DataFrame:
    rows = []
    for path, label in files:
        data = path.read_bytes()
        ext = path.suffix.lstrip(".").lower()
        sha, key = storage.write_content_addressed("images", data, ext)
        rows.append(
            {
                "record_id": f"bench/{label}/{path.name}",
                "batch_id": "bench",
                "path": f"{label}/{path.name}",
                "label": label,
                "status": "ingested",
                "reason": None,
                "sample_id": sha,
                "image_key": key,
                "ext": ext,
                "size_bytes": len(data),
                "ingested_at": "2025-01-01T00:00:00+00:00",
            }
        )
    return pd.DataFrame(rows)


def _rss_mb() -> float | None:
    """This process's resident memory in MB (Linux), the size a fork copies page tables of."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _bare_loop(paths: Sequence[Path]) -> None:
    """Open and load each file with Pillow; a file Pillow cannot read is passed over."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001, S112 - a broken file must not end the loop
            continue


def run_cleaning_benchmark(
    files: list[Path] | None = None,
    scale: int = 1,
    workers: Sequence[int] = (1, 2),
    repeats: int = 3,
    config: CleaningConfig = CleaningConfig(),
) -> dict[str, Any]:
    """Time the cleaning pass against a bare Pillow loop on the same files.

    Args:
        files: image files (their parent folder name is the label); ``None`` builds the
            digits sample data.
        scale: with ``files=None``, variants per digit (10 gives the 10x re-encoded set).
        workers: worker counts to time the cleaning pass with (1 and 2 are reported as
            the ``_1_worker`` and ``_2_workers`` figures).
        repeats: timed runs of each measurement; the best (fastest) is kept, as usual for
            throughput on a shared machine.
        config: cleaning settings.

    Returns:
        ``files``, ``bare_images_per_s``, ``cleaning_images_per_s_<n>_worker(s)``,
        ``ratio_<n>_worker(s)`` (cleaning rate / bare rate), the outcome counts of the last
        cleaning run and the decode phase's share of its time.
    """
    work = Path(tempfile.mkdtemp(prefix="cvops-cleaning-bench-"))
    try:
        if files is None:
            labelled = _build_in_subprocess(work / "source", scale)
        else:
            labelled = [(Path(p), Path(p).parent.name) for p in files]
        storage = ArtifactStorage(str(work / "store"))
        manifest = _raw_manifest(storage, labelled)
        # The bare loop reads the files in the order the cleaning pass schedules them
        # (grouped by format), so neither side gains from the order alone.
        keys = [key for key, _ in schedule_order([(key, key) for key in sorted(manifest["image_key"].unique())])]
        raw_paths = [storage.local_path(key) for key in keys]
        n_files = len(manifest)

        def fresh() -> None:
            for prefix in ("canonical", "datasets"):
                path = storage.local_path(prefix)
                if path is not None and path.exists():
                    shutil.rmtree(path)

        clean_dataset(storage, manifest.head(16), config, workers=1)  # warm-up, untimed
        wait_for_exited_workers()
        bare_best = float("inf")
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            _bare_loop([p for p in raw_paths if p is not None])
            bare_best = min(bare_best, time.perf_counter() - started)
        figures: dict[str, Any] = {"files": n_files, "distinct_files": len(raw_paths), "scale": scale}
        # Other processes on the machine skew the parallel figures most: record the load.
        figures["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        figures["parent_rss_mb"] = _rss_mb()
        figures["bare_images_per_s"] = len(raw_paths) / bare_best
        last = None
        for count in workers:
            best = float("inf")
            for _ in range(max(1, repeats)):
                fresh()
                started = time.perf_counter()
                last = clean_dataset(storage, manifest, config, workers=count)
                best = min(best, time.perf_counter() - started)
                # The workers exit after the pass returns (overlapping the caller's work);
                # the next timed pass starts once they are gone.
                wait_for_exited_workers()
            suffix = "1_worker" if count == 1 else f"{count}_workers"
            rate = len(raw_paths) / best
            figures[f"cleaning_images_per_s_{suffix}"] = rate
            figures[f"ratio_{suffix}"] = rate / figures["bare_images_per_s"]
            figures[f"decode_share_{suffix}"] = last.timings["decode_s"] / last.timings["total_s"]
        if last is not None:
            figures["outcomes"] = {k: v for k, v in last.counts.items() if k != "input"}
        logger.info("cleaning benchmark: %s", figures)
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _main() -> None:  # pragma: no cover - manual use: python -m cvops_dagster.bench.cleaning
    import json

    logging.basicConfig(level=logging.WARNING)
    results = {"sample": run_cleaning_benchmark(scale=1), "x10": run_cleaning_benchmark(scale=10)}
    print(json.dumps(results, indent=2, default=float))  # noqa: T201 - command-line output


if __name__ == "__main__":  # pragma: no cover
    _main()


__all__ = ["build_sample_files", "run_cleaning_benchmark"]
