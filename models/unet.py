"""A compact 2D UNet used for hippocampus segmentation.

The network takes a stack of neighbouring slices as input channels (2.5D)
and predicts per-pixel logits for three classes (background, anterior,
posterior hippocampus) for the centre slice.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class UNet2D(nn.Module):
    """Encoder/decoder with skip connections.

    Args:
        in_channels: number of input channels (1 + 2 * context for 2.5D input).
        n_classes: number of output classes (3 for this task).
        base: channel count of the first level; doubled at every level.
        depth: number of resolution levels (input size must be divisible by
            ``2 ** (depth - 1)``).
        dropout: dropout rate used in the bottleneck block.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 3, base: int = 32,
                 depth: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be >= 2")
        self.depth = depth
        widths = [base * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        ch = in_channels
        for i, w in enumerate(widths):
            self.down.append(ConvBlock(ch, w, dropout if i == depth - 1 else 0.0))
            ch = w
        self.pool = nn.MaxPool2d(2)
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upconv.append(nn.ConvTranspose2d(ch, w, 2, stride=2))
            self.up.append(ConvBlock(2 * w, w))
            ch = w
        self.head = nn.Conv2d(ch, n_classes, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for upconv, block in zip(self.upconv, self.up):
            x = upconv(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
