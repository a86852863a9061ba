"""The U-Net of the method (the SSL4MIS 2D U-Net whose decoder returns its features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcsc.models.heads import ClassifierHead
from mcsc.models.output import SegmentationOutput


class ConvBlock(nn.Module):
    """Two (3x3 conv -> BatchNorm -> LeakyReLU) with dropout in between, as in SSL4MIS."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """1x1 conv to the skip's channels, bilinear x2 upsampling, concatenation, ConvBlock."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, skip_channels, kernel_size=1)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """2D U-Net (SSL4MIS layout) returning logits and the decoder features of every scale.

    Encoder: ``len(channels)`` ConvBlocks separated by 2x2 max-pooling, with the given dropout
    per level. Decoder: one :class:`UpBlock` per pooling, then a 3x3 :class:`ClassifierHead`.

    Args:
        in_channels: image channels.
        num_classes: output classes (background included).
        channels: encoder channels per level, finest first (the method: 16, 32, 64, 128, 256).
        dropout: encoder dropout per level, same length as ``channels``.

    Forward: ``x`` (B, in_channels, H, W) float with H and W divisible by
    ``2 ** (len(channels) - 1)`` -> :class:`SegmentationOutput` with ``logits``
    (B, num_classes, H, W) and ``features`` = one map per decoder stage, finest first:
    ``features[k]`` is (B, channels[k], H / 2**k, W / 2**k) for k = 0 .. len(channels) - 2.
    With the defaults and 224x224 inputs: (16, 224), (32, 112), (64, 56), (128, 28)
    (channels, side).

    Attributes:
        feature_channels: ``channels[:-1]``; feature_strides: ``(1, 2, 4, ...)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    ):
        super().__init__()
        channels, dropout = tuple(int(c) for c in channels), tuple(float(p) for p in dropout)
        if len(channels) < 2 or any(c < 1 for c in channels):
            raise ValueError(f"channels must hold at least two positive values, got {channels}")
        if len(dropout) != len(channels):
            raise ValueError(
                f"dropout must have one value per level ({len(channels)}), got {dropout}"
            )
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}"
            )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.feature_channels = channels[:-1]
        self.feature_strides = tuple(2**k for k in range(len(channels) - 1))
        self.encoder = nn.ModuleList(
            ConvBlock(in_channels if k == 0 else channels[k - 1], channels[k], dropout[k])
            for k in range(len(channels))
        )
        # decoder[0] takes the bottleneck; decoder[-1] produces the full-resolution features.
        self.decoder = nn.ModuleList(
            UpBlock(channels[k + 1], channels[k], channels[k])
            for k in reversed(range(len(channels) - 1))
        )
        self.classifier = ClassifierHead(channels[0], num_classes)

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        factor = 2 ** (len(self.encoder) - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x's height and width must be divisible by {factor}, got {tuple(x.shape[2:])}"
            )
        skips = []
        for k, block in enumerate(self.encoder):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        features = []
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            x = up(x, skip)
            features.append(x)
        return SegmentationOutput(self.classifier(x), tuple(reversed(features)))
