"""Test helpers: build raw manifests directly in an ArtifactStorage, and sample images."""

from __future__ import annotations

import io
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from PIL import Image

from cvops_dagster.ingestion.ingest import MANIFEST_COLUMNS
from cvops_dagster.core.storage import ArtifactStorage

RAW_COLUMNS = list(MANIFEST_COLUMNS)  # the raw-manifest contract, from ingestion itself

_BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)


def raw_manifest(
    storage: ArtifactStorage,
    batch_id: str,
    files: Iterable[tuple[str, str | None, bytes]],
    batch_index: int = 0,
) -> pd.DataFrame:
    """Store files under ``images/<sha>.<ext>`` and return their raw-manifest rows.

    Args:
        storage: where the raw images go.
        batch_id: the batch id of every row.
        files: ``(path, label, bytes)``; the extension of ``path`` becomes ``ext``.
        batch_index: orders batches in time (``ingested_at``).
    """
    rows = []
    stamp = (_BASE_TIME + timedelta(hours=batch_index)).isoformat()
    for path, label, data in files:
        ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        sha, key = storage.write_content_addressed("images", data, ext)
        rows.append(
            {
                "record_id": f"{batch_id}/{path}",
                "batch_id": batch_id,
                "path": path,
                "label": label,
                "status": "ingested",
                "reason": None,
                "sample_id": sha,
                "image_key": key,
                "ext": ext or None,
                "size_bytes": len(data),
                "ingested_at": stamp,
            }
        )
    return pd.DataFrame(rows, columns=RAW_COLUMNS)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def digit_images(count: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """The bundled sample data's digits (sklearn, no download): 32x32 uint8 arrays, labels."""
    from cvops_dagster.ingestion.sample_data import digit_images as sample_digits

    images, labels = sample_digits()
    if count is not None:
        images, labels = images[:count], labels[:count]
    return list(images), [str(label) for label in labels]


def textured(width: int = 48, height: int = 32, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic random image that no other test image duplicates."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
