"""The ONNX predictor: serves a cvops runtime file with ONNX Runtime alone, without torch.

A runtime file carries everything needed to use it (see
:mod:`cvops_dagster.serving.runtime_file`), so this module needs nothing but ONNX Runtime, numpy,
the cleaning decoder (:func:`~cvops_dagster.imaging.decode.decode_image`, so a served file is
seen as a training file was) and the shared :func:`~cvops_dagster.imaging.preprocessing.preprocess`
(the very function the training eval transform uses).

It owns the session settings every ONNX Runtime session in this system uses
(:func:`make_session_options`), reading one image file (:func:`read_image_file`, which names
what is wrong with a bad path), :class:`Predictor` and its :class:`Predictions`.

This module must never import torch: the serving process runs without PyTorch (a test proves it).
Nor ``onnx`` on import: only loading an unpinned file runs the ``onnx`` checks.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from cvops_dagster.core.settings import available_cpus
from cvops_dagster.imaging.decode import decode_image
from cvops_dagster.imaging.policy import DecodeFailure
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess
from cvops_dagster.serving.runtime_file import (
    EMBEDDING_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    RuntimeMetadata,
    RuntimeModelError,
    check_io_names,
    metadata_from_props,
    read_runtime_bytes,
)

logger = logging.getLogger(__name__)

ImageInput = Image.Image | np.ndarray | str | os.PathLike[str]


class ImageLoadError(ValueError):
    """An input image path could not be read as an image.

    Attributes:
        path: the path as given.
        reason: what is wrong with it, without the path (``no such file or directory``,
            ``not a regular file``, ``cannot read file: ...``, ``cannot decode image: ...``).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def default_num_threads() -> int:
    """The cores this process may run on (respects CPU affinity pinning where known)."""
    return max(1, available_cpus())


