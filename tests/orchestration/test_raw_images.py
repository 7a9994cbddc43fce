"""raw_images materialized through Dagster on a hostile landing zone."""

from __future__ import annotations

import io
import os
import unicodedata
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test, materialize
from PIL import Image

from assets.ingestion import raw_images
from cvops_dagster.ingestion.ingest import raw_manifest_key
from cvops_dagster.core.storage import ArtifactStorage
from resources.storage import ArtifactStore, ImageSource
from assets.metadata import table_as_mapping


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def make_hostile_batch(root: Path, batch: str = "b1") -> Path:
    base = root / batch
    (base / "cat").mkdir(parents=True)
    (base / "dog").mkdir()
    (base / "cat" / "ok1.png").write_bytes(png(10))
    (base / "dog" / "ok2.png").write_bytes(png(20))
    (base / "cat" / "empty.png").write_bytes(b"")
    (base / ".hidden").mkdir()
    (base / ".hidden" / "h.png").write_bytes(png(30))
    (base / "cat" / ".DS_Store").write_bytes(b"junk")
    (base / "empty_label").mkdir()
    outside = root / "outside.png"
    outside.write_bytes(png(40))
    os.symlink(outside, base / "cat" / "link.png")
    os.symlink("../../outside.png", base / "dog" / "dotdot.png")  # a ../ name leaving the batch
    os.symlink(root, base / "linked_dir")
    nfc = unicodedata.normalize("NFC", "café.png")
    nfd = unicodedata.normalize("NFD", "café.png")
    (base / "cat" / nfc).write_bytes(png(50))
    (base / "dog" / nfd).write_bytes(png(60))
    (base / "dog" / "日本語.png").write_bytes(png(70))
    os.mkfifo(base / "cat" / "pipe.png")
    os.close(os.open(bytes(base / "cat") + b"/bad\xffname.png", os.O_CREAT | os.O_WRONLY))
    (base / "loose.png").write_bytes(png(80))
    (base / "_READY").write_text("")
    return base


def ingest(landing: Path, artifacts: Path, instance: DagsterInstance, batch: str = "b1"):  # noqa: ANN201
    instance.add_dynamic_partitions("image_batches", [batch])
    return materialize(
        [raw_images],
        instance=instance,
        partition_key=batch,
        resources={
            "image_source": ImageSource(root=str(landing)),
            "artifact_store": ArtifactStore(root=str(artifacts)),
        },
    )


def test_hostile_batch_is_accounted_for(tmp_path: Path) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    make_hostile_batch(landing)
    with instance_for_test() as instance:
        result = ingest(landing, artifacts, instance)
        assert result.success
        metadata = result.asset_materializations_for_node("raw_images")[0].metadata
    manifest = ArtifactStorage(str(artifacts)).read_parquet(raw_manifest_key("b1"))
    by_path = dict(zip(manifest["path"], manifest["reason"], strict=True))
    ingested = set(manifest.loc[manifest["status"] == "ingested", "path"])

    nfc = unicodedata.normalize("NFC", "café.png")
    nfd = unicodedata.normalize("NFD", "café.png")
    assert ingested == {"cat/ok1.png", "dog/ok2.png", f"cat/{nfc}", f"dog/{nfd}", "dog/日本語.png"}
    assert by_path["cat/empty.png"] == "empty_file"
    assert by_path[".hidden/h.png"] == "hidden"
    assert by_path["cat/.DS_Store"] == "hidden"
    assert by_path["empty_label/"] == "empty_label_folder"
    assert by_path["cat/link.png"] == "symlink"
    assert by_path["dog/dotdot.png"] == "symlink"
    assert by_path["linked_dir"] == "symlink"
    assert by_path["cat/pipe.png"] == "not_a_regular_file"
    assert by_path["loose.png"] == "not_in_label_folder"
    assert by_path["cat/bad\\xffname.png"] == "undecodable_name"
    # Nothing that was rejected was copied; everything ingested is stored by content.
    store = ArtifactStorage(str(artifacts))
    stored = set(store.list("images"))
    assert stored == set(manifest.loc[manifest["status"] == "ingested", "image_key"])
    assert metadata["files"].value == 5
    assert metadata["rejected"].value == len(manifest) - 5
    assert table_as_mapping(metadata["rejected_reasons"])["symlink"] == 3
    assert table_as_mapping(metadata["labels"]) == {"cat": 2, "dog": 3}


def test_rematerializing_is_idempotent(tmp_path: Path) -> None:
    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    make_hostile_batch(landing)
    store = ArtifactStorage(str(artifacts))
    with instance_for_test() as instance:
        ingest(landing, artifacts, instance)
        first = store.read_bytes(raw_manifest_key("b1"))
        images = store.list("images")
        ingest(landing, artifacts, instance)
    assert store.read_bytes(raw_manifest_key("b1")) == first
    assert store.list("images") == images


def test_unreadable_file_is_rejected_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cvops_dagster.ingestion.landing import LandingZone

    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    make_hostile_batch(landing)
    original = LandingZone.read_bytes

    def flaky(self, batch_id, rel, production=False):  # noqa: ANN001, ANN202
        if rel == "dog/ok2.png":
            raise PermissionError(13, "Permission denied")
        return original(self, batch_id, rel, production)

    monkeypatch.setattr(LandingZone, "read_bytes", flaky)
    with instance_for_test() as instance:
        assert ingest(landing, artifacts, instance).success
    manifest = ArtifactStorage(str(artifacts)).read_parquet(raw_manifest_key("b1"))
    row = manifest.set_index("path").loc["dog/ok2.png"]
    assert row["status"] == "rejected" and row["reason"] == "unreadable"


def test_a_missing_raw_manifest_fails_cleaning_instead_of_shrinking_the_dataset(tmp_path: Path) -> None:
    from cvops_dagster.ingestion.ingest import MissingManifestError, read_raw_manifests

    landing, artifacts = tmp_path / "landing", tmp_path / "artifacts"
    make_hostile_batch(landing, "b1")
    make_hostile_batch(landing, "b2")
    store = ArtifactStorage(str(artifacts))
    with instance_for_test() as instance:
        ingest(landing, artifacts, instance, "b1")
        ingest(landing, artifacts, instance, "b2")
    assert len(read_raw_manifests(store, batch_ids=["b1", "b2"])) > 0
    store.delete(raw_manifest_key("b2"))
    with pytest.raises(MissingManifestError, match=r"\['b2'\].*materialize raw_images"):
        read_raw_manifests(store, batch_ids=["b1", "b2"])
