"""A configurable image-classification CNN family (plain or residual blocks).

The architecture is a JSON-able dict so a model card can rebuild the exact network:

``{"widths": [16, 32, 64], "blocks_per_stage": 1, "dropout": 0.1, "norm": "batch",
"residual": true}``

Every stage after the first halves the resolution, a global average pool gives the
embedding (width of the last stage) and a linear head gives the logits. Global pooling makes
the same network work for any input size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_ARCH: dict[str, Any] = {
    "widths": [24, 48, 96],
    "blocks_per_stage": 1,
    "dropout": 0.1,
    "norm": "batch",
    "residual": True,
    "stem_stride": 1,
}

_NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # Up to 8 groups, always dividing the channel count.
        groups = max(g for g in range(1, 9) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with normalisation; a residual shortcut when enabled."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str, residual: bool) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, out_ch)
        self.act = nn.ReLU(inplace=True)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_ch != out_ch):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias), _norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.act(out)


class ImageClassifier(nn.Module):
    """CNN backbone + linear head that can also hand back its penultimate embedding."""

    def __init__(self, arch: dict[str, Any], num_classes: int, in_channels: int) -> None:
        super().__init__()
        widths = [int(w) for w in arch.get("widths", DEFAULT_ARCH["widths"])]
        blocks = int(arch.get("blocks_per_stage", DEFAULT_ARCH["blocks_per_stage"]))
        norm = str(arch.get("norm", DEFAULT_ARCH["norm"]))
        residual = bool(arch.get("residual", DEFAULT_ARCH["residual"]))
        dropout = float(arch.get("dropout", DEFAULT_ARCH["dropout"]))
        stem_stride = int(arch.get("stem_stride", DEFAULT_ARCH["stem_stride"]))
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be positive, got {widths}")
        if stem_stride not in (1, 2):
            raise ValueError("stem_stride must be 1 or 2")
        if blocks < 1:
            raise ValueError("blocks_per_stage must be >= 1")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=norm == "none"),
            _norm(norm, widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(ConvBlock(in_ch, width, stride, norm, residual))
                in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_ch, num_classes)
        self.embedding_dim = in_ch
        self.num_classes = num_classes
        self.in_channels = in_channels

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, embedding)``; the embedding feeds drift and similarity search."""
        embedding = self.pool(self.features(self.stem(x))).flatten(1)
        return self.head(self.dropout(embedding)), embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x)[0]


def build_classifier(arch: dict[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    """Build an :class:`ImageClassifier` from a JSON-able architecture dict.

    Args:
        arch: keys ``widths`` (list of stage widths), ``blocks_per_stage``, ``dropout``,
            ``norm`` (``batch``/``group``/``none``), ``residual``, ``stem_stride`` (2 halves
            the resolution right away: cheaper for larger inputs); missing keys take
            :data:`DEFAULT_ARCH` values.
        num_classes: size of the output layer.
        in_channels: 1 for grayscale, 3 for RGB.
    """
    return ImageClassifier(arch, num_classes, in_channels)


def full_arch(arch: dict[str, Any] | None) -> dict[str, Any]:
    """``arch`` with every default filled in, as recorded in a model card."""
    merged = dict(DEFAULT_ARCH)
    merged.update(arch or {})
    merged["widths"] = [int(w) for w in merged["widths"]]
    return merged
