"""The test datasets come from ingestion and cleaning, and the session cache hands out true copies."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets import cleaning
from cvops_dagster.datasets.loading import load_dataset
from cvops_dagster.ingestion.ingest import raw_manifest_key
from tests.unit import synthetic_datasets
from tests.unit.synthetic_datasets import DatasetCache, clean_images, only_version, shapes_dataset


@pytest.mark.parametrize(("mode", "size"), [("L", (12, 12)), ("RGB", (20, 14))])
def test_shapes_dataset_is_what_cleaning_writes(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    storage = ArtifactStorage(str(tmp_path))
    result = shapes_dataset(storage, n_classes=3, per_class=10, size=size, mode=mode)
    assert storage.exists(raw_manifest_key("synthetic"))  # ingested from a landing batch
    manifest = storage.read_parquet(result.manifest_key)
    assert tuple(manifest.columns) == cleaning.MANIFEST_COLUMNS
    assert manifest["raw_image_key"].str.startswith("images/").all()
    assert (manifest["outcome"] == "clean").all() and len(manifest) == 30
    assert storage.read_json(result.dataset_json_key)["version"] == result.version
    assert only_version(storage) == result.version
    data = load_dataset(storage, result.version)
    assert data.channels == (3 if mode == "RGB" else 1) and data.image_size == (size[1], size[0])
    assert result.dataset_info["classes"] == {"circle": 10, "hbar": 10, "vbar": 10}


def test_generated_duplicates_fail_loudly_unless_allowed(tmp_path: Path) -> None:
    image = Image.new("L", (8, 8), 0)
    other = Image.new("L", (8, 8), 255)
    with pytest.raises(ValueError, match="kept 2 of 3"):
        clean_images(ArtifactStorage(str(tmp_path / "a")), [image, image.copy(), other], ["a", "a", "b"])
    result = clean_images(ArtifactStorage(str(tmp_path / "b")), [image, image.copy(), other], ["a", "a", "b"], keep_all=False)
    assert result.counts["clean"] == 2 and result.counts["duplicates"] == 1


def test_cache_cleans_once_and_hands_out_independent_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = synthetic_datasets.clean_dataset
    monkeypatch.setattr(synthetic_datasets, "clean_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = DatasetCache(tmp_path / "cache")
    first, second = ArtifactStorage(str(tmp_path / "one")), ArtifactStorage(str(tmp_path / "two"))
    a = cache.shapes(first, n_classes=2, per_class=6, size=(10, 10))
    b = cache.shapes(second, n_classes=2, per_class=6, size=(10, 10))
    assert len(calls) == 1 and a.version == b.version == only_version(first) == only_version(second)
    keys = first.list("")
    assert keys == second.list("") and all(first.read_bytes(k) == second.read_bytes(k) for k in keys)
    first.write_bytes(a.dataset_json_key, b"{}")  # a test tampering with its copy
    assert second.read_json(b.dataset_json_key)["version"] == b.version
    cache.shapes(ArtifactStorage(str(tmp_path / "three")), n_classes=2, per_class=6, size=(10, 10), mode="RGB")
    assert len(calls) == 2  # another parameter set is another dataset
