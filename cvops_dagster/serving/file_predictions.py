"""Predicting image files named on a command line: folders expanded, one outcome per path.

``cvops predict`` hands its arguments to :func:`predict_paths`. A named file is predicted as
it is (whatever its name); a named folder contributes every image file below it, recursively,
chosen by suffix (:data:`IMAGE_SUFFIXES`, the formats the cleaning decoder allows), in sorted
order, skipping hidden files and folders (names starting with ``.``), so a landing-zone batch
folder with its ``_READY`` marker and ``labels.csv`` can be given as is. A bad path never stops
the others: it becomes a :class:`PathPrediction` with an ``error`` naming the reason (missing,
not a file, unreadable, not a decodable image, a folder without image files), and the good
ones are still predicted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvops_dagster.imaging.isolation import decode_isolated
from cvops_dagster.imaging.policy import DecodeConfig
from cvops_dagster.serving.predictor import ImageLoadError, Predictor, read_image_bytes

logger = logging.getLogger(__name__)

#: Suffixes (lower case) of the formats :data:`cvops_dagster.imaging.policy.ALLOWED_FORMATS`
#: admits, as Pillow registers them; a test keeps the two in step.
IMAGE_SUFFIXES = frozenset(
    {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)


@dataclass(frozen=True)
class PathPrediction:
    """One line of ``cvops predict`` output: a label and confidence, or the reason there is none.

    Attributes:
        path: the image file (as named, or found in a named folder), or the bad path as given.
        label: predicted class name; ``None`` when ``error`` is set.
        confidence: probability of that class; ``None`` when ``error`` is set.
        error: why the path was not predicted; ``None`` on success.
    """

    path: str
    label: str | None
    confidence: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the path was predicted."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` record: ``path``, ``label``, ``confidence`` and ``error`` (null on success)."""
        return {"path": self.path, "label": self.label, "confidence": self.confidence, "error": self.error}


def _walk_images(folder: Path) -> list[tuple[str, str | None]]:
    """``(path, error)`` for the image files below ``folder``, sorted by path, and for each folder
    that cannot be listed. Hidden entries are skipped; symlinked folders are not followed, so a
    link loop cannot make the walk endless."""
    found: list[tuple[str, str | None]] = []

    def unlistable(exc: OSError) -> None:
        found.append((str(exc.filename), f"cannot list folder: {exc.strerror or exc}"))

    for root, dirs, files in os.walk(folder, onerror=unlistable, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(
            (os.path.join(root, name), None)
            for name in files
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        )
    return sorted(found, key=lambda entry: entry[0])


def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[str, str | None]]:
    """``(path, error)`` for each file to predict, in the order given (folders expanded in place).

    ``error`` is ``None`` for a path to read; a folder without image files, or one that cannot be
    listed, yields an entry with its error. Missing paths and non-files are passed through:
    :func:`~cvops_dagster.serving.predictor.read_image_bytes` names their reason, the same one it
    gives any caller.
    """
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            yield str(given), None
            continue
        entries = _walk_images(path)
        if not entries:
            yield str(given), f"no image files in folder (suffixes: {' '.join(sorted(IMAGE_SUFFIXES))})"
        yield from entries


def _chunks(items: Iterator[tuple[str, str | None]], size: int) -> Iterator[list[tuple[str, str | None]]]:
    # itertools.batched arrives with Python 3.12; the project supports 3.11.
    chunk: list[tuple[str, str | None]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_paths(
    runtime: Predictor | str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 64,
    intra_op_num_threads: int | None = None,
    expected_sha256: str | None = None,
    isolation: DecodeConfig = DecodeConfig(),
) -> list[PathPrediction]:
    """Classify image files and folders of them with a runtime file; one record per file, in order.

    Images of any mode and size are converted to the model's channels and size by the shared
    preprocessing. Files are read ``batch_size`` at a time, so a large folder never sits in
    memory whole.

    Args:
        runtime: a :class:`Predictor`, or the runtime file to open one on.
        paths: image files and folders (see the module docstring for what a folder contributes).
        batch_size: images decoded and run per session call.
        intra_op_num_threads: ONNX Runtime threads (default: available cores), for a file.
        expected_sha256: the SHA-256 the runtime file must have, for a file.
        isolation: limits of the decoding worker (per-file time limit, memory limit).

    Returns:
        One :class:`PathPrediction` per file found, a bad path as a record with ``error`` set.

    Raises:
        RuntimeModelError: the model file is refused (nothing is predicted then).
    """
    if isinstance(runtime, Predictor):
        predictor = runtime
    else:
        predictor = Predictor(runtime, intra_op_num_threads=intra_op_num_threads, expected_sha256=expected_sha256)
    records: list[PathPrediction] = []
    for chunk in _chunks(expand_paths(paths), batch_size):
        read_paths, files = [], []
        outcome: dict[int, PathPrediction] = {}
        for i, (path, error) in enumerate(chunk):
            if error is None:
                try:
                    files.append(read_image_bytes(path))
                    read_paths.append((i, path))
                    continue
                except ImageLoadError as exc:
                    error = exc.reason
            logger.info("not predicted: %s: %s", path, error)
            outcome[i] = PathPrediction(path, None, None, error)
        # Untrusted files are decoded in a worker process with a time and memory limit: a
        # hostile file costs its own record, never the command.
        good_paths, images = [], []
        for (i, path), decoded in zip(read_paths, decode_isolated(files, isolation), strict=True):
            if decoded.pixels is None:
                logger.info("not predicted: %s: %s", path, decoded.failure)
                outcome[i] = PathPrediction(path, None, None, f"cannot decode image: {decoded.failure}")
            else:
                good_paths.append((i, path))
                images.append(decoded.pixels)
        if images:
            result = predictor.predict(images, batch_size=batch_size)
            for (i, path), label, confidence in zip(good_paths, result.labels, result.confidences, strict=True):
                outcome[i] = PathPrediction(path, label, float(confidence))
        records.extend(outcome[i] for i in range(len(chunk)))
    return records
