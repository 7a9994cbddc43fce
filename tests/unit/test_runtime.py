"""The torch-free ONNX predictor: metadata round trip, image inputs, refusals, session settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from cvops_dagster.imaging.preprocessing import preprocess
from cvops_dagster.serving.file_predictions import predict_paths
from cvops_dagster.serving.predictor import ImageLoadError, Predictor, default_num_threads, softmax
from cvops_dagster.serving.runtime_checks import check_external_data, stamp_runtime_model
from cvops_dagster.serving.runtime_file import RuntimeMetadata, RuntimeModelError
from cvops_dagster.bench.runtime import run_runtime_benchmark
from tests.unit.onnx_testkit import LABELS, SPEC, exported_bytes, flip_weight_byte, torch_outputs, trained_case

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runtime_file(tmp_path: Path) -> Path:
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(exported_bytes())
    return path


def _save_images(folder: Path, images: list[np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def test_fresh_process_predicts_from_the_onnx_file_alone_without_torch(tmp_path, runtime_file):
    case = trained_case()
    images = case.test_images[:12]
    paths = _save_images(tmp_path / "imgs", images)
    script = textwrap.dedent(
        """
        import json, sys
        from cvops_dagster.serving.predictor import Predictor
        predictor = Predictor(sys.argv[1], intra_op_num_threads=1)
        result = predictor.predict(sys.argv[2:])
        assert "torch" not in sys.modules, "runtime imported torch"
        print(json.dumps({"labels": result.labels, "probabilities": result.probabilities.tolist(),
                          "meta": predictor.metadata.to_dict(), "torch_loaded": "torch" in sys.modules}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(runtime_file), *map(str, paths)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False
    assert out["meta"]["labels"] == LABELS
    assert out["meta"]["input_spec"] == SPEC.to_dict()
    assert out["meta"]["dataset_version"] == "ds-test"

    logits, _ = torch_outputs(case.model, preprocess(images, SPEC))
    assert out["labels"] == [LABELS[i] for i in logits.argmax(1)]
    np.testing.assert_allclose(np.asarray(out["probabilities"]), softmax(logits), atol=1e-5)


def test_plain_import_does_not_load_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, cvops_dagster.serving.predictor; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "kind",
    ["uint8_gray", "uint8_rgb", "pil_rgba_large", "pil_palette", "pil_gray_small", "pil_16bit"],
)
def test_image_predictions_equal_the_model(runtime_file, kind):
    case = trained_case()
    base = case.test_images[:9]
    converters = {
        "uint8_gray": lambda a: a,
        "uint8_rgb": lambda a: np.stack([a] * 3, axis=-1),
        "pil_rgba_large": lambda a: Image.fromarray(a).convert("RGBA").resize((40, 30)),
        "pil_palette": lambda a: Image.fromarray(a).convert("P"),
        "pil_gray_small": lambda a: Image.fromarray(a).resize((9, 11)),
        "pil_16bit": lambda a: Image.fromarray(a.astype(np.uint16)).convert("I;16"),
    }
    images = [converters[kind](a) for a in base]
    predictor = Predictor(runtime_file)
    result = predictor.predict(images, batch_size=4)
    logits, embeddings = torch_outputs(case.model, preprocess(images, SPEC))
    assert result.labels == [LABELS[i] for i in logits.argmax(1)]
    np.testing.assert_allclose(result.logits, logits, atol=1e-4)
    np.testing.assert_allclose(result.embeddings, embeddings, atol=1e-4)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, atol=1e-5)
    assert result.embeddings.shape == (len(images), 16)


def test_predictions_are_accurate_and_predict_paths_lists_each_file(tmp_path, runtime_file):
    case = trained_case()
    paths = _save_images(tmp_path / "imgs", case.test_images[:30])
    rows = predict_paths(runtime_file, paths, batch_size=8, intra_op_num_threads=1)
    assert [r.path for r in rows] == [str(p) for p in paths]
    predicted = np.asarray([LABELS.index(r.label) for r in rows])
    assert (predicted == case.test_targets[:30]).mean() >= 0.9
    probs = Predictor(runtime_file).predict(paths).probabilities
    np.testing.assert_allclose([r.confidence for r in rows], probs.max(1), atol=1e-6)
    assert all(0.0 < r.confidence <= 1.0 for r in rows)


def test_empty_batch_and_unreadable_path(tmp_path, runtime_file):
    predictor = Predictor(runtime_file)
    empty = predictor.predict([])
    assert len(empty) == 0 and empty.probabilities.shape == (0, len(LABELS))
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(ImageLoadError, match="not_an_image.png"):
        predictor.predict([bad])
    with pytest.raises(ValueError, match="expected inputs"):
        predictor.run(np.zeros((1, 3, 16, 16), dtype=np.float32))


def test_session_threads_and_spinning(runtime_file):
    default = Predictor(runtime_file)
    options = default.session.get_session_options()
    assert options.intra_op_num_threads == default_num_threads()
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert Predictor(runtime_file, intra_op_num_threads=1).session.get_session_options().intra_op_num_threads == 1


