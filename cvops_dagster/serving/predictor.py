"""The ONNX predictor: serves an exported classifier from the ``.onnx`` file alone, without torch.

A runtime file written by :mod:`cvops_dagster.serving.export` carries everything needed to use it in
its ``metadata_props`` (labels, input spec, dataset version, model hash), so this module needs
nothing but ``onnx``, ``onnxruntime``, numpy and the shared :func:`~cvops_dagster.imaging.preprocessing.preprocess`
(the very function the training eval transform uses).

Loading is defensive, because a runtime file is an input like any other:

1. external-data references are inspected *before* anything could read them; an absolute
   ``location`` or one that resolves outside the model's folder is refused;
2. the embedded integrity hash (``cvops.integrity_sha256``: SHA-256 of the serialized model
   with that one entry removed) must match, so changed or truncated bytes are refused even
   when the result still parses; callers that know the file's SHA-256 from the artifact
   record (asset metadata) can also pass ``expected_sha256`` to pin the exact file;
3. ``onnx.checker.check_model(full_check=True)`` must pass.

Every refusal raises :class:`RuntimeModelError` naming the file and the reason.

This module must never import torch: the serving process runs without PyTorch (a test proves it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from PIL import Image

from cvops_dagster.imaging.preprocessing import InputSpec, preprocess

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
LOGITS_NAME = "logits"
EMBEDDING_NAME = "embedding"

# metadata_props keys; every value is a JSON string so the file is self-describing.
META_PREFIX = "cvops."
META_FORMAT = "cvops.format_version"
META_LABELS = "cvops.labels"
META_INPUT_SPEC = "cvops.input_spec"
META_INPUT_SIZE = "cvops.input_size"
META_CHANNELS = "cvops.channels"
META_MEAN = "cvops.mean"
META_STD = "cvops.std"
META_DATASET_VERSION = "cvops.dataset_version"
META_MODEL_HASH = "cvops.model_hash"
META_MODEL_ID = "cvops.model_id"
META_PRECISION = "cvops.precision"
META_INTEGRITY = "cvops.integrity_sha256"
FORMAT_VERSION = 1

ImageInput = Image.Image | np.ndarray | str | os.PathLike[str]


def runtime_key(model_id: str, precision: str = "fp32") -> str:
    """Storage key of a runtime file: ``runtimes/<model_id>/model.onnx`` (``model.int8.onnx`` for INT8)."""
    name = "model.onnx" if precision == "fp32" else f"model.{precision}.onnx"
    return f"runtimes/{model_id}/{name}"


class RuntimeModelError(ValueError):
    """A runtime model file was refused (unsafe, corrupted, tampered or not a cvops runtime)."""


class ImageLoadError(ValueError):
    """An input image path could not be read as an image."""


def default_num_threads() -> int:
    """The cores this process may run on (respects CPU affinity/cgroup pinning where known)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


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


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class RuntimeMetadata:
    """What a runtime file says about itself (read back from ``metadata_props``).

    Attributes:
        labels: class names, index ``i`` is logit ``i``.
        input_spec: size, channels and normalisation of the model input.
        dataset_version: the cleaned dataset version the model was trained on.
        model_hash: SHA-256 of the source model weights (the model card's weights hash).
        model_id: the model's id in the artifact store ("" when unknown).
        precision: ``fp32`` or ``int8``.
    """

    labels: tuple[str, ...]
    input_spec: InputSpec
    dataset_version: str
    model_hash: str
    model_id: str = ""
    precision: str = "fp32"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RuntimeMetadata:
        """Build from a plain dict: ``labels``, ``input_spec`` (dict or InputSpec), ``dataset_version``,
        ``model_hash`` and optionally ``model_id`` and ``precision``."""
        missing = [k for k in ("labels", "input_spec", "dataset_version", "model_hash") if k not in data]
        if missing:
            raise ValueError(f"runtime metadata is missing {missing}")
        spec = data["input_spec"]
        if not isinstance(spec, InputSpec):
            spec = InputSpec.from_dict(dict(spec))
        labels = tuple(str(label) for label in data["labels"])
        if not labels:
            raise ValueError("runtime metadata needs at least one label")
        return cls(
            labels=labels,
            input_spec=spec,
            dataset_version=str(data["dataset_version"]),
            model_hash=str(data["model_hash"]),
            model_id=str(data.get("model_id", "")),
            precision=str(data.get("precision", "fp32")),
        )

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries (JSON strings), without the integrity hash."""
        spec = self.input_spec
        return {
            META_FORMAT: json.dumps(FORMAT_VERSION),
            META_LABELS: json.dumps(list(self.labels)),
            META_INPUT_SPEC: json.dumps(spec.to_dict(), sort_keys=True),
            META_INPUT_SIZE: json.dumps([spec.height, spec.width]),
            META_CHANNELS: json.dumps(spec.channels),
            META_MEAN: json.dumps(list(spec.mean)),
            META_STD: json.dumps(list(spec.std)),
            META_DATASET_VERSION: json.dumps(self.dataset_version),
            META_MODEL_HASH: json.dumps(self.model_hash),
            META_MODEL_ID: json.dumps(self.model_id),
            META_PRECISION: json.dumps(self.precision),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> RuntimeMetadata:
        """Inverse of :meth:`to_props`; raises ``ValueError`` on missing or malformed entries."""
        try:
            size = json.loads(props[META_INPUT_SIZE])
            channels = int(json.loads(props[META_CHANNELS]))
            spec = InputSpec(
                height=int(size[0]),
                width=int(size[1]),
                channels=channels,
                mean=tuple(json.loads(props[META_MEAN])),
                std=tuple(json.loads(props[META_STD])),
            )
            return cls(
                labels=tuple(str(x) for x in json.loads(props[META_LABELS])),
                input_spec=spec,
                dataset_version=str(json.loads(props[META_DATASET_VERSION])),
                model_hash=str(json.loads(props[META_MODEL_HASH])),
                model_id=str(json.loads(props.get(META_MODEL_ID, '""'))),
                precision=str(json.loads(props.get(META_PRECISION, '"fp32"'))),
            )
        except KeyError as exc:
            raise ValueError(f"missing metadata entry {exc.args[0]!r}") from exc
        except (json.JSONDecodeError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed metadata: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (asset metadata, ``cvops status``)."""
        return {
            "labels": list(self.labels),
            "input_spec": self.input_spec.to_dict(),
            "dataset_version": self.dataset_version,
            "model_hash": self.model_hash,
            "model_id": self.model_id,
            "precision": self.precision,
        }


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def integrity_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialized model with the integrity entry left out.

    ONNX protos contain no map fields, so serialization is deterministic and a parsed file
    re-serializes to the same bytes: changing any weight, node or metadata value changes the digest.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [(p.key, p.value) for p in copy.metadata_props if p.key != META_INTEGRITY]
    del copy.metadata_props[:]
    for key, value in kept:
        copy.metadata_props.add(key=key, value=value)
    return hashlib.sha256(copy.SerializeToString()).hexdigest()


