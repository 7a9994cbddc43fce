"""Parallel HPO benchmark (``cvops bench hpo``): figures, never a timed test.

The same fixed study (``n_trials`` trials of the product's search space, seed, sampler and
pruner) is run twice on the same dataset, each in a fresh storage: with one worker (in this
process, all the CPUs as torch threads) and with ``workers`` worker processes (each its share
of the threads), through :func:`~cvops_dagster.training.tuning.run_study` as ``hpo_study``
calls it. Reported: the wall time of each, ``hpo_speedup_<n>_workers`` (one-worker seconds over
n-worker seconds; target >= 1.6 for 2 workers on 2 cores), the best value of each and their
difference (target: within 1 point, 0.01 accuracy), the spread of the completed trials'
values (``trial_value_spread_*``: min, max, std), the trials each worker ran, and the epochs
each study trained (successive halving prunes differently when trials finish in another order).

The dataset must make trials differ: on the bundled digits every trial reaches validation
accuracy 1.0 and "equal best value" says nothing. So it is a realistic colour set: small
patches of scikit-image's bundled colour photos (:data:`~cvops_dagster.bench.cleaning.PHOTO_SOURCES`,
none downloaded), labelled with the photo they come from: random crops of 8-20% of a photo's
short side, turned, colour-jittered and noisy, made in a child interpreter (scikit-image never
loads here), then landed, ingested and cleaned through the product (``clean_dataset``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cvops_dagster.bench.cleaning import PHOTO_SOURCES
from cvops_dagster.core.settings import available_cpus
from cvops_dagster.core.storage import ArtifactStorage

logger = logging.getLogger(__name__)

SPEEDUP_TARGET = 1.6
BEST_VALUE_TOLERANCE = 0.01
BENCH_BATCH = "patches"
#: Patch side as a fraction of the source photo's short side: small enough that one patch is
#: a texture (fur, hair, sky, tissue), not the recognisable photo.
PATCH_FRACTION = (0.08, 0.20)


def build_patch_files(folder: str, per_class: int, size: int, seed: int) -> int:
    """Write ``per_class`` patches of each photo as PNGs ``<folder>/<photo>/patch_<i>.png``.

    Each patch: a random square crop (see :data:`PATCH_FRACTION`), resized to ``size`` x
    ``size``, in one of the eight orientations, each channel scaled by a random gain of
    0.8-1.2 and Gaussian noise (sigma 6 of 255) added. A function of ``seed`` alone.

    Returns:
        The number of files written.
    """
    import skimage.data  # in the child interpreter only (see the module docstring)

    rng = np.random.default_rng(seed)
    written = 0
    for name in PHOTO_SOURCES:
        source = np.asarray(getattr(skimage.data, name)())[..., :3]
        short = min(source.shape[:2])
        target = Path(folder) / name
        target.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            side = int(rng.integers(int(short * PATCH_FRACTION[0]), int(short * PATCH_FRACTION[1]) + 1))
            top = int(rng.integers(source.shape[0] - side + 1))
            left = int(rng.integers(source.shape[1] - side + 1))
            patch = Image.fromarray(source[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR)
            orientation = int(rng.integers(8))
            if orientation:
                patch = patch.transpose(tuple(Image.Transpose)[orientation - 1])
            pixels = np.asarray(patch, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3) + rng.normal(0.0, 6.0, size=(size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB").save(target / f"patch_{index:05d}.png")
            written += 1
    return written


def _build_in_subprocess(**kwargs: Any) -> None:
    code = "import json, sys; from cvops_dagster.bench.hpo import build_patch_files; build_patch_files(**json.loads(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the benchmark images failed: {result.stderr.strip()[-2000:]}")


def patch_dataset(work: Path, per_class: int, size: int, seed: int) -> tuple[ArtifactStorage, str, dict[str, Any]]:
    """Build the patch set, land, ingest and clean it as the product does; its storage,
    version and cleaning outcome counts."""
    from cvops_dagster.datasets.cleaning import clean_dataset
    from cvops_dagster.ingestion.ingest import ingest_batch, read_raw_manifests
    from cvops_dagster.ingestion.landing import READY_MARKER, LandingZone

    landing = work / "landing"
    _build_in_subprocess(folder=str(landing / BENCH_BATCH), per_class=per_class, size=size, seed=seed)
    (landing / BENCH_BATCH / READY_MARKER).touch()
    storage = ArtifactStorage(str(work / "artifacts"))
    ingest_batch(LandingZone(str(landing)), storage, BENCH_BATCH)
    shutil.rmtree(landing)
    cleaned = clean_dataset(storage, read_raw_manifests(storage, batch_ids=[BENCH_BATCH]))
    return storage, cleaned.version, {k: v for k, v in cleaned.counts.items() if k != "input"}


def _last_value(trial: Any) -> float | None:
    steps = sorted(trial.intermediate_values)
    return float(trial.intermediate_values[steps[-1]]) if steps else None


def value_spread(values: list[float]) -> dict[str, float | int | None]:
    """Min, max, population std and count of trial values (``None`` figures when empty)."""
    if not values:
        return {"n": 0, "min": None, "max": None, "std": None}
    return {"n": len(values), "min": min(values), "max": max(values), "std": statistics.pstdev(values)}


def bench_hpo(
    *,
    n_trials: int = 16,
    workers: int = 2,
    per_class: int = 300,
    image_size: int = 32,
    max_epochs: int = 6,
    pruner: str = "successive_halving",
    min_resource: int = 2,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the same study with one worker and with ``workers``; see the module docstring.

    Args:
        n_trials: trials of each study.
        workers: worker processes of the parallel study.
        per_class: patches per photo (7 photos).
        image_size: patch side in pixels.
        max_epochs: epochs per unpruned trial.
        pruner: the studies' pruner (``successive_halving``, ``hyperband``, ``none``).
        min_resource: epochs before the first pruning decision.
        threads: torch threads of the whole study, split among the workers (default: the
            available cores).
        seed: seeds the images, the samplers and training.

    Returns:
        One flat dict: ``hpo_seconds_1_worker``, ``hpo_seconds_<n>_workers``,
        ``hpo_speedup_<n>_workers``, ``best_value_1_worker``, ``best_value_<n>_workers``,
        ``best_value_difference`` (n workers minus one), ``trial_value_spread_1_worker`` and
        ``..._<n>_workers`` (min/max/std/n of completed trials' values), ``all_trial_value_spread_*``
        (the same with pruned trials' last reported values), ``epoch_throughput_speedup_<n>_workers``
        (epochs per second over epochs per second: the speedup apart from pruning), ``trials_per_worker``
        (of the parallel study), finished/pruned/failed trials and epochs of each, the targets
        met, the dataset's figures, threads, CPUs and load average.
    """
    import optuna

    from cvops_dagster.datasets.loading import load_dataset
    from cvops_dagster.training.tuning import StudyConfig, default_storage_url, run_study

    if workers < 2:
        raise ValueError("workers must be at least 2: the benchmark compares them with one")
    started = time.perf_counter()
    threads = threads or available_cpus()
    work = Path(tempfile.mkdtemp(prefix="cvops-hpo-bench-"))
    try:
        storage, version, outcomes = patch_dataset(work, per_class, image_size, seed)
        data = load_dataset(storage, version)
        prepare_seconds = time.perf_counter() - started
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        results = {}
        for count in (1, workers):
            config = StudyConfig(
                n_trials=n_trials,
                max_epochs=max_epochs,
                seed=seed,
                pruner=pruner,
                min_resource=min_resource,
                num_threads=threads,
                workers=count,
                study_prefix=f"bench-{count}-",
            )
            url = default_storage_url(work / f"optuna-{count}")  # fresh storage per study
            begun = time.perf_counter()
            result = run_study(storage, version, config, url, data=data)
            seconds = time.perf_counter() - begun
            study = optuna.load_study(study_name=result.study_name, storage=url)
            result.trials["last_value"] = [_last_value(t) for t in study.trials]  # one row per trial, in number order
            results[count] = (result, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, one_s = results[1]
    many, many_s = results[workers]
    suffix = f"{workers}_workers"
    speedup = one_s / many_s

    def completed(result: Any) -> list[float]:
        frame = result.trials
        return [float(v) for v in frame.loc[frame["state"] == "COMPLETE", "value"]]

    def judged(result: Any) -> list[float]:
        """Completed trials' values and pruned trials' last reported ones (what the pruner judged)."""
        frame = result.trials
        return completed(result) + [float(v) for v in frame.loc[frame["state"] == "PRUNED", "last_value"]]

    difference = None if one.best_value is None or many.best_value is None else many.best_value - one.best_value
    figures: dict[str, Any] = {
        "hpo_seconds_1_worker": one_s,
        f"hpo_seconds_{suffix}": many_s,
        f"hpo_speedup_{suffix}": speedup,
        "best_value_1_worker": one.best_value,
        f"best_value_{suffix}": many.best_value,
        "best_value_difference": difference,
        "trial_value_spread_1_worker": value_spread(completed(one)),
        f"trial_value_spread_{suffix}": value_spread(completed(many)),
        "all_trial_value_spread_1_worker": value_spread(judged(one)),
        f"all_trial_value_spread_{suffix}": value_spread(judged(many)),
        # Epochs per second: parallel efficiency apart from how differently the two studies pruned.
        f"epoch_throughput_speedup_{suffix}": (many.epochs_consumed / many_s) / (one.epochs_consumed / one_s),
        "trials_per_worker": many.trials_per_worker,
        "worker_exit_codes": many.worker_exit_codes,
        "speedup_target": SPEEDUP_TARGET,
        "speedup_target_met": speedup >= SPEEDUP_TARGET if workers == 2 else None,
        "best_value_target_met": difference is not None and abs(difference) <= BEST_VALUE_TOLERANCE,
        "n_trials": n_trials,
        "max_epochs": max_epochs,
        "pruner": pruner,
        "dataset_version": version,
        "classes": len(data.labels),
        "image_size": list(data.image_size),
        "train_images": len(data.splits["train"]),
        "val_images": len(data.splits["val"]),
        "cleaning_outcomes": outcomes,
        "torch_threads": threads,
        "cpus": available_cpus(),
        "load_average_1m": load,
        "prepare_seconds": prepare_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    for count, (result, _) in results.items():
        name = "1_worker" if count == 1 else suffix
        figures[f"finished_trials_{name}"] = result.n_complete + result.n_pruned
        figures[f"pruned_trials_{name}"] = result.n_pruned
        figures[f"failed_trials_{name}"] = result.n_failed
        figures[f"epochs_{name}"] = result.epochs_consumed
    logger.info("hpo benchmark: %s", figures)
    return figures


__all__ = ["BEST_VALUE_TOLERANCE", "SPEEDUP_TARGET", "bench_hpo", "build_patch_files", "patch_dataset", "value_spread"]
