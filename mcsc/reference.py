"""Dense pure-PyTorch implementation of the supervised contrastive loss.

This is the ground truth for the tests and the fallback when the compiled extension cannot be
loaded. It materialises the (n x n) similarity matrix of every segment, so it is only meant for
small inputs. ``mcsc.ops.supcon_loss`` documents the loss it computes.
"""

from __future__ import annotations

import itertools

import torch


def supcon_per_anchor_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    temperature: float,
    prevalence: bool,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor losses and the number of positives of every row.

    Args:
        features: (N, D) floating tensor.
        labels: (N,) integer tensor; ``ignore_index`` marks rows that take no part.
        segments: (S + 1,) int64 offsets on any device; rows interact only within a segment.
        temperature: positive float.
        prevalence: True for the MCSC class-prevalence weights, False for plain SupCon.
        ignore_index: label value of ignored rows.

    Returns:
        loss: (N,) tensor of ``features.dtype``; 0 for rows that are not anchors.
        positives: (N,) int64, |P(i)| for valid rows and -1 for ignored rows.
    """
    n = features.shape[0]
    loss = features.new_zeros(n)
    positives = torch.full((n,), -1, dtype=torch.int64, device=features.device)
    bounds = segments.tolist()
    for start, stop in itertools.pairwise(bounds):
        if stop <= start:
            continue
        loss[start:stop], positives[start:stop] = _segment_losses(
            features[start:stop], labels[start:stop], temperature, prevalence, ignore_index
        )
    return loss, positives


def _segment_losses(z, y, temperature, prevalence, ignore_index):
    n = z.shape[0]
    valid = y != ignore_index
    similarity = (z @ z.T) / temperature
    same_class = y[:, None] == y[None, :]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    contrast = valid[None, :] & valid[:, None] & not_self
    positive = contrast & same_class
    num_positives = positive.sum(dim=1)

    if prevalence:
        class_size = (same_class & valid[None, :]).sum(dim=1).to(z.dtype)  # n_{y_i} per row
        # w_i(y_j) = 1 / (n_{y_j} - [y_j == y_i]); clamp only guards entries masked out below.
        weight = 1.0 / (class_size[None, :] - same_class.to(z.dtype)).clamp(min=1)
        logits = similarity + weight.log()
    else:
        logits = similarity
    logits = logits.masked_fill(~contrast, float("-inf"))
    log_denominator = torch.logsumexp(logits, dim=1)

    positive_sum = (similarity * positive).sum(dim=1)
    is_anchor = valid & (num_positives > 0)
    anchor_loss = log_denominator - positive_sum / num_positives.clamp(min=1)
    loss = torch.where(is_anchor, anchor_loss, torch.zeros_like(anchor_loss))
    positives = torch.where(valid, num_positives, torch.full_like(num_positives, -1))
    return loss, positives