def stamp_runtime_model(model: onnx.ModelProto, metadata: RuntimeMetadata) -> onnx.ModelProto:
    """Write ``metadata`` into ``model.metadata_props`` (replacing any cvops entries) and seal it
    with the integrity hash. Returns the same proto, modified in place."""
    others = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for key, value in others:
        model.metadata_props.add(key=key, value=value)
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    model.metadata_props.add(key=META_INTEGRITY, value=integrity_digest(model))
    return model


# --------------------------------------------------------------------------- validation


def _all_tensors(graph: onnx.GraphProto, extra_nodes: Sequence[onnx.NodeProto] = ()) -> list[onnx.TensorProto]:
    """Initializers and tensor attributes, including those of nested subgraphs."""
    tensors = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors.extend([sparse.values, sparse.indices])
    for node in [*graph.node, *extra_nodes]:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            if attr.HasField("g"):
                tensors.extend(_all_tensors(attr.g))
            for sub in attr.graphs:
                tensors.extend(_all_tensors(sub))
    return tensors


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """The ``location`` of every tensor stored as external data."""
    locations = []
    function_nodes = [node for function in model.functions for node in function.node]
    for tensor in _all_tensors(model.graph, function_nodes):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.append(entries.get("location", ""))
    return locations


def check_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    """Refuse external-data locations that are absolute or resolve outside ``model_dir``.

    Symlinks are resolved too, so a link inside the folder pointing elsewhere is refused.
    """
    root = model_dir.resolve()
    for location in external_data_locations(model):
        if not location:
            raise RuntimeModelError("external data tensor without a location")
        if (
            PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).is_absolute()
            or PureWindowsPath(location).drive
            or location.startswith(("/", "\\"))
        ):
            raise RuntimeModelError(f"external data location {location!r} is an absolute path")
        target = (root / location).resolve()
        if target != root and root not in target.parents:
            raise RuntimeModelError(f"external data location {location!r} escapes the model folder {root}")


@dataclass
class LoadedRuntime:
    """A validated runtime file: its proto (external data not loaded), bytes and metadata."""

    path: Path
    model: onnx.ModelProto
    data: bytes
    sha256: str
    metadata: RuntimeMetadata
    has_external_data: bool


