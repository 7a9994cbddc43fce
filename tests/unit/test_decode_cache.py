"""The decode cache: a new batch decodes alone, results equal a run without cache, and a policy
change, a transient failure or a damaged cache part mean decoding again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets import decode_cache
from cvops_dagster.datasets.cleaning import CleaningConfig, CleaningResult, clean_dataset
from cvops_dagster.datasets.decode_cache import DECODE_CACHE_PREFIX, DecodeCache
from cvops_dagster.imaging import facts as facts_module
from cvops_dagster.imaging import policy
from cvops_dagster.imaging.facts import facts_frame, failure_row

from tests.unit.rawdata import digit_images, encode, raw_manifest, textured


def _batch(batch: str, seed: int, index: int, storage: ArtifactStorage, extra: list | None = None) -> pd.DataFrame:
    """Gray digits (canonical PNGs, BMP re-encodes), larger colour images, a JPEG, a bad file."""
    images, labels = digit_images(60)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), 12, replace=False)
    files = [(f"{labels[i]}/d{i}.png", labels[i], encode(Image.fromarray(images[i]))) for i in picks[:6]]
    files += [(f"{labels[i]}/d{i}.bmp", labels[i], encode(Image.fromarray(images[i]), "BMP")) for i in picks[6:]]
    files += [(f"c/big{n}.png", "c", encode(textured(96, 80, seed=seed * 10 + n))) for n in range(3)]
    files += [("c/photo.jpg", "c", encode(textured(90, 70, seed=seed + 500), "JPEG", quality=92))]
    files += [(f"{labels[picks[0]]}/copy.bmp", labels[picks[0]], encode(Image.fromarray(images[picks[0]]), "BMP"))]
    files += [("c/broken.jpg", "c", encode(textured(40, 40, seed=seed + 900), "JPEG")[:200])]
    return raw_manifest(storage, batch, files + (extra or []), batch_index=index)


def _same_result(cached: CleaningResult, fresh: CleaningResult) -> None:
    assert cached.version == fresh.version
    pd.testing.assert_frame_equal(cached.manifest, fresh.manifest)
    assert cached.dataset_info == fresh.dataset_info


def _copy_raw(source: Path, target: Path) -> ArtifactStorage:
    """A storage holding only the raw images of ``source`` (no cache, no canonical files)."""
    shutil.copytree(source / "images", target / "images")
    return ArtifactStorage(str(target))


def test_second_run_decodes_only_the_new_batch_and_matches_a_run_without_cache(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path / "store"))
    first = _batch("b1", 1, 0, storage)
    one = clean_dataset(storage, first, workers=2)
    assert one.cache.hits == 0 and one.cache.decoded == first["image_key"].nunique()
    assert one.cache.written == first["image_key"].nunique()  # every failure here is a property of the bytes

    second = _batch("b2", 2, 1, storage, extra=[("7/again.png", "7", storage.read_bytes(first["image_key"][0]))])
    both = pd.concat([first, second], ignore_index=True)
    two = clean_dataset(storage, both, workers=2)
    new_files = set(second["image_key"]) - set(first["image_key"])
    assert two.cache.decoded == two.pool.files == len(new_files)
    assert two.cache.hits == both["image_key"].nunique() - len(new_files)

    fresh = clean_dataset(_copy_raw(tmp_path / "store", tmp_path / "fresh"), both, CleaningConfig(decode_cache=False))
    assert fresh.cache.hits == 0 and fresh.pool.files == both["image_key"].nunique()
    _same_result(two, fresh)
    again = clean_dataset(storage, both, workers=1)  # everything known: nothing decoded
    assert again.cache.decoded == 0 and again.pool.workers == 0
    _same_result(again, fresh)


def test_cached_duplicate_that_becomes_clean_gets_its_canonical_png(tmp_path: Path) -> None:
    """A file cached as a duplicate (no canonical PNG published) that later is the kept copy
    is decoded again for its PNG; the result equals a run without cache."""
    storage = ArtifactStorage(str(tmp_path / "store"))
    images, labels = digit_images(3)
    first = raw_manifest(storage, "b1", [(f"{labels[0]}/a.png", labels[0], encode(Image.fromarray(images[0])))])
    second = raw_manifest(
        storage,
        "b2",
        [(f"{labels[0]}/a.bmp", labels[0], encode(Image.fromarray(images[0]), "BMP"))]  # small: never encoded
        + [(f"{labels[1]}/b.bmp", labels[1], encode(textured(70, 70, seed=5, mode="L"), "BMP"))],
        batch_index=1,
    )
    one = clean_dataset(storage, pd.concat([first, second]), workers=1)
    assert one.manifest.set_index("path").loc[f"{labels[0]}/a.bmp", "outcome"] == "duplicate"
    two = clean_dataset(storage, second, workers=1)  # without b1 the BMP is the kept copy
    assert two.cache.decoded == 0
    assert two.pool.files == 1  # decoded again, for its canonical PNG only
    fresh = clean_dataset(_copy_raw(tmp_path / "store", tmp_path / "fresh"), second, CleaningConfig(decode_cache=False))
    _same_result(two, fresh)


def test_mode_change_converts_cached_images_like_a_run_without_cache(tmp_path: Path) -> None:
    storage = ArtifactStorage(str(tmp_path / "store"))
    images, labels = digit_images(8)
    gray = [(f"{labels[i]}/g{i}.{ext}", labels[i], encode(Image.fromarray(images[i]), fmt)) for i, (ext, fmt) in
            enumerate([("png", "PNG"), ("bmp", "BMP"), ("png", "PNG"), ("gif", "GIF")])]  # fmt: skip
    gray.append(("9/large.bmp", "9", encode(textured(90, 90, seed=3, mode="L"), "BMP")))
    first = raw_manifest(storage, "b1", gray)
    assert clean_dataset(storage, first, workers=1).mode == "L"
    colour = raw_manifest(storage, "b2", [(f"c/{n}.png", "c", encode(textured(20, 20, seed=40 + n))) for n in range(5)], 1)
    both = pd.concat([first, colour])
    two = clean_dataset(storage, both, workers=1)
    assert two.mode == "RGB" and two.cache.hits == len(first)
    fresh = clean_dataset(_copy_raw(tmp_path / "store", tmp_path / "fresh"), both, CleaningConfig(decode_cache=False))
    _same_result(two, fresh)


def test_policy_change_decodes_everything_again(tmp_path: Path, monkeypatch) -> None:
    storage = ArtifactStorage(str(tmp_path / "store"))
    manifest = _batch("b1", 3, 0, storage)
    one = clean_dataset(storage, manifest, workers=1)
    assert clean_dataset(storage, manifest, workers=1).cache.decoded == 0
    monkeypatch.setattr(policy, "NORMALISATION_POLICY_VERSION", policy.NORMALISATION_POLICY_VERSION + 1)
    bumped = clean_dataset(storage, manifest, workers=1)
    assert bumped.cache.hits == 0 and bumped.cache.decoded == len(manifest)
    assert bumped.cache.policy_key != one.cache.policy_key
    assert bumped.version == one.version  # same policy in fact: same dataset
    # A setting that changes results is part of the key too.
    config = CleaningConfig(decode=policy.DecodeConfig(gray_tolerance=0))
    assert clean_dataset(storage, manifest, config, workers=1).cache.hits == 0


def _crash_on_first(key: str) -> None:
    if key.endswith(".bmp") and "crash-here" in os.environ:
        os._exit(3)


def test_transient_failures_are_not_cached(tmp_path: Path, monkeypatch) -> None:
    storage = ArtifactStorage(str(tmp_path / "store"))
    files = [(f"a/{n}.png", "a", encode(textured(16, 16, seed=60 + n))) for n in range(3)]
    files.append(("a/x.bmp", "a", encode(textured(16, 16, seed=70), "BMP")))
    manifest = raw_manifest(storage, "b", files)
    missing_key = manifest["image_key"][1]
    kept = storage.read_bytes(missing_key)
    storage.delete(missing_key)
    monkeypatch.setattr(facts_module, "_ITEM_HOOK", _crash_on_first)
    monkeypatch.setenv("crash-here", "1")
    one = clean_dataset(storage, manifest, workers=1)
    assert one.summary()["quarantine_reasons"] == {"decoder_crashed": 1, "missing_image": 1}
    assert one.cache.written == 2
    monkeypatch.delenv("crash-here")
    storage.write_bytes(missing_key, kept)
    two = clean_dataset(storage, manifest, workers=1)
    assert two.cache.decoded == 2 and two.cache.hits == 2
    assert two.summary()["quarantined"] == 0


def test_parts_are_merged_and_a_damaged_part_only_costs_decoding(tmp_path: Path, monkeypatch) -> None:
    storage = ArtifactStorage(str(tmp_path / "store"))
    cache = DecodeCache(storage)
    monkeypatch.setattr(decode_cache, "MAX_PARTS", 3)
    ids = [f"{n:064x}" for n in range(5)]
    for n, sample_id in enumerate(ids):
        frame = facts_frame([failure_row(policy.REASON_TRUNCATED, f"row {n}")])
        frame.insert(0, "sample_id", [sample_id])
        assert cache.save(frame) == 1
    parts = storage.list(cache.prefix)
    assert len(parts) <= 3 and parts[0].startswith(f"{DECODE_CACHE_PREFIX}/{cache.key}/part-")
    loaded = cache.load(ids + ["f" * 64])
    assert sorted(loaded["sample_id"]) == ids
    assert loaded.set_index("sample_id").loc[ids[4], "reason_detail"] == "row 4"
    storage.write_bytes(f"{cache.prefix}/part-99999999-damaged.parquet", b"not parquet")
    assert sorted(cache.load(ids)["sample_id"]) == ids
    transient = facts_frame([failure_row(policy.REASON_TIMEOUT, "slow"), failure_row(policy.REASON_TRUNCATED, "x")])
    transient.insert(0, "sample_id", ["a" * 64, "not-a-content-address"])
    assert cache.save(transient) == 0


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto")
    from tests.s3server import s3_server

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with s3_server(("cvops",)) as url:
            yield url


def test_cache_works_on_s3(s3_endpoint: str, tmp_path: Path) -> None:
    storage = ArtifactStorage("s3://cvops/cache-test", endpoint_url=s3_endpoint)
    first = _batch("b1", 4, 0, storage)
    one = clean_dataset(storage, first, workers=1)
    assert one.cache.written == first["image_key"].nunique()
    second = _batch("b2", 5, 1, storage)
    both = pd.concat([first, second], ignore_index=True)
    two = clean_dataset(storage, both, workers=1)
    new_files = set(second["image_key"]) - set(first["image_key"])
    assert two.cache.decoded == two.pool.files == len(new_files)
    assert two.cache.hits == first["image_key"].nunique()
    local = ArtifactStorage(str(tmp_path / "local"))
    for key in storage.list("images"):
        local.write_bytes(key, storage.read_bytes(key))
    fresh = clean_dataset(local, both, CleaningConfig(decode_cache=False), workers=1)
    _same_result(two, fresh)
    for key in two.manifest.loc[two.manifest["outcome"] == "clean", "image_key"]:
        assert storage.exists(key)
