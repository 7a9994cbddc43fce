"""Review dataset benchmark (``cvops bench review``): the upsert against FiftyOne's own bulk add.

Measured side by side in one process, on ``images`` production images (default 5,000) with
predictions, embeddings and features:

* ``review_build_seconds``: :func:`~cvops_dagster.review.dataset.upsert_rows`, the edge-case
  review's own function, whole, into a fresh dataset (every row new: declaring the fields and
  the unique ``cvops_key`` index, building the samples, one ``add_samples`` call). Against
  ``add_samples_seconds``: what one writes with FiftyOne alone for the same samples with the
  same fields and values (``filepath``, the group tag, ``cvops_key``, ``prediction`` as a
  ``Classification`` with confidence and logits, ``ground_truth`` when known, ``embedding``,
  the eight numeric features, ``batch_id``, ``model_id``, ``drift_batch``, ...): a loop building
  ``fo.Sample`` objects from the same columns, then ``dataset.add_samples`` into a fresh
  dataset, no field declarations, no index. Target: ``review_vs_add_samples_ratio``
  (seconds over seconds) <= 1.5. ``add_samples_call_seconds`` is the ``add_samples`` call alone.
* ``review_update_seconds``: ``upsert_rows`` again on the built dataset with every row's
  prediction changed (a new model's labels, confidences, logits and embeddings, and more
  delayed labels known): the update path, ``set_values`` keyed on ``cvops_key``.
  ``update_vs_add_samples_ratio`` is reported beside it, without a target.
* ``brain_seconds``: :func:`~cvops_dagster.review.brain.run_brain` on the updated dataset, once,
  with each run's seconds (``brain_run_seconds``), and ``views_seconds``:
  :func:`~cvops_dagster.review.views.mark_edge_cases` + :func:`~cvops_dagster.review.views.save_views`.

The data is generated the way production makes it, outside the timings: jittered digits of
the production pool (:func:`~cvops_dagster.bench.monitoring.jittered_digits`, 32x32 grey) as
PNG files, content-addressed in a temporary local artifact store, in ``batches`` production
batches (two of them flagged as drifted); their features from the one feature function; each
batch's stored predictions frame (:func:`~cvops_dagster.monitoring.predictions.prediction_frame`:
10 classes, probabilities, a :data:`EMBEDDING_DIM`-wide embedding, the size of the default
architecture's last stage) from a simulated model (the true class's logit raised, so about
nine in ten are right; embeddings near a per-class centre); delayed labels for 30% of the
images (60% at the update). The review rows are then :func:`~cvops_dagster.review.samples.production_rows`
of those frames, and the media paths :class:`~cvops_dagster.review.media.MediaCache`'s
(``rows_seconds`` and ``media_seconds``, untimed against anything).

Each repeat builds both sides into fresh datasets, alternating which goes first; the best of
``repeats`` is kept for each side, as usual for throughput on a shared machine. Every dataset
the bench creates is deleted before it returns.

FiftyOne's database: the one this process already uses, if any; else a bundled ``mongod`` in a
temporary folder (removed when the process exits). Note FiftyOne's bundled ``mongod`` is one
per user: a process that finds another process's running one attaches to it, whatever its
folder; ``mongod_dbpath`` reports the folder actually used.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cvops_dagster.core.settings import available_cpus
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.monitoring.predictions import (
    NUMERIC_FEATURES,
    STATUS_PREDICTED,
    prediction_frame,
    predictions_key,
)

if TYPE_CHECKING:
    import fiftyone as fo

logger = logging.getLogger(__name__)

REVIEW_TARGET_RATIO = 1.5
#: The digits model's embedding width: the last stage of ``training.models.DEFAULT_ARCH``.
EMBEDDING_DIM = 96
LABELS = tuple(str(d) for d in range(10))
#: Share of images with a delayed label at the build, and at the update.
LABELLED_AT_BUILD = 0.3
LABELLED_AT_UPDATE = 0.6
#: Production batches flagged as drifted (by position, when there are that many).
DRIFTED_BATCHES = (3, 7)
MODEL_V1 = "bench_model_v1"
MODEL_V2 = "bench_model_v2"


def _database() -> tuple[str, bool]:
    """Use the FiftyOne database this process already has, else configure a temporary one.

    Returns its description and whether this call configured it.
    """
    from cvops_dagster.review.connection import FiftyOneDatabase, ReviewConnectionError, configure, database_from_env

    fod = sys.modules.get("fiftyone.core.odm.database")
    if fod is not None and getattr(fod, "_client", None) is not None:
        return database_from_env().describe() + ", already connected", False
    folder = tempfile.mkdtemp(prefix="cvops-bench-review-db-")
    try:
        configure(FiftyOneDatabase(None, folder))
    except ReviewConnectionError:  # this process is configured for another database: reuse it
        shutil.rmtree(folder, ignore_errors=True)
        return database_from_env().describe() + ", configured by the caller", False
    # Registered before FiftyOne connects, so it runs after FiftyOne's own exit handlers.
    atexit.register(shutil.rmtree, folder, True)
    return FiftyOneDatabase(None, folder).describe(), True


def _mongod_dbpath() -> str | None:
    """The data folder of the ``mongod`` FiftyOne talks to (``None`` if it does not say)."""
    try:
        import fiftyone.core.odm.database as fod

        opts = fod.get_db_client().admin.command("getCmdLineOpts")
        return str(opts.get("parsed", {}).get("storage", {}).get("dbPath")) or None
    except Exception:  # noqa: BLE001 - a hosted MongoDB may refuse the command
        return None


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _simulated_outputs(
    truth: np.ndarray, rng: np.random.Generator, centres: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (float32) and embeddings of a simulated model for images of class ``truth``."""
    logits = rng.normal(0.0, 1.0, size=(len(truth), len(LABELS)))
    logits[np.arange(len(truth)), truth] += margin
    probabilities = _softmax(logits).astype(np.float32)
    predicted = probabilities.argmax(axis=1)
    noise = rng.normal(0.0, 0.35, size=(len(truth), EMBEDDING_DIM))
    embeddings = np.maximum(centres[predicted] + noise, 0.0).astype(np.float32)  # post-ReLU pooling
    return probabilities, embeddings


