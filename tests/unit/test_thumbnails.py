"""Sample thumbnails of a cleaned dataset: bounded, stable, small, and never a crash on bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.thumbnails import (
    ThumbnailConfig,
    class_thumbnails,
    grid_png,
    pick_samples,
    quarantine_thumbnails,
)


def _png(seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(buffer, "PNG")
    return buffer.getvalue()


def _row(n: int, label: str | None, outcome: str, data: bytes | None, storage: ArtifactStorage, **extra: object) -> dict:
    """One manifest row whose image (if any) is stored under its own key."""
    key = f"images/{n:04d}.png"
    if data is not None:
        storage.write_bytes(key, data)
    width, height = (24, 20) if extra.pop("decoded", data is not None) else (None, None)
    return {
        "record_id": f"b1/{label}/{n}.png", "sample_id": f"{(n * 7919) % 10007:064x}", "label": label,
        "outcome": outcome, "reason": extra.pop("reason", None), "image_key": key if outcome == "clean" else None,
        "raw_image_key": key, "width": width, "height": height, "file_size": len(data) if data else None, **extra,
    }  # fmt: skip


def _manifest(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame.astype({"width": "Int64", "height": "Int64", "file_size": "Int64"})


@pytest.fixture
def storage(tmp_path: Path) -> ArtifactStorage:
    return ArtifactStorage(str(tmp_path / "artifacts"))


def test_pick_samples_is_bounded_stable_and_keeps_the_largest_groups_in_name_order(storage: ArtifactStorage) -> None:
    rows = [_row(n, label, "clean", None, storage) for n, label in enumerate(["a"] * 9 + ["b"] * 3 + ["c"] * 5 + ["d"])]
    manifest = _manifest(rows)
    picked = pick_samples(manifest, "label", per_group=4, max_groups=3)
    assert list(picked) == ["a", "b", "c"]  # the largest groups, in name order; "d" cut at max_groups
    assert [len(g) for g in picked.values()] == [4, 3, 4]
    assert list(picked["a"]["sample_id"]) == sorted(manifest.loc[manifest["label"] == "a", "sample_id"])[:4]
    shuffled = pick_samples(manifest.sample(frac=1.0, random_state=3), "label", per_group=4, max_groups=3)
    assert all(list(shuffled[g]["record_id"]) == list(picked[g]["record_id"]) for g in picked)
    # The copies of one file (same sample_id) are shown once.
    twins = _manifest([_row(1, "x", "quarantined", None, storage), _row(1, "x", "quarantined", None, storage)])
    assert len(pick_samples(twins, "label", 4, 4)["x"]) == 1
    assert pick_samples(manifest.iloc[:0], "label", 4, 4) == {}


def test_class_thumbnails_are_a_small_png_grid(storage: ArtifactStorage) -> None:
    labels = [f"class-{k}" for k in range(15)]
    rows = [_row(k * 10 + i, label, "clean", _png(k * 10 + i), storage) for k, label in enumerate(labels) for i in range(6)]
    config = ThumbnailConfig()
    grid = class_thumbnails(storage, _manifest(rows), config)
    assert grid is not None
    assert len(grid.groups) == config.max_groups and grid.groups_total == 15
    assert grid.images == config.max_groups * config.per_group and not grid.skipped
    assert grid.caption == "48 samples of 12 of 15 classes."
    assert len(grid.png) < 24_000  # random noise is the worst case for PNG; real images are far smaller
    with Image.open(io.BytesIO(grid.png)) as image:
        assert image.mode == "P"
        assert image.height == config.max_groups * (config.cell + 2) + 2


def test_oversized_and_undecodable_samples_get_no_thumbnail(storage: ArtifactStorage) -> None:
    huge = _row(1, "a", "clean", _png(1), storage)
    huge["width"], huge["height"] = 10_000, 10_000  # the manifest says too large to decode here
    garbage = _row(2, "a", "clean", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, storage, decoded=True)
    fine = _row(3, "a", "clean", _png(3), storage)
    grid = class_thumbnails(storage, _manifest([huge, garbage, fine]))
    assert grid is not None and grid.images == 1
    assert grid.skipped == [garbage["record_id"]]  # picked, failed to decode, reported
    assert "1 could not be shown" in grid.caption


def test_quarantine_thumbnails_only_for_files_that_decoded(storage: ArtifactStorage) -> None:
    rows = [
        _row(1, "a", "quarantined", _png(1), storage, reason="label_conflict"),
        _row(2, "b", "quarantined", _png(1), storage, reason="label_conflict"),
        _row(3, "a", "quarantined", b"<html>", storage, reason="format_not_allowed", decoded=False),
        _row(4, "a", "quarantined", b"\x89PNG\r\n\x1a\ncut", storage, reason="truncated", decoded=False),
        _row(5, "a", "clean", _png(5), storage),
    ]
    grid = quarantine_thumbnails(storage, _manifest(rows))
    assert grid is not None and grid.groups == ["label_conflict"] and grid.images == 2
    assert "did not decode have no thumbnail" in grid.caption
    assert quarantine_thumbnails(storage, _manifest(rows[2:])) is None


def test_a_file_changed_since_cleaning_is_not_shown_and_raises_nothing(storage: ArtifactStorage) -> None:
    # The manifest says a small image decoded; the stored file now declares more pixels than allowed.
    row = _row(1, "a", "quarantined", _png(1, size=(200, 200), mode="L"), storage, reason="label_conflict")
    row["width"], row["height"] = 24, 20
    grid = quarantine_thumbnails(storage, _manifest([row]), config=ThumbnailConfig(max_source_pixels=64 * 64))
    assert grid is not None and grid.images == 0 and grid.skipped == [row["record_id"]]


def test_grid_draws_any_label() -> None:
    cells = [("日本語-ラベル", [Image.new("RGB", (32, 20), (200, 0, 0))]), ("x" * 80, [])]
    with Image.open(io.BytesIO(grid_png(cells))) as image:
        assert image.size[1] == 2 * 34 + 2
