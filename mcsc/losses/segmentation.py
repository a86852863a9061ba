"""Supervised and cross-teaching segmentation losses (SSL4MIS / cross teaching CNN-Transformer)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DiceLoss(nn.Module):
    """Soft Dice loss averaged over all classes, background included (SSL4MIS ``DiceLoss``).

    Per class c: ``1 - (2 sum(p_c t_c) + smooth) / (sum(p_c^2) + sum(t_c^2) + smooth)`` with the
    sums running over the whole batch, ``t_c`` the one-hot target.

    Args:
        num_classes: C.
        smooth: additive smoothing (1e-5 as in SSL4MIS).

    Forward: ``probabilities`` (B, C, H, W) float (softmax outputs), ``target`` (B, H, W)
    integer class map in [0, C) -> scalar loss.
    """

    def __init__(self, num_classes: int, smooth: float = 1e-5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.smooth = num_classes, smooth

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float probabilities against a (B, H, W) integer class map -> scalar loss."""
        if probabilities.dim() != 4 or probabilities.shape[1] != self.num_classes:
            raise ValueError(f"probabilities must be (B, {self.num_classes}, H, W), got {tuple(probabilities.shape)}")
        if target.shape != probabilities.shape[:1] + probabilities.shape[2:]:
            raise ValueError(f"target must be (B, H, W) = {tuple(probabilities.shape[:1] + probabilities.shape[2:])}, "
                             f"got {tuple(target.shape)}")
        one_hot = F.one_hot(target.long(), self.num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
        dims = (0, 2, 3)
        intersection = (probabilities * one_hot).sum(dims)
        denominator = (probabilities * probabilities).sum(dims) + one_hot.sum(dims)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth)
        return (1 - dice).mean()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``0.5 * (cross-entropy + Dice)`` of (B, C, H, W) logits against (B, H, W) int labels -> scalar."""
    dice = DiceLoss(num_classes)(torch.softmax(logits, dim=1), labels)
    return 0.5 * (F.cross_entropy(logits, labels.long()) + dice)


def cross_teaching_loss(logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """Dice of ``softmax(logits)`` against the other network's hard prediction (no gradient to it).

    Both inputs are (B, C, H, W) logits of the same images; returns a scalar.
    """
    if logits.shape != other_logits.shape:
        raise ValueError(f"logits and other_logits must have the same shape, got {tuple(logits.shape)} "
                         f"and {tuple(other_logits.shape)}")
    pseudo = other_logits.detach().argmax(dim=1)
    return DiceLoss(logits.shape[1])(torch.softmax(logits, dim=1), pseudo)


def sigmoid_rampup(iteration: float, rampup_length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(iteration / rampup_length, 0, 1)`` (Laine & Aila 2017).

    Returns 1.0 when ``rampup_length`` is 0. The public code feeds ``iteration // 150`` with a
    length of 200 and scales by 0.1 for the cross-teaching weight.
    """
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}")
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(max(float(iteration), 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * phase * phase))
