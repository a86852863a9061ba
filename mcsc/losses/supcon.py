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
    N, never the N x N similarity matrix), also with PML's ``ref_emb`` / ``ref_labels``: the
    embeddings are then the anchors and the reference rows their only contrasts (memory linear
    in N + K, never the N x K matrix). ``weighting="prevalence"`` gives every class in the
    denominator the weight of its mean exp-similarity, so rare classes count as much as frequent
    ones (MCSC). The formula is documented in :func:`mcsc.supcon_loss`.

    Differences from pytorch-metric-learning 2.9.0, each an edge case:

    * ``reduction="mean"`` averages over the anchors that have a positive; PML's
      ``AvgNonZeroReducer`` averages over the anchors whose loss is > 0, which leaves out, in
      addition, anchors whose loss rounds to exactly 0 (all negatives far below the positives,
      e.g. a cosine gap above about 1.7 at temperature 0.1 in float32).
    * PML returns 0 (no gradient) when the whole batch has no positive pair or no negative
      pair, or at most one of each; here every anchor with a positive keeps its loss (a batch
      of one class still has the loss log-sum-exp over positives minus their mean).
    * PML drops the pairs (i, i) when ``ref_labels`` is the very same tensor object as
      ``labels`` (it tests ``ref_labels is labels``), so ``ref_labels=labels`` and
      ``ref_labels=labels.clone()`` give different losses there. Here the result never depends
      on object identity: reference rows are all contrasts; pass ``ref_emb=None`` for the
      single-set loss, where each row's own pair is excluded.
    * Labels must be >= 0; ``ignore_index`` (default -1) marks rows that take no part, where
      PML treats every integer, -1 included, as a class.

    Args:
        temperature: float > 0.
        weighting: ``"prevalence"`` or ``"none"``.
        ignore_index: label of rows that are neither anchors nor contrasts.
        reduction: ``"mean"`` (over anchors with a positive; 0 when there is none), ``"sum"`` or
            ``"none"`` (per-row losses, 0 for rows that are not anchors).
        normalize: L2-normalise every embedding row (and every reference row) before the loss,
            as pytorch-metric-learning's cosine similarity does; False uses the embeddings as
            given (dot products), for inputs that are already unit vectors or when their norm
            should matter.

    Call: ``loss(embeddings, labels, segments=None, ref_emb=None, ref_labels=None,
    ref_segments=None)`` with

    * ``embeddings`` (N, D) float32/float64 (on CUDA also float16/bfloat16);
    * ``labels`` (N,) int64 or int32 in [0, C) or ``ignore_index``;
    * ``segments`` None or (S + 1,) int64 offsets ``0 = o_0 <= ... <= o_S = N`` (rows interact
      only within ``[o_k, o_{k+1})``);
    * ``ref_emb`` None or (K, D) reference rows of the embeddings' dtype and device (gradient
      flows to them when they require grad), ``ref_labels`` (K,) int64/int32 (required with
      ``ref_emb``), and with ``segments`` also ``ref_segments`` (S + 1,) int64 offsets into the
      reference rows: anchor segment k contrasts against reference segment k.

    Returns a scalar, or (N,) with ``reduction="none"``, of the embeddings' dtype.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weighting: str = "prevalence",
        ignore_index: int = -1,
        reduction: str = "mean",
        normalize: bool = True,
    ):
        super().__init__()
        # the op's own checks, run on an empty input, report bad settings at construction
        validate_inputs(
            torch.zeros(0, 1),
            torch.zeros(0, dtype=torch.long),
            temperature,
            None,
            weighting,
            ignore_index,
            reduction,
            None,
        )
        self.temperature, self.weighting = temperature, weighting
        self.ignore_index, self.reduction, self.normalize = ignore_index, reduction, bool(normalize)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        segments: torch.Tensor | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of (N, D) ``embeddings`` with (N,) ``labels``, against themselves or against
        the (K, D) ``ref_emb`` with (K,) ``ref_labels`` (see the class docstring)."""
        if ref_emb is None and (ref_labels is not None or ref_segments is not None):
            raise ValueError(
                "ref_labels and ref_segments need ref_emb: without ref_emb the embeddings are "
                "their own reference rows"
            )
        if ref_emb is not None:
            _check_reference(embeddings, ref_emb, ref_labels)
        return self.reference_loss(
            self.prepare(embeddings),
            labels,
            segments,
            None if ref_emb is None else self.prepare(ref_emb),
            ref_labels,
            ref_segments,
        )

    def prepare(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows as the loss uses them: L2-normalised when ``normalize`` (same shape)."""
        if self.normalize and isinstance(rows, torch.Tensor):
            return F.normalize(rows, dim=-1)
        return rows

    def reference_loss(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        segments: torch.Tensor | None = None,
        ref_features: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        ref_segments: torch.Tensor | None = None,
        ref_self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`mcsc.supcon_loss` with this module's settings on rows already prepared (see
        :meth:`prepare`); the step that :class:`mcsc.CrossBatchMemory` shares."""
        return supcon_loss(
            features,
            labels,
            temperature=self.temperature,
            segments=segments,
            weighting=self.weighting,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            ref_features=ref_features,
            ref_labels=ref_labels,
            ref_segments=ref_segments,
            ref_self_index=ref_self_index,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, weighting={self.weighting!r}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, normalize={self.normalize}"
        )


def _check_reference(embeddings, ref_emb, ref_labels) -> None:
    """The module's own names for the op's reference checks (ref_emb is the op's
    ref_features); the op checks the rest (dtypes, devices, values)."""
    if not isinstance(ref_emb, torch.Tensor):
        raise TypeError(f"ref_emb must be None or a torch.Tensor, got {type(ref_emb).__name__}")
    if ref_labels is None:
        raise ValueError("ref_labels must be given with ref_emb (one label per reference row)")
    if not isinstance(ref_labels, torch.Tensor):
        raise TypeError(f"ref_labels must be a torch.Tensor, got {type(ref_labels).__name__}")
    width = embeddings.shape[-1] if isinstance(embeddings, torch.Tensor) else None
    if ref_emb.dim() != 2 or ref_emb.shape[1] != width:
        raise ValueError(
            f"ref_emb must have shape (K, D) with D = {width} like embeddings, got shape "
            f"{tuple(ref_emb.shape)}"
        )
    if ref_labels.dim() != 1 or ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError(
            f"ref_labels must have shape (K,) = ({ref_emb.shape[0]},) to match ref_emb, got "
            f"{tuple(ref_labels.shape)}"
        )
