"""The decode sandbox: hung and crashing files cost only themselves, limits hold, workers go away.

Faults are injected through ``cvops_dagster.imaging.facts._ITEM_HOOK`` (or by patching the
worker initializer): the workers are forked, so they inherit the patch.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvops_dagster.imaging import facts as facts_module
from cvops_dagster.imaging import policy, sandbox
from cvops_dagster.imaging.facts import decode_chunk
from cvops_dagster.imaging.policy import DecodeConfig
from cvops_dagster.imaging.sandbox import decode_files

from tests.unit.rawdata import encode, textured


def _write_items(tmp_path, named: dict[str, bytes]) -> list[tuple[str, str]]:
    items = []
    for key, data in named.items():
        path = tmp_path / f"{key}.bin"
        path.write_bytes(data)
        items.append((key, str(path)))
    return items


def _good(n: int, seed: int = 20) -> dict[str, bytes]:
    return {f"good{i}": encode(textured(12, 12, seed=seed + i)) for i in range(n)}


def _faulty(key: str) -> None:
    if key.startswith("hang"):
        time.sleep(60)
    if key.startswith("crash"):
        os._exit(7)
    if key.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)


def _by_key(output) -> pd.DataFrame:
    return output.facts.set_index("key")


def test_pool_quarantines_hung_and_crashed_files_and_carries_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(facts_module, "_ITEM_HOOK", _faulty)
    good = _good(10)
    named = {**dict(list(good.items())[:5]), "hang": good["good0"], "crash": good["good1"], **dict(list(good.items())[5:])}
    config = DecodeConfig(task_timeout_s=3.0, chunk_size=4)
    started = time.monotonic()
    output = decode_files(_write_items(tmp_path, named), tmp_path / "out", config, workers=2)
    assert time.monotonic() - started < 30
    rows = _by_key(output)
    assert rows.loc["hang", "reason"] == policy.REASON_TIMEOUT
    assert rows.loc["crash", "reason"] == policy.REASON_CRASH
    assert "code 7" in rows.loc["crash", "reason_detail"]
    assert rows.loc[list(good), "ok"].all()
    assert list(output.facts["key"]) == list(named)  # input order
    assert output.stats.timeouts == 1 and output.stats.crashes == 1
    assert output.stats.retried_chunks == 1  # the chunk holding both (good4, hang, crash, good5), file by file
    assert output.facts["phash"].notna().sum() == len(good)


@pytest.mark.parametrize("killer", ["crash", "kill"])
def test_crash_right_after_a_result_costs_only_that_file(tmp_path, monkeypatch, killer: str) -> None:
    """The race of the old pool: a worker that has just answered a chunk dies on the first
    file of the next one (sent to it while it was still alive). Only that file is lost."""
    monkeypatch.setattr(facts_module, "_ITEM_HOOK", _faulty)
    good = _good(11, seed=100)
    keys = list(good)
    # One worker, chunks of four: chunk 1 = good0-3 (completes), chunk 2 starts with the killer.
    named = {**{k: good[k] for k in keys[:4]}, killer: good[keys[0]], **{k: good[k] for k in keys[4:]}}
    config = DecodeConfig(task_timeout_s=10.0, chunk_size=4)
    output = decode_files(_write_items(tmp_path, named), tmp_path / "out", config, workers=1)
    rows = _by_key(output)
    assert rows.loc[killer, "reason"] == policy.REASON_CRASH
    assert ("signal 9" if killer == "kill" else "code 7") in rows.loc[killer, "reason_detail"]
    assert rows.drop(index=killer)["ok"].all()
    assert output.stats.crashes == 1 and output.stats.timeouts == 0
    assert output.stats.chunks >= 2  # at least one chunk answered before the crash


def test_crashes_in_the_one_file_per_task_retry_cost_only_their_files(tmp_path, monkeypatch) -> None:
    """Two killers in one chunk: its retry runs one file per task, where each killer dies
    right after a worker has answered a file; the good files between them decode."""
    monkeypatch.setattr(facts_module, "_ITEM_HOOK", _faulty)
    good = _good(6, seed=200)
    named = {"good0": good["good0"], "crash_a": good["good1"], "good2": good["good2"], "kill_b": good["good3"]}
    named.update({k: good[k] for k in ("good4", "good5")})
    output = decode_files(_write_items(tmp_path, named), tmp_path / "out", DecodeConfig(chunk_size=8), workers=2)
    rows = _by_key(output)
    assert rows.loc[["crash_a", "kill_b"], "reason"].tolist() == [policy.REASON_CRASH] * 2
    assert rows.drop(index=["crash_a", "kill_b"])["ok"].all()
    assert output.stats.crashes == 2 and output.stats.retried_chunks == 1


def test_pool_memory_limit_quarantines_the_file(tmp_path) -> None:
    big = encode(Image.new("RGB", (5000, 5000), (10, 20, 30)), compress_level=1)  # 75 MB decoded
    named = {"big": big, "small": encode(textured(12, 12, seed=30))}
    config = DecodeConfig(memory_limit_bytes=40 * 1024**2)
    rows = _by_key(decode_files(_write_items(tmp_path, named), tmp_path / "out", config, workers=1))
    assert rows.loc["big", "reason"] == policy.REASON_MEMORY
    assert bool(rows.loc["small", "ok"])


def test_bomb_and_disallowed_files_are_refused_in_the_workers(tmp_path) -> None:
    named = {
        "bomb": encode(Image.new("L", (300, 300), 7)),
        "pcx": encode(textured(8, 8, seed=1), "PCX"),
        "ok": encode(textured(8, 8, seed=2)),
    }
    config = DecodeConfig(max_pixels=10_000)
    rows = _by_key(decode_files(_write_items(tmp_path, named), tmp_path / "out", config, workers=1))
    assert rows.loc["bomb", "reason"] == policy.REASON_BOMB
    assert rows.loc["pcx", "reason"] == policy.REASON_FORMAT
    assert bool(rows.loc["ok", "ok"])


def _noisy(key: str) -> None:
    os.write(2, f"decoder noise from {key}\n".encode())


@pytest.mark.parametrize("silence", [True, False])
def test_worker_stderr_is_silenced(tmp_path, monkeypatch, capfd, silence: bool) -> None:
    monkeypatch.setattr(facts_module, "_ITEM_HOOK", _noisy)
    items = _write_items(tmp_path, {"loud": encode(textured(8, 8, seed=3))})
    decode_files(items, tmp_path / "out", DecodeConfig(silence_stderr=silence), workers=1)
    assert ("decoder noise from loud" in capfd.readouterr().err) is not silence


def test_pool_writes_canonical_pngs_named_by_their_hash(tmp_path) -> None:
    named = {"a": encode(textured(12, 12, seed=31), "BMP"), "b": encode(textured(80, 80, seed=32, mode="L"), "BMP")}
    config = DecodeConfig(start_method="forkserver")  # the other start methods work too
    output = decode_files(_write_items(tmp_path, named), tmp_path / "out", config, workers=1)
    assert output.facts["ok"].all()
    for sha in output.facts["canonical_sha"]:
        data = (tmp_path / "out" / f"{sha}.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
        assert Image.open(io.BytesIO(data)).mode in ("L", "RGB")


def test_pool_can_return_pixels_instead_of_encoding(tmp_path) -> None:
    named = {
        "bmp": encode(textured(12, 12, seed=60), "BMP"),
        "png": encode(textured(12, 12, seed=61, mode="L")),
        "big": encode(textured(64, 64, seed=62), "BMP"),
    }
    output = decode_files(
        _write_items(tmp_path, named), tmp_path / "out", DecodeConfig(), workers=1, keep_pixels_up_to=12 * 12 * 3
    )
    rows = _by_key(output)
    pixels = dict(zip(output.facts["key"], output.pixels, strict=True))
    assert rows["ok"].all()
    # Small non-canonical image: pixels back, nothing encoded.
    assert pd.isna(rows.loc["bmp", "canonical_sha"])
    np.testing.assert_array_equal(pixels["bmp"], np.asarray(textured(12, 12, seed=60)))
    # Already canonical: only its hash, no file (the raw file is its canonical PNG).
    assert bool(rows.loc["png", "passthrough"]) and pixels["png"] is None
    assert rows.loc["png", "canonical_sha"] == hashlib.sha256(named["png"]).hexdigest()
    # Larger than the limit: encoded by the worker.
    assert pixels["big"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{rows.loc['big', 'canonical_sha']}.png"]


def _slow(key: str) -> None:
    time.sleep(0.3)


def test_a_chunk_stops_inside_its_time_budget_and_the_rest_is_sent_again(tmp_path, monkeypatch) -> None:
    """Files that are slow but sound are never timed out for sharing a chunk."""
    monkeypatch.setattr(facts_module, "_ITEM_HOOK", _slow)
    named = _good(5, seed=300)
    config = DecodeConfig(task_timeout_s=1.0, chunk_size=5)  # a chunk's budget: 0.25 s, one file
    output = decode_files(_write_items(tmp_path, named), tmp_path / "out", config, workers=1)
    assert output.facts["ok"].all()
    assert output.stats.timeouts == 0 and output.stats.retried_chunks == 0
    assert output.stats.chunks == 5


def test_decode_chunk_within_budget_keeps_at_least_one_file(tmp_path) -> None:
    items = _write_items(tmp_path, _good(3, seed=310))
    result = decode_chunk(items, DecodeConfig(), str(tmp_path / "out"), time_budget_s=0.0)
    assert result.done == 1 and result.facts.num_rows == 1
    assert decode_chunk(items, DecodeConfig(), str(tmp_path / "out")).done == 3


def test_worker_hanging_at_start_is_replaced_without_blaming_a_file(tmp_path, monkeypatch) -> None:
    flag = tmp_path / "hung-once"
    real_init = sandbox.init_worker

    def hang_first_time(config: DecodeConfig) -> None:
        if not flag.exists():
            flag.write_text("x")
            time.sleep(60)
        real_init(config)

    monkeypatch.setattr(sandbox, "init_worker", hang_first_time)
    named = {f"f{i}": encode(textured(10, 10, seed=40 + i)) for i in range(5)}
    output = decode_files(_write_items(tmp_path, named), tmp_path / "out", DecodeConfig(task_timeout_s=1.0), workers=1)
    assert output.facts["ok"].all()
    assert output.stats.restarts == 1 and output.stats.crashes == 0 and output.stats.timeouts == 0


def test_workers_that_never_start_work_stop_the_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "init_worker", lambda config: time.sleep(60))
    items = _write_items(tmp_path, _good(2, seed=320))
    with pytest.raises(sandbox.DecodePoolError, match="no progress"):
        decode_files(items, tmp_path / "out", DecodeConfig(task_timeout_s=0.5), workers=1)


def test_nothing_to_decode_starts_no_worker(tmp_path) -> None:
    output = decode_files([], tmp_path / "out", DecodeConfig())
    assert output.stats.workers == 0 and len(output.facts) == 0 and output.pixels == []
    assert list(output.facts.columns)[0] == "key"


def _children() -> set[int]:
    """Child pids of this process (zombies included: they are listed until reaped)."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids |= {int(pid) for pid in f.read().split()}
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return pids


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="lists child processes through Linux's /proc")
def test_workers_are_gone_when_the_pool_returns(tmp_path) -> None:
    before = _children()
    output = decode_files(_write_items(tmp_path, _good(6, seed=90)), tmp_path / "out", DecodeConfig(), workers=2)
    assert output.facts["ok"].all() and output.stats.workers == 2
    assert not (_children() - before), "decode workers left behind"