def _write_predictions(
    storage: ArtifactStorage, batches: dict[str, np.ndarray], meta: pd.DataFrame, probabilities: np.ndarray,
    embeddings: np.ndarray, model_id: str,
) -> None:  # fmt: skip
    """Each batch's predictions frame, as ``predict_batch`` stores it."""
    for batch_id, index in batches.items():
        part = meta.iloc[index]
        p = probabilities[index]
        classes = p.argmax(axis=1)
        frame = prediction_frame(
            pd.DataFrame({
                "record_id": [f"{batch_id}:{i}" for i in range(len(index))],
                "batch_id": batch_id,
                "path": [f"production/{batch_id}/img_{i:05d}.png" for i in range(len(index))],
                "status": STATUS_PREDICTED,
                "reason": None,
                "reason_detail": None,
                "sample_id": part["sample_id"].to_numpy(),
                "image_key": part["image_key"].to_numpy(),
                "format": "PNG",
                **{name: part[name].to_numpy() for name in NUMERIC_FEATURES},
                "label": [LABELS[c] for c in classes],
                "class_index": classes,
                "confidence": p.max(axis=1).astype(np.float64),
                "probabilities": list(p),
                "embedding": list(embeddings[index]),
                "model_id": model_id,
                "runtime_sha256": hashlib.sha256(model_id.encode()).hexdigest(),
            })  # fmt: skip
        )
        storage.write_parquet(predictions_key(batch_id), frame)


