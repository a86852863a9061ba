"""Losses: supervised contrastive losses for embeddings and pixel maps, and the method's losses.

* :class:`SupConLoss` — (N, D) embeddings and (N,) labels (also ``mcsc.SupConLoss``).
* :class:`CrossBatchMemory` — a ``SupConLoss`` against a queue of past embeddings (also
  ``mcsc.CrossBatchMemory``; pytorch-metric-learning's ``CrossBatchMemory``, fused).
* :class:`PixelContrastiveLoss` — (B, D, h, w) embedding maps of any segmentation network
  (one per scale) and (B, H, W) labels, with the ``blocks`` / ``balanced`` / ``all`` samplers
  and an optional per-class pixel memory (``memory_per_class``).
* :class:`MultiScaleContrastiveLoss` — MCSC's cross loss over a CNN's and a Swin-UNet's maps.
* :class:`DiceLoss`, :func:`supervised_loss`, :func:`cross_teaching_loss`,
  :func:`sigmoid_rampup` — the segmentation and cross-teaching terms of the method.

Everything here needs torch alone.
"""

from mcsc.losses.contrastive import MultiScaleContrastiveLoss
from mcsc.losses.memory import CrossBatchMemory
from mcsc.losses.pixel import (
    ContrastiveDiagnostics,
    EmbeddingMaps,
    PixelContrastiveLoss,
    PixelSample,
    balanced_rows,
    block_rows,
    resize_labels,
)
from mcsc.losses.segmentation import (
    DiceLoss,
    cross_teaching_loss,
    sigmoid_rampup,
    supervised_loss,
)
from mcsc.losses.supcon import SupConLoss

__all__ = [
    "SupConLoss",
    "CrossBatchMemory",
    "PixelContrastiveLoss",
    "MultiScaleContrastiveLoss",
    "ContrastiveDiagnostics",
    "EmbeddingMaps",
    "PixelSample",
    "resize_labels",
    "block_rows",
    "balanced_rows",
    "DiceLoss",
    "supervised_loss",
    "cross_teaching_loss",
    "sigmoid_rampup",
]
