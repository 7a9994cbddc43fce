"""Worker isolation shared by every sandboxed decode: the limits a decode worker runs under, and
a small pool that decodes untrusted image bytes for serving.

:func:`init_worker` is the pebble initializer of every decode worker: stderr to /dev/null,
Pillow's bomb warning as an error, one BLAS/torch thread, an address-space limit. Cleaning's
chunked pool (:mod:`cvops_dagster.imaging.sandbox`) and :func:`decode_isolated` (used by
``cvops predict`` on untrusted files) both use it. This module loads no pandas or pyarrow, so
the predict path stays quick to start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
from pebble import ProcessExpired, ProcessPool
from PIL import Image, ImageFile

from cvops_dagster.imaging.decode import decode_image
from cvops_dagster.imaging.policy import REASON_CRASH, REASON_TIMEOUT, DecodeConfig, DecodeFailure

logger = logging.getLogger(__name__)


def init_worker(config: DecodeConfig) -> None:
    """Set the limits a decode worker runs under (pebble's pool initializer)."""
    if config.silence_stderr:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    # Set once for the worker's life, so code outside decode_image (thumbnails) has them too.
    warnings.simplefilter("ignore")
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    Image.MAX_IMAGE_PIXELS = config.max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    single_threaded_numerics()
    _limit_address_space(config.memory_limit_bytes)


def single_threaded_numerics() -> None:
    """One thread for BLAS/OpenMP (numpy's pHash products) and torch in this process.

    Left as they are, OpenBLAS and torch start a thread per core in every worker, and two
    workers on two cores would fight over four or more busy threads. Only pools above one
    thread are touched: a worker forked while the parent held BLAS at one thread (see
    :func:`decode_files`) is already there, and setting OpenBLAS's thread count in a forked
    child starts a helper thread that spins for ~0.1 s of CPU (measured).
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        logger.debug("threadpoolctl not installed; BLAS threads left as they are")
    else:
        controller = ThreadpoolController()
        busy = [info["filepath"] for info in controller.info() if info["num_threads"] > 1]
        if busy:
            controller.select(filepath=busy).limit(limits=1)  # for the rest of the process's life
    torch = sys.modules.get("torch")  # only when the parent had it loaded already
    if torch is not None:
        torch.set_num_threads(1)


@contextlib.contextmanager
def forking_single_threaded(start_method: str) -> Iterator[None]:
    """BLAS at one thread in this process while workers are forked from it.

    A forked worker inherits the setting, so its BLAS never starts helper threads (see
    :func:`single_threaded_numerics`). Held for the pool's life: the pool forks a fresh
    worker whenever one dies.
    """
    if start_method != "fork":
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _limit_address_space(extra_bytes: int) -> None:
    """Limit this process's address space to its current size plus ``extra_bytes``.

    A decoder asking for more gets a ``MemoryError`` (``out_of_memory``) instead of taking
    the machine's memory. Relative to the size at start: a forked worker already maps the
    whole parent.
    """
    if not extra_bytes:
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current + extra_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        logger.debug("address-space limit not available on this platform")


@dataclass(frozen=True)
class IsolatedDecode:
    """One file decoded in isolation: canonical pixels, or why there are none."""

    pixels: np.ndarray | None
    failure: DecodeFailure | None = None


def _decode_bytes(data: bytes, config: DecodeConfig) -> np.ndarray:
    return decode_image(data, config).pixels


def decode_isolated(
    files: Sequence[bytes], config: DecodeConfig = DecodeConfig(), workers: int = 1
) -> list[IsolatedDecode]:
    """Decode untrusted image bytes in worker processes, one task per file, in input order.

    A file that hangs past ``config.task_timeout_s`` is killed (``decode_timeout``), one that
    kills its worker fails alone (``decoder_crashed``), one over the memory limit fails with
    ``out_of_memory``; the others decode on fresh workers. The caller reads the files (plain
    I/O); only decoding, where a hostile file can hang or crash a C decoder, runs here. For a
    few files (``cvops predict``) a task per file costs less than it saves; cleaning uses the
    chunked pool of :mod:`cvops_dagster.imaging.sandbox` instead.
    """
    if not files:
        return []
    import multiprocessing

    Image.init()  # plugins imported once here, not again in each forked worker
    results: list[IsolatedDecode] = []
    with forking_single_threaded(config.start_method):
        pool = ProcessPool(
            max_workers=max(1, min(workers, len(files))),
            initializer=init_worker,
            initargs=(config,),
            context=multiprocessing.get_context(config.start_method),
        )
        try:
            futures = [pool.schedule(_decode_bytes, args=(data, config), timeout=config.task_timeout_s) for data in files]
            for future in futures:
                try:
                    results.append(IsolatedDecode(future.result()))
                except DecodeFailure as exc:
                    results.append(IsolatedDecode(None, exc))
                except FutureTimeout:
                    results.append(IsolatedDecode(None, DecodeFailure(REASON_TIMEOUT, f"killed after {config.task_timeout_s:g}s")))
                except ProcessExpired as exc:
                    results.append(IsolatedDecode(None, DecodeFailure(REASON_CRASH, f"the decoder's process died ({exc})")))
        finally:
            pool.close()
            pool.join()
    return results