def generate_rows(work: Path, images: int, *, batches: int = 10, seed: int = 0) -> dict[str, Any]:
    """The bench's production data (see the module docstring), written under ``work``.

    Returns ``rows`` and ``changed`` (the same keys, a new model's predictions, more labels),
    ``filepaths``, ``drifted`` (batch ids), and the seconds ``rows_seconds`` (both
    ``production_rows`` calls) and ``media_seconds``.
    """
    from cvops_dagster.bench.monitoring import jittered_digits, production_pool
    from cvops_dagster.imaging.features import pixel_features
    from cvops_dagster.ingestion.sample_data import png_bytes
    from cvops_dagster.review.media import MediaCache
    from cvops_dagster.review.samples import production_rows

    rng = np.random.default_rng([seed, 11])
    sources, labels = production_pool()
    pixels, truth = jittered_digits(sources, labels, images, rng)
    storage = ArtifactStorage(str(work / "artifacts"))
    sample_ids, image_keys, sizes = [], [], []
    for array in pixels:
        data = png_bytes(array)
        sha, key = storage.write_content_addressed("images", data, "png")
        sample_ids.append(sha)
        image_keys.append(key)
        sizes.append(len(data))
    if len(set(sample_ids)) != images:
        raise RuntimeError("the generated images repeat (a jitter drew the same image twice); use another seed")
    features = pixel_features(pixels)
    meta = pd.DataFrame({
        "sample_id": sample_ids, "image_key": image_keys, "file_size": sizes,
        **{name: np.asarray(features[name], dtype=np.float64) for name in NUMERIC_FEATURES if name != "file_size"},
    })  # fmt: skip
    count = max(1, min(batches, images))
    batch_index = {f"bench_{b:03d}": part for b, part in enumerate(np.array_split(np.arange(images), count), start=1)}
    drifted = [f"bench_{b:03d}" for b in DRIFTED_BATCHES if b <= count]

    centres = np.abs(rng.normal(0.0, 1.0, size=(len(LABELS), EMBEDDING_DIM)))
    truth = np.asarray(truth, dtype=np.int64)
    order = rng.permutation(images)  # who gets a delayed label: the first 30%, then the first 60%
    v2 = ArtifactStorage(str(work / "predictions-v2"))
    _write_predictions(storage, batch_index, meta, *_simulated_outputs(truth, rng, centres, 3.0), MODEL_V1)
    _write_predictions(v2, batch_index, meta, *_simulated_outputs(truth, rng, centres, 3.5), MODEL_V2)

    def known(share: float) -> dict[str, str]:
        return {sample_ids[i]: LABELS[truth[i]] for i in order[: int(round(share * images))]}

    flags = {b: b in drifted for b in batch_index}
    started = time.perf_counter()
    rows = production_rows(storage, list(batch_index), flags, known(LABELLED_AT_BUILD))
    changed = production_rows(v2, list(batch_index), flags, known(LABELLED_AT_UPDATE))
    rows_seconds = time.perf_counter() - started
    started = time.perf_counter()
    filepaths = MediaCache(storage, work / "media").paths(rows["image_key"].astype(str).tolist())
    media_seconds = time.perf_counter() - started
    return {"rows": rows, "changed": changed, "filepaths": filepaths, "drifted": drifted,
            "rows_seconds": rows_seconds, "media_seconds": media_seconds}  # fmt: skip


def _columns(rows: pd.DataFrame, filepaths: Sequence[str]) -> dict[str, list[Any]]:
    """The rows as plain Python columns: the data a FiftyOne user has in hand."""
    out = {name: rows[name].tolist() for name in rows.columns}
    out["filepath"] = list(filepaths)
    out["ground_truth"] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in rows["ground_truth"]]
    return out


def add_samples_baseline(dataset: fo.Dataset, columns: dict[str, list[Any]]) -> tuple[float, float]:
    """FiftyOne alone: build the samples, then one ``add_samples``. Seconds in all, and of the call."""
    import fiftyone as fo

    started = time.perf_counter()
    samples = []
    for i in range(len(columns["key"])):
        truth = columns["ground_truth"][i]
        extra = {"ground_truth": fo.Classification(label=truth)} if truth is not None else {}
        samples.append(
            fo.Sample(
                filepath=columns["filepath"][i],
                tags=[columns["group"][i]],
                cvops_key=columns["key"][i],
                prediction=fo.Classification(
                    label=columns["predicted_label"][i],
                    confidence=float(columns["confidence"][i]),
                    logits=np.asarray(columns["logits"][i], dtype=np.float32),
                ),
                embedding=np.asarray(columns["embedding"][i], dtype=np.float32),
                cvops_sample_id=columns["sample_id"][i],
                image_key=columns["image_key"][i],
                batch_id=columns["batch_id"][i],
                source_path=columns["source_path"][i],
                model_id=columns["model_id"][i],
                dataset_version=columns["dataset_version"][i],
                drift_batch=bool(columns["drift_batch"][i]),
                **{name: float(columns[name][i]) for name in NUMERIC_FEATURES},
                **extra,
            )
        )
    called = time.perf_counter()
    dataset.add_samples(samples, progress=False)
    ended = time.perf_counter()
    return ended - started, ended - called