def _threads_after_blas(key: str) -> None:
    """In a worker: one BLAS product, then the thread count, into the file named by ``key``."""
    _ = np.ones((256, 256), dtype=np.float32) @ np.ones((256, 256), dtype=np.float32)
    with open("/proc/self/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    with open(key, "w") as f:
        f.write(str(threads))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="thread count read from Linux /proc")
@pytest.mark.parametrize("matmul_in_parent", [False, True])
def test_workers_compute_on_one_thread(tmp_path, matmul_in_parent: bool) -> None:
    """A worker keeps one thread through its BLAS products, whatever the parent's BLAS was
    doing (busy BLAS threads in every worker would fight the other workers).

    The parent is a fresh interpreter, like a Dagster step process: what earlier tests loaded
    into this one (torch's thread pools) is not what a cleaning step forks from."""
    import subprocess
    import sys
    from pathlib import Path

    report = tmp_path / "threads"
    code = (
        "import numpy as np\n"
        + ("_ = np.ones((512, 512)) @ np.ones((512, 512))\n" if matmul_in_parent else "")
        + "from cvops_dagster.imaging import facts\n"
        "from cvops_dagster.imaging.policy import DecodeConfig\n"
        "from cvops_dagster.imaging.sandbox import decode_files\n"
        "from tests.unit.test_sandbox import _threads_after_blas\n"
        "facts._ITEM_HOOK = _threads_after_blas\n"
        f"decode_files([({str(report)!r}, {str(tmp_path / 'absent')!r})], {str(tmp_path / 'out')!r}, DecodeConfig(), workers=1)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=120)
    assert report.read_text() == "1"


def _blas_threads_after_setup(conn: Any) -> None:
    from cvops_dagster.imaging.isolation import single_threaded_numerics

    single_threaded_numerics()
    from threadpoolctl import threadpool_info

    conn.send([info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"])
    conn.close()


def test_worker_setup_limits_blas_it_did_not_inherit_at_one_thread() -> None:
    """A worker not forked under the parent's limit (spawn, forkserver) limits BLAS itself."""
    import multiprocessing

    from threadpoolctl import threadpool_info

    if all(info["num_threads"] == 1 for info in threadpool_info() if info["user_api"] == "blas"):
        pytest.skip("BLAS runs on one thread here already")
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_blas_threads_after_setup, args=(child,))
    process.start()
    child.close()
    assert parent.poll(20)
    threads = parent.recv()
    process.join(5)
    assert threads and set(threads) == {1}


@pytest.mark.corpus
def test_pillow_corpus_gets_one_row_per_file_and_no_worker_failure(tmp_path, pillow_corpus) -> None:
    paths = sorted(p for p in pillow_corpus.rglob("*") if p.is_file())
    items = [(p.relative_to(pillow_corpus).as_posix(), str(p)) for p in paths]
    output = decode_files(items, tmp_path / "out", DecodeConfig(), workers=2, keep_pixels_up_to=64 * 64 * 3)
    assert list(output.facts["key"]) == [key for key, _ in items]
    assert output.facts["ok"].sum() > 100
    assert output.facts.loc[~output.facts["ok"], "reason"].notna().all()
    assert output.stats.crashes == 0 and output.stats.timeouts == 0
