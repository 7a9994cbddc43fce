"""Classifier family, preprocessing, augmentations and the training datamodule."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from cvops_dagster.training.augmentation import AugmentConfig, augment, color_jitter, random_affine, random_crop
from cvops_dagster.training.models import build_classifier, full_arch
from cvops_dagster.imaging.preprocessing import InputSpec, channel_stats, preprocess, to_uint8
from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.datasets.loading import load_dataset
from cvops_dagster.training.datamodule import ImageDataModule
from cvops_dagster.training.system import arch_from_params, resolve_params
from tests.unit.synthetic_datasets import shapes_dataset


@pytest.mark.parametrize(
    ("arch", "in_channels", "size", "num_classes"),
    [
        ({"widths": [8, 16], "norm": "batch", "residual": True}, 1, (32, 32), 10),
        ({"widths": [8, 16, 32], "norm": "group", "residual": False, "blocks_per_stage": 2}, 3, (20, 28), 2),
        ({"widths": [4], "norm": "none", "dropout": 0.5}, 3, (9, 9), 20),
        ({"widths": [8, 16], "stem_stride": 2}, 1, (64, 48), 3),
    ],
)
def test_classifier_shapes_and_embedding(arch: dict, in_channels: int, size: tuple[int, int], num_classes: int) -> None:
    model = build_classifier(arch, num_classes, in_channels).eval()
    x = torch.randn(5, in_channels, *size)
    logits, embedding = model.forward_with_embedding(x)
    assert logits.shape == (5, num_classes)
    assert embedding.shape == (5, full_arch(arch)["widths"][-1])
    assert torch.allclose(model(x), logits)


@pytest.mark.parametrize("bad", [{"widths": []}, {"norm": "layer"}, {"blocks_per_stage": 0}, {"stem_stride": 3}])
def test_classifier_rejects_bad_arch(bad: dict) -> None:
    with pytest.raises(ValueError):
        build_classifier(bad, 3, 1)


@pytest.mark.parametrize(("size", "expected_stride"), [((32, 32), 2), ((64, 40), 2), ((16, 16), 1), ((28, 28), 1)])
def test_auto_stem_stride_follows_input_size(size: tuple[int, int], expected_stride: int) -> None:
    assert arch_from_params(resolve_params(None), size)["stem_stride"] == expected_stride


def test_resolve_params_rejects_unknown_keys() -> None:
    assert resolve_params({"lr": 0.01})["lr"] == 0.01
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        resolve_params({"learning_rate": 0.01})


def test_preprocessing_does_not_import_torch() -> None:
    # The ONNX runtime serves without PyTorch and shares this module with training.
    import subprocess
    import sys

    code = "import sys, cvops_dagster.imaging.preprocessing; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("channels", [1, 3])
def test_input_spec_round_trip_and_preprocess(channels: int) -> None:
    spec = InputSpec(12, 10, channels, (0.5,) * channels, (0.25,) * channels)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    rgb = Image.fromarray(np.full((30, 20, 3), 255, dtype=np.uint8))
    array = np.zeros((12, 10), dtype=np.uint8)
    out = preprocess([rgb, array], spec)
    assert out.dtype == np.float32 and out.shape == (2, channels, 12, 10)
    assert np.allclose(out[0], (1.0 - 0.5) / 0.25)  # white
    assert np.allclose(out[1], (0.0 - 0.5) / 0.25)  # black


def test_preprocess_same_for_pil_and_array() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    spec = InputSpec(16, 16, 3, (0.4, 0.5, 0.6), (0.2, 0.2, 0.3))
    assert np.array_equal(preprocess([Image.fromarray(pixels)], spec), preprocess([pixels], spec))


@pytest.mark.parametrize("bad", [dict(channels=2), dict(mean=(0.5, 0.5)), dict(std=(0.0,)), dict(height=0)])
def test_input_spec_validation(bad: dict) -> None:
    kwargs = dict(height=8, width=8, channels=1, mean=(0.5,), std=(0.5,)) | bad
    with pytest.raises(ValueError):
        InputSpec(**kwargs)


def test_channel_stats() -> None:
    pixels = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    pixels[1] = 255
    mean, std = channel_stats(pixels)
    assert mean == pytest.approx((0.5,)) and std == pytest.approx((0.5,))


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentations_keep_shape_range_and_change_pixels(channels: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, channels, 20, 24, generator=g)
    for out in (
        random_crop(x, 3, g),
        random_affine(x, 15.0, 0.1, 0.1, g),
        color_jitter(x, 0.2, 0.3, g),
        augment(x, AugmentConfig(hflip=True), g),
    ):
        assert out.shape == x.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert not torch.allclose(out, x)
    assert torch.equal(augment(x, AugmentConfig(0, 0.0, 0.0, 0.0, 0.0, 0.0, False)), x)


def test_random_crop_is_a_shift() -> None:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    out = random_crop(x, 2, torch.Generator().manual_seed(3))
    assert float(out.sum()) == 1.0  # the single bright pixel moved, nothing was resampled


@pytest.mark.parametrize(("mode", "size"), [("L", (24, 24)), ("RGB", (20, 28))])
def test_datamodule_reads_dataset_and_shares_eval_transform(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    storage = ArtifactStorage(str(tmp_path))
    cleaned = shapes_dataset(storage, n_classes=3, per_class=12, size=size, mode=mode)
    info = cleaned.dataset_info
    data = load_dataset(storage, cleaned.version)
    assert data.labels == info["labels"] and data.channels == (3 if mode == "RGB" else 1)
    assert data.image_size == (size[1], size[0])
    assert sum(len(s) for s in data.splits.values()) == 36
    dm = ImageDataModule(data, batch_size=8, augment_config=AugmentConfig(0, 0.0, 0.0, 0.0, 0.0, 0.0, False))
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    expected = preprocess(data.splits["val"].images, dm.spec)
    assert np.allclose(x.numpy(), expected[: len(x)])
    train_x, _ = next(iter(dm.train_dataloader()))
    assert train_x.dtype == torch.uint8
    # With augmentations off the train transform equals the shared eval transform.
    pixels = torch.from_numpy(to_uint8(data.splits["train"].images[:4], dm.spec))
    assert np.allclose(dm.train_transform(pixels).numpy(), preprocess(data.splits["train"].images[:4], dm.spec), atol=1e-5)


def test_load_dataset_missing_version(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dataset(ArtifactStorage(str(tmp_path)), "nope")
