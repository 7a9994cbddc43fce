"""The decode sandbox: untrusted files decoded in worker processes that may hang or die.

Built on pebble's ``ProcessPool``, a maintained library that gives exactly the guarantees
needed: ``schedule(timeout=...)`` kills a worker whose task runs past its time (the future
raises ``TimeoutError``), a worker that dies (a segfault in a C decoder, ``os._exit``, the
kernel's OOM killer) fails only the task it was running (``ProcessExpired``), and the pool
replaces both with fresh workers while the other tasks go on. Each worker starts with
:func:`init_worker`: an address-space limit (``RLIMIT_AS``), stderr sent to /dev/null
(libjpeg and libtiff warnings would flood the run log), Pillow's bomb warning as an error,
and one thread for BLAS and torch (the pool is the parallelism).

Files travel in chunks (one task per chunk, grouped by file extension so one decoder's code
stays hot): a process round trip per file would cost more than decoding a small image. A
chunk has the per-file time limit as a whole, and stops itself once it has used a quarter
of it (the rest of its files are sent again), so sound files never run out of time for
sharing a chunk. When a chunk's worker dies or times out, every file of the chunk is tried
again alone, so exactly the guilty file is quarantined (``decoder_crashed`` or
``decode_timeout``) and the others decode.

Start method: "fork" (:class:`~cvops_dagster.imaging.policy.DecodeConfig`'s default) starts
a worker in milliseconds with Pillow's plugins and numpy already imported, whereas "spawn"
and "forkserver" start a fresh interpreter that re-imports the parent's main module (in a
Dagster step that is Dagster itself: seconds per worker, and again for every replacement).
Forking a threaded parent (pebble's own manager threads, Dagster's) can leave a child
holding a lock another thread held; a watchdog replaces the whole pool if no task starts
within the time limit, so such a stall costs time, never the run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pebble import ProcessExpired, ProcessPool
from PIL import Image

from cvops_dagster.imaging.facts import FACTS_SCHEMA, ChunkResult, decode_chunk, facts_frame, failure_row
from cvops_dagster.imaging.isolation import forking_single_threaded, init_worker
from cvops_dagster.imaging.policy import REASON_CRASH, REASON_TIMEOUT, DecodeConfig

logger = logging.getLogger(__name__)

_MAX_CHUNK_FILES = 128
# A chunk stops after the file that takes it past this share of the time limit and the
# rest is sent again: a chunk of large photos never comes near the limit.
_CHUNK_BUDGET_SHARE = 0.25
_MAX_STALLS = 3  # pool replacements in a row without any file settled before giving up


@dataclass
class PoolStats:
    """What happened in a :func:`decode_files` run.

    Attributes:
        workers: worker processes (0 when there was nothing to decode).
        files: files decoded (or quarantined) by the pool.
        chunks: tasks that finished normally.
        retried_chunks: chunks whose worker died or timed out, retried file by file.
        timeouts, crashes: files quarantined as ``decode_timeout`` / ``decoder_crashed``.
        restarts: pools replaced after a stall or a broken pool (no file is blamed).
        seconds: wall time of the run.
    """

    workers: int = 0
    files: int = 0
    chunks: int = 0
    retried_chunks: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0
    seconds: float = 0.0

    def add(self, other: PoolStats) -> None:
        """Count another run of the pool in these figures (``workers``: the most used)."""
        self.workers = max(self.workers, other.workers)
        for name in ("files", "chunks", "retried_chunks", "timeouts", "crashes", "restarts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds


@dataclass
class DecodedFiles:
    """What :func:`decode_files` learnt, one entry per input file in input order.

    Attributes:
        facts: one row per file: ``key`` and the columns of
            :data:`~cvops_dagster.imaging.facts.FACTS_SCHEMA` (see ``facts_frame``).
        pixels: canonical pixels of the small images kept as arrays, else ``None``.
        stats: what the pool did.
    """

    facts: pd.DataFrame
    pixels: list[np.ndarray | None]
    stats: PoolStats = field(default_factory=PoolStats)


class DecodePoolError(RuntimeError):
    """The pool cannot make progress (workers never start work), or a worker hit an error
    that is not the file's fault (such as a full disk while writing canonical PNGs)."""


