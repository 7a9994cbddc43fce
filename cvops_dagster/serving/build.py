"""Runtime candidates for a model: ONNX FP32 with parity, and a gated INT8 variant, under new
content-addressed names. Building publishes nothing.

:func:`build_runtimes` exports the model to ``runtimes/<model_id>/<sha256>.onnx`` (written once;
a file being served is never touched in place), checks parity with PyTorch on the test split,
and builds the INT8 candidate (``<sha256>.int8.onnx`` when its gate accepts it). The publisher
(:mod:`cvops_dagster.serving.publication`) decides what, if anything, to publish from the
:class:`RuntimeBuild` it returns.

Importing this module loads no torch (the ``serving`` rule): the model store and the exporter
need it, so :func:`build_runtimes` imports them where it runs, in the Dagster step that builds.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.loading import load_dataset
from cvops_dagster.imaging.preprocessing import preprocess
from cvops_dagster.serving.pointer import ServingPointer, local_copy
from cvops_dagster.serving.quantization import Int8Decision, build_int8_runtime

if TYPE_CHECKING:
    from cvops_dagster.serving.export import ExportResult, ParityReport

logger = logging.getLogger(__name__)


@dataclass
class RuntimeBuild:
    """What :func:`build_runtimes` produced for one model."""

    model_id: str
    dataset_version: str
    export: ExportResult
    parity: ParityReport
    int8: Int8Decision
    model_hash: str | None = None

    @property
    def passed(self) -> bool:
        """Whether every blocking check on the candidate passed (parity; INT8 only gates itself)."""
        return bool(self.parity.passed)

    def summary(self) -> dict[str, Any]:
        """The figures ``cvops status --json`` reports under ``onnx_runtime``."""
        return {
            "model_id": self.model_id,
            "dataset_version": self.dataset_version,
            "path": self.export.uri,
            "sha256": self.export.sha256,
            "opset": self.export.opset,
            "parity_max_abs_diff": self.parity.max_abs_diff,
            "parity_argmax_agreement": self.parity.argmax_agreement,
            "parity_samples": self.parity.n,
            "parity_passed": self.parity.passed,
            "int8": {
                "accepted": self.int8.accepted,
                "reason": self.int8.reason,
                "test_accuracy": self.int8.test_accuracy,
                "path": self.int8.path,
                "speedup": self.int8.speedup,
                "min_speedup": self.int8.min_speedup,
            },
        }

    def checks(self) -> dict[str, Any]:
        """What a history event records about the checks this runtime passed."""
        return {
            "parity": self.parity.to_dict(),
            "int8": {k: v for k, v in asdict(self.int8).items() if k not in ("path",)},
            "opset": self.export.opset,
            "size_bytes": self.export.size_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary plus the full export, parity and INT8 records."""
        return {**self.summary(), "export": self.export.to_dict(), "parity": self.parity.to_dict(), "int8_decision": asdict(self.int8)}

    def pointer(self) -> ServingPointer:
        """The serving pointer for this build (INT8 only when its gate accepted it)."""
        accepted = self.int8.accepted
        return ServingPointer(
            model_id=self.model_id,
            dataset_version=self.dataset_version,
            fp32_key=self.export.key,
            fp32_sha256=self.export.sha256,
            int8_key=self.int8.key if accepted else None,
            int8_sha256=self.int8.sha256 if accepted else None,
        )


def build_runtimes(storage: ArtifactStorage, model_id: str, dataset_version: str | None = None) -> RuntimeBuild:
    """Export ``model_id`` to a content-addressed ONNX candidate, check parity on the test split,
    and build the gated INT8 candidate. Nothing is published.

    Args:
        storage: artifact store with the model and its dataset.
        model_id: the model to export.
        dataset_version: dataset whose test split checks parity and INT8 accuracy
            (default: the one in the model card).
    """
    # torch loads here, not on import: the model store and the exporter are the torch side.
    from cvops_dagster.serving.export import check_parity, export_onnx
    from cvops_dagster.training.model_store import card_input_spec, load_model

    model, card = load_model(storage, model_id)
    version = dataset_version or card["dataset_version"]
    data = load_dataset(storage, version)
    spec = card_input_spec(card)
    exported = export_onnx(
        model,
        {"labels": card["labels"], "input_spec": spec, "dataset_version": version, "model_hash": card["weights_sha256"]},
        storage,
        model_id,
        content_addressed=True,
    )
    test = data.splits["test"] if len(data.splits["test"]) else data.splits["val"]
    with local_copy(storage, exported.key) as path:
        parity = check_parity(model, path, preprocess(test.images, spec))
    labels = [data.labels[int(t)] for t in test.targets]
    int8 = build_int8_runtime(
        storage,
        model_id,
        calibration_images=data.splits["train"].images[:512],
        test_images=test.images,
        test_labels=labels,
        fp32_key=exported.key,
    )
    logger.info("runtime candidate %s: parity %s, int8 %s", exported.uri, parity.passed, "kept" if int8.accepted else "rejected")
    return RuntimeBuild(model_id, version, exported, parity, int8, model_hash=card["weights_sha256"])
