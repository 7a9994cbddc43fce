"""The bundled production stream: what `cvops seed` writes under ``<landing>/production/``.

Built from the production pool of scikit-learn's digits
(:func:`cvops_dagster.ingestion.sample_data.labelled_and_production_indices`), so no digit the
model trains on reaches production. The pool, dealt class by class so every part holds every
digit, becomes:

================  ==============  ======  =============================================
batch / set       shift           images  delayed labels seeded
================  ==============  ======  =============================================
``prod_001``      none            150     half of the files: in-distribution, no drift
``prod_002``      ``rotation_30``  120     none: drift found, retraining must wait
``prod_003``      ``new_camera``   240     85%: what lets retraining learn the new camera
holdout           any shift        163     never written: :func:`drifted_holdout`
================  ==============  ======  =============================================

The holdout measures accuracy on the drifted stream before and after retraining on digits
that never enter the landing zone. Files are named ``img_0000.png`` ... in a shuffled order
(the name says nothing of the label); labels are the digit as a string, as the labelled
batches' folder names are. Everything is deterministic: the same call gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from cvops_dagster.ingestion.landing import LABELS_FILE, READY_MARKER, LandingZone
from cvops_dagster.ingestion.sample_data import (
    class_ranks,
    digit_images,
    digit_labels,
    labelled_and_production_indices,
    png_bytes,
)
from cvops_dagster.monitoring.shifts import SHIFTS, apply_shift

logger = logging.getLogger(__name__)

HOLDOUT = "holdout"
#: Seed of every draw here (file order, shift noise); fixed so the stream is reproducible.
STREAM_SEED = 13


@dataclass(frozen=True)
class _Part:
    """One consecutive slice of the class-interleaved pool."""

    name: str
    size: int | None  # None: the rest of the pool
    shift: str | None
    labelled_share: Fraction


#: The production batches in order, then the holdout (the rest of the pool).
PARTS = (
    _Part("prod_001", 150, None, Fraction(1, 2)),
    _Part("prod_002", 120, "rotation_30", Fraction(0)),
    _Part("prod_003", 240, "new_camera", Fraction(17, 20)),
    _Part(HOLDOUT, None, "new_camera", Fraction(0)),
)
STREAM_BATCHES = tuple(part.name for part in PARTS if part.name != HOLDOUT)


@dataclass(frozen=True)
class StreamBatch:
    """One production batch of the bundled stream.

    Attributes:
        batch_id: its folder name under ``<landing>/production/``.
        shift: the :data:`~cvops_dagster.monitoring.shifts.SHIFTS` name applied, ``None`` for
            in-distribution digits.
        files: file name -> PNG bytes, in file-name order.
        labels: file name -> true label of *every* file (what an evaluation compares with).
        labelled_share: the share of files whose label seeding delivers (:attr:`delayed_labels`).
        sources: file name -> index of the digit in scikit-learn's digits.
    """

    batch_id: str
    shift: str | None
    files: dict[str, bytes]
    labels: dict[str, str]
    labelled_share: float
    sources: dict[str, int]

    @property
    def delayed_labels(self) -> dict[str, str]:
        """The labels seeding delivers in ``labels.csv`` (see :func:`delayed_labels`)."""
        return delayed_labels(self.batch_id)


@dataclass(frozen=True)
class _Plan:
    """Which digits a part holds, in file order, and which of its files are labelled."""

    part: _Part
    indices: tuple[int, ...]
    labelled: frozenset[str]

    @property
    def names(self) -> list[str]:
        return [file_name(k) for k in range(len(self.indices))]


def file_name(position: int) -> str:
    """The name of the ``position``-th file of a production batch (``img_0000.png``)."""
    return f"img_{position:04d}.png"


def _evenly_chosen(count: int, share: Fraction) -> list[int]:
    """Positions ``0..count-1`` to keep so that about ``share`` of them are kept, spread evenly
    (exact integer arithmetic: 17/20 keeps exactly 17 of every 20)."""
    return [k for k in range(count) if math.floor((k + 1) * share) > math.floor(k * share)]


@lru_cache(maxsize=1)
def _labels() -> np.ndarray:
    # Read-only: shared by every caller in this process.
    labels = digit_labels()
    labels.setflags(write=False)
    return labels


@lru_cache(maxsize=1)
def _images() -> np.ndarray:
    # Read-only: shared by every caller in this process.
    images, _ = digit_images()
    images.setflags(write=False)
    return images


@lru_cache(maxsize=1)
def _plans() -> dict[str, _Plan]:
    """The partition of the pool into the parts of :data:`PARTS` (cheap: labels only)."""
    labels = _labels()
    _, pool = labelled_and_production_indices(labels)
    # Shuffled first (seeded): scikit-learn's digits are grouped by writer, so consecutive
    # digits of a class share a hand; a part cut from them would be a writer shift, not an
    # in-distribution sample. Then class-interleaved: the first of each class, then the second
    # of each, ... so every consecutive slice holds every digit in about equal numbers.
    pool = np.random.default_rng([STREAM_SEED, len(PARTS)]).permutation(pool)
    order = np.lexsort((labels[pool], class_ranks(labels[pool])))
    interleaved = pool[order]
    plans: dict[str, _Plan] = {}
    start = 0
    for number, part in enumerate(PARTS):
        stop = len(interleaved) if part.size is None else start + part.size
        if stop > len(interleaved):
            raise RuntimeError(f"the production pool ({len(interleaved)} digits) is too small for {part.name}")
        chosen = interleaved[start:stop]
        # Shuffled once so that neither file names nor listing order give the label away.
        shuffled = np.random.default_rng([STREAM_SEED, number]).permutation(chosen)
        labelled = frozenset(file_name(k) for k in _evenly_chosen(len(shuffled), part.labelled_share))
        plans[part.name] = _Plan(part, tuple(int(i) for i in shuffled), labelled)
        start = stop
    return plans


def production_partition() -> dict[str, np.ndarray]:
    """The digit indices of each part: ``labelled`` (the labelled batches), each production
    batch id (in file order) and ``holdout``; pairwise disjoint, together every digit."""
    labelled, _ = labelled_and_production_indices(_labels())
    parts = {name: np.asarray(plan.indices, dtype=int) for name, plan in _plans().items()}
    return {"labelled": labelled, **parts}


def _shifted(part: _Part, indices: tuple[int, ...]) -> list[np.ndarray]:
    images = _images()
    chosen = [images[i] for i in indices]
    if part.shift is None:
        return chosen
    return apply_shift(part.shift, chosen, seed=STREAM_SEED + PARTS.index(part))


def production_stream() -> list[StreamBatch]:
    """The production batches of the bundled stream, in order (``prod_001`` ...)."""
    plans = _plans()
    labels = _labels()
    batches = []
    for batch_id in STREAM_BATCHES:
        plan = plans[batch_id]
        names = plan.names
        images = _shifted(plan.part, plan.indices)
        batches.append(
            StreamBatch(
                batch_id=batch_id,
                shift=plan.part.shift,
                files={name: png_bytes(image) for name, image in zip(names, images, strict=True)},
                labels={name: str(labels[i]) for name, i in zip(names, plan.indices, strict=True)},
                labelled_share=float(plan.part.labelled_share),
                sources=dict(zip(names, plan.indices, strict=True)),
            )
        )
    return batches


def delayed_labels(batch_id: str) -> dict[str, str]:
    """The labels seeding delivers for ``batch_id`` (file name -> digit), sorted by name.

    Raises:
        ValueError: ``batch_id`` is not a batch of the stream.
    """
    plans = _plans()
    if batch_id not in STREAM_BATCHES:
        raise ValueError(f"unknown production batch {batch_id!r}; the stream has {', '.join(STREAM_BATCHES)}")
    plan, labels = plans[batch_id], _labels()
    return {name: str(labels[i]) for name, i in zip(plan.names, plan.indices, strict=True) if name in plan.labelled}


def drifted_holdout(shift: str = "new_camera") -> tuple[list[np.ndarray], np.ndarray]:
    """The held-out drifted evaluation set: pool digits in no production batch, shifted.

    These images are never written anywhere, so accuracy on them before and after retraining
    measures what retraining on the delivered labels taught, not what it memorised.

    Args:
        shift: a :data:`~cvops_dagster.monitoring.shifts.SHIFTS` name, or ``"none"`` for the
            digits unchanged.

    Returns:
        The images (``uint8`` arrays) and their integer labels, in the same order.

    Raises:
        ValueError: ``shift`` is not a known shift.
    """
    if shift != "none" and shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; known shifts: none, {', '.join(SHIFTS)}")
    plan = _plans()[HOLDOUT]
    images, labels = _images(), _labels()
    chosen = [images[i].copy() for i in plan.indices]
    if shift != "none":
        chosen = apply_shift(shift, chosen, seed=STREAM_SEED + PARTS.index(plan.part))
    return chosen, labels[list(plan.indices)]


def labels_csv(labels: Mapping[str, str]) -> bytes:
    """``labels.csv`` content: header ``file,label``, one row per file sorted by name, each
    line ended by ``\\n`` (a file without a final line end reads as truncated)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label"])
    writer.writerows(sorted(labels.items()))
    return buffer.getvalue().encode("utf-8")


