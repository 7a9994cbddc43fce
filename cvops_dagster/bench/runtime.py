"""Runtime speed benchmark: PyTorch eager vs ONNX Runtime FP32 vs INT8, side by side in one process.

Figures are ratios against the PyTorch baseline measured in the same run (never timed tests).
Targets: ORT FP32 batch-1 p50 <= 0.5x PyTorch eager, batch-32 throughput >= 1.0x.
``cvops bench runtime`` times the production model (:func:`benchmark_production_runtime`), or with
``--allow-synthetic`` a generated one (:func:`run_default_runtime_benchmark`).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.loading import load_dataset
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess
from cvops_dagster.serving.pointer import local_copy, serving_record
from cvops_dagster.serving.predictor import Predictor, default_num_threads, make_session_options
from cvops_dagster.serving.runtime_file import INPUT_NAME
from cvops_dagster.training.model_store import card_input_spec, load_model

logger = logging.getLogger(__name__)

BATCH1_TARGET_RATIO = 0.5
BATCH32_TARGET_RATIO = 1.0
# A ResNet-ish CNN of the size this system trains: 3 residual stages, 1x32x32 inputs, 10 classes.
BENCH_ARCH: dict[str, Any] = {"widths": [32, 64, 128], "blocks_per_stage": 2, "dropout": 0.0, "norm": "batch", "residual": True}


def _tile(inputs: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(inputs))
    return np.ascontiguousarray(np.concatenate([inputs] * reps)[:n], dtype=np.float32)


def _interleaved_times(runners: dict[str, Callable[[], Any]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Per-call seconds for each runner, run round-robin so noise on a shared box hits all alike."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(iters):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q) * 1000.0)


def _add_ratios(results: dict[str, Any], measured: set[str]) -> None:
    """Each ONNX engine against PyTorch, and the targets; an engine not measured gets ``None``."""
    for name in ("ort_fp32", "ort_int8"):
        if name not in measured:
            for suffix in ("batch1_p50_ms", "batch1_p95_ms", "batch32_p50_ms", "batch32_throughput_ips"):
                results[f"{name}_{suffix}"] = None
            results[f"{name}_vs_torch_batch1_ratio"] = None
            results[f"{name}_vs_torch_batch32_throughput_ratio"] = None
            continue
        results[f"{name}_vs_torch_batch1_ratio"] = results[f"{name}_batch1_p50_ms"] / results["torch_batch1_p50_ms"]
        results[f"{name}_vs_torch_batch32_throughput_ratio"] = (
            results[f"{name}_batch32_throughput_ips"] / results["torch_batch32_throughput_ips"]
        )
    results["batch1_target_met"] = results["ort_fp32_vs_torch_batch1_ratio"] <= BATCH1_TARGET_RATIO
    results["batch32_target_met"] = results["ort_fp32_vs_torch_batch32_throughput_ratio"] >= BATCH32_TARGET_RATIO


# Over ~80 lines: the docstring names every reported figure, and the timed sections stay in
# one function so the side-by-side measurements visibly share their setup.
def run_runtime_benchmark(
    model: nn.Module,
    onnx_fp32_path: str | os.PathLike[str],
    onnx_int8_path: str | os.PathLike[str] | None,
    sample_inputs: np.ndarray | torch.Tensor,
    *,
    threads: int | None = None,
    batch1_iters: int = 200,
    batch32_iters: int = 30,
    warmup: int = 20,
) -> dict[str, Any]:
    """Measure batch-1 latency and batch-32 throughput of PyTorch eager, ORT FP32 and ORT INT8.

    All engines get the same thread count; ONNX Runtime uses the serving session options
    (ORT_ENABLE_ALL, ``allow_spinning=0``, one inter-op thread). PyTorch runs under
    ``torch.inference_mode`` with ``torch.set_num_threads`` (restored afterwards). Each engine
    computes logits and embedding. Nothing is printed.

    Args:
        model: the PyTorch model the FP32 file was exported from.
        onnx_fp32_path: FP32 runtime file.
        onnx_int8_path: INT8 runtime file, or ``None`` (INT8 keys are then ``None``).
        sample_inputs: preprocessed float32 ``[N, C, H, W]`` (tiled when N < 32).
        threads: intra-op threads for every engine (default: available cores).
        batch1_iters: timed batch-1 calls per engine.
        batch32_iters: timed batch-32 calls per engine.
        warmup: untimed calls per engine before timing.

    Returns:
        ``torch_/ort_fp32_/ort_int8_`` ``batch1_p50_ms``, ``batch1_p95_ms``,
        ``batch32_throughput_ips`` (images/s), the ratios ``ort_fp32_vs_torch_batch1_ratio``
        (p50 latency, lower is better), ``ort_fp32_vs_torch_batch32_throughput_ratio``
        (higher is better), their INT8 counterparts, ``ort_fp32_spinning_batch1_p50_ms``
        (the same session with spinning allowed, for diagnosis), whether the targets were met
        (``batch1_target_met``, ``batch32_target_met``), the settings used and the machine's
        load average around the run.
    """
    threads = int(threads or default_num_threads())
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    array = sample_inputs.detach().cpu().numpy() if isinstance(sample_inputs, torch.Tensor) else np.asarray(sample_inputs)
    x1, x32 = _tile(array, 1), _tile(array, 32)
    t1, t32 = torch.from_numpy(x1), torch.from_numpy(x32)

    sessions: dict[str, ort.InferenceSession] = {"ort_fp32": Predictor(onnx_fp32_path, intra_op_num_threads=threads).session}
    if onnx_int8_path is not None:
        sessions["ort_int8"] = Predictor(onnx_int8_path, intra_op_num_threads=threads).session
    spin_options = make_session_options(threads, allow_spinning=True)
    spinning = ort.InferenceSession(str(onnx_fp32_path), spin_options, providers=["CPUExecutionProvider"])

    previous_threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    torch.set_num_threads(threads)
    results: dict[str, Any] = {}
    try:
        with torch.inference_mode():
            for batch_name, x, tx, iters in (("batch1", x1, t1, batch1_iters), ("batch32", x32, t32, batch32_iters)):
                runners: dict[str, Callable[[], Any]] = {"torch": lambda tx=tx: model.forward_with_embedding(tx)}
                for name, session in sessions.items():
                    runners[name] = lambda s=session, x=x: s.run(None, {INPUT_NAME: x})
                times = _interleaved_times(runners, iters, warmup)
                for name, values in times.items():
                    if batch_name == "batch1":
                        results[f"{name}_batch1_p50_ms"] = _percentile_ms(values, 50)
                        results[f"{name}_batch1_p95_ms"] = _percentile_ms(values, 95)
                    else:
                        results[f"{name}_batch32_p50_ms"] = _percentile_ms(values, 50)
                        results[f"{name}_batch32_throughput_ips"] = 32.0 / statistics.median(values)
        # Spinning measured on its own: spinning threads would steal the cores of the others.
        spin_times = _interleaved_times({"spin": lambda: spinning.run(None, {INPUT_NAME: x1})}, batch1_iters, warmup)
        results["ort_fp32_spinning_batch1_p50_ms"] = _percentile_ms(spin_times["spin"], 50)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)

    _add_ratios(results, measured=set(sessions))
    results.update(
        threads=threads,
        batch1_iters=batch1_iters,
        batch32_iters=batch32_iters,
        warmup=warmup,
        input_shape=list(x1.shape[1:]),
        # Other processes on the box distort every figure (torch's OpenMP threads suffer most):
        # the 1-minute load average before and after tells whether a run is trustworthy.
        load_average_before=load_before,
        load_average_after=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        cpu_count=default_num_threads(),
        torch_version=torch.__version__,
        onnxruntime_version=ort.__version__,
    )
    logger.info(
        "runtime bench: batch-1 p50 torch %.3f ms, ort fp32 %.3f ms (%.2fx); batch-32 throughput ratio %.2fx",
        results["torch_batch1_p50_ms"], results["ort_fp32_batch1_p50_ms"],
        results["ort_fp32_vs_torch_batch1_ratio"], results["ort_fp32_vs_torch_batch32_throughput_ratio"],
    )
    return results


def run_default_runtime_benchmark(
    *, threads: int | None = None, seed: int = 0, quantize: bool = True, **kwargs: Any
) -> dict[str, Any]:
    """The standard ``cvops bench runtime`` case, self-contained (no artifacts needed).

    Builds :data:`BENCH_ARCH` (a ResNet-ish CNN, 1x32x32 inputs, 10 classes) with random
    weights, exports it to a temporary folder, quantizes it to INT8 with random calibration
    images (timing does not depend on the weights' values) and calls
    :func:`run_runtime_benchmark`. Extra keyword arguments go to that function.
    """
    from cvops_dagster.serving.export import export_onnx
    from cvops_dagster.serving.quantization import quantize_model_int8
    from cvops_dagster.training.models import build_classifier

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = InputSpec(height=32, width=32, channels=1, mean=(0.5,), std=(0.25,))
    model = build_classifier(BENCH_ARCH, num_classes=10, in_channels=1).eval()
    images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(64)]
    metadata = {
        "labels": [f"class_{i}" for i in range(10)],
        "input_spec": spec,
        "dataset_version": "bench",
        "model_hash": "bench",
    }
    with tempfile.TemporaryDirectory(prefix="cvops-bench-") as tmp:
        storage = ArtifactStorage(tmp)
        exported = export_onnx(model, metadata, storage, "bench")
        fp32_path = storage.local_path(exported.key)
        int8_path: Path | None = None
        if quantize:
            int8_path = Path(tmp) / "runtimes" / "bench" / "model.int8.onnx"
            int8_path.write_bytes(quantize_model_int8(fp32_path.read_bytes(), images))
        figures = run_runtime_benchmark(model, fp32_path, int8_path, preprocess(images, spec), threads=threads, **kwargs)
    figures["arch"] = dict(BENCH_ARCH)
    figures["onnx_nodes"] = exported.n_nodes
    return figures


def benchmark_production_runtime(storage: ArtifactStorage, threads: int | None = None) -> dict[str, Any]:
    """``cvops bench runtime`` on the production model: PyTorch eager vs ORT FP32 vs INT8.

    Times exactly the runtime files the serving pointer names, against the model they were
    exported from, on its dataset's test split (train split when the test split is empty).

    Raises:
        FileNotFoundError: no runtime was published yet.
    """
    record = serving_record(storage)
    model, card = load_model(storage, record["model_id"])
    data = load_dataset(storage, record["dataset_version"])
    inputs = preprocess(data.splits["test"].images or data.splits["train"].images, card_input_spec(card))
    with local_copy(storage, record["fp32_key"]) as fp32_path:
        if record.get("int8_key"):
            with local_copy(storage, record["int8_key"]) as int8_path:
                figures = run_runtime_benchmark(model, fp32_path, int8_path, inputs, threads=threads)
        else:
            figures = run_runtime_benchmark(model, fp32_path, None, inputs, threads=threads)
    return {"model_id": record["model_id"], **figures}
