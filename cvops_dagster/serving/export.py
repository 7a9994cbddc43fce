"""Export a trained classifier to a self-contained ONNX runtime file, and prove it matches PyTorch.

The file has one input ``input`` (float32 ``[batch, C, H, W]``, dynamic batch) and two outputs,
``logits`` and ``embedding``, and carries its labels, input spec, dataset version and model
hash in ``metadata_props`` (see :mod:`cvops_dagster.serving.runtime_file`), sealed with an
integrity hash, so the predictor can serve it from the file alone.

Importing this module loads no torch (the ``serving`` rule): :func:`export_onnx` and
:func:`check_parity` take a torch model, so they import torch in their bodies, where one exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.serving.predictor import Predictor
from cvops_dagster.serving.runtime_checks import stamp_runtime_model
from cvops_dagster.serving.runtime_file import (
    EMBEDDING_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    RuntimeMetadata,
    runtime_key,
    write_runtime_once,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18

# The exporter warns once per missing torchvision op; this project never uses torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
PARITY_ATOL = 1e-4
PARITY_MIN_AGREEMENT = 0.999


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        key: storage key (``runtimes/<model_id>/model.onnx``).
        uri: full location of the file.
        sha256: SHA-256 of the file bytes (pin it with ``Predictor(expected_sha256=...)``).
        size_bytes: file size.
        opset: ONNX opset of the default domain.
        n_nodes: nodes in the exported graph.
        metadata: the embedded runtime metadata, as a dict.
    """

    key: str
    uri: str
    sha256: str
    size_bytes: int
    opset: int
    n_nodes: int
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (asset metadata, ``cvops status``)."""
        return asdict(self)


def _export_proto(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    import torch  # the exporter is torch's; callers already hold a torch model

    class _LogitsAndEmbedding(torch.nn.Module):
        """Exposes ``forward_with_embedding`` as ``forward`` so the graph has both outputs."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model  # the attribute name prefixes the graph's initializer names

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.model.forward_with_embedding(x)

    # The dynamo (torch.export) exporter, deliberately: it is torch's supported path (the
    # TorchScript exporter is deprecated), and on this CNN family it gives the cleaner graph:
    # BatchNorm folded into Conv, no Identity/Flatten leftovers, a named symbolic "batch"
    # dimension on the input and both outputs. The example batch is 2, not 1, because
    # torch.export specializes size-1 dimensions to constants.
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(
        _LogitsAndEmbedding(model).eval(),
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[LOGITS_NAME, EMBEDDING_NAME],
        opset_version=opset,
        dynamic_shapes=({0: batch},),
        optimize=True,
        external_data=False,
        verbose=False,
    )
    if program is None:  # pragma: no cover - only when f= is given
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _check_dynamic_batch(proto: onnx.ModelProto) -> None:
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param or dim0.HasField("dim_value"):
            raise RuntimeError(f"export produced a fixed batch dimension on {value.name!r}")


