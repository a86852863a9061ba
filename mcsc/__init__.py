"""mcsc: Multi-Scale Cross Supervised Contrastive learning for semi-supervised segmentation.

The core is a fused C++/CUDA operator for the supervised contrastive loss with
class-prevalence weights; it never builds the N x N similarity matrix. Use it as

* :func:`supcon_loss` — the functional op: (N, D) features, (N,) labels, optional segments;
* :class:`SupConLoss` — the same as an ``nn.Module`` for (N, D) embeddings (the signature of
  pytorch-metric-learning's ``SupConLoss``, optional L2 normalisation, ``ref_emb`` /
  ``ref_labels`` reference rows);
* :class:`CrossBatchMemory` — that loss against a queue of the last ``memory_size`` embeddings
  (pytorch-metric-learning's ``CrossBatchMemory``), never the batch x memory matrix;
* :class:`PixelContrastiveLoss` — for any segmentation network: (B, D, h, w) embedding maps
  (one per scale) and (B, H, W) labels, with pixel samplers and an optional per-class pixel
  memory (``memory_per_class``);
* :func:`backend` — which implementation runs on a device (compiled or the reference).

``import mcsc`` and these losses need torch alone. The method's trainer lives in
subpackages that need the training extras: ``mcsc.models`` (U-Net, Swin-UNet, projection
heads), ``mcsc.data``, ``mcsc.training``, ``mcsc.evaluation``; ``mcsc.losses`` also holds the
method's ``MultiScaleContrastiveLoss`` and segmentation losses.
"""

from mcsc.losses.memory import CrossBatchMemory
from mcsc.losses.pixel import PixelContrastiveLoss
from mcsc.losses.supcon import SupConLoss
from mcsc.ops import backend, supcon_loss

__version__ = "0.1.0"
__all__ = [
    "supcon_loss",
    "SupConLoss",
    "CrossBatchMemory",
    "PixelContrastiveLoss",
    "backend",
    "__version__",
]