class _PoolFailed(Exception):
    """The current pool is stuck or broken; the unfinished chunks go to a fresh pool."""


def decode_files(
    items: Sequence[tuple[str, str]],
    out_dir: str | os.PathLike[str],
    config: DecodeConfig = DecodeConfig(),
    workers: int | None = None,
    *,
    keep_pixels_up_to: int = 0,
) -> DecodedFiles:
    """Decode files in the sandbox, quarantining the ones that hang or crash.

    Args:
        items: ``(key, local path)`` per file; keys must be unique.
        out_dir: local folder the canonical PNGs of larger images are written to, as
            ``<sha256>.png`` (see :func:`~cvops_dagster.imaging.facts.decode_chunk`).
        config: decoding settings and limits.
        workers: worker processes; ``None`` means one per CPU core.
        keep_pixels_up_to: small images (canonical pixels of at most this many bytes)
            come back as pixels instead of canonical PNGs.

    Returns:
        The facts of every file in input order, the kept pixels and the pool statistics.
        Every worker has exited when it returns.

    Raises:
        DecodePoolError: the pool keeps failing before any file is settled, or a worker
            failed in a way that is not a file's fault.
        ValueError: keys repeat.
    """
    started = time.perf_counter()
    if len({key for key, _ in items}) != len(items):
        raise ValueError("decode_files needs unique keys")
    stats = PoolStats(files=len(items))
    run = _Run(list(items), str(out_dir), config, keep_pixels_up_to, stats)
    if items:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Image.init()  # every Pillow plugin imported once here, not again in each worker
        stats.workers = max(1, min(workers or os.cpu_count() or 1, len(items)))
        with forking_single_threaded(config.start_method):
            run.run()
    facts = facts_frame(run.table())
    facts.insert(0, "key", pd.Series([key for key, _ in items], dtype=object))
    stats.seconds = time.perf_counter() - started
    return DecodedFiles(facts, [run.pixels.get(i) for i in range(len(items))], stats)


