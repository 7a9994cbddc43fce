"""Batch-level training augmentations written with plain torch ops.

They run on a whole batch at once (on whatever device the batch lives on), which is far
cheaper than per-sample PIL transforms for small images. Inputs are pixel values in [0, 1];
normalisation happens afterwards so padding and jitter act on real pixel values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; zero disables it.

    Attributes:
        crop_padding: random crop after padding by this many pixels (edge-replicated).
        rotation_deg: maximum absolute rotation in degrees.
        translate: maximum translation as a fraction of the image size.
        scale: maximum relative zoom in or out.
        brightness: maximum additive brightness shift (pixel values are in [0, 1]).
        contrast: maximum relative contrast change.
        hflip: random horizontal flips; off by default because they change the meaning of
            many labels (digits, text, oriented objects).
    """

    crop_padding: int = 2
    rotation_deg: float = 10.0
    translate: float = 0.0
    scale: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.2
    hflip: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AugmentConfig:
        return cls(**(data or {}))


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``padding`` (replicating edges) and crop back to size at a random offset per sample."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), mode="replicate")
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, :, None]  # [N, H, 1]
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, :]  # [N, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing gives [N, H, W, C]; move channels back.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_affine(
    x: torch.Tensor,
    rotation_deg: float,
    translate: float,
    scale: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Small random rotation, translation and zoom through ``affine_grid``/``grid_sample``."""
    if rotation_deg <= 0 and translate <= 0 and scale <= 0:
        return x
    n = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(rotation_deg))
    zoom = 1.0 + uniform(scale)
    tx, ty = uniform(2 * translate), uniform(2 * translate)  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random per-sample brightness shift and contrast scaling, clamped to [0, 1]."""
    if brightness <= 0 and contrast <= 0:
        return x
    n = x.shape[0]
    shape = (n, 1, 1, 1)
    if contrast > 0:
        factor = 1.0 + (torch.rand(shape, device=x.device, generator=generator) * 2 - 1) * contrast
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor + mean
    if brightness > 0:
        x = x + (torch.rand(shape, device=x.device, generator=generator) * 2 - 1) * brightness
    return x.clamp(0.0, 1.0)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the configured augmentations to a batch of [0, 1] pixels ``[N, C, H, W]``."""
    x = random_crop(x, config.crop_padding, generator)
    x = random_affine(x, config.rotation_deg, config.translate, config.scale, generator)
    x = color_jitter(x, config.brightness, config.contrast, generator)
    if config.hflip:
        x = random_hflip(x, generator)
    return x
