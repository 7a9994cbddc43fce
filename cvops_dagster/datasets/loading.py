"""Loading a cleaned dataset version: its clean images decoded once into memory, per split.

Reads ``datasets/<version>/manifest.parquet`` + ``dataset.json`` (docs/contracts.md). Training,
tuning, promotion and the runtime build all read a version through :func:`load_dataset`, so
they see the same images in the same order. numpy + Pillow only: no torch here.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from cvops_dagster.core.contracts import SPLITS, dataset_keys
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.imaging.preprocessing import InputSpec, channel_stats, to_uint8

logger = logging.getLogger(__name__)


@dataclass
class SplitData:
    """One split decoded in memory: the canonical images and their label indices."""

    images: list[Image.Image]
    targets: np.ndarray
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class LoadedDataset:
    """A cleaned dataset version held in memory (decoded once, shared by HPO trials)."""

    version: str
    labels: list[str]
    channels: int
    image_size: tuple[int, int]
    splits: dict[str, SplitData]
    info: dict[str, Any] = field(default_factory=dict)

    def input_spec(self) -> InputSpec:
        """Input spec with normalisation statistics measured on the train split."""
        height, width = self.image_size
        base = InputSpec(height, width, self.channels, (0.0,) * self.channels, (1.0,) * self.channels)
        mean, std = channel_stats(to_uint8(self.splits["train"].images, base))
        return InputSpec(height, width, self.channels, mean, std)


def load_dataset(storage: ArtifactStorage, version: str) -> LoadedDataset:
    """Read a cleaned dataset version and decode its clean images.

    Raises:
        FileNotFoundError: the version does not exist in ``storage``.
        ValueError: the manifest is unusable (no train/val rows, unknown labels).
    """
    manifest_key, info_key = dataset_keys(version)
    if not storage.exists(manifest_key) or not storage.exists(info_key):
        raise FileNotFoundError(f"cleaned dataset {version!r} not found at {storage.uri(f'datasets/{version}')}")
    info = storage.read_json(info_key)
    frame = storage.read_parquet(manifest_key)
    frame = frame[frame["outcome"] == "clean"]
    labels = [str(label) for label in info["labels"]]
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(frame["label"].astype(str)) - set(index))
    if unknown:
        raise ValueError(f"dataset {version!r}: manifest labels {unknown} are missing from dataset.json")
    if len(labels) < 2:
        raise ValueError(f"dataset {version!r} has {len(labels)} class(es); a classifier needs at least 2")
    channels = int(info.get("channels") or (3 if info.get("mode") == "RGB" else 1))
    height, width = (int(v) for v in info["image_size"])
    mode = "RGB" if channels == 3 else "L"
    splits: dict[str, SplitData] = {}
    for split in SPLITS:
        rows = frame[frame["split"] == split].sort_values("sample_id")
        images = []
        for data in storage.read_many([str(key) for key in rows["image_key"]]):
            image = Image.open(io.BytesIO(data))
            image.load()
            images.append(image if image.mode == mode else image.convert(mode))
        targets = np.array([index[str(label)] for label in rows["label"]], dtype=np.int64)
        splits[split] = SplitData(images, targets, [str(s) for s in rows["sample_id"]])
    for split in ("train", "val"):
        if len(splits[split]) == 0:
            raise ValueError(f"dataset {version!r} has no clean {split} rows")
    logger.info(
        "loaded dataset %s: %s images, %d classes, %dx%d x%d",
        version,
        {s: len(d) for s, d in splits.items()},
        len(labels),
        height,
        width,
        channels,
    )
    return LoadedDataset(version, labels, channels, (height, width), splits, info)
