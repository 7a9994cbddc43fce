"""Shared helpers for the export, runtime and quantization tests: generated images and a
small classifier trained on them (cached per test process so the three files train once)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.imaging.preprocessing import InputSpec, preprocess
from cvops_dagster.serving.export import export_onnx
from cvops_dagster.serving.pointer import ServingPointer, publish
from cvops_dagster.training.models import build_classifier

LABELS = ["blob", "horizontal", "vertical"]
SPEC = InputSpec(height=16, width=16, channels=1, mean=(0.45,), std=(0.3,))
TINY_ARCH = {"widths": [8, 16], "blocks_per_stage": 1, "dropout": 0.0, "norm": "batch", "residual": True}


def make_images(n: int, seed: int, size: int = 16) -> tuple[list[np.ndarray], np.ndarray]:
    """Grayscale uint8 images of three easy classes (stripes either way, a bright blob), noisy."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        target = i % 3
        period = rng.integers(2, 5)
        phase = rng.integers(0, period)
        if target == 0:
            cy, cx = rng.uniform(4, size - 4, 2)
            img = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1.5, 3.0) ** 2))
        elif target == 1:
            img = 220.0 * (((yy + phase) // period) % 2)
        else:
            img = 220.0 * (((xx + phase) // period) % 2)
        img = img + rng.normal(0, 20, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        targets.append(target)
    return images, np.asarray(targets, dtype=np.int64)


@dataclass
class TrainedCase:
    model: nn.Module
    train_images: list[np.ndarray]
    train_targets: np.ndarray
    test_images: list[np.ndarray]
    test_targets: np.ndarray

    @property
    def test_inputs(self) -> np.ndarray:
        return preprocess(self.test_images, SPEC)

    def metadata(self) -> dict:
        return {"labels": LABELS, "input_spec": SPEC.to_dict(), "dataset_version": "ds-test", "model_hash": "f" * 64}


@functools.lru_cache(maxsize=1)
def trained_case() -> TrainedCase:
    """A real classifier from ``build_classifier``, trained a few steps (seconds) to high accuracy."""
    torch.manual_seed(0)
    train_images, train_targets = make_images(240, seed=1)
    test_images, test_targets = make_images(150, seed=2)
    model = build_classifier(TINY_ARCH, num_classes=len(LABELS), in_channels=1)
    x = torch.from_numpy(preprocess(train_images, SPEC))
    y = torch.from_numpy(train_targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is as fast and immune to a busy box
    try:
        _fit(model, optimizer, x, y)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return TrainedCase(model, train_images, train_targets, test_images, test_targets)


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    for step in range(60):
        idx = torch.randint(0, len(x), (48,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()


def torch_outputs(model: nn.Module, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        logits, emb = model.forward_with_embedding(torch.from_numpy(inputs))
    return logits.numpy(), emb.numpy()


def export_trained(root: str, model_id: str = "m-test") -> tuple[ArtifactStorage, str]:
    """Export the cached trained model into a fresh storage; returns (storage, key)."""
    case = trained_case()
    storage = ArtifactStorage(root)
    result = export_onnx(case.model, case.metadata(), storage, model_id)
    return storage, result.key


def publish_trained(root: str, model_id: str = "m-test") -> tuple[ArtifactStorage, str, str]:
    """Export the cached trained model into a fresh storage and publish it as the served runtime;
    returns (storage, key, sha256)."""
    case = trained_case()
    storage = ArtifactStorage(root)
    result = export_onnx(case.model, case.metadata(), storage, model_id)
    publish(storage, ServingPointer(model_id, "ds-test", result.key, result.sha256))
    return storage, result.key, result.sha256


@functools.lru_cache(maxsize=1)
def exported_bytes() -> bytes:
    """The trained model's FP32 runtime bytes (exported once per process)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        storage, key = export_trained(tmp)
        return Path(storage.local_path(key)).read_bytes()


def flip_weight_byte(data: bytes) -> bytes:
    """``data`` (a serialized ONNX model) with one byte of its largest weight tensor flipped:
    still a loadable model, but no longer the one its integrity seal was made for."""
    import onnx

    model = onnx.load_from_string(data)
    largest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    offset = data.find(largest.raw_data) + len(largest.raw_data) // 2
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]
