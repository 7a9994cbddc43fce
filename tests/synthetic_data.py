"""Small cleaned datasets written straight to the cleaned-dataset contract.

Benchmarks and tests need a dataset version without running ingestion and cleaning; these
helpers write canonical PNGs, ``manifest.parquet`` and ``dataset.json`` exactly as
docs/contracts.md describes, from in-memory images (scikit-learn's bundled digits needs no
download).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from cvops_dagster.ingestion.sample_data import digit_images
from cvops_dagster.datasets.splits import assign_split
from cvops_dagster.core.storage import ArtifactStorage


def digits_images(size: int = 32) -> tuple[list[Image.Image], list[str]]:
    """The product's bundled sample digits (see :mod:`cvops_dagster.ingestion.sample_data`) as PIL images."""
    arrays, targets = digit_images(size)
    return [Image.fromarray(a, mode="L") for a in arrays], [str(int(t)) for t in targets]


def write_cleaned_dataset(
    storage: ArtifactStorage,
    version: str,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    batch_id: str = "synthetic",
) -> dict:
    """Write ``images`` as a clean dataset version; returns the dataset.json written.

    Exact duplicate images are recorded as ``duplicate`` rows, as cleaning would.
    """
    if len(images) != len(labels):
        raise ValueError("images and labels differ in length")
    mode = images[0].mode
    if mode not in ("L", "RGB") or any(image.mode != mode for image in images):
        raise ValueError("all images must share mode L or RGB")
    rows = []
    seen: set[str] = set()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        sample_id = hashlib.sha256(data).hexdigest()
        duplicate = sample_id in seen
        seen.add(sample_id)
        key = f"canonical/{sample_id}.png"
        if not duplicate:
            storage.write_bytes(key, data)
        width, height = image.size
        features = np.asarray(image, dtype=np.float32)
        rows.append(
            {
                "record_id": f"{batch_id}/{label}/{i:05d}.png",
                "batch_id": batch_id,
                "path": f"{label}/{i:05d}.png",
                "sample_id": sample_id,
                "label": str(label),
                "outcome": "duplicate" if duplicate else "clean",
                "reason": "exact" if duplicate else None,
                "alias_of": sample_id if duplicate else None,
                "split": None if duplicate else assign_split(sample_id, str(label)),
                "image_key": None if duplicate else key,
                "format": "PNG",
                "mode": mode,
                "orig_width": width,
                "orig_height": height,
                "width": width,
                "height": height,
                "channels": 3 if mode == "RGB" else 1,
                "aspect_ratio": width / height,
                "brightness": float(features.mean()),
                "contrast": float(features.std()),
                "sharpness": 0.0,
                "file_size": len(data),
            }
        )
    frame = pd.DataFrame(rows)
    clean = frame[frame["outcome"] == "clean"]
    width, height = images[0].size
    info = {
        "version": version,
        "mode": mode,
        "channels": 3 if mode == "RGB" else 1,
        "labels": sorted({str(label) for label in labels}),
        "image_size": [height, width],
        "counts": {k: int(v) for k, v in Counter(frame["outcome"]).items()},
        "splits": {k: int(v) for k, v in Counter(clean["split"]).items()},
        "classes": {k: int(v) for k, v in Counter(clean["label"]).items()},
        "quarantine_reasons": {},
    }
    storage.write_parquet(f"datasets/{version}/manifest.parquet", frame)
    storage.write_json(f"datasets/{version}/dataset.json", info)
    return info


def write_digits_dataset(storage: ArtifactStorage, version: str = "digits", size: int = 32) -> dict:
    """The bundled digits (1,797 images, ``size``x``size`` grayscale) as a cleaned dataset."""
    images, labels = digits_images(size)
    return write_cleaned_dataset(storage, version, images, labels)