def make_session_options(
    intra_op_num_threads: int | None = None,
    graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    *,
    allow_spinning: bool = False,
) -> ort.SessionOptions:
    """Session options used by every ONNX Runtime session in this system.

    Threads are set on purpose: intra-op threads default to the available cores, one
    inter-op thread (the graph is a chain, parallel branches buy nothing), and spinning is off
    so idle worker threads do not burn the cores that preprocessing and other processes
    (Dagster, training) need; the benchmark measures what that costs (``allow_spinning=True``
    exists for that comparison only).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_num_threads or default_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = graph_optimization_level
    spinning = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return options


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file, refusing what is no regular file before any read.

    Raises:
        ImageLoadError: the path is missing, not a regular file (a folder, a FIFO that would
            block the read, a device) or unreadable; ``reason`` says which.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file or directory") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ImageLoadError(path, f"not a file ({kind})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file: {exc.strerror or exc}") from exc


def read_image_file(path: str | os.PathLike[str]) -> Image.Image:
    """Decode one image file through the cleaning decoder, in this process (trusted files).

    :func:`~cvops_dagster.imaging.decode.decode_image` made the training set canonical (EXIF
    orientation, 16-bit scaling, alpha on the fixed background, first frame), so a served image
    is seen exactly as a training image was. Untrusted files go through
    :func:`~cvops_dagster.serving.file_predictions.predict_paths`, which decodes them isolated.

    Raises:
        ImageLoadError: see :func:`read_image_bytes`, or not a decodable image.
    """
    data = read_image_bytes(path)
    try:
        return decode_image(data).image
    except DecodeFailure as exc:
        raise ImageLoadError(path, f"cannot decode image: {exc}") from exc


def _as_image(item: ImageInput) -> Image.Image | np.ndarray:
    """An in-memory image as is; a path through :func:`read_image_file`."""
    if isinstance(item, (Image.Image, np.ndarray)):
        return item
    return read_image_file(item)


@dataclass
class Predictions:
    """Predictions for a batch, in input order.

    Attributes:
        labels: predicted class name per sample.
        class_indices: int64 ``[N]`` index of the predicted class.
        probabilities: float32 ``[N, K]`` softmax over the logits.
        embeddings: float32 ``[N, D]`` penultimate-layer features (drift, review).
        logits: float32 ``[N, K]`` raw model outputs.
    """

    labels: list[str]
    class_indices: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray
    logits: np.ndarray = field(repr=False)

    @property
    def confidences(self) -> np.ndarray:
        """Probability of the predicted class, ``[N]``."""
        if len(self.labels) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.probabilities[np.arange(len(self.labels)), self.class_indices]

    def __len__(self) -> int:
        return len(self.labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


class Predictor:
    """An ONNX Runtime session over a validated cvops runtime file.

    Args:
        path: the ``.onnx`` file (FP32 or INT8 variant).
        intra_op_num_threads: ONNX Runtime intra-op threads; ``None`` = the available cores.
        expected_sha256: optional SHA-256 the file must have (from the artifact record).
        graph_optimization_level: ONNX Runtime graph optimisation (default: all).
        published: the file is one the serving pointer pins, and ``expected_sha256`` is that pin.
            :func:`~cvops_dagster.serving.pointer.publish` pins only bytes that passed every
            check of :func:`~cvops_dagster.serving.runtime_checks.load_runtime_model` and hold no
            external data, so equal hashes mean those checks hold: they are not run again, and
            ``onnx`` (about 0.6 s of CPU to import) stays out of ``cvops predict``. The
            metadata and the input and output names are still read and checked, through ONNX
            Runtime. Never set it for a hash computed from the file itself.

    Raises:
        RuntimeModelError: when the file is refused (see :func:`load_runtime_model`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        intra_op_num_threads: int | None = None,
        expected_sha256: str | None = None,
        graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        published: bool = False,
    ) -> None:
        self.path = Path(path)
        self.intra_op_num_threads = int(intra_op_num_threads or default_num_threads())
        options = make_session_options(self.intra_op_num_threads, graph_optimization_level)
        metadata: RuntimeMetadata | None = None
        if published:
            if expected_sha256 is None:
                raise ValueError("published=True needs the pinned expected_sha256")
            data, self.sha256 = read_runtime_bytes(path, expected_sha256)
            source: bytes | str = data  # published files hold no external data (publish checks it)
        else:
            # onnx is imported here, not on import: the published path above never needs it.
            from cvops_dagster.serving.runtime_checks import load_runtime_model

            loaded = load_runtime_model(path, expected_sha256=expected_sha256)
            self.sha256, metadata = loaded.sha256, loaded.metadata
            # Without external data the session is built from the exact bytes that were verified,
            # so the file cannot change between the checks and the load.
            source = str(loaded.path) if loaded.has_external_data else loaded.data
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeModelError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
        if metadata is None:
            metadata = metadata_from_props(path, self.session.get_modelmeta().custom_metadata_map)
            check_io_names(path, [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        self.metadata: RuntimeMetadata = metadata
        logger.info(
            "loaded runtime %s (%s, %d labels, %d threads)",
            self.path, self.metadata.precision, len(self.metadata.labels), self.intra_op_num_threads,
        )

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names from the runtime file, index ``i`` is logit ``i``."""
        return self.metadata.labels

    @property
    def input_spec(self) -> InputSpec:
        """Size, channels and normalisation the model expects (from the runtime file)."""
        return self.metadata.input_spec

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw session call on preprocessed float32 ``[N, C, H, W]``; returns (logits, embeddings)."""
        spec = self.input_spec
        expected = (spec.channels, spec.height, spec.width)
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(f"expected inputs [N, {expected[0]}, {expected[1]}, {expected[2]}], got {inputs.shape}")
        logits, embeddings = self.session.run(
            [LOGITS_NAME, EMBEDDING_NAME], {INPUT_NAME: np.ascontiguousarray(inputs, dtype=np.float32)}
        )
        return logits, embeddings

    def predict_array(self, inputs: np.ndarray, batch_size: int = 64) -> Predictions:
        """Predict preprocessed float32 ``[N, C, H, W]`` inputs in batches of ``batch_size``."""
        logits_parts, emb_parts = [], []
        for start in range(0, len(inputs), batch_size):
            logits, emb = self.run(inputs[start : start + batch_size])
            logits_parts.append(logits)
            emb_parts.append(emb)
        return self._assemble(logits_parts, emb_parts)

    def predict(self, images: Sequence[ImageInput], batch_size: int = 64) -> Predictions:
        """Predict images given as paths, PIL images or uint8 arrays (any mode and size).

        Each batch is converted with the shared :func:`preprocess` (mode, size, normalisation
        from the model's own metadata), so serving sees exactly the training eval transform.

        Raises:
            ImageLoadError: a path cannot be read as an image (the first one met; see
                :func:`cvops_dagster.serving.file_predictions.predict_paths` to get every bad path).
        """
        logits_parts, emb_parts = [], []
        for start in range(0, len(images), batch_size):
            batch = [_as_image(item) for item in images[start : start + batch_size]]
            logits, emb = self.run(preprocess(batch, self.input_spec))
            logits_parts.append(logits)
            emb_parts.append(emb)
        return self._assemble(logits_parts, emb_parts)

    def _assemble(self, logits_parts: list[np.ndarray], emb_parts: list[np.ndarray]) -> Predictions:
        if logits_parts:
            logits = np.concatenate(logits_parts).astype(np.float32)
            embeddings = np.concatenate(emb_parts).astype(np.float32)
        else:
            dim = self.session.get_outputs()[1].shape[-1]
            logits = np.zeros((0, len(self.labels)), dtype=np.float32)
            embeddings = np.zeros((0, dim if isinstance(dim, int) else 0), dtype=np.float32)
        indices = logits.argmax(axis=1).astype(np.int64)
        return Predictions(
            labels=[self.labels[i] for i in indices],
            class_indices=indices,
            probabilities=softmax(logits),
            embeddings=embeddings,
            logits=logits,
        )
