"""ArtifactStorage on a local folder: round trips, listing, keys and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from cvops_dagster.core.storage import ArtifactStorage, sha256_bytes


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStorage:
    return ArtifactStorage(str(tmp_path / "artifacts"))


def test_round_trip_and_listing(store: ArtifactStorage) -> None:
    store.write_bytes("a/b/c.bin", b"hello")
    store.write_json("a/meta.json", {"x": 1})
    store.write_parquet("t/frame.parquet", pd.DataFrame({"v": [1, 2]}))
    assert store.read_bytes("a/b/c.bin") == b"hello"
    assert store.read_json("a/meta.json") == {"x": 1}
    assert store.read_parquet("t/frame.parquet")["v"].tolist() == [1, 2]
    assert store.list() == ["a/b/c.bin", "a/meta.json", "t/frame.parquet"]
    assert store.list("a") == ["a/b/c.bin", "a/meta.json"]
    assert store.list("missing") == []
    assert store.exists("a/b/c.bin") and not store.exists("a/b/nope")


def test_exception_mid_write_leaves_no_file(store: ArtifactStorage) -> None:
    with pytest.raises(RuntimeError):
        with store.open_write("x/partial.bin") as f:
            f.write(b"half of it")
            raise RuntimeError("disk on fire")
    assert not store.exists("x/partial.bin")
    # No temporary file left behind either (list() hides them, so look at the folder itself).
    root = store.local_path("x/partial.bin").parent
    assert not root.exists() or os.listdir(root) == []


def test_failed_overwrite_keeps_previous_version(store: ArtifactStorage) -> None:
    store.write_bytes("model.bin", b"good")
    with pytest.raises(ValueError):
        with store.open_write("model.bin") as f:
            f.write(b"bad")
            raise ValueError("interrupted")
    assert store.read_bytes("model.bin") == b"good"


def test_content_addressed_writes_once(store: ArtifactStorage) -> None:
    digest, key = store.write_content_addressed("images", b"\x89PNG...", "PNG")
    assert digest == sha256_bytes(b"\x89PNG...")
    assert key == f"images/{digest}.png"
    assert store.write_content_addressed("images", b"\x89PNG...", "png") == (digest, key)
    assert store.list("images") == [key]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "../x", "a//b", "./a"])
def test_keys_cannot_leave_the_root(store: ArtifactStorage, key: str) -> None:
    with pytest.raises(ValueError):
        store.write_bytes(key, b"x")


def test_memory_backend_lists_like_local() -> None:
    # fsspec's memory filesystem reports paths with a leading "/"; listing must still work.
    store = ArtifactStorage("memory://cvops-test-list")
    store.write_bytes("a/b.bin", b"1")
    store.write_bytes("c.bin", b"2")
    assert store.list() == ["a/b.bin", "c.bin"]
    assert store.list("a") == ["a/b.bin"]


def test_read_many_keeps_order(store: ArtifactStorage) -> None:
    for i in range(5):
        store.write_bytes(f"a/{i}.bin", bytes([i]) * (i + 1))
    keys = [f"a/{i}.bin" for i in (3, 0, 4, 1)]
    assert store.read_many(keys) == [bytes([i]) * (i + 1) for i in (3, 0, 4, 1)]


def test_map_transfers_preserves_order_on_the_pool(store: ArtifactStorage) -> None:
    import threading

    seen: set[str] = set()

    def work(i: int) -> int:
        seen.add(threading.current_thread().name)
        return i * i

    assert store.map_transfers(work, range(50), remote=True) == [i * i for i in range(50)]
    assert any(name.startswith("cvops-transfer") for name in seen)
    assert store.map_transfers(work, range(3), remote=False) == [0, 1, 4]


def test_stale_temporaries_from_a_killed_write_are_removed(store: ArtifactStorage) -> None:
    import os
    import time

    folder = store.local_path("images")
    assert folder is not None
    folder.mkdir(parents=True)
    old, fresh = folder / ".tmp-abc.png-1", folder / ".tmp-def.png-2"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    (folder / "kept.png").write_bytes(b"real")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    assert store.remove_stale_temporaries("images") == 1
    assert not old.exists() and fresh.exists() and (folder / "kept.png").exists()
