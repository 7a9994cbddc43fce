"""The champion turned into serving runtimes: ONNX FP32 with parity, and a gated INT8 variant."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cvops_dagster.serving.export import ExportResult, ParityReport, check_parity, export_onnx
from cvops_dagster.registry.model_store import card_input_spec, load_model
from cvops_dagster.imaging.preprocessing import preprocess
from cvops_dagster.serving.quantization import Int8Decision, build_int8_runtime
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.loading import load_dataset

logger = logging.getLogger(__name__)

SERVING_KEY = "production/serving.json"


@dataclass
class RuntimeBuild:
    """What :func:`build_runtimes` produced for one model."""

    model_id: str
    dataset_version: str
    export: ExportResult
    parity: ParityReport
    int8: Int8Decision

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
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "export": self.export.to_dict(), "parity": self.parity.to_dict(), "int8_decision": asdict(self.int8)}


@contextmanager
def local_copy(storage: ArtifactStorage, key: str) -> Iterator[Path]:
    """A local path for ``key``: the file itself when storage is local, else a temporary copy."""
    path = storage.local_path(key)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cvops-runtime-") as folder:
        copy = Path(folder) / Path(key).name
        copy.write_bytes(storage.read_bytes(key))
        yield copy


def build_runtimes(storage: ArtifactStorage, model_id: str, dataset_version: str | None = None) -> RuntimeBuild:
    """Export ``model_id`` to ONNX, check parity on the test split, and gate an INT8 variant.

    Args:
        storage: artifact store with the model and its dataset.
        model_id: the model to export (normally the production champion).
        dataset_version: dataset whose test split checks parity and INT8 accuracy
            (default: the one in the model card).
    """
    model, card = load_model(storage, model_id)
    version = dataset_version or card["dataset_version"]
    data = load_dataset(storage, version)
    spec = card_input_spec(card)
    exported = export_onnx(
        model,
        {"labels": card["labels"], "input_spec": spec, "dataset_version": version, "model_hash": card["weights_sha256"]},
        storage,
        model_id,
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
    logger.info("runtime %s: parity %s, int8 %s", exported.uri, parity.passed, "kept" if int8.accepted else "rejected")
    build = RuntimeBuild(model_id, version, exported, parity, int8)
    if parity.passed:
        publish(storage, build)
    return build


def publish(storage: ArtifactStorage, build: RuntimeBuild) -> None:
    """Point serving at ``build`` (``production/serving.json``), pinned by file hash.

    Written only after parity passed, so a failed export never becomes what `cvops predict`
    serves: the previous pointer, and the file hash it pins, stay.
    """
    storage.write_json(
        SERVING_KEY,
        {
            "model_id": build.model_id,
            "dataset_version": build.dataset_version,
            "fp32_key": build.export.key,
            "fp32_sha256": build.export.sha256,
            "int8_key": build.int8.key if build.int8.accepted else None,
            "int8_sha256": build.int8.sha256 if build.int8.accepted else None,
        },
    )


def serving_record(storage: ArtifactStorage) -> dict[str, Any]:
    """The published runtime (``production/serving.json``).

    Raises:
        FileNotFoundError: no runtime was published yet.
    """
    if not storage.exists(SERVING_KEY):
        raise FileNotFoundError("no production runtime yet (run `cvops run` first)")
    return storage.read_json(SERVING_KEY)


def production_runtime(storage: ArtifactStorage, int8: bool = False) -> tuple[str, str]:
    """Key and pinned SHA-256 of the runtime being served.

    Raises:
        FileNotFoundError: no runtime was published yet, or no INT8 one was accepted.
    """
    record = serving_record(storage)
    if int8 and not record.get("int8_key"):
        raise FileNotFoundError(f"production model {record['model_id']} has no accepted INT8 runtime")
    prefix = "int8" if int8 else "fp32"
    return record[f"{prefix}_key"], record[f"{prefix}_sha256"]


def benchmark_production_runtime(storage: ArtifactStorage, threads: int | None = None) -> dict[str, Any]:
    """``cvops bench runtime`` on the production model: PyTorch eager vs ORT FP32 vs INT8."""
    from cvops_dagster.bench.runtime import run_runtime_benchmark

    record = serving_record(storage)
    fp32_key = record["fp32_key"]
    model, card = load_model(storage, record["model_id"])
    data = load_dataset(storage, record["dataset_version"])
    inputs = preprocess(data.splits["test"].images or data.splits["train"].images, card_input_spec(card))
    with local_copy(storage, fp32_key) as fp32_path:
        if record.get("int8_key"):
            with local_copy(storage, record["int8_key"]) as int8_path:
                figures = run_runtime_benchmark(model, fp32_path, int8_path, inputs, threads=threads)
        else:
            figures = run_runtime_benchmark(model, fp32_path, None, inputs, threads=threads)
    return {"model_id": record["model_id"], **figures}
