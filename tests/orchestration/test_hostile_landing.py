"""A hostile landing zone ends in a failed blocking check and no training, never a crash.

Pillow's own corpus of odd and broken images under one label, plus a batch of crafted files,
go through the real assets: raw_images per batch, then cleaned_dataset and hpo_study in one
run. cleaned_dataset must materialize (recording ``accepted: false``), its blocking check must
fail with the failing expectations and their examples, and hpo_study must not run.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, instance_for_test, materialize
from PIL import Image

from assets.datasets import CHECK_EXPECTATIONS, cleaned_dataset
from assets.ingestion import raw_images
from assets.training import hpo_study
from resources.storage import ArtifactStore, ImageSource
from resources.tuning import OptunaStorage
from assets.metadata import table_as_mapping

pytestmark = pytest.mark.slow


def _png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG that declares 30000x30000 pixels (its data would inflate to ~900 MB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 16)  # far fewer rows than declared
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def crafted_files() -> dict[str, bytes]:
    """label/file -> bytes: the hostile files the reliability issue lists."""
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    good = _png(photo)
    bad_crc = bytearray(good)
    bad_crc[40] ^= 0xFF  # inside IHDR/IDAT data: the chunk CRC no longer matches
    palette = Image.new("P", (16, 16))
    palette.putpalette([i % 256 for i in range(768)])
    palette.info["transparency"] = 0
    sixteen = Image.frombytes("I;16", (16, 16), (np.arange(256, dtype="<u2") * 256).tobytes())
    frames = [Image.new("L", (12, 12), v) for v in (0, 128, 255)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg_rotated = io.BytesIO()
    photo.save(jpeg_rotated, "JPEG", exif=exif.tobytes())
    cmyk = io.BytesIO()
    photo.convert("CMYK").save(cmyk, "JPEG")
    name = "café.png"
    return {
        "a/empty.png": b"",
        "a/page.jpg": b"<!doctype html><html><body>not an image</body></html>",
        "a/truncated.png": good[: len(good) // 2],
        "a/bad_crc.png": bytes(bad_crc),
        "a/bomb.png": _bomb_png(),
        "a/cmyk.jpg": cmyk.getvalue(),
        "a/palette_trns.png": _png(palette),
        "a/sixteen.png": _png(sixteen),
        "a/animated.gif": gif.getvalue(),
        "a/exif6.jpg": jpeg_rotated.getvalue(),
        f"a/{unicodedata.normalize('NFC', name)}": _png(Image.new("RGB", (10, 10), (200, 10, 10))),
        f"a/{unicodedata.normalize('NFD', name)}": _png(Image.new("RGB", (10, 10), (10, 200, 10))),
        "a/original.png": good,
        "b/same_pixels_other_label.png": good,
        "a/.hidden.png": good,
    }


def write_landing(landing: Path, corpus: Path) -> None:
    odd = landing / "corpus" / "odd"
    odd.mkdir(parents=True)
    for path in sorted(corpus.rglob("*")):
        if path.is_file():
            target = odd / path.relative_to(corpus).as_posix().replace("/", "__")
            shutil.copyfile(path, target)
    (landing / "corpus" / "_READY").write_text("")
    crafted = landing / "crafted"
    for rel, data in crafted_files().items():
        target = crafted / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    os.symlink("/etc/passwd", crafted / "a" / "link.png")
    (crafted / "_READY").write_text("")


def _latest(instance: DagsterInstance, asset: str):  # noqa: ANN202
    event = instance.get_latest_materialization_event(AssetKey(asset))
    return None if event is None else event.asset_materialization.metadata


def test_hostile_landing_zone_fails_the_blocking_check_and_trains_nothing(tmp_path: Path, pillow_corpus: Path) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    write_landing(landing, pillow_corpus)
    resources = {
        "image_source": ImageSource(root=str(landing)),
        "artifact_store": ArtifactStore(root=str(artifacts)),
        "optuna_storage": OptunaStorage(),
    }
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("image_batches", ["corpus", "crafted"])
        for batch in ("corpus", "crafted"):
            assert materialize([raw_images], instance=instance, partition_key=batch, resources=resources).success
        crafted = _latest(instance, "raw_images")
        assert crafted is not None and crafted["rejected"].value >= 3  # empty, hidden, symlink

        result = materialize(
            [cleaned_dataset, hpo_study, raw_images.to_source_asset()],
            selection=["cleaned_dataset", "hpo_study"],
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        metadata = _latest(instance, "cleaned_dataset")
        assert metadata is not None, "cleaned_dataset crashed instead of materializing"
        assert metadata["accepted"].value is False and metadata["gx_success"].value is False
        assert metadata["input"].value > 500
        assert metadata["clean"].value + metadata["duplicates"].value + metadata["quarantined"].value == metadata["input"].value
        reasons = table_as_mapping(metadata["quarantine_reasons"])
        assert {"decompression_bomb", "format_not_allowed", "label_conflict"} <= set(reasons), reasons

        checks = [e for e in result.get_asset_check_evaluations() if e.check_name == CHECK_EXPECTATIONS]
        assert len(checks) == 1 and not checks[0].passed
        failing = checks[0].metadata["failing_expectations"].value
        assert failing and all("expectation" in f for f in failing)
        assert any(f.get("examples") for f in failing), failing

        assert _latest(instance, "hpo_study") is None, "training started on a rejected dataset"
