"""Dense pure-PyTorch implementation of the supervised contrastive loss.

This is the ground truth for the tests and the fallback when the compiled extension cannot be
loaded. It materialises the (anchors x contrasts) similarity matrix of every segment, so it is
only meant for small inputs. ``mcsc.ops.supcon_loss`` documents the loss it computes.
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
    ref_features: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ref_segments: torch.Tensor | None = None,
    ref_self_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor losses and the number of positives of every anchor row.

    Without a reference set the rows of ``features`` are both the anchors and the contrasts
    (each row's own pair excluded). With one, anchor i of segment k contrasts against the rows
    of ``ref_features`` in reference segment k, minus the row ``ref_self_index[i]`` when that
    is >= 0 (the anchor's own copy in the reference set).

    Args:
        features: (M, D) floating tensor, the anchors.
        labels: (M,) integer tensor; ``ignore_index`` marks rows that take no part.
        segments: (S + 1,) int64 offsets into the anchors; rows interact only within a segment.
        temperature: positive float.
        prevalence: True for the MCSC class-prevalence weights, False for plain SupCon.
        ignore_index: label value of ignored rows (anchors and reference rows alike).
        ref_features: None, or (K, D) reference rows of the features' dtype and device.
        ref_labels: (K,) integer tensor, with ``ref_features``.
        ref_segments: (S + 1,) int64 offsets into the reference rows, with ``ref_features``.
        ref_self_index: None, or (M,) integer: the reference row that is anchor i itself, or -1.

    Returns:
        loss: (M,) tensor of ``features.dtype``; 0 for rows that are not anchors.
        positives: (M,) int64, |P(i)| for valid rows and -1 for ignored rows.
    """
    m = features.shape[0]
    loss = features.new_zeros(m)
    positives = torch.full((m,), -1, dtype=torch.int64, device=features.device)
    if ref_features is None:
        ref_features, ref_labels, ref_segments = features, labels, segments
        ref_self_index = torch.arange(m, device=features.device)
    elif ref_self_index is None:
        ref_self_index = torch.full((m,), -1, dtype=torch.int64, device=features.device)
    bounds = zip(itertools.pairwise(segments.tolist()), itertools.pairwise(ref_segments.tolist()))
    for (start, stop), (ref_start, ref_stop) in bounds:
        if stop <= start:
            continue
        own_column = ref_self_index[start:stop].to(torch.int64)
        own_column = torch.where(own_column >= 0, own_column - ref_start, own_column)
        loss[start:stop], positives[start:stop] = _segment_losses(
            features[start:stop],
            labels[start:stop],
            ref_features[ref_start:ref_stop],
            ref_labels[ref_start:ref_stop],
            own_column,
            temperature,
            prevalence,
            ignore_index,
        )
    return loss, positives


def _segment_losses(z, y, keys, key_labels, own_column, temperature, prevalence, ignore_index):
    """One segment: anchors z (m, D) against contrasts keys (k, D); own_column (m,) is the
    column of each anchor's own pair (excluded), -1 for none."""
    valid = y != ignore_index
    valid_key = key_labels != ignore_index
    similarity = (z @ keys.T) / temperature
    same_class = y[:, None] == key_labels[None, :]
    columns = torch.arange(keys.shape[0], device=z.device)
    own = columns[None, :] == own_column[:, None]
    contrast = valid[:, None] & valid_key[None, :] & ~own
    positive = contrast & same_class
    num_positives = positive.sum(dim=1)

    if prevalence:
        # w_i(y_j) = 1 / |{contrasts of anchor i labelled y_j}|: n_{y_j} valid keys of that
        # class, less the anchor's own pair when it is one of them (always of class y_i).
        key_same = key_labels[:, None] == key_labels[None, :]
        class_size = (key_same & valid_key[None, :]).sum(dim=1).to(z.dtype)  # n_{y_j} per key
        own_is_contrast = (own & valid_key[None, :]).any(dim=1)
        own_in_class = own_is_contrast[:, None] & same_class
        # clamp only guards entries masked out below
        weight = 1.0 / (class_size[None, :] - own_in_class.to(z.dtype)).clamp(min=1)
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
