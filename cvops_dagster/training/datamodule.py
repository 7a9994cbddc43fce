"""The LightningDataModule over a loaded dataset: augmented train batches, preprocessed eval batches.

Evaluation batches are built with :func:`cvops_dagster.imaging.preprocessing.preprocess`, the very
function the ONNX runtime uses; training batches are the same uint8 pixels, augmented on the
batch (see :mod:`cvops_dagster.training.augmentation`) and then normalised with the same statistics.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from cvops_dagster.datasets.loading import LoadedDataset
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess, to_uint8
from cvops_dagster.training.augmentation import AugmentConfig, augment


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