def export_onnx(
    model: nn.Module,
    metadata: Mapping[str, Any] | RuntimeMetadata,
    storage: ArtifactStorage,
    model_id: str,
    *,
    opset: int = DEFAULT_OPSET,
    content_addressed: bool = False,
) -> ExportResult:
    """Export ``model`` to ``runtimes/<model_id>/model.onnx``, validated and self-describing.

    Args:
        model: any ``nn.Module`` with ``forward_with_embedding(x) -> (logits, embedding)``.
        metadata: ``labels``, ``input_spec`` (InputSpec or its dict), ``dataset_version``,
            ``model_hash`` (the weights SHA-256 from the model card); ``model_id`` defaults to
            the argument.
        storage: where the file goes (written atomically).
        model_id: the model's id in the artifact store.
        opset: ONNX opset, at least 17.
        content_addressed: write ``runtimes/<model_id>/<sha256>.onnx`` instead, once (see
            :func:`~cvops_dagster.serving.runtime_file.write_runtime_once`): a new build never
            overwrites a file that may be served.

    Returns:
        ExportResult with the key, URI, file hash and graph summary.

    Raises:
        onnx.checker.ValidationError: the exported graph fails the full checker (nothing written).
    """
    import torch  # here, not on import: only the step that exports loads torch

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if not isinstance(metadata, RuntimeMetadata):
        metadata = RuntimeMetadata.from_mapping({"model_id": model_id, **dict(metadata)})
    spec = metadata.input_spec
    example = torch.zeros(2, spec.channels, spec.height, spec.width, dtype=torch.float32)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, _ = model.forward_with_embedding(example)
        if logits.shape[-1] != len(metadata.labels):
            raise ValueError(f"model has {logits.shape[-1]} outputs but metadata lists {len(metadata.labels)} labels")
        proto = _export_proto(model, example, opset)
    finally:
        model.train(was_training)

    _check_dynamic_batch(proto)
    proto.producer_name = "cvops-dagster"
    proto.doc_string = f"cvops classifier runtime for model {metadata.model_id} (dataset {metadata.dataset_version})"
    stamp_runtime_model(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()

    digest = hashlib.sha256(data).hexdigest()
    if content_addressed:
        key = runtime_key(model_id, sha256=digest)
        uri = write_runtime_once(storage, key, data)
    else:
        key = runtime_key(model_id)
        uri = storage.write_bytes(key, data)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    result = ExportResult(
        key=key,
        uri=uri,
        sha256=digest,
        size_bytes=len(data),
        opset=int(opset_used),
        n_nodes=len(proto.graph.node),
        metadata=metadata.to_dict(),
    )
    logger.info("exported %s (%d nodes, opset %d, %d bytes)", uri, result.n_nodes, result.opset, len(data))
    return result


@dataclass(frozen=True)
class ParityReport:
    """PyTorch vs ONNX Runtime on the same inputs.

    Attributes:
        max_abs_diff: largest absolute logit difference.
        argmax_agreement: fraction of samples with the same predicted class.
        n: samples compared.
        passed: ``max_abs_diff <= atol`` and ``argmax_agreement >= min_agreement``.
        max_abs_embedding_diff: largest absolute embedding difference (reported, not gated).
    """

    max_abs_diff: float
    argmax_agreement: float
    n: int
    passed: bool
    max_abs_embedding_diff: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (asset metadata, ``cvops status``)."""
        return asdict(self)


def check_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    inputs: np.ndarray | torch.Tensor,
    *,
    atol: float = PARITY_ATOL,
    min_agreement: float = PARITY_MIN_AGREEMENT,
    batch_size: int = 256,
) -> ParityReport:
    """Compare the PyTorch model and the runtime file on preprocessed inputs (the test split).

    The ONNX side goes through :class:`~cvops_dagster.serving.predictor.Predictor`, i.e. the served
    configuration (all graph optimisations on), not a friendlier one.

    Args:
        model: the PyTorch model that was exported.
        onnx_path: the runtime file.
        inputs: float32 ``[N, C, H, W]`` produced by the shared ``preprocess``.
        atol: largest allowed absolute logit difference.
        min_agreement: smallest allowed fraction of identical predicted classes.
        batch_size: comparison batch size.
    """
    import torch  # here, not on import: the model compared is a torch model

    array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    array = np.ascontiguousarray(array, dtype=np.float32)
    n = len(array)
    if n == 0:
        raise ValueError("parity needs at least one input")
    predictor = Predictor(onnx_path)
    was_training = model.training
    model.eval()
    max_diff = max_emb_diff = 0.0
    agree = 0
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = array[start : start + batch_size]
                t_logits, t_emb = model.forward_with_embedding(torch.from_numpy(chunk))
                t_logits, t_emb = t_logits.float().numpy(), t_emb.float().numpy()
                o_logits, o_emb = predictor.run(chunk)
                max_diff = max(max_diff, float(np.abs(t_logits - o_logits).max()))
                max_emb_diff = max(max_emb_diff, float(np.abs(t_emb - o_emb).max()))
                agree += int((t_logits.argmax(1) == o_logits.argmax(1)).sum())
    finally:
        model.train(was_training)
    agreement = agree / n
    report = ParityReport(
        max_abs_diff=max_diff,
        argmax_agreement=agreement,
        n=n,
        passed=bool(max_diff <= atol and agreement >= min_agreement),
        max_abs_embedding_diff=max_emb_diff,
    )
    logger.info("parity on %d samples: max |dlogit| %.3g, agreement %.4f, passed=%s", n, max_diff, agreement, report.passed)
    return report