# ------------------------------------------------------------------ refusals


def _relabel(data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    for prop in model.metadata_props:
        if prop.key == "cvops.labels":
            prop.value = json.dumps(list(reversed(LABELS)))
    return model.SerializeToString()


def _drop_integrity(data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "cvops.integrity_sha256"]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def _broken_graph_resealed(data: bytes) -> bytes:
    """A graph the checker rejects but whose integrity hash is (re)computed correctly."""
    model = onnx.load_from_string(data)
    model.graph.node[1].input[0] = "undefined_tensor"
    meta = RuntimeMetadata.from_props({p.key: p.value for p in model.metadata_props})
    return stamp_runtime_model(model, meta).SerializeToString()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (flip_weight_byte, "integrity check failed"),
        (_relabel, "integrity check failed"),
        (lambda d: d[: len(d) // 2], "corrupted or truncated"),
        (lambda d: d[:-7], "corrupted or truncated|integrity"),
        (lambda d: b"", "corrupted or truncated"),
        (lambda d: os.urandom(256), "corrupted or truncated|not a cvops runtime"),
        (_drop_integrity, "not a cvops runtime"),
        (_broken_graph_resealed, "checker failed"),
    ],
    ids=["weight_byte", "labels", "half", "tail", "empty", "garbage", "no_integrity", "checker"],
)
def test_tampered_model_is_refused(runtime_file, tamper, message):
    Predictor(runtime_file)  # the untouched file loads
    runtime_file.write_bytes(tamper(runtime_file.read_bytes()))
    with pytest.raises(RuntimeModelError, match=message):
        Predictor(runtime_file)


def test_expected_sha256_pins_the_file(runtime_file):
    import hashlib

    digest = hashlib.sha256(runtime_file.read_bytes()).hexdigest()
    Predictor(runtime_file, expected_sha256=digest)
    with pytest.raises(RuntimeModelError, match="differs from the expected"):
        Predictor(runtime_file, expected_sha256="0" * 64)


def _externalize(data: bytes, location: str) -> bytes:
    model = onnx.load_from_string(data)
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../outside.bin", "escapes the model folder"),
        ("sub/../../outside.bin", "escapes the model folder"),
        ("ABSOLUTE", "absolute path"),
        ("link.bin", "escapes the model folder"),  # a symlink inside the folder pointing out
    ],
)
def test_external_data_escaping_the_folder_is_refused(tmp_path, runtime_file, location, message):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 4096)  # the target exists: only the check stops the read
    if location == "ABSOLUTE":
        location = str(outside)
    if location == "link.bin":
        (runtime_file.parent / "link.bin").symlink_to(outside)
    runtime_file.write_bytes(_externalize(runtime_file.read_bytes(), location))
    with pytest.raises(RuntimeModelError, match=message):
        Predictor(runtime_file)


@pytest.mark.parametrize("location", ["weights.bin", "sub/weights.bin", "./sub/../weights.bin"])
def test_external_data_inside_the_folder_passes_the_location_check(tmp_path, location):
    model = onnx.load_from_string(_externalize(exported_bytes(), location))
    check_external_data(model, tmp_path)  # no exception


def test_runtime_benchmark_returns_consistent_figures(runtime_file):
    import torch

    case = trained_case()
    threads_before = torch.get_num_threads()
    figures = run_runtime_benchmark(
        case.model, runtime_file, None, case.test_inputs[:8], threads=1, batch1_iters=3, batch32_iters=2, warmup=1
    )
    assert torch.get_num_threads() == threads_before
    for key in ("torch_batch1_p50_ms", "ort_fp32_batch1_p50_ms", "torch_batch1_p95_ms", "ort_fp32_batch32_throughput_ips"):
        assert figures[key] > 0
    assert figures["ort_int8_batch1_p50_ms"] is None
    assert figures["ort_fp32_vs_torch_batch1_ratio"] == pytest.approx(
        figures["ort_fp32_batch1_p50_ms"] / figures["torch_batch1_p50_ms"]
    )
    assert figures["ort_fp32_vs_torch_batch32_throughput_ratio"] == pytest.approx(
        figures["ort_fp32_batch32_throughput_ips"] / figures["torch_batch32_throughput_ips"]
    )
    assert figures["threads"] == 1 and figures["input_shape"] == [1, 16, 16]


@pytest.mark.parametrize("mode", ["LA", "La", "RGBA", "PA"])
def test_in_memory_alpha_images_match_the_cleaning_decoder(mode: str) -> None:
    """Transparent pixels land on the decoder's background, as in the canonical training images."""
    import io

    from cvops_dagster.imaging.decode import decode_image
    from cvops_dagster.imaging.preprocessing import InputSpec, to_uint8

    image = Image.new(mode, (6, 6))  # fully transparent
    spec = InputSpec(6, 6, 1, (0.0,), (1.0,))
    served = to_uint8([image], spec)
    if mode in ("LA", "RGBA"):  # the modes PNG can store
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        trained = to_uint8([decode_image(buffer.getvalue()).image], spec)
        assert (served == trained).all()
    assert (served == 255).all()
