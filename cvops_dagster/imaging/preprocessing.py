"""The one eval-time image transform, shared by training and the exported ONNX runtime.

Deliberately numpy + Pillow only (no torch): the ONNX predictor must produce exactly the
tensors the model saw during validation without pulling torch into the serving process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cvops_dagster.imaging.normalise import normalise_mode

_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: size, channel count and per-channel normalisation.

    Attributes:
        height: input height in pixels.
        width: input width in pixels.
        channels: 1 (grayscale, PIL mode ``L``) or 3 (``RGB``).
        mean: per-channel mean of the [0, 1] pixel values, subtracted before the model.
        std: per-channel standard deviation the centred values are divided by.
    """

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in _MODES:
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to (``L`` or ``RGB``)."""
        return _MODES[self.channels]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (model cards, ONNX metadata)."""
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            channels=int(data["channels"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )


def _to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected an HxW or HxWxC (C in 1, 3, 4) array, got shape {array.shape}")
    return Image.fromarray(array)


def to_uint8(images: Iterable[Image.Image | np.ndarray], spec: InputSpec) -> np.ndarray:
    """Convert and resize images to the spec's mode and size, without normalising.

    Returns:
        uint8 array ``[N, C, H, W]``. Training keeps this form in memory so augmentations can
        run on raw pixels before :func:`normalize`.
    """
    out = []
    for image in images:
        pil = _to_pil(image)
        if pil.mode != spec.mode:
            if pil.mode not in ("L", "RGB"):
                # The cleaning decoder's rule (alpha on its background, 16-bit scaled, ...), so
                # an in-memory image is seen exactly as a cleaned training image was.
                pil = normalise_mode(pil)
            pil = pil.convert(spec.mode)
        if pil.size != (spec.width, spec.height):
            pil = pil.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        array = np.asarray(pil, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        out.append(array.transpose(2, 0, 1))
    if not out:
        return np.zeros((0, spec.channels, spec.height, spec.width), dtype=np.uint8)
    return np.stack(out)


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Scale uint8 ``[N, C, H, W]`` pixels to [0, 1] and standardise per channel."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((pixels.astype(np.float32) / np.float32(255.0)) - mean) / std


def preprocess(images: Sequence[Image.Image | np.ndarray], spec: InputSpec) -> np.ndarray:
    """The eval transform: convert mode, resize to the spec, scale and standardise.

    Args:
        images: PIL images or uint8 arrays (``HxW`` or ``HxWxC``).
        spec: the model's :class:`InputSpec`.

    Returns:
        float32 array ``[N, C, H, W]``, ready for the model or the ONNX session.
    """
    return normalize(to_uint8(images, spec), spec)


def channel_stats(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of [0, 1] values) of uint8 ``[N, C, H, W]`` pixels.

    The std is floored so a constant channel never divides by zero.
    """
    scaled = pixels.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