class _Run:
    """The state of one :func:`decode_files` call: chunks to do, and rows by input position."""

    def __init__(
        self, items: list[tuple[str, str]], out_dir: str, config: DecodeConfig, keep: int, stats: PoolStats
    ) -> None:
        self.items = items
        self.out_dir = out_dir
        self.config = config
        self.keep = keep
        self.stats = stats
        self.parts: list[tuple[list[int], pa.RecordBatch]] = []  # (input positions, their facts)
        self.filled = np.zeros(len(items), dtype=bool)
        self.pixels: dict[int, np.ndarray] = {}
        self.pending: deque[list[int]] = deque()
        self.settled = 0

    def run(self) -> None:
        """Work through every chunk, on a fresh pool whenever one gets stuck or breaks."""
        self.pending = deque(_chunks(self.items, self.stats.workers, self.config.chunk_size))
        failures = 0
        while self.pending:
            before = self.settled
            pool = ProcessPool(
                max_workers=self.stats.workers,
                initializer=init_worker,
                initargs=(self.config,),
                context=multiprocessing.get_context(self.config.start_method),
            )
            try:
                self._drive(pool)
            except _PoolFailed as failure:
                self.stats.restarts += 1
                failures = 0 if self.settled > before else failures + 1
                logger.warning("decode pool replaced: %s", failure)
                if failures >= _MAX_STALLS:
                    raise DecodePoolError(f"decode workers make no progress: {failure}") from None
            finally:
                pool.stop()
                pool.join()

    def _drive(self, pool: ProcessPool) -> None:
        """Keep the workers fed until every chunk is settled, or raise :class:`_PoolFailed`.

        A bounded number of chunks is in flight (two per worker: one running, one queued),
        so a chunk split for a retry runs soon and a stall is noticed.
        """
        in_flight: dict[Future[ChunkResult], list[int]] = {}
        last_progress = time.monotonic()
        try:
            while self.pending or in_flight:
                while self.pending and len(in_flight) < 2 * self.stats.workers:
                    chunk = self.pending.popleft()
                    in_flight[self._schedule(pool, chunk)] = chunk
                done, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    self._settle(future, in_flight[future])
                    del in_flight[future]
                now = time.monotonic()
                if done or any(future.running() for future in in_flight):
                    last_progress = now
                elif now - last_progress > self.config.task_timeout_s:
                    raise _PoolFailed(f"no task started within {self.config.task_timeout_s:g} s")
        except (_PoolFailed, BrokenProcessPool) as exc:
            # Unfinished chunks go back to the front, whole: no file is blamed for a pool failure.
            self.pending.extendleft(reversed(list(in_flight.values())))
            raise _PoolFailed(str(exc) or type(exc).__name__) from exc

    def _schedule(self, pool: ProcessPool, chunk: list[int]) -> Future[ChunkResult]:
        task = [self.items[i] for i in chunk]
        try:
            return pool.schedule(
                decode_chunk,
                args=(task, self.config, self.out_dir, self.keep, self.config.task_timeout_s * _CHUNK_BUDGET_SHARE),
                timeout=self.config.task_timeout_s,
            )
        except RuntimeError as exc:  # pebble: "Unexpected error within the Pool"
            self.pending.appendleft(chunk)
            raise _PoolFailed(str(exc)) from exc

    def _settle(self, future: Future[ChunkResult], chunk: list[int]) -> None:
        """Place a finished chunk's rows, or split it / blame its file when its worker failed."""
        try:
            result = future.result()
        except TimeoutError:
            self._failed(chunk, REASON_TIMEOUT, f"no result within {self.config.task_timeout_s:g} s; worker killed")
        except ProcessExpired as exc:
            code = exc.exitcode
            how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
            self._failed(chunk, REASON_CRASH, f"worker exited with {how}")
        except BrokenProcessPool:
            raise
        except Exception as exc:  # an error that is not a decoder's: a bug, a full disk
            if len(chunk) > 1:
                self._split(chunk)
                return
            key = self.items[chunk[0]][0]
            raise DecodePoolError(f"decoding {key!r} failed outside the decoder: {exc!r}") from exc
        else:
            self.stats.chunks += 1
            self._place(chunk[: result.done], result.facts)
            for offset, array in result.pixels.items():
                self.pixels[chunk[offset]] = array
            if result.done < len(chunk):  # its time budget ran short: the rest goes again
                self.pending.appendleft(chunk[result.done :])

    def _failed(self, chunk: list[int], reason: str, detail: str) -> None:
        """A worker died or hung on ``chunk``: retry its files alone, or blame the one file."""
        if len(chunk) > 1:
            self._split(chunk)
            return
        key = self.items[chunk[0]][0]
        logger.warning("decode worker failed on %s: %s (%s)", key, reason, detail)
        if reason == REASON_TIMEOUT:
            self.stats.timeouts += 1
        else:
            self.stats.crashes += 1
        self._place(chunk, pa.RecordBatch.from_pylist([failure_row(reason, detail)], schema=FACTS_SCHEMA))

    def _split(self, chunk: list[int]) -> None:
        self.stats.retried_chunks += 1
        self.pending.extendleft([position] for position in reversed(chunk))

    def _place(self, positions: list[int], facts: pa.RecordBatch) -> None:
        if self.filled[positions].any():
            raise RuntimeError("decode pool returned a file twice")
        self.filled[positions] = True
        self.parts.append((positions, facts))
        self.settled += len(positions)

    def table(self) -> pa.Table:
        """The facts of every file, in input order."""
        if not self.filled.all():
            raise RuntimeError(f"decode pool settled {int(self.filled.sum())} of {len(self.items)} files")
        positions = np.fromiter((p for chunk, _ in self.parts for p in chunk), dtype=np.int64, count=len(self.items))
        table = pa.Table.from_batches([facts for _, facts in self.parts], schema=FACTS_SCHEMA)
        return table.take(np.argsort(positions, kind="stable"))


def _chunks(items: Sequence[tuple[str, str]], workers: int, configured: int | None) -> list[list[int]]:
    """Input positions cut into tasks of equal size, grouped by file extension.

    Runs of one format keep one decoder's code and tables hot in the CPU caches. About four
    chunks per worker balance the load at the end of a run.
    """
    if not items:
        return []
    size = max(1, configured) if configured else min(_MAX_CHUNK_FILES, max(1, -(-len(items) // (workers * 4))))
    order = sorted(range(len(items)), key=lambda i: os.path.splitext(items[i][0])[1].lower())
    return [order[start : start + size] for start in range(0, len(order), size)]
