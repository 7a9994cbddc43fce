"""The ONNX runtime file format: the names a cvops runtime file uses and what it says about itself.

A runtime file (written by :mod:`cvops_dagster.serving.export`, its INT8 variant by
:mod:`cvops_dagster.serving.quantization`) has one input ``input`` and two outputs, ``logits`` and
``embedding``, and describes itself in ``metadata_props``, every value a JSON string (labels,
input spec, dataset version, model hash, model id, precision), sealed with
``cvops.integrity_sha256``. This module owns those names, :class:`RuntimeMetadata` and its round
trip, the storage key of a runtime, and the checks that need no ``onnx`` (the pinned file hash,
the input and output names); the seal and the full defensive load are in
:mod:`cvops_dagster.serving.runtime_checks`.

Plain Python on purpose: ``cvops predict`` imports it, and importing ``onnx`` alone costs about
0.6 s of CPU (its ``ml_dtypes`` dependency registers its NumPy loops on import).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvops_dagster.imaging.preprocessing import InputSpec

if TYPE_CHECKING:
    from cvops_dagster.core.storage import ArtifactStorage

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


def runtime_key(model_id: str, precision: str = "fp32", sha256: str | None = None) -> str:
    """Storage key of a runtime file.

    With ``sha256`` the key is content addressed, ``runtimes/<model_id>/<sha256>.onnx``
    (``<sha256>.int8.onnx`` for INT8): the runtime build writes candidates there, so a rebuild
    never touches a file being served. Without it, ``runtimes/<model_id>/model.onnx``
    (``model.int8.onnx``), the fixed name a plain export writes.
    """
    stem = sha256 if sha256 is not None else "model"
    name = f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx"
    return f"runtimes/{model_id}/{name}"


def write_runtime_once(storage: ArtifactStorage, key: str, data: bytes) -> str:
    """Write a content-addressed runtime file unless ``key`` already holds exactly ``data``.

    A file already there with other bytes does not match the SHA-256 its name promises (it was
    corrupted or modified): it is replaced, and the log says so. Returns the file's URI.
    """
    if storage.exists(key):
        if hashlib.sha256(storage.read_bytes(key)).hexdigest() == hashlib.sha256(data).hexdigest():
            return storage.uri(key)
        logger.warning("%s does not hold the bytes its content address names (corrupted or modified); replacing it", storage.uri(key))
    return storage.write_bytes(key, data)


class RuntimeModelError(ValueError):
    """A runtime model file was refused (unsafe, corrupted, tampered or not a cvops runtime)."""


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


# --------------------------------------------------------------------------- checks without onnx


def read_runtime_bytes(path: str | os.PathLike[str], expected_sha256: str | None = None) -> tuple[bytes, str]:
    """The file's bytes and their SHA-256, refused when ``expected_sha256`` is given and differs.

    Raises:
        RuntimeModelError: the file cannot be read, or its SHA-256 is not the expected one.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RuntimeModelError(f"{path}: cannot read model file: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise RuntimeModelError(f"{path}: file SHA-256 {digest} differs from the expected {expected_sha256}")
    return data, digest


def metadata_from_props(path: str | os.PathLike[str], props: Mapping[str, str]) -> RuntimeMetadata:
    """The runtime metadata in ``props`` (a file's ``metadata_props``), refused when it is not a
    cvops runtime's (no integrity seal, missing or malformed entries).

    Raises:
        RuntimeModelError: naming ``path`` and the reason.
    """
    if META_INTEGRITY not in props:
        raise RuntimeModelError(f"{path}: not a cvops runtime model (no {META_INTEGRITY} metadata)")
    try:
        return RuntimeMetadata.from_props(props)
    except ValueError as exc:
        raise RuntimeModelError(f"{path}: invalid cvops metadata: {exc}") from exc


def check_io_names(path: str | os.PathLike[str], inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Refuse a graph without input ``input`` and outputs ``logits`` and ``embedding``.

    Raises:
        RuntimeModelError: naming ``path`` and the names found.
    """
    if INPUT_NAME not in inputs or not {LOGITS_NAME, EMBEDDING_NAME} <= set(outputs):
        raise RuntimeModelError(
            f"{path}: expected input {INPUT_NAME!r} and outputs {LOGITS_NAME!r}, {EMBEDDING_NAME!r}; "
            f"got {list(inputs)} -> {list(outputs)}"
        )