def load_runtime_model(path: str | os.PathLike[str], expected_sha256: str | None = None) -> LoadedRuntime:
    """Read and validate a runtime file (see the module docstring for the checks, in order).

    Args:
        path: the ``.onnx`` file.
        expected_sha256: when given, the file's SHA-256 must equal it (pins the exact artifact
            recorded at export time).

    Raises:
        RuntimeModelError: the file is missing, unsafe, corrupted, tampered or not a cvops runtime.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RuntimeModelError(f"{path}: cannot read model file: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise RuntimeModelError(f"{path}: file SHA-256 {digest} differs from the expected {expected_sha256}")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise RuntimeModelError(f"{path}: not a readable ONNX model (corrupted or truncated): {exc}") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise RuntimeModelError(f"{path}: not a readable ONNX model (no graph; corrupted or truncated?)")

    # Before anything could follow an external-data reference.
    try:
        check_external_data(model, path.parent)
    except RuntimeModelError as exc:
        raise RuntimeModelError(f"{path}: refused: {exc}") from exc
    has_external = bool(external_data_locations(model))

    props = _props(model)
    if META_INTEGRITY not in props:
        raise RuntimeModelError(f"{path}: not a cvops runtime model (no {META_INTEGRITY} metadata)")
    actual = integrity_digest(model)
    if actual != props[META_INTEGRITY]:
        raise RuntimeModelError(
            f"{path}: integrity check failed (content hash {actual} != recorded {props[META_INTEGRITY]}); "
            "the file was modified or corrupted after export"
        )
    try:
        metadata = RuntimeMetadata.from_props(props)
    except ValueError as exc:
        raise RuntimeModelError(f"{path}: invalid cvops metadata: {exc}") from exc

    try:
        # A path lets the checker resolve (already vetted) external data; otherwise check the proto.
        onnx.checker.check_model(str(path) if has_external else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise RuntimeModelError(f"{path}: ONNX checker failed: {exc}") from exc

    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if INPUT_NAME not in names_in or not {LOGITS_NAME, EMBEDDING_NAME} <= set(names_out):
        raise RuntimeModelError(
            f"{path}: expected input {INPUT_NAME!r} and outputs {LOGITS_NAME!r}, {EMBEDDING_NAME!r}; "
            f"got {names_in} -> {names_out}"
        )
    return LoadedRuntime(path, model, data, digest, metadata, has_external)


# --------------------------------------------------------------------------- prediction


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


def _load_image(item: ImageInput) -> Image.Image | np.ndarray:
    """An in-memory image as is; a file through the cleaning decoder.

    Files go through :func:`cvops_dagster.imaging.decoding.decode_image`, the function that made the
    training set canonical (EXIF orientation, 16-bit scaling, alpha on the fixed background,
    first frame), so a served image is seen exactly as a training image was.
    """
    if isinstance(item, (Image.Image, np.ndarray)):
        return item
    from cvops_dagster.imaging.decoding import DecodeFailure, decode_image

    path = Path(item)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file: {exc}") from exc
    try:
        return decode_image(data).image
    except DecodeFailure as exc:
        raise ImageLoadError(f"{path}: cannot decode image: {exc}") from exc


class Predictor:
    """An ONNX Runtime session over a validated cvops runtime file.

    Args:
        path: the ``.onnx`` file (FP32 or INT8 variant).
        intra_op_num_threads: ONNX Runtime intra-op threads; ``None`` = the available cores.
        expected_sha256: optional SHA-256 the file must have (from the artifact record).
        graph_optimization_level: ONNX Runtime graph optimisation (default: all).

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
    ) -> None:
        loaded = load_runtime_model(path, expected_sha256=expected_sha256)
        self.path = loaded.path
        self.sha256 = loaded.sha256
        self.metadata = loaded.metadata
        self.intra_op_num_threads = int(intra_op_num_threads or default_num_threads())
        options = make_session_options(self.intra_op_num_threads, graph_optimization_level)
        # Without external data the session is built from the exact bytes that were verified,
        # so the file cannot change between the checks and the load.
        source: bytes | str = str(loaded.path) if loaded.has_external_data else loaded.data
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeModelError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
        logger.info(
            "loaded runtime %s (%s, %d labels, %d threads)",
            self.path, self.metadata.precision, len(self.metadata.labels), self.intra_op_num_threads,
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    @property
    def input_spec(self) -> InputSpec:
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
            ImageLoadError: a path cannot be read as an image.
        """
        logits_parts, emb_parts = [], []
        for start in range(0, len(images), batch_size):
            batch = [_load_image(item) for item in images[start : start + batch_size]]
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


@dataclass(frozen=True)
class PathPrediction:
    """One line of ``cvops predict`` output."""

    path: str
    label: str
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "confidence": self.confidence}


def predict_paths(
    onnx_path: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 64,
    intra_op_num_threads: int | None = None,
    expected_sha256: str | None = None,
) -> list[PathPrediction]:
    """Classify image files with a runtime file: one ``(path, label, confidence)`` per input, in order.

    Images of any mode and size are converted to the model's channels and size by the shared
    preprocessing.

    Raises:
        RuntimeModelError: the model file is refused.
        ImageLoadError: an input path is not a readable image (the message names it).
    """
    paths = list(paths)
    predictor = Predictor(onnx_path, intra_op_num_threads=intra_op_num_threads, expected_sha256=expected_sha256)
    result = predictor.predict(paths, batch_size=batch_size)
    return [
        PathPrediction(str(p), label, float(conf))
        for p, label, conf in zip(paths, result.labels, result.confidences, strict=True)
    ]
