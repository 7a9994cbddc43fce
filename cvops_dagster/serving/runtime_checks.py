"""The runtime file's integrity seal and the defensive load, both built on ``onnx``.

:func:`stamp_runtime_model` writes :class:`~cvops_dagster.serving.runtime_file.RuntimeMetadata`
into a model's ``metadata_props`` and seals it; :func:`load_runtime_model` checks a file before
anything serves it. Loading is defensive, because a runtime file is an input like any other:

1. external-data references are inspected *before* anything could read them; an absolute
   ``location`` or one that resolves outside the model's folder is refused;
2. the embedded integrity hash (``cvops.integrity_sha256``: SHA-256 of the serialized model
   with that one entry removed) must match, so changed or truncated bytes are refused even
   when the result still parses; callers that know the file's SHA-256 from the artifact
   record (asset metadata) can also pass ``expected_sha256`` to pin the exact file;
3. ``onnx.checker.check_model(full_check=True)`` must pass.

Every refusal raises :class:`~cvops_dagster.serving.runtime_file.RuntimeModelError` naming the
file and the reason. The serving pointer runs these checks on every file before it pins it
(:func:`cvops_dagster.serving.pointer.publish`), which is why ``cvops predict`` can serve a pinned
file on its hash alone, without importing ``onnx``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from google.protobuf.message import DecodeError

from cvops_dagster.serving.runtime_file import (
    META_INTEGRITY,
    META_PREFIX,
    RuntimeMetadata,
    RuntimeModelError,
    check_io_names,
    metadata_from_props,
    read_runtime_bytes,
)


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


# --------------------------------------------------------------------------- loading


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
    data, digest = read_runtime_bytes(path, expected_sha256)
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
    metadata = metadata_from_props(path, props)

    try:
        # A path lets the checker resolve (already vetted) external data; otherwise check the proto.
        onnx.checker.check_model(str(path) if has_external else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise RuntimeModelError(f"{path}: ONNX checker failed: {exc}") from exc

    check_io_names(path, [i.name for i in model.graph.input], [o.name for o in model.graph.output])
    return LoadedRuntime(path, model, data, digest, metadata, has_external)
