"""Losses of the method: segmentation, cross teaching and the multi-scale cross contrastive loss."""

from mcsc.losses.contrastive import MultiScaleContrastiveLoss, balanced_rows, block_rows
from mcsc.losses.segmentation import DiceLoss, cross_teaching_loss, sigmoid_rampup, supervised_loss

__all__ = [
    "MultiScaleContrastiveLoss",
    "block_rows",
    "balanced_rows",
    "DiceLoss",
    "supervised_loss",
    "cross_teaching_loss",
    "sigmoid_rampup",
]
