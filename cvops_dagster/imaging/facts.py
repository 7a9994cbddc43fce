"""Per-file decode facts: everything cleaning needs to know about one raw file, in one row.

:func:`decode_chunk` is the work a sandbox worker does for a chunk of files: read each file,
decode it (:func:`~cvops_dagster.imaging.decode.decode_image`), hash its pixels, make its
thumbnail, measure its features, compute its perceptual hash, and give it a canonical PNG.
The result is one row per file with the columns of :data:`FACTS_SCHEMA`, the same row the
decode cache stores, so a file known to the cache needs no decoding at all.

The canonical PNG of an image that already is one (``passthrough``) is the file itself: only
its sha256 is recorded. Small images (up to ``keep_pixels_up_to`` bytes of pixels) come back
as pixels instead of being encoded: encoding and writing a tiny PNG costs more than sending
its pixels, and the caller only needs the PNGs of the images it keeps (not of duplicates).
Larger images are encoded here and written content-addressed into the output folder.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from cvops_dagster.imaging.decode import DecodedImage, classify, decode_image, encode_png, read_file
from cvops_dagster.imaging.features import pixel_features
from cvops_dagster.imaging.hashes import COMPARE_SIZE, THUMB_SIZE, perceptual_hashes, pixel_hash
from cvops_dagster.imaging.policy import REASON_MEMORY, DecodeConfig

FACTS_SCHEMA = pa.schema(
    [
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("reason_detail", pa.string()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("orig_width", pa.int64()),
        ("orig_height", pa.int64()),
        ("animated", pa.bool_()),
        ("orientation", pa.int64()),
        ("passthrough", pa.bool_()),
        ("canonical_mode", pa.string()),
        ("canonical_sha", pa.string()),
        ("converted_sha", pa.string()),
        ("pixel_hash", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("channels", pa.int64()),
        ("aspect_ratio", pa.float64()),
        ("brightness", pa.float64()),
        ("contrast", pa.float64()),
        ("sharpness", pa.float64()),
        ("file_size", pa.int64()),
        ("phash", pa.uint64()),
        ("compare", pa.binary(COMPARE_SIZE * COMPARE_SIZE)),
    ]
)
"""One row per file. A failed file has ``ok`` false, a ``reason`` and ``reason_detail``, and
nulls elsewhere; ``canonical_sha`` is the sha256 of the canonical PNG when one was made (the
raw file's own for ``passthrough``), ``converted_sha`` that of the PNG converted to the other
mode (L <-> RGB) once cleaning made one (never by a worker); ``phash`` and ``compare`` (16x16 luma thumbnail, row
major) are the perceptual hash and its confirmation thumbnail."""

FACT_COLUMNS: tuple[str, ...] = tuple(FACTS_SCHEMA.names)

# Tests inject hangs and crashes here (workers are forked, so they inherit the patch).
_ITEM_HOOK: Callable[[str], None] | None = None


@dataclass
class ChunkResult:
    """What :func:`decode_chunk` returns.

    Attributes:
        facts: one row of :data:`FACTS_SCHEMA` per file done, in order.
        pixels: the kept pixels, by position in the chunk.
    """

    facts: pa.RecordBatch
    pixels: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def done(self) -> int:
        """Files done: all of the chunk, or its first ones when its time ran short."""
        return self.facts.num_rows


def failure_row(reason: str, detail: str) -> dict[str, Any]:
    """The fact row of a file that could not be decoded."""
    return {"ok": False, "reason": reason, "reason_detail": detail}


def decode_chunk(
    items: Sequence[tuple[str, str]],
    config: DecodeConfig,
    out_dir: str,
    keep_pixels_up_to: int = 0,
    time_budget_s: float | None = None,
) -> ChunkResult:
    """Decode a chunk of files; the unit of work of a sandbox worker.

    Args:
        items: ``(key, local path)`` per file.
        config: decoding settings.
        out_dir: folder the canonical PNGs of larger images are written to, as
            ``<sha256>.png``.
        keep_pixels_up_to: images whose canonical pixels take at most this many bytes, and
            that are not canonical PNGs already, come back as pixels (``canonical_sha`` is
            then null): the caller encodes only the ones it keeps.
        time_budget_s: stop after the file that used it up (the caller sends the rest
            again), so a chunk of large images stays well inside the sandbox's time limit.

    Returns:
        The facts of the files done (all of them, or the first ones within the budget),
        and the kept pixels by position in ``items``.
    """
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    rows: list[dict[str, Any]] = []
    decoded: list[tuple[int, DecodedImage]] = []
    thumbs: list[np.ndarray] = []
    pixels: dict[int, np.ndarray] = {}
    for index, (key, path) in enumerate(items):
        if deadline is not None and index and time.monotonic() > deadline:
            break
        try:
            if _ITEM_HOOK is not None:
                _ITEM_HOOK(key)
            data = read_file(path)
            image = decode_image(data, config)
            thumb = _thumbnail(image.pixels)  # here: a hostile file's cost and fault are its own
        except Exception as exc:  # noqa: BLE001 - any decoder bug is a quarantine, not a crash
            rows.append(failure_row(*classify(exc)))
            continue
        # Any error but MemoryError while encoding and writing the PNG (a full disk) is the
        # machine's problem, not the file's: it propagates and stops the run.
        try:
            rows.append(_decoded_row(image, data, config, out_dir, keep_pixels_up_to, pixels, index))
        except MemoryError as exc:  # encoding a huge image under the worker's memory limit
            rows.append(failure_row(REASON_MEMORY, f"MemoryError while encoding: {exc}"[:300]))
            continue
        thumbs.append(thumb)
        decoded.append((index, image))
    if decoded:
        # Features and perceptual hashes of the chunk's images at once (stacked numpy).
        features = pixel_features([image.pixels for _, image in decoded])
        phash, compare = perceptual_hashes(np.stack(thumbs))
        for n, (index, _) in enumerate(decoded):
            row = rows[index]
            for name, values in features.items():
                row[name] = values[n].item()
            row["phash"] = int(phash[n])
            row["compare"] = compare[n].tobytes()
    return ChunkResult(pa.RecordBatch.from_pylist(rows, schema=FACTS_SCHEMA), pixels)


def _decoded_row(
    image: DecodedImage,
    data: bytes,
    config: DecodeConfig,
    out_dir: str,
    keep_pixels_up_to: int,
    kept: dict[int, np.ndarray],
    index: int,
) -> dict[str, Any]:
    """The facts of a decoded file, its canonical PNG written or its pixels kept."""
    if image.passthrough:
        sha: str | None = hashlib.sha256(data).hexdigest()
    elif image.pixels.nbytes <= keep_pixels_up_to:
        sha = None
        kept[index] = image.pixels
    else:
        sha = write_canonical(out_dir, encode_png(image.image, config.png_compress_level))
    return {
        "ok": True,
        "format": image.format,
        "mode": image.mode,
        "orig_width": image.width,
        "orig_height": image.height,
        "animated": image.animated,
        "orientation": image.orientation,
        "passthrough": image.passthrough,
        "canonical_mode": image.canonical_mode,
        "canonical_sha": sha,
        "pixel_hash": pixel_hash(image.pixels),
        "file_size": len(data),
    }


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """The 32x32 box-filtered luma thumbnail the perceptual hash is computed from."""
    if pixels.shape == (THUMB_SIZE, THUMB_SIZE):
        return pixels
    gray = Image.fromarray(pixels, mode="L") if pixels.ndim == 2 else Image.fromarray(pixels, mode="RGB").convert("L")
    return np.asarray(gray.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX))


def write_canonical(out_dir: str | os.PathLike[str], data: bytes) -> str:
    """Write canonical PNG bytes content-addressed into ``out_dir``; return their sha256.

    The file appears whole or not at all (a temporary name, then a rename), so a worker
    killed while writing leaves nothing half-written under the final name.
    """
    sha = hashlib.sha256(data).hexdigest()
    target = Path(out_dir) / f"{sha}.png"
    if not target.exists():
        tmp = target.with_name(f".tmp-{sha}.png-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return sha


def facts_frame(table: pa.Table | pa.RecordBatch | list[dict[str, Any]]) -> pd.DataFrame:
    """Fact rows as a typed frame: the same dtypes whether decoded now or read from a cache.

    Text is pandas ``str`` (missing: NaN), counts ``Int64``, flags ``boolean`` (``ok`` plain
    ``bool``), the pHash ``UInt64``, features ``float64``, ``compare`` bytes (or ``None``).
    """
    if isinstance(table, list):
        table = pa.Table.from_pylist(table, schema=FACTS_SCHEMA)
    elif isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    table = table.select(list(FACT_COLUMNS)).cast(FACTS_SCHEMA)
    frame = table.to_pandas(types_mapper=_PANDAS_TYPES.get)
    frame["ok"] = frame["ok"].fillna(False).astype(bool)
    return frame


_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype(), pa.uint64(): pd.UInt64Dtype()}


def facts_table(frame: pd.DataFrame) -> pa.Table:
    """A facts frame (see :func:`facts_frame`) as an Arrow table of :data:`FACTS_SCHEMA`."""
    return pa.Table.from_pandas(frame[list(FACT_COLUMNS)], schema=FACTS_SCHEMA, preserve_index=False)


def compare_stack(compare: pd.Series) -> np.ndarray:
    """The ``compare`` column as a uint8 array (N, 16, 16), zeros where missing."""
    blank = bytes(COMPARE_SIZE * COMPARE_SIZE)
    joined = b"".join(blank if value is None or value is pd.NA else value for value in compare.tolist())
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(compare), COMPARE_SIZE, COMPARE_SIZE)
