"""Small heads shared by both backbones: the classifier and the contrastive projection heads."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierHead(nn.Module):
    """Per-pixel classifier on the last decoder features: one ``kernel_size`` convolution.

    The public MCSC code uses a 3x3 convolution (padding 1, Xavier-normal weights) on top of both
    networks' last decoder features; that is the default here.

    Args:
        in_channels: channels of the input features.
        num_classes: number of output classes.
        kernel_size: odd convolution size; the output keeps the input's spatial size.

    Shapes: (B, in_channels, H, W) float -> (B, num_classes, H, W) logits.
    """

    def __init__(self, in_channels: int, num_classes: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the output keeps its size, got {kernel_size}")
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size, padding=kernel_size // 2)
        nn.init.xavier_normal_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map: (B, C, h, w) -> (B, C, h, w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ProjectionHead(nn.Module):
    """Network-specific projection for one scale: [LayerNorm ->] 1x1 conv -> ``hidden`` -> ReLU ->
    ``shared``.

    The final 1x1 convolution (``hidden -> out``) is shared by the CNN and the Swin head of the
    same scale, as in the method, so both networks embed into one space. It is passed in as a
    module and registered here as an ordinary submodule: the two heads of one scale hold the
    *same* ``nn.Conv2d`` object. ``parameters()`` lists it once; ``state_dict()`` holds it under
    both names (loading writes the same tensor twice, which is harmless).

    Args:
        in_channels: channels of the backbone features at this scale.
        shared: the shared ``nn.Conv2d(hidden, out, 1)``.
        layer_norm: start with a LayerNorm over the channels (the public code's coarse Swin head).

    Shapes: (B, in_channels, h, w) float -> (B, out, h, w), *not* normalised (see
    :class:`ContrastiveHeads` for the L2-normalised embeddings).
    """

    def __init__(self, in_channels: int, shared: nn.Conv2d, layer_norm: bool = False):
        super().__init__()
        if not isinstance(shared, nn.Conv2d) or shared.kernel_size != (1, 1):
            raise ValueError("shared must be an nn.Conv2d with kernel_size 1")
        self.norm = ChannelLayerNorm(in_channels) if layer_norm else nn.Identity()
        self.conv = nn.Conv2d(in_channels, shared.in_channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.relu(self.conv(self.norm(x))))


class ContrastiveHeads(nn.Module):
    """All projection heads of the contrastive loss: one CNN and one Swin head per scale.

    Scale ``s`` pairs ``cnn_channels[s]`` with ``swin_channels[s]``; the two heads of a scale
    share their last convolution. Build it with :func:`build_projection_heads`.

    Args:
        cnn_channels, swin_channels: feature channels per scale, finest scale first.
        hidden, out: widths of the hidden layer and of the embeddings.
        swin_layer_norm: per scale, whether the Swin head starts with a LayerNorm over the
            channels; ``None``: every scale but the first, as the public code does before its
            coarse Swin head (its full-resolution head has none).

    Attributes:
        cnn_heads, swin_heads: ``nn.ModuleList`` of :class:`ProjectionHead`, one per scale.
        shared: ``nn.ModuleList`` of the shared final convolutions, one per scale.
    """

    def __init__(self, cnn_channels: Sequence[int], swin_channels: Sequence[int], hidden: int = 256,
                 out: int = 128, swin_layer_norm: Sequence[bool] | None = None):
        super().__init__()
        if len(cnn_channels) != len(swin_channels) or len(cnn_channels) == 0:
            raise ValueError(
                f"cnn_channels and swin_channels must be non-empty and of equal length (one entry "
                f"per scale), got {list(cnn_channels)} and {list(swin_channels)}")
        if hidden < 1 or out < 1:
            raise ValueError(f"hidden and out must be positive, got hidden={hidden}, out={out}")
        if swin_layer_norm is None:
            swin_layer_norm = [scale > 0 for scale in range(len(swin_channels))]
        if len(swin_layer_norm) != len(swin_channels):
            raise ValueError(f"swin_layer_norm needs one entry per scale ({len(swin_channels)}), "
                             f"got {list(swin_layer_norm)}")
        self.shared = nn.ModuleList(nn.Conv2d(hidden, out, kernel_size=1) for _ in cnn_channels)
        self.cnn_heads = nn.ModuleList(ProjectionHead(c, s) for c, s in zip(cnn_channels, self.shared))
        self.swin_heads = nn.ModuleList(ProjectionHead(c, s, layer_norm=bool(norm))
                                        for c, s, norm in zip(swin_channels, self.shared, swin_layer_norm))

    def forward(self, cnn_features: Sequence[torch.Tensor], swin_features: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Project and L2-normalise the features of every scale.

        Args:
            cnn_features: one (B, cnn_channels[s], h_s, w_s) float tensor per scale.
            swin_features: one (B, swin_channels[s], h_s, w_s) float tensor per scale.

        Returns:
            ``(cnn_embeddings, swin_embeddings)``: lists of (B, out, h_s, w_s) tensors with unit
            L2 norm along the channel dimension.
        """
        if len(cnn_features) != len(self.cnn_heads) or len(swin_features) != len(self.swin_heads):
            raise ValueError(
                f"expected {len(self.cnn_heads)} feature maps per network (one per scale), got "
                f"{len(cnn_features)} cnn_features and {len(swin_features)} swin_features")
        cnn = [F.normalize(head(x), dim=1) for head, x in zip(self.cnn_heads, cnn_features)]
        swin = [F.normalize(head(x), dim=1) for head, x in zip(self.swin_heads, swin_features)]
        return cnn, swin


def build_projection_heads(cnn_channels: Sequence[int], swin_channels: Sequence[int], hidden: int = 256,
                           out: int = 128, swin_layer_norm: Sequence[bool] | None = None) -> ContrastiveHeads:
    """The projection heads of the method for the given scales (see :class:`ContrastiveHeads`).

    For the paper: ``build_projection_heads([16, 128], [96, 192])`` — the full-resolution decoder
    features (U-Net ``features[0]``, Swin-UNet ``features[0]``) and the 1/8-resolution ones (U-Net
    ``features[3]``, Swin-UNet ``features[2]``, after a ``LayerNorm(192)``). See
    :func:`mcsc.models.feature_index`.
    """
    return ContrastiveHeads(cnn_channels, swin_channels, hidden=hidden, out=out,
                            swin_layer_norm=swin_layer_norm)
