"""Training data: a cleaned dataset version decoded once into memory, as a LightningDataModule.

Reads ``datasets/<version>/manifest.parquet`` + ``dataset.json`` (docs/contracts.md), keeps only
``outcome == "clean"`` rows and decodes their canonical PNGs once. Image size, channel count
and the class list come from ``dataset.json``, so any ImageFolder-derived dataset works.

Evaluation batches are built with :func:`cvops_dagster.preprocessing.preprocess`, the very
function the ONNX runtime uses; training batches are the same uint8 pixels, augmented on the
batch (see :mod:`cvops_dagster.augmentation`) and then normalised with the same statistics.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from cvops_dagster.augmentation import AugmentConfig, augment
from cvops_dagster.preprocessing import InputSpec, channel_stats, preprocess, to_uint8
from cvops_dagster.storage import ArtifactStorage

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def dataset_keys(version: str) -> tuple[str, str]:
    """(manifest key, dataset.json key) of a cleaned dataset version."""
    return f"datasets/{version}/manifest.parquet", f"datasets/{version}/dataset.json"


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
        for key in rows["image_key"]:
            image = Image.open(io.BytesIO(storage.read_bytes(str(key))))
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


def _batch_loader(dataset: TensorDataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> DataLoader:
    # Whole-batch indexing of in-memory tensors: one gather per batch instead of a Python call
    # and a collate per sample, which dominates the epoch time for small images.
    sampler = (
        RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(dataset)
    )
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=drop_last), batch_size=None)


class ImageDataModule(pl.LightningDataModule):
    """Serves a :class:`LoadedDataset`: augmented train batches, preprocessed eval batches.

    Args:
        data: the decoded dataset.
        batch_size: samples per batch.
        augment_config: training augmentations.
        seed: seed of the shuffling generator.
        spec: input spec; by default measured on the train split.
    """

    def __init__(
        self,
        data: LoadedDataset,
        batch_size: int = 64,
        augment_config: AugmentConfig | None = None,
        seed: int = 0,
        spec: InputSpec | None = None,
    ) -> None:
        super().__init__()
        self.data = data
        self.batch_size = int(batch_size)
        self.augment_config = augment_config or AugmentConfig()
        self.seed = seed
        self.spec = spec or data.input_spec()
        self.labels = data.labels
        self.num_classes = len(data.labels)
        self._train: TensorDataset | None = None
        self._eval: dict[str, TensorDataset] = {}
        self._mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, -1, 1, 1)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            train = self.data.splits["train"]
            self._train = TensorDataset(
                torch.from_numpy(to_uint8(train.images, self.spec)), torch.from_numpy(train.targets)
            )
            for split in ("val", "test"):
                self._eval[split] = self.eval_tensors(split)

    def eval_tensors(self, split: str) -> TensorDataset:
        """(inputs, targets) of a split through the shared eval transform."""
        data = self.data.splits[split]
        return TensorDataset(torch.from_numpy(preprocess(data.images, self.spec)), torch.from_numpy(data.targets))

    def train_transform(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 train batch -> augmented, normalised float batch (on the batch's device)."""
        x = pixels.float().div_(255.0)
        x = augment(x, self.augment_config)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if x.dtype == torch.uint8:
            x = self.train_transform(x)
        return x, y

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self._train is not None
        drop_last = len(self._train) > self.batch_size  # a batch of one breaks BatchNorm
        return _batch_loader(self._train, self.batch_size, True, self.seed, drop_last)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return _batch_loader(self._eval["val"], max(self.batch_size, 256), False, self.seed, False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return _batch_loader(self._eval["test"], max(self.batch_size, 256), False, self.seed, False)