def write_delayed_labels(root: str, batch_id: str, labels: Mapping[str, str], endpoint_url: str | None = None) -> str:
    """Deliver ``labels`` (file -> label) as ``<root>/production/<batch_id>/labels.csv``, atomically.

    A reader never sees a partial file: on a local folder the content is written under a
    hidden temporary name in the ``production`` folder (not a batch, so no listing counts it)
    and renamed into place; on S3 a single PUT is atomic. Replaces any earlier labels file.

    Returns:
        The path (or key) written.

    Raises:
        ValueError: ``batch_id`` is not a plain folder name.
    """
    zone = LandingZone(root, endpoint_url)
    target = zone.labels_path(batch_id)
    data = labels_csv(labels)
    if zone.is_local:
        batch_folder = os.path.dirname(target)
        production_folder = os.path.dirname(batch_folder)
        os.makedirs(batch_folder, exist_ok=True)
        temporary = os.path.join(production_folder, f".{LABELS_FILE}.{batch_id}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    else:
        zone.fs.pipe_file(target, data)
    logger.info("delivered %d delayed labels for production batch %s", len(labels), batch_id)
    return target


def seed_production(root: str, endpoint_url: str | None = None, *, labels: bool = True) -> dict[str, int]:
    """Write the production stream into the landing zone ``root`` (a folder or ``s3://...``).

    Each batch's images go to ``<root>/production/<batch_id>/``, then its ``_READY`` (written
    last, so no sensor sees a partial batch), then, when ``labels`` is true and the batch has
    some, its ``labels.csv`` (:func:`delayed_labels`, written by :func:`write_delayed_labels`).

    Returns:
        The number of images written per batch id.
    """
    zone = LandingZone(root, endpoint_url)
    counts: dict[str, int] = {}
    for batch in production_stream():
        folder = zone.labels_path(batch.batch_id).rsplit("/", 1)[0]  # the batch folder, validated
        if zone.is_local:
            os.makedirs(folder, exist_ok=True)
        for name, data in batch.files.items():
            zone.fs.pipe_file(f"{folder}/{name}", data)
        zone.fs.pipe_file(f"{folder}/{READY_MARKER}", b"")
        counts[batch.batch_id] = len(batch.files)
        delivered = batch.delayed_labels if labels else {}
        if delivered:
            write_delayed_labels(root, batch.batch_id, delivered, endpoint_url)
        logger.info("seeded production batch %s: %d images, %d labels", batch.batch_id, counts[batch.batch_id], len(delivered))
    return counts


__all__ = [
    "HOLDOUT",
    "STREAM_BATCHES",
    "StreamBatch",
    "delayed_labels",
    "drifted_holdout",
    "file_name",
    "labels_csv",
    "production_partition",
    "production_stream",
    "seed_production",
    "write_delayed_labels",
]
