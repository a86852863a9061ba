"""The two segmentation backbones of the method and their heads.

Both backbones return a :class:`SegmentationOutput` ``(logits, features)``, ``features`` being
the decoder feature maps finest first (``features[0]`` at the full input resolution).
"""

from mcsc.models.heads import (
    ClassifierHead,
    ContrastiveHeads,
    ProjectionHead,
    build_projection_heads,
)
from mcsc.models.output import SegmentationOutput, feature_index
from mcsc.models.swin_unet import SwinUNet, load_swin_encoder_checkpoint
from mcsc.models.unet import UNet

__all__ = [
    "SegmentationOutput",
    "UNet",
    "SwinUNet",
    "load_swin_encoder_checkpoint",
    "ClassifierHead",
    "ProjectionHead",
    "ContrastiveHeads",
    "build_projection_heads",
    "feature_index",
]
