"""Predicting files and folders: one outcome per path, folders expanded, every bad path named;
the pinned (published) predictor and the serving pointer that makes the pin trustworthy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.imaging.policy import ALLOWED_FORMATS
from cvops_dagster.serving.file_predictions import IMAGE_SUFFIXES, expand_paths, predict_paths
from cvops_dagster.serving.pointer import (
    SERVING_KEY,
    ServingPointer,
    production_runtime,
    publish,
    serving_record,
)
from cvops_dagster.serving.predictor import ImageLoadError, Predictor, read_image_file
from cvops_dagster.serving.runtime_checks import load_runtime_model, stamp_runtime_model
from cvops_dagster.serving.runtime_file import RuntimeMetadata, RuntimeModelError
from tests.unit.onnx_testkit import exported_bytes, flip_weight_byte, publish_trained, trained_case


@pytest.fixture
def runtime_file(tmp_path: Path) -> Path:
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(exported_bytes())
    return path


def _image(path: Path, index: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(trained_case().test_images[index]).save(path, format="PNG")  # content sniffed, not named
    return path


def test_image_suffixes_are_the_decoders_formats() -> None:
    Image.init()
    registered = {ext for ext, fmt in Image.registered_extensions().items() if fmt in ALLOWED_FORMATS}
    assert IMAGE_SUFFIXES == registered


def test_folders_expand_recursively_sorted_without_hidden_or_other_files(tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    files = [_image(batch / "b.png", 0), _image(batch / "a" / "z.JPG", 1), _image(batch / "a" / "y.gif", 2)]
    (batch / "_READY").write_text("")
    (batch / "labels.csv").write_text("file,label\n")
    _image(batch / ".hidden.png", 3)
    _image(batch / ".cache" / "x.png", 4)
    (batch / "a" / "loop").symlink_to(batch, target_is_directory=True)  # not followed
    single = _image(tmp_path / "named.bin", 5)  # a named file is taken whatever its suffix

    entries = list(expand_paths([str(single), str(batch)]))
    expected = [str(single), *sorted(str(p) for p in files)]
    assert entries == [(p, None) for p in expected]


def test_folder_without_images_is_one_bad_entry(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    [(path, error)] = expand_paths([tmp_path / "empty"])
    assert path == str(tmp_path / "empty") and error.startswith("no image files in folder")


def test_every_bad_path_is_reported_and_the_good_ones_predicted(tmp_path, runtime_file, monkeypatch):
    good = [_image(tmp_path / "one.png", 0), _image(tmp_path / "dir" / "two.png", 1), _image(tmp_path / "dir" / "three.png", 2)]
    corrupt = tmp_path / "dir" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block: it must be refused before any read
    locked = _image(tmp_path / "locked.png", 3)
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # as if permissions denied the read (tests run as root)
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    (tmp_path / "nothing").mkdir()
    given = [good[0], tmp_path / "missing.png", tmp_path / "dir", text, fifo, locked, tmp_path / "nothing"]

    records = predict_paths(runtime_file, given, batch_size=2)

    by_path = {r.path: r for r in records}
    assert [r.path for r in records] == [
        str(good[0]), str(tmp_path / "missing.png"), str(corrupt), str(good[2]), str(good[1]),
        str(text), str(fifo), str(locked), str(tmp_path / "nothing"),
    ]
    errors = {Path(r.path).name: r.error for r in records if not r.ok}
    assert errors["missing.png"] == "no such file or directory"
    assert errors["corrupt.png"].startswith("cannot decode image")
    assert errors["text.png"].startswith("cannot decode image")
    assert errors["pipe.png"] == "not a file (not a regular file)"
    assert errors["locked.png"] == "cannot read file: Permission denied"
    assert errors["nothing"].startswith("no image files in folder")
    expected = Predictor(runtime_file).predict([Image.open(p) for p in good])
    for path, label, confidence in zip(good, expected.labels, expected.confidences, strict=True):
        record = by_path[str(path)]
        assert record.ok and record.label == label and record.confidence == pytest.approx(float(confidence), abs=1e-6)
        assert record.to_dict() == {"path": str(path), "label": label, "confidence": record.confidence, "error": None}
    assert by_path[str(text)].to_dict() == {"path": str(text), "label": None, "confidence": None, "error": errors["text.png"]}


def test_read_image_file_names_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not a file \\(a folder\\)") as info:
        read_image_file(tmp_path)
    assert info.value.path == str(tmp_path) and info.value.reason == "not a file (a folder)"
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageLoadError, match="dangling.png: no such file or directory"):
        read_image_file(dangling)


# ------------------------------------------------------------------ the pinned predictor


def test_published_predictor_equals_the_fully_checked_one(runtime_file: Path) -> None:
    digest = hashlib.sha256(runtime_file.read_bytes()).hexdigest()
    images = trained_case().test_images[:20]
    checked = Predictor(runtime_file)
    pinned = Predictor(runtime_file, expected_sha256=digest, published=True)
    assert pinned.metadata == checked.metadata and pinned.sha256 == digest
    np.testing.assert_array_equal(pinned.predict(images).logits, checked.predict(images).logits)


def test_published_predictor_refuses_anything_but_the_pinned_bytes(runtime_file: Path) -> None:
    digest = hashlib.sha256(runtime_file.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="pinned expected_sha256"):
        Predictor(runtime_file, published=True)
    data = bytearray(runtime_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    runtime_file.write_bytes(bytes(data))
    with pytest.raises(RuntimeModelError, match="differs from the expected"):
        Predictor(runtime_file, expected_sha256=digest, published=True)


def test_published_predictor_still_reads_and_checks_the_metadata(tmp_path: Path) -> None:
    model = onnx.load_from_string(exported_bytes())
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "cvops.labels"]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(RuntimeModelError, match="invalid cvops metadata"):
        Predictor(path, expected_sha256=digest, published=True)


# ------------------------------------------------------------------ the serving pointer


def test_publish_pins_checked_files_and_production_runtime_reads_the_pin(tmp_path: Path) -> None:
    storage, key, sha = publish_trained(str(tmp_path))
    assert serving_record(storage) == {
        "model_id": "m-test", "dataset_version": "ds-test", "fp32_key": key, "fp32_sha256": sha,
        "int8_key": None, "int8_sha256": None,
    }
    assert production_runtime(storage) == (key, sha)
    with pytest.raises(FileNotFoundError, match="no accepted INT8 runtime"):
        production_runtime(storage, int8=True)
    with pytest.raises(FileNotFoundError, match="no production runtime yet"):
        production_runtime(ArtifactStorage(str(tmp_path / "empty")))


def _externalize(data: bytes) -> bytes:
    """The largest tensor moved to ``weights.bin`` beside the file, and the file resealed: a valid
    runtime by every check, but one whose weights a pin on the file would not cover."""
    model = onnx.load_from_string(data)
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for name, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=name, value=value)
    metadata = RuntimeMetadata.from_props({p.key: p.value for p in model.metadata_props})
    return stamp_runtime_model(model, metadata).SerializeToString()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d, "differs from the expected"),  # the pin is not this file's hash
        (flip_weight_byte, "integrity check failed"),  # the pin is right, the seal is broken
        (_externalize, "external data"),  # the pin could not cover the weights
    ],
    ids=["wrong_pin", "broken_seal", "external_data"],
)
def test_publish_refuses_what_it_could_not_vouch_for(tmp_path: Path, change, message) -> None:
    storage, key, sha = publish_trained(str(tmp_path))
    before = storage.read_bytes(SERVING_KEY)
    bad_key = "runtimes/m-bad/model.onnx"
    data = change(exported_bytes())
    storage.write_bytes(bad_key, data)
    weights = max(onnx.load_from_string(exported_bytes()).graph.initializer, key=lambda t: len(t.raw_data))
    storage.write_bytes("runtimes/m-bad/weights.bin", weights.raw_data)
    pin = "0" * 64 if message == "differs from the expected" else hashlib.sha256(data).hexdigest()
    if message == "external data":
        assert load_runtime_model(storage.local_path(bad_key)).has_external_data  # passes every check
    with pytest.raises(RuntimeModelError, match=message):
        publish(storage, ServingPointer("m-bad", "ds-test", bad_key, pin))
    assert storage.read_bytes(SERVING_KEY) == before  # the served runtime did not change


def test_predict_decodes_untrusted_files_isolated(tmp_path: Path, runtime_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that hangs or kills its decoder costs its own record; the others are predicted."""
    from cvops_dagster.imaging import isolation
    from cvops_dagster.imaging.policy import DecodeConfig
    from cvops_dagster.serving.file_predictions import predict_paths

    monkeypatch.setattr(isolation, "_decode_bytes", _hostile_decode)
    runtime = runtime_file
    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 200).save(good)
    (tmp_path / "hang.png").write_bytes(b"HANG" + good.read_bytes())
    (tmp_path / "kill.png").write_bytes(b"KILL" + good.read_bytes())
    paths = [tmp_path / "hang.png", good, tmp_path / "kill.png", good]
    records = predict_paths(runtime, paths, isolation=DecodeConfig(task_timeout_s=2.0))
    assert [r.error is None for r in records] == [False, True, False, True]
    assert "decode_timeout" in records[0].error and "decoder_crashed" in records[2].error


def _hostile_decode(data: bytes, config):  # noqa: ANN001, ANN202 - module level: pebble pickles it
    """The isolated decoder, except for files that hang or kill their process."""
    import time

    from cvops_dagster.imaging.decode import decode_image

    if data.startswith(b"HANG"):
        time.sleep(60)
    if data.startswith(b"KILL"):
        os._exit(9)
    return decode_image(data, config).pixels
