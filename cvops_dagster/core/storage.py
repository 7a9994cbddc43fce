"""Artifact storage over fsspec: one API for a local folder and ``s3://bucket/prefix``.

Every artifact this system writes goes through :class:`ArtifactStorage`, so a local run and an
S3-backed deployment behave the same. Writes are atomic: a reader never sees a half-written
artifact, and an exception during a write leaves nothing at the final key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec

logger = logging.getLogger(__name__)


T = TypeVar("T")
R = TypeVar("R")

#: Concurrent object transfers (GET/HEAD/PUT) per storage operation on remote stores.
TRANSFER_THREADS = 16


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``: the content address used for every artifact."""
    return hashlib.sha256(data).hexdigest()


def split_protocol(root: str) -> tuple[str, str]:
    if "://" in root:
        protocol, rest = root.split("://", 1)
        return protocol, rest.rstrip("/")
    return "file", str(Path(root).expanduser().resolve())


def open_filesystem(protocol: str, endpoint_url: str | None = None, **options: Any) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``protocol``, set up the same way for artifacts and landing zones.

    On S3 the endpoint comes from the argument (``CVOPS_S3_ENDPOINT_URL``), credentials from
    botocore's environment chain, and listings are not cached: objects written by other
    processes (sensors, workers) must show up at once.
    """
    if protocol == "s3":
        if endpoint_url:
            options.setdefault("endpoint_url", endpoint_url)
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
    return fsspec.filesystem(protocol, **options)


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is an artifact key: relative, ``/``-separated, no empty, ``.`` or
    ``..`` segment, no backslash (so no key can reach outside the artifact root)."""
    return bool(key) and not key.startswith("/") and "\\" not in key and not any(
        part in ("", ".", "..") for part in key.split("/")
    )


@dataclass
class ArtifactStorage:
    """Keyed byte storage rooted at a local folder or an fsspec URL.

    Keys are POSIX relative paths (``images/<sha>.png``); they may not be absolute or contain
    ``..`` so a key can never address anything outside the root.

    Args:
        root: a folder path or URL such as ``s3://bucket/prefix``.
        endpoint_url: S3-compatible endpoint (MinIO, a test server); ``None`` means AWS.
        storage_options: extra fsspec options (credentials come from the environment).
    """

    root: str
    endpoint_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.protocol, self._base = split_protocol(self.root)
        self.fs = open_filesystem(self.protocol, self.endpoint_url, **self.storage_options)
        if self.is_local:
            Path(self._base).mkdir(parents=True, exist_ok=True)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def _path(self, key: str) -> str:
        if not is_valid_key(key):
            raise ValueError(f"invalid artifact key {key!r}")
        return f"{self._base}/{key}"

    def uri(self, key: str) -> str:
        """The full location of ``key``, as users and metadata show it."""
        path = self._path(key)
        return path if self.is_local else f"{self.protocol}://{path}"

    def local_path(self, key: str) -> Path | None:
        """The file path of ``key`` when storage is local, else ``None``."""
        return Path(self._path(key)) if self.is_local else None

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open(self._path(key), "rb") as f:
            return f.read()

    def read_many(self, keys: Sequence[str]) -> list[bytes]:
        """The bytes of every key, in order; one batched, concurrent fetch on object stores.

        A folder reads them one after the other (a local read is microseconds); S3 fetches
        them concurrently through fsspec's batch ``cat`` instead of one round trip each.
        """
        if self.is_local or len(keys) < 2:
            return [self.read_bytes(k) for k in keys]
        paths = [self._path(k) for k in keys]
        found = self.fs.cat(paths, on_error="raise")
        by_path = {str(path).split("://", 1)[-1].lstrip("/"): data for path, data in found.items()}
        return [by_path[path.lstrip("/")] for path in paths]

    def map_transfers(self, fn: Callable[[T], R], items: Iterable[T], remote: bool | None = None) -> list[R]:
        """``[fn(item) for item in items]``, on a bounded thread pool when transfers are remote.

        Each call of ``fn`` moves whole objects (a GET, a HEAD, a PUT); on S3 these are
        round trips that overlap well, on a folder they are faster one by one.
        """
        overlap = (not self.is_local) if remote is None else remote
        if not overlap:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=TRANSFER_THREADS, thread_name_prefix="cvops-transfer") as pool:
            return list(pool.map(fn, items))

    def remove_stale_temporaries(self, prefix: str, max_age_s: float = 3600.0) -> int:
        """Delete temporary files (``.tmp-*``) a killed writer left under ``prefix`` (local only).

        Only files older than ``max_age_s`` go, so a write in progress elsewhere is left alone.
        Object stores need nothing: their writes are one PUT, with no temporary object.
        """
        folder = self.local_path(prefix.strip("/")) if self.is_local else None
        if folder is None or not folder.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - max_age_s
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".tmp-") and entry.is_file(follow_symlinks=False):
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        continue  # its writer finished (renamed it) meanwhile
        if removed:
            logger.info("removed %d stale temporary file(s) under %s", removed, self.uri(prefix.strip("/")))
        return removed

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursively), sorted, relative to the root."""
        base = self._base if not prefix.strip("/") else self._path(prefix.strip("/"))
        if not self.is_local:
            # s3fs keeps listings it has seen (per process, shared by every instance with the
            # same settings); a stale one would hide objects written since.
            self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        # Backends differ on a leading "/" (memory:// adds one, s3 has none): compare without it.
        base_no_proto = self._base.strip("/") + "/"
        keys = []
        for path in found:
            path = str(path)
            if "://" in path:
                path = path.split("://", 1)[1]
            path = path.lstrip("/")
            if path.startswith(base_no_proto):
                key = path[len(base_no_proto):]
                if "/.tmp-" not in f"/{key}" and not key.split("/")[-1].startswith(".tmp-"):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path)

    @contextmanager
    def open_write(self, key: str) -> Iterator[io.BufferedIOBase]:
        """Open ``key`` for writing; the object appears only if the block finishes.

        Local: a temporary file in the same folder, fsynced and renamed over the key.
        Object stores: the bytes are buffered and uploaded in one PUT after the block,
        so an exception inside the block never commits a partial object.
        """
        path = self._path(key)
        if self.is_local:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    yield f  # type: ignore[misc]
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        else:
            buffer = io.BytesIO()
            yield buffer
            self.fs.pipe_file(path, buffer.getvalue())

    def write_bytes(self, key: str, data: bytes) -> str:
        """Atomically write ``data`` at ``key`` and return its URI."""
        with self.open_write(key) as f:
            f.write(data)
        return self.uri(key)

    def write_content_addressed(
        self, prefix: str, data: bytes, ext: str, known: set[str] | None = None
    ) -> tuple[str, str]:
        """Store ``data`` once under ``<prefix>/<sha256>.<ext>``; return (sha256, key).

        ``known``: keys already listed as present (see :meth:`list`); a key in it is not
        looked up again, so a batch of writes costs one listing instead of a request each.
        """
        digest = sha256_bytes(data)
        key = f"{prefix.strip('/')}/{digest}.{ext.lstrip('.').lower()}" if ext else f"{prefix}/{digest}"
        if known is not None and key in known:
            return digest, key
        if not self.exists(key):
            self.write_bytes(key, data)
        return digest, key

    def write_json(self, key: str, obj: Any) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_parquet(self, key: str, frame: Any) -> str:
        """Write a pandas DataFrame as Parquet, atomically."""
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return self.write_bytes(key, buffer.getvalue())

    def read_parquet(self, key: str) -> Any:
        import pandas as pd

        return pd.read_parquet(io.BytesIO(self.read_bytes(key)))
