"""Compact UNets used for hippocampus segmentation.

``UNet2D`` takes a stack of neighbouring slices as input channels (2.5D) and
predicts per-pixel logits for the centre slice; ``UNet3D`` takes the whole
(padded) volume and predicts per-voxel logits.  Both predict three classes
(background, anterior, posterior hippocampus) and share one layout: ``depth``
resolution levels, two 3x3(x3) convolutions per level, channels doubled at
every level, transposed convolutions on the way up.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# per dimensionality: convolution, transposed convolution, pooling, normalisation, activation
_LAYERS = {
    # 2D: batch norm (batches of 32 slices) and ReLU
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d, lambda: nn.ReLU(inplace=True)),
    # 3D: batches of two volumes are too small for batch statistics, so instance norm and leaky ReLU
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, lambda ch: nn.InstanceNorm3d(ch, affine=True),
        lambda: nn.LeakyReLU(0.01, inplace=True)),
}


class ConvBlock(nn.Sequential):
    """Two 3x3 (or 3x3x3) convolutions, each followed by normalisation and activation."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, dims: int = 2) -> None:
        conv, _, _, norm, act = _LAYERS[dims]
        layers: list[nn.Module] = [conv(in_ch, out_ch, 3, padding=1, bias=False), norm(out_ch), act()]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout) if dims == 2 else nn.Dropout3d(dropout))
        layers += [conv(out_ch, out_ch, 3, padding=1, bias=False), norm(out_ch), act()]
        super().__init__(*layers)


class UNet(nn.Module):
    """Encoder/decoder with skip connections, in 2 or 3 spatial dimensions.

    Args:
        in_channels: number of input channels (1 + 2 * context for 2.5D input, 1 for 3D).
        n_classes: number of output classes (3 for this task).
        base: channel count of the first level; doubled at every level.
        depth: number of resolution levels (every spatial size must be
            divisible by ``2 ** (depth - 1)``, see ``size_multiple``).
        dropout: dropout rate used in the bottleneck block.
        dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 3, base: int = 32,
                 depth: int = 4, dropout: float = 0.1, dims: int = 2) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be >= 2")
        if dims not in _LAYERS:
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        conv, upconv, pool, _, _ = _LAYERS[dims]
        self.depth = depth
        self.dims = dims
        widths = [base * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        ch = in_channels
        for i, w in enumerate(widths):
            self.down.append(ConvBlock(ch, w, dropout if i == depth - 1 else 0.0, dims))
            ch = w
        self.pool = pool(2)
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upconv.append(upconv(ch, w, 2, stride=2))
            self.up.append(ConvBlock(2 * w, w, dims=dims))
            ch = w
        self.head = conv(ch, n_classes, 1)

    @property
    def size_multiple(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for upconv, block in zip(self.upconv, self.up, strict=True):
            x = upconv(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


class UNet2D(UNet):
    """The 2.5D network: slices with their neighbours as channels."""

    def __init__(self, in_channels: int = 3, n_classes: int = 3, base: int = 32, depth: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__(in_channels, n_classes, base, depth, dropout, dims=2)


class UNet3D(UNet):
    """The 3D network: one channel, the whole padded volume."""

    def __init__(self, in_channels: int = 1, n_classes: int = 3, base: int = 16, depth: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__(in_channels, n_classes, base, depth, dropout, dims=3)


def fold_batch_norm(model: UNet) -> UNet:
    """An eval-mode copy of ``model`` with each batch norm folded into the convolution before it.

    In eval mode a batch norm is a fixed per-channel affine map, so convolution + batch norm is one
    convolution with rescaled weights and a bias: the copy computes the same function (up to float
    rounding) with a third fewer layers to run.  Dropout, an identity in eval mode, is dropped.
    Instance norm (the 3D network) depends on the input and cannot be folded: such blocks are kept.
    """
    folded = copy.deepcopy(model).eval()
    for blocks in (folded.down, folded.up):
        for i, block in enumerate(blocks):
            kept: list[nn.Module] = []
            for layer in block:
                if isinstance(layer, nn.BatchNorm2d) and kept and isinstance(kept[-1], nn.Conv2d):
                    kept[-1] = fuse_conv_bn_eval(kept[-1], layer)
                elif not isinstance(layer, (nn.Dropout2d, nn.Dropout3d)):
                    kept.append(layer)
            blocks[i] = nn.Sequential(*kept)
    return folded
