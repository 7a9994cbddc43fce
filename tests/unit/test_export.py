"""ONNX export: graph shape, embedded metadata, parity with PyTorch, atomic writes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch

from cvops_dagster.serving import export as export_mod
from cvops_dagster.serving.export import check_parity, export_onnx, runtime_key
from cvops_dagster.training.models import build_classifier
from cvops_dagster.imaging.preprocessing import InputSpec
from cvops_dagster.serving.predictor import Predictor
from cvops_dagster.serving.runtime_checks import integrity_digest
from cvops_dagster.serving.runtime_file import META_INTEGRITY
from cvops_dagster.core.storage import ArtifactStorage
from tests.unit.onnx_testkit import LABELS, SPEC, trained_case


def _meta(labels, spec):
    return {"labels": labels, "input_spec": spec, "dataset_version": "v7", "model_hash": "ab" * 32}


def test_trained_model_parity_on_test_split(tmp_path):
    case = trained_case()
    storage = ArtifactStorage(str(tmp_path))
    result = export_onnx(case.model, case.metadata(), storage, "m1")
    report = check_parity(case.model, storage.local_path(result.key), case.test_inputs)
    assert report.n == len(case.test_images)
    assert report.max_abs_diff <= 1e-4
    assert report.argmax_agreement >= 0.999
    assert report.passed


@pytest.mark.parametrize(
    ("norm", "channels", "size"),
    [("batch", 1, (16, 16)), ("group", 3, (12, 20)), ("none", 3, (16, 16))],
)
def test_export_graph_is_clean_with_dynamic_batch(tmp_path, norm, channels, size):
    torch.manual_seed(1)
    model = build_classifier({"widths": [8, 16], "norm": norm, "dropout": 0.2}, num_classes=4, in_channels=channels)
    spec = InputSpec(size[0], size[1], channels, (0.5,) * channels, (0.25,) * channels)
    storage = ArtifactStorage(str(tmp_path))
    result = export_onnx(model, _meta(list("abcd"), spec), storage, "m2")
    assert result.key == "runtimes/m2/model.onnx" == runtime_key("m2")

    proto = onnx.load(str(storage.local_path(result.key)))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits", "embedding"]
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert result.opset >= 17
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}  # folded / absent

    for batch in (1, 5):  # the dynamic axis really is dynamic
        inputs = np.random.default_rng(batch).normal(size=(batch, channels, *size)).astype(np.float32)
        report = check_parity(model, storage.local_path(result.key), inputs)
        assert report.n == batch and report.passed, report


def test_metadata_props_describe_the_model(tmp_path):
    case = trained_case()
    storage = ArtifactStorage(str(tmp_path))
    result = export_onnx(case.model, case.metadata(), storage, "m3")
    proto = onnx.load(str(storage.local_path(result.key)))
    props = {p.key: p.value for p in proto.metadata_props}
    decoded = {k: json.loads(v) for k, v in props.items() if k != META_INTEGRITY}
    assert decoded["cvops.labels"] == LABELS
    assert decoded["cvops.input_size"] == [SPEC.height, SPEC.width]
    assert decoded["cvops.channels"] == SPEC.channels
    assert decoded["cvops.mean"] == list(SPEC.mean) and decoded["cvops.std"] == list(SPEC.std)
    assert decoded["cvops.input_spec"] == SPEC.to_dict()
    assert decoded["cvops.dataset_version"] == "ds-test"
    assert decoded["cvops.model_hash"] == "f" * 64
    assert decoded["cvops.model_id"] == "m3"
    assert decoded["cvops.precision"] == "fp32"
    assert props[META_INTEGRITY] == integrity_digest(proto)
    assert result.metadata["labels"] == LABELS
    assert result.sha256 == hashlib.sha256(storage.read_bytes(result.key)).hexdigest()


def test_parity_check_can_fail(tmp_path):
    torch.manual_seed(2)
    model = build_classifier({"widths": [8]}, num_classes=3, in_channels=1).eval()
    storage = ArtifactStorage(str(tmp_path))
    result = export_onnx(model, _meta(LABELS, SPEC), storage, "m4")
    with torch.no_grad():
        model.head.bias += torch.tensor([5.0, 0.0, 0.0])  # the torch side drifts after export
    inputs = np.random.default_rng(0).normal(size=(20, 1, 16, 16)).astype(np.float32)
    report = check_parity(model, storage.local_path(result.key), inputs)
    assert not report.passed
    assert report.max_abs_diff > 1.0


def test_export_keeps_training_mode_and_validates_inputs(tmp_path):
    model = build_classifier({"widths": [8]}, num_classes=3, in_channels=1)
    model.train()
    storage = ArtifactStorage(str(tmp_path))
    export_onnx(model, _meta(LABELS, SPEC), storage, "m5")
    assert model.training
    with pytest.raises(ValueError, match="labels"):
        export_onnx(model, _meta(["a", "b"], SPEC), storage, "m6")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, _meta(LABELS, SPEC), storage, "m7", opset=13)
    with pytest.raises(ValueError, match="missing"):
        export_onnx(model, {"labels": LABELS}, storage, "m8")
    assert storage.list("runtimes") == ["runtimes/m5/model.onnx"]


def test_failed_export_leaves_previous_runtime(tmp_path, monkeypatch):
    model = build_classifier({"widths": [8]}, num_classes=3, in_channels=1)
    storage = ArtifactStorage(str(tmp_path))
    first = export_onnx(model, _meta(LABELS, SPEC), storage, "m9")
    before = storage.read_bytes(first.key)

    def broken_checker(*args, **kwargs):
        raise onnx.checker.ValidationError("boom")

    monkeypatch.setattr(export_mod.onnx.checker, "check_model", broken_checker)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(model, _meta(LABELS, SPEC), storage, "m9")
    monkeypatch.undo()
    assert storage.read_bytes(first.key) == before
    assert storage.list("runtimes/m9") == ["runtimes/m9/model.onnx"]
    Predictor(storage.local_path(first.key))  # still a valid runtime
