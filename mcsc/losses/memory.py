"""``CrossBatchMemory``: contrast every batch against a queue of past embeddings, fused.

A drop-in for pytorch-metric-learning's ``CrossBatchMemory(SupConLoss(...), embedding_size,
memory_size)`` (Wang et al. 2020, "Cross-Batch Memory for Embedding Learning"): the memory is
a first-in first-out queue of the last ``memory_size`` embeddings (detached) and their labels;
each batch is written into it first, then its rows are the anchors and the stored rows their
contrasts. The loss is :func:`mcsc.supcon_loss` with the memory as its reference set, so it
never builds the (batch x memory) similarity matrix: memory O((batch + memory_size) D).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from mcsc.losses.supcon import SupConLoss


class CrossBatchMemory(nn.Module):
    """A supervised contrastive loss against a queue of the last ``memory_size`` embeddings.

    Every call (1) writes the batch's embeddings (detached) and labels into the queue at the
    write position, wrapping around at the end, (2) computes ``loss`` with the batch's rows as
    the anchors and the queue's stored rows as the contrasts (the batch's own copies
    included), each anchor's own copy excluded. Gradient flows to the anchors only, as in
    pytorch-metric-learning: the queue is detached.

    With ``enqueue_mask`` (N,) bool, the rows where it is True are only written to the queue
    and the others are only anchors (no row is then an anchor and a stored row at once, so
    there is nothing to exclude), as pytorch-metric-learning's ``enqueue_mask`` (e.g. a
    momentum encoder's keys enqueued next to the query rows).

    It equals pytorch-metric-learning 2.9.0's ``CrossBatchMemory(SupConLoss(t), D, Q)`` for
    ``SupConLoss(t, weighting="none")`` (values and gradients, every step, wrap-around
    included), except where that one has a bug:

    * a one-row batch (or ``memory_size`` 1): its wrap-around test ``end <= start`` holds and
      the anchor's own copy is kept as its positive; here it is always excluded;
    * an ``enqueue_mask`` with no True row marks its queue as full, so the never-written zero
      rows (label 0) become contrasts; here an empty enqueue changes nothing;

    and in the degenerate batches listed in :class:`mcsc.SupConLoss` (its reduction averages
    over anchors with a positive, not over non-zero losses).

    Args:
        loss: a :class:`mcsc.SupConLoss` (``weighting="none"`` for pytorch-metric-learning's
            loss, ``"prevalence"`` for MCSC's weights computed over the stored rows); its
            temperature, ``ignore_index`` (stored rows with that label take no part),
            reduction and ``normalize`` (stored rows are kept as given and normalised when
            used, as pytorch-metric-learning does) apply.
        embedding_size: D, the embeddings' width.
        memory_size: Q >= 1, the rows the queue holds.

    Buffers (in ``state_dict``, moved by ``.to()``): ``embedding_memory`` (Q, D), float, the
    stored rows by slot; ``label_memory`` (Q,) int64. The write position ``queue_idx`` and
    ``has_been_filled`` are plain attributes saved in ``state_dict`` as the module's extra
    state. Slots ``[0, queue_idx)`` hold rows until the queue has been filled, then all do.

    Call: ``memory(embeddings, labels, enqueue_mask=None)`` with ``embeddings`` (N, D) float32
    or float64 (on CUDA also float16/bfloat16; the queue takes their dtype and device),
    ``labels`` (N,) int64/int32 in [0, C) or the loss's ``ignore_index``, ``enqueue_mask``
    None or (N,) bool. Without a mask N <= Q; with one, at most Q rows may be enqueued.
    Returns the loss's reduction of the anchors' losses (a scalar of the embeddings' dtype, or
    one value per anchor for ``reduction="none"``).
    """

    def __init__(self, loss: SupConLoss, embedding_size: int, memory_size: int = 1024):
        super().__init__()
        if not isinstance(loss, SupConLoss):
            raise TypeError(f"loss must be an mcsc.SupConLoss, got {type(loss).__name__}")
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.loss = loss
        self.embedding_size, self.memory_size = int(embedding_size), int(memory_size)
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.queue_idx, self.has_been_filled = 0, False

    def reset_queue(self) -> None:
        """Empty the queue (the buffers keep their dtype and device)."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx, self.has_been_filled = 0, False

    @property
    def stored(self) -> int:
        """How many slots hold rows."""
        return self.memory_size if self.has_been_filled else self.queue_idx

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        enqueue_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Enqueue the batch, then its loss against the queue (see the class docstring)."""
        self._check(embeddings, labels, enqueue_mask)
        if (
            self.embedding_memory.dtype != embeddings.dtype
            or self.embedding_memory.device != embeddings.device
        ):
            # the queue follows its input, as pytorch-metric-learning's does
            self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
        if self.label_memory.device != embeddings.device:
            self.label_memory = self.label_memory.to(embeddings.device)
        labels = labels.to(torch.long)
        if enqueue_mask is None:
            queued_rows, queued_labels = embeddings, labels
            anchors, anchor_labels = embeddings, labels
        else:
            queued_rows, queued_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            anchors, anchor_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        slots = (
            torch.arange(queued_rows.shape[0], device=embeddings.device) + self.queue_idx
        ) % self.memory_size
        # kept so that a loss that rejects its input leaves the queue as it was
        before = (
            self.embedding_memory[slots].clone(),
            self.label_memory[slots].clone(),
            self.queue_idx,
            self.has_been_filled,
        )
        self._enqueue(queued_rows, queued_labels, slots)
        try:
            stored = self.stored
            keys = self.embedding_memory[:stored]
            # the loss keeps its keys and their labels for the backward: copies, not views of
            # the queue, so that the next call's write cannot precede a pending backward
            keys = self.loss.prepare(keys) if self.loss.normalize else keys.clone()
            key_labels = self.label_memory[:stored].clone()
            return self.loss.reference_loss(
                self.loss.prepare(anchors),
                anchor_labels,
                ref_features=keys,
                ref_labels=key_labels,
                # each anchor's own copy is the slot it was just written to
                ref_self_index=slots if enqueue_mask is None else None,
            )
        except Exception:
            self.embedding_memory[slots] = before[0]
            self.label_memory[slots] = before[1]
            self.queue_idx, self.has_been_filled = before[2], before[3]
            raise

    def _enqueue(self, rows: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor) -> None:
        count = rows.shape[0]
        if count == 0:
            return
        self.embedding_memory[slots] = rows.detach()
        self.label_memory[slots] = labels
        end = self.queue_idx + count
        self.has_been_filled = self.has_been_filled or end >= self.memory_size
        self.queue_idx = end % self.memory_size

    def _check(self, embeddings, labels, enqueue_mask) -> None:
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if embeddings.dim() != 2 or not embeddings.dtype.is_floating_point:
            raise ValueError(
                f"embeddings must be a (N, D) float tensor, got shape {tuple(embeddings.shape)} "
                f"of {embeddings.dtype}"
            )
        n, width = embeddings.shape
        if width != self.embedding_size:
            raise ValueError(
                f"embeddings have width {width} but embedding_size is {self.embedding_size}"
            )
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(
                f"labels must have shape (N,) = ({n},) to match embeddings, got "
                f"{tuple(labels.shape)}"
            )
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
        if labels.device != embeddings.device:
            raise ValueError(
                f"labels are on {labels.device} but embeddings are on {embeddings.device}"
            )
        if enqueue_mask is None:
            if n > self.memory_size:
                raise ValueError(
                    f"the batch has {n} rows but memory_size is {self.memory_size}: a batch "
                    f"must fit in the queue (raise memory_size or split the batch)"
                )
        else:
            if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
                raise TypeError(
                    f"enqueue_mask must be None or a bool tensor, got "
                    f"{getattr(enqueue_mask, 'dtype', type(enqueue_mask).__name__)}"
                )
            if enqueue_mask.shape != (n,):
                raise ValueError(
                    f"enqueue_mask must have shape (N,) = ({n},), got {tuple(enqueue_mask.shape)}"
                )
            if enqueue_mask.device != embeddings.device:
                raise ValueError(
                    f"enqueue_mask is on {enqueue_mask.device} but embeddings are on "
                    f"{embeddings.device}"
                )
            queued = int(enqueue_mask.sum())
            if queued > self.memory_size:
                raise ValueError(
                    f"enqueue_mask selects {queued} rows but memory_size is {self.memory_size}"
                )
        # checked before the queue is written: a bad label must not enter it
        ignore_index = self.loss.ignore_index
        bad = (labels < 0) & (labels != ignore_index)
        if bool(bad.any()):
            raise ValueError(
                f"labels must be >= 0 or the loss's ignore_index={ignore_index}; found "
                f"{int(labels[bad][0])}"
            )

    def get_extra_state(self) -> dict[str, Any]:
        """The write position and fill state, saved in ``state_dict``."""
        return {"queue_idx": self.queue_idx, "has_been_filled": self.has_been_filled}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        position = int(state["queue_idx"])
        if not 0 <= position < self.memory_size:
            raise ValueError(
                f"the saved queue_idx {position} is outside memory_size {self.memory_size}"
            )
        self.queue_idx, self.has_been_filled = position, bool(state["has_been_filled"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the saved queue may have another dtype than this module's (the queue follows its
        # input's dtype); load_state_dict copies into the existing buffer, so match it first
        key = prefix + "embedding_memory"
        if key in state_dict and state_dict[key].dtype != self.embedding_memory.dtype:
            self.embedding_memory = self.embedding_memory.to(state_dict[key].dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"
