"""The INT8 variant: the pure gate, real static quantization, and both outcomes end to end."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import pytest

from cvops_dagster.imaging.preprocessing import preprocess
from cvops_dagster.serving.quantization import (
    INT8_MIN_SPEEDUP,
    PreprocessedImageReader,
    build_int8_runtime,
    int8_gate,
    quantize_model_int8,
)
from cvops_dagster.serving.predictor import Predictor
from cvops_dagster.core.storage import ArtifactStorage
from tests.unit.onnx_testkit import LABELS, SPEC, exported_bytes, trained_case


@pytest.mark.parametrize(
    ("fp32_acc", "int8_acc", "fp32_ms", "int8_ms", "accepted", "why"),
    [
        (0.950, 0.945, 10.0, 6.0, True, "accepted"),
        (0.950, 0.940, 10.0, 6.0, True, "accepted"),  # exactly one point
        (0.900, 0.920, 10.0, 9.9, True, "accepted"),  # more accurate and slightly faster
        (0.950, 0.939, 10.0, 6.0, False, "accuracy drop too large"),
        (0.950, 0.950, 10.0, 10.0, False, "not faster"),
        (0.950, 0.950, 10.0, 12.5, False, "not faster"),
        (0.950, 0.800, 10.0, 12.5, False, "accuracy drop too large; not faster"),
    ],
)
def test_int8_gate(fp32_acc, int8_acc, fp32_ms, int8_ms, accepted, why):
    ok, reason = int8_gate(fp32_acc, int8_acc, fp32_ms, int8_ms)
    assert ok is accepted
    assert why in reason
    assert f"{int8_ms:.3f} ms" in reason and f"{fp32_acc:.4f}" in reason  # the measured figures


@pytest.mark.parametrize(
    ("fp32_ms", "int8_ms", "accepted"),
    [
        (10.0, 6.0, True),  # 1.67x
        (10.0, 9.0, True),  # 1.11x, just past a 1.10x margin
        (10.0, 9.2, False),  # 1.09x: faster, but within the noise the margin absorbs
        (10.0, 9.9, False),  # a near tie either way never flips the decision
        (10.0, 10.5, False),
    ],
)
def test_int8_gate_latency_margin(fp32_ms, int8_ms, accepted):
    ok, reason = int8_gate(0.95, 0.95, fp32_ms, int8_ms, min_speedup=1.10)
    assert ok is accepted
    assert "required > 1.10x" in reason
    if not accepted:
        assert "not faster than fp32 by the 1.10x margin" in reason


def test_gate_limit_is_configurable():
    assert int8_gate(0.95, 0.93, 10.0, 5.0, max_accuracy_drop=0.05)[0]
    assert not int8_gate(0.95, 0.95, 10.0, 5.0, max_accuracy_drop=-0.01)[0]


def test_calibration_reader_uses_the_shared_preprocess():
    images = trained_case().train_images[:10]
    reader = PreprocessedImageReader(images, SPEC, batch_size=4)
    batches = []
    while (batch := reader.get_next()) is not None:
        batches.append(batch["input"])
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), preprocess(images, SPEC))
    reader.rewind()
    assert reader.get_next() is not None


def test_quantized_model_is_qdq_int8_and_agrees_with_fp32(tmp_path):
    case = trained_case()
    int8_bytes = quantize_model_int8(exported_bytes(), case.train_images[:64])
    model = onnx.load_from_string(int8_bytes)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    weight_scales = [t for t in model.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] > 1]
    assert weight_scales, "per-channel quantization gives vector scales"

    path = tmp_path / "model.int8.onnx"
    path.write_bytes(int8_bytes)
    int8 = Predictor(path)
    assert int8.metadata.precision == "int8"
    assert list(int8.labels) == LABELS and int8.input_spec == SPEC
    fp32_path = tmp_path / "model.onnx"
    fp32_path.write_bytes(exported_bytes())
    inputs = case.test_inputs
    agree = (int8.predict_array(inputs).class_indices == Predictor(fp32_path).predict_array(inputs).class_indices).mean()
    assert agree >= 0.9


def _storage_with_fp32(tmp_path) -> ArtifactStorage:
    storage = ArtifactStorage(str(tmp_path / "store"))
    storage.write_bytes("runtimes/m1/model.onnx", exported_bytes())
    return storage


def test_build_int8_runtime_measures_and_applies_the_gate(tmp_path):
    case = trained_case()
    storage = _storage_with_fp32(tmp_path)
    decision = build_int8_runtime(
        storage, "m1", case.train_images[:64], case.test_images, [LABELS[t] for t in case.test_targets],
        latency_repeats=5,
    )
    assert decision.fp32_test_accuracy >= 0.9  # a real, trained model
    assert decision.int8_latency_ms > 0 and decision.fp32_latency_ms > 0
    assert decision.min_speedup == INT8_MIN_SPEEDUP and decision.latency_repeats == 5
    assert decision.speedup == pytest.approx(decision.fp32_latency_ms / decision.int8_latency_ms)
    expected, _ = int8_gate(
        decision.fp32_test_accuracy, decision.test_accuracy, decision.fp32_latency_ms, decision.int8_latency_ms,
        min_speedup=decision.min_speedup,
    )
    assert decision.accepted is expected
    assert (decision.key is not None and storage.exists(decision.key)) is expected
    assert (decision.path is not None) is expected
    # Candidates only ever go under their content address; the fixed name is never written.
    assert not storage.exists("runtimes/m1/model.int8.onnx")
    assert [k for k in storage.list("runtimes/m1") if k.endswith(".int8.onnx")] == ([decision.key] if expected else [])


def test_rejected_variant_is_not_kept_and_says_why(tmp_path):
    case = trained_case()
    storage = _storage_with_fp32(tmp_path)
    storage.write_bytes("runtimes/m1/model.int8.onnx", b"stale")
    decision = build_int8_runtime(
        storage, "m1", case.train_images[:32], case.test_images[:40], case.test_targets[:40],
        latency_repeats=2, max_accuracy_drop=-1.0,  # no variant can pass this
    )
    assert not decision.accepted
    assert decision.path is None and decision.key is None
    assert "accuracy drop too large" in decision.reason
    # A rejected candidate is not written, and no existing file (maybe being served) is touched.
    assert storage.list("runtimes/m1") == ["runtimes/m1/model.int8.onnx", "runtimes/m1/model.onnx"]
    assert storage.read_bytes("runtimes/m1/model.int8.onnx") == b"stale"


def test_accepted_variant_is_written_and_served(tmp_path):
    case = trained_case()
    storage = _storage_with_fp32(tmp_path)
    decision = build_int8_runtime(
        storage, "m1", case.train_images[:32], case.test_images[:40], case.test_targets[:40],
        latency_repeats=2, gate=lambda *figures: (True, "accepted: forced"),
    )
    assert decision.accepted and decision.key == f"runtimes/m1/{decision.sha256}.int8.onnx"
    data = storage.read_bytes(decision.key)
    assert decision.sha256 == hashlib.sha256(data).hexdigest()
    predictor = Predictor(storage.local_path(decision.key), expected_sha256=decision.sha256)
    assert predictor.metadata.precision == "int8"
    assert decision.to_dict()["path"] == storage.uri(decision.key)


def test_unknown_test_label_is_an_error(tmp_path):
    case = trained_case()
    storage = _storage_with_fp32(tmp_path)
    with pytest.raises(ValueError, match="not one of the model's labels"):
        build_int8_runtime(storage, "m1", case.train_images[:8], case.test_images[:3], ["blob", "cat", "blob"])
