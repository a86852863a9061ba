"""``SupConLoss``: the fused supervised contrastive loss as an ``nn.Module`` for (N, D) embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcsc.ops import supcon_loss, validate_inputs


class SupConLoss(nn.Module):
    """Supervised contrastive loss of embeddings and labels, with MCSC's class-prevalence weights.

    A drop-in for pytorch-metric-learning's ``SupConLoss``: with ``weighting="none"`` and
    ``normalize=True`` it computes the same loss (Khosla et al. 2020), fused (memory linear in
    N, never the N x N similarity matrix). ``weighting="prevalence"`` gives every class in the
    denominator the weight of its mean exp-similarity, so rare classes count as much as frequent
    ones (MCSC). The formula is documented in :func:`mcsc.supcon_loss`.

    Args:
        temperature: float > 0.
        weighting: ``"prevalence"`` or ``"none"``.
        ignore_index: label of rows that are neither anchors nor contrasts.
        reduction: ``"mean"`` (over anchors with a positive; 0 when there is none), ``"sum"`` or
            ``"none"`` (per-row losses, 0 for rows that are not anchors).
        normalize: L2-normalise every embedding row before the loss (as pytorch-metric-learning's
            cosine similarity does); False uses the embeddings as given (dot products), for
            inputs that are already unit vectors or when their norm should matter.

    Call: ``loss(embeddings, labels, segments=None)`` with ``embeddings`` (N, D) float32/float64
    (on CUDA also float16/bfloat16), ``labels`` (N,) int64 or int32 in [0, C) or
    ``ignore_index``, and ``segments`` None or (S + 1,) int64 offsets ``0 = o_0 <= ... <= o_S
    = N`` (rows interact only within ``[o_k, o_{k+1})``). Returns a scalar, or (N,) with
    ``reduction="none"``, of the embeddings' dtype.
    """

    def __init__(self, temperature: float = 0.1, weighting: str = "prevalence", ignore_index: int = -1,
                 reduction: str = "mean", normalize: bool = True):
        super().__init__()
        # the op's own checks, run on an empty input, report bad settings at construction
        validate_inputs(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), temperature, None, weighting,
                        ignore_index, reduction, None)
        self.temperature, self.weighting = temperature, weighting
        self.ignore_index, self.reduction, self.normalize = ignore_index, reduction, bool(normalize)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of (N, D) ``embeddings`` with (N,) ``labels`` (see the class docstring)."""
        if self.normalize and isinstance(embeddings, torch.Tensor):
            embeddings = F.normalize(embeddings, dim=-1)
        return supcon_loss(embeddings, labels, temperature=self.temperature, segments=segments,
                           weighting=self.weighting, ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, weighting={self.weighting!r}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, normalize={self.normalize}")