def _comparable(sample: fo.Sample) -> dict[str, Any]:
    """A sample's stored fields, without what differs between any two datasets (ids, times, the
    random ``_rand``), a null field the same as an absent one (a declared field stores nulls)."""
    doc = {k: v for k, v in sample.to_mongo_dict(include_id=False).items() if v is not None}
    for name in ("_dataset_id", "_rand", "created_at", "last_modified_at"):
        doc.pop(name, None)
    for name in ("prediction", "ground_truth"):
        if isinstance(doc.get(name), dict):
            doc[name].pop("_id", None)
    return doc


def _schema_differences(review: fo.Dataset, plain: fo.Dataset) -> dict[str, list[str | None]]:
    """Field -> [its type in the review dataset, in the add_samples one], where they differ."""
    a, b = (
        {k: type(v).__name__ for k, v in d.get_field_schema(flat=True).items() if k not in ("created_at", "last_modified_at")}
        for d in (review, plain)
    )
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# Over ~80 lines: the docstring names every reported figure, and the timed sections stay in
# one function so the side-by-side measurements visibly share their rows, files and database.
def bench_review(*, images: int = 5000, repeats: int = 3, batches: int = 10, seed: int = 0) -> dict[str, Any]:
    """Time ``upsert_rows`` (build and update) against FiftyOne's ``add_samples``, then the Brain runs.

    Args:
        images: production images (rows) in the review dataset.
        repeats: timed passes of each side (alternating which goes first); the best is kept.
        batches: production batches the images are dealt into.
        seed: seeds the images, the simulated predictions and the delayed labels.

    Returns:
        ``review_build_seconds``, ``review_update_seconds``, ``add_samples_seconds`` (with
        ``add_samples_call_seconds``), ``review_vs_add_samples_ratio`` and its target,
        ``update_vs_add_samples_ratio``, every pass's seconds (``all_...``), what the upserts did
        (``build_added``, ``update_updated``, ...), the sample and distinct-key counts after each
        pass, whether the update holds the new predictions (``update_applied``) and whether both
        sides stored the same document (``same_documents``; ``schema_differences``: the fields
        the review declares that ``add_samples`` leaves out, such as an all-null one), ``brain_seconds`` with
        ``brain_run_seconds`` per run, ``views_seconds``, the view sizes, ``rows_seconds`` and
        ``media_seconds``, the database, the cores, the load average around the run.
    """
    from cvops_dagster.review.brain import BrainConfig, run_brain
    from cvops_dagster.review.connection import open_dataset
    from cvops_dagster.review.dataset import KEY_FIELD, upsert_rows
    from cvops_dagster.review.views import ViewConfig, mark_edge_cases, save_views

    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    database, own_database = _database()
    import fiftyone as fo

    repeats = max(1, repeats)
    tag = uuid.uuid4().hex[:8]
    created: list[str] = []

    def fresh(kind: str, r: int) -> fo.Dataset:
        name = f"cvops_bench_review_{tag}_{kind}_{r}"
        created.append(name)
        dataset = open_dataset(name, create=True)
        assert dataset is not None
        return dataset

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cvops-bench-review-") as tmp:
        try:
            data = generate_rows(Path(tmp), images, batches=batches, seed=seed)
            rows, changed, filepaths = data["rows"], data["changed"], data["filepaths"]
            columns = _columns(rows, filepaths)
            # Connect (and start mongod), load the code both sides run: untimed, a few rows each.
            warm = min(16, images)
            add_samples_baseline(fresh("warmup", 0), {k: v[:warm] for k, v in columns.items()})
            upsert_rows(fresh("warmup", 1), rows.iloc[:warm], filepaths[:warm])

            baseline: list[tuple[float, float]] = []
            builds: list[float] = []
            updates: list[float] = []
            counts: list[tuple[int, int, int, int]] = []
            reviewed: fo.Dataset | None = None
            same_documents = None
            schema_differences: dict[str, list[str | None]] = {}
            for r in range(repeats):
                sides = ("add_samples", "review") if r % 2 == 0 else ("review", "add_samples")
                for side in sides:
                    if side == "add_samples":
                        plain = fresh("add_samples", r)
                        baseline.append(add_samples_baseline(plain, columns))
                        if same_documents is None:
                            mine = fresh("check", r)
                            upsert_rows(mine, rows.iloc[:1], filepaths[:1])
                            same_documents = _comparable(mine.first()) == _comparable(plain.first())
                            schema_differences = _schema_differences(mine, plain)
                            mine.delete()
                        plain.delete()
                        continue
                    if reviewed is not None:
                        reviewed.delete()
                    reviewed = fresh("review", r)
                    began = time.perf_counter()
                    built = upsert_rows(reviewed, rows, filepaths)
                    builds.append(time.perf_counter() - began)
                    after_build = len(reviewed)
                    began = time.perf_counter()
                    updated = upsert_rows(reviewed, changed, filepaths)
                    updates.append(time.perf_counter() - began)
                    counts.append((after_build, len(reviewed), len(reviewed.distinct(KEY_FIELD)), built.added))
            assert reviewed is not None
            model_ids, labels = reviewed.values(["model_id", "prediction.label"])
            by_key = dict(zip(reviewed.values(KEY_FIELD), labels, strict=True))
            update_applied = set(model_ids) == {MODEL_V2} and all(
                by_key.get(k) == v for k, v in zip(changed["key"], changed["predicted_label"], strict=True)
            )

            brain_started = time.perf_counter()
            brain = run_brain(reviewed, MODEL_V2, BrainConfig())
            brain_seconds = time.perf_counter() - brain_started
            views_started = time.perf_counter()
            criteria = mark_edge_cases(reviewed, brain.keys, ViewConfig())
            view_counts = save_views(reviewed, brain.keys, data["drifted"], ViewConfig())
            views_seconds = time.perf_counter() - views_started
            figures["mongod_dbpath"] = _mongod_dbpath()
        finally:
            for name in created:
                if fo.dataset_exists(name):
                    fo.load_dataset(name).delete()

    plain_seconds, plain_call = min(baseline)
    build_s, update_s = min(builds), min(updates)
    after_build, after_update, distinct_keys, added = counts[-1]
    figures.update(
        images=images,
        batches=len(set(rows["batch_id"])),
        labelled_at_build=int(rows["ground_truth"].notna().sum()),
        labelled_at_update=int(changed["ground_truth"].notna().sum()),
        embedding_dim=EMBEDDING_DIM,
        classes=len(LABELS),
        review_build_seconds=build_s,
        review_update_seconds=update_s,
        add_samples_seconds=plain_seconds,
        add_samples_call_seconds=plain_call,
        review_vs_add_samples_ratio=build_s / plain_seconds,
        update_vs_add_samples_ratio=update_s / plain_seconds,
        review_target_ratio=REVIEW_TARGET_RATIO,
        review_target_met=build_s / plain_seconds <= REVIEW_TARGET_RATIO,
        review_build_samples_per_s=images / build_s,
        review_update_samples_per_s=images / update_s,
        add_samples_samples_per_s=images / plain_seconds,
        all_review_build_seconds=builds,
        all_review_update_seconds=updates,
        all_add_samples_seconds=[t for t, _ in baseline],
        build_added=added,
        update_added=int(updated.added),
        update_updated=int(updated.updated),
        samples_after_build=after_build,
        samples_after_update=after_update,
        distinct_keys_after_update=distinct_keys,
        update_applied=bool(update_applied),
        same_documents=bool(same_documents),
        schema_differences=schema_differences,
        brain_seconds=brain_seconds,
        brain_run_seconds=dict(brain.seconds),
        brain_skipped=dict(brain.skipped),
        near_duplicates=brain.near_duplicates,
        views_seconds=views_seconds,
        edge_criteria=criteria,
        view_counts=view_counts,
        rows_seconds=data["rows_seconds"],
        media_seconds=data["media_seconds"],
        repeats=repeats,
        fiftyone_database=database,
        temporary_database=own_database,
        fiftyone_version=fo.__version__,
        cpu_count=available_cpus(),
        load_average_before=load_before,
        load_average_after=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "review bench: upsert build %.2fs vs add_samples %.2fs (%.2fx), update %.2fs (%.2fx); brain %.2fs",
        build_s, plain_seconds, figures["review_vs_add_samples_ratio"], update_s, figures["update_vs_add_samples_ratio"],
        brain_seconds,
    )  # fmt: skip
    return figures
