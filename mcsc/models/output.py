"""The output type shared by both backbones."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class SegmentationOutput(NamedTuple):
    """What :class:`~mcsc.models.UNet` and :class:`~mcsc.models.SwinUNet` return.

    Attributes:
        logits: (B, num_classes, H, W) float segmentation logits at the input resolution.
        features: tuple of decoder feature maps (B, C_k, H / r_k, W / r_k), **finest first**:
            ``features[0]`` is the last decoder stage at the full input resolution (the input of
            the classifier), later entries are coarser. The channels and strides ``r_k`` are the
            model's ``feature_channels`` and ``feature_strides`` attributes.
    """

    logits: torch.Tensor
    features: tuple[torch.Tensor, ...]


def feature_index(model: nn.Module, stride: int) -> int:
    """Index into ``SegmentationOutput.features`` of the map at ``stride`` (1 = full resolution).

    With the default configurations, stride 8 (28x28 for 224x224 inputs, the paper's coarse
    contrastive level) is ``features[3]`` of the U-Net and ``features[2]`` of the Swin-UNet.
    When several maps share the stride, the finest-listed one (lowest index) is returned.
    """
    strides = tuple(getattr(model, "feature_strides", ()))
    if stride not in strides:
        raise ValueError(f"stride {stride} is not among the model's feature_strides {strides}")
    return strides.index(stride)
