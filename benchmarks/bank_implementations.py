"""One step of a cross-batch memory, in every implementation ``memory_bank.py`` compares.

A step: a batch of M anchors (M, D) is written into a full memory of K rows (first in, first
out, at rows ``slots``, as pytorch-metric-learning's ``CrossBatchMemory`` enqueues the batch
before the loss), then every anchor contrasts against the K memory rows except its own copy.
The loss is SupCon (``weighting="none"``, temperature 0.1, mean over anchors); the gradient
flows to the batch only (the memory is a detached buffer, as in ``CrossBatchMemory``).

Every implementation is prepared once per step (untimed) into a call that returns the scalar
loss; the caller runs ``loss.backward()``:

* ``fused``    -- the enqueue (two ``index_copy_`` of M rows), then ``mcsc.supcon_loss(batch,
  labels, ref_features=memory, ref_labels=memory_labels, ref_self_index=slots,
  weighting="none")``.
* ``pml_xbm``  -- pytorch-metric-learning's ``CrossBatchMemory(SupConLoss(0.1), D,
  memory_size=K)`` as users call it: the enqueue, the indices of all (anchor, key) pairs, the
  removal of the self pairs, the loss. That removal compares every positive pair with every
  batch slot: a (positive pairs x M) bool matrix, ``f M^2 K`` bytes with ``f`` the fraction of
  same-class pairs (0.43 for the inputs here), 435 GiB at M = 4096, K = 65536.
* ``pml_loss`` -- the ``SupConLoss`` call that ``CrossBatchMemory`` makes, alone: the pair
  indices without the self pairs (the same tuple, built without the (pairs x M) matrix) are
  made at preparation and not timed. ``pml_xbm`` does all of this and more, so its time is
  at least this one's.
* ``dense``    -- the enqueue, then ``mcsc.reference``'s dense formula (autograd backward).
* ``gemm``     -- not a loss: ``A @ K.T`` then ``P @ K`` (P the first product's M x K result)
  into preallocated outputs, the two products any exact implementation has to do.

Whether the installed pytorch-metric-learning has a chunked ``anchor_batched_backward`` (an
implementation that would avoid the M x K matrices) is checked by :func:`pml_chunked_problem`;
2.9.0 has none.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import implementations as impls
import torch

from mcsc import reference, supcon_loss

TEMPERATURE = 0.1
LOSS_IMPLS = ("fused", "pml_xbm", "pml_loss", "dense")
ALL_IMPLS = ("gemm",) + LOSS_IMPLS
PML_CHUNKED = "anchor_batched_backward"


@dataclasses.dataclass
class Step:
    """The inputs of one step, shared by every implementation.

    ``batch``: (M, D) anchors, L2-normalised, requiring grad. ``labels``: (M,) int64.
    ``memory``: (K, D) the memory, of the batch's dtype and device, already holding the batch at
    ``slots``. ``memory_labels``: (K,) int64. ``slots``: (M,) int64, the memory rows of the
    batch, ``(start + i) % K``. ``start``: where the queue pointer stood before the enqueue.
    """

    batch: torch.Tensor
    labels: torch.Tensor
    memory: torch.Tensor
    memory_labels: torch.Tensor
    slots: torch.Tensor
    start: int


def make_step(
    m: int, k: int, d: int, num_classes: int, *, seed: int = 0, dtype=torch.float32, device="cpu"
) -> Step:
    """A full memory of ``k`` rows and a batch of ``m <= k`` rows written into it; the batch
    wraps around the end of the memory (it starts ``m // 2`` rows before the end)."""
    if m > k:
        raise ValueError(f"the batch ({m} rows) must fit in the memory ({k} rows)")
    memory, memory_labels = impls.make_inputs(
        k, d, num_classes, seed=seed, dtype=dtype, device=device
    )
    batch, labels = impls.make_inputs(m, d, num_classes, seed=seed + 1, dtype=dtype, device=device)
    start = (k - m // 2) % k
    slots = (start + torch.arange(m, device=device)) % k
    memory[slots] = batch
    memory_labels[slots] = labels
    return Step(batch.requires_grad_(True), labels, memory, memory_labels, slots, start)


def same_class_fraction(num_classes: int) -> float:
    """The expected fraction of (anchor, key) pairs of one class for ``make_inputs`` labels."""
    probabilities = impls.class_probabilities(num_classes)
    return float((probabilities * probabilities).sum())


# ----------------------------------------------------------------------------------------------
# the implementations
# ----------------------------------------------------------------------------------------------


def enqueue(step: Step) -> None:
    """Write the batch into the memory at its slots (detached), as a cross-batch memory does."""
    step.memory.index_copy_(0, step.slots, step.batch.detach())
    step.memory_labels.index_copy_(0, step.slots, step.labels)


def fused(step: Step) -> torch.Tensor:
    enqueue(step)
    return supcon_loss(
        step.batch,
        step.labels,
        temperature=TEMPERATURE,
        weighting="none",
        ref_features=step.memory,
        ref_labels=step.memory_labels,
        ref_self_index=step.slots,
    )


def dense(step: Step) -> torch.Tensor:
    enqueue(step)
    m, k = step.batch.shape[0], step.memory.shape[0]
    per_anchor, positives = reference.supcon_per_anchor_reference(
        step.batch,
        step.labels,
        torch.tensor([0, m], device=step.batch.device),
        TEMPERATURE,
        False,
        impls.IGNORE_INDEX,
        step.memory,
        step.memory_labels,
        torch.tensor([0, k], device=step.batch.device),
        step.slots,
    )
    return per_anchor.sum() / (positives > 0).sum().clamp(min=1).to(per_anchor.dtype)


def pair_indices(step: Step) -> tuple[torch.Tensor, ...]:
    """``(a1, p, a2, n)``: every (anchor, memory row) pair of one class except each anchor's own
    row, and every pair of two classes; the tuple ``CrossBatchMemory`` hands its loss."""
    same = step.labels[:, None] == step.memory_labels[None, :]
    negatives = torch.where(~same)
    same[torch.arange(step.slots.shape[0], device=same.device), step.slots] = False
    positives = torch.where(same)
    return positives + negatives


def _pml_losses():
    from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss

    return CrossBatchMemory, SupConLoss


def prepare_pml_xbm(step: Step):
    cross_batch_memory, supcon = _pml_losses()
    m, d = step.batch.shape
    module = cross_batch_memory(
        supcon(temperature=TEMPERATURE), d, memory_size=step.memory.shape[0]
    )
    module = module.to(step.memory.device)
    module.embedding_memory = step.memory.clone()
    module.label_memory = step.memory_labels.clone()
    module.has_been_filled = True

    def call():
        module.queue_idx = step.start  # the same slots every call: the same data every call
        return module(step.batch, step.labels)

    return call


def prepare_pml_loss(step: Step):
    _, supcon = _pml_losses()
    loss_fn = supcon(temperature=TEMPERATURE)
    indices = pair_indices(step)

    def call():
        return loss_fn(step.batch, step.labels, indices, step.memory, step.memory_labels)

    return call


def prepare_gemm(step: Step):
    m, k = step.batch.shape[0], step.memory.shape[0]
    scores = step.memory.new_empty(m, k)
    product = step.memory.new_empty(step.batch.shape)
    anchors = step.batch.detach()

    def call():
        torch.mm(anchors, step.memory.T, out=scores)
        torch.mm(scores, step.memory, out=product)
        return None

    return call


def prepare(name: str, step: Step):
    """The untimed preparation of ``name`` on ``step``: a call returning the loss (None for
    ``gemm``)."""
    if name == "fused":
        return functools.partial(fused, step)
    if name == "dense":
        return functools.partial(dense, step)
    if name == "pml_xbm":
        return prepare_pml_xbm(step)
    if name == "pml_loss":
        return prepare_pml_loss(step)
    if name == "gemm":
        return prepare_gemm(step)
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join(ALL_IMPLS)}")


# ----------------------------------------------------------------------------------------------
# what pytorch-metric-learning offers
# ----------------------------------------------------------------------------------------------


def pml_version() -> str:
    import pytorch_metric_learning

    return pytorch_metric_learning.__version__


@functools.cache
def pml_chunked_problem() -> str:
    """Why there is no chunked PML peer to time: the installed pytorch-metric-learning's source
    never names ``anchor_batched_backward`` (2.9.0 does not), or this script does not know the
    API of the one it has."""
    import pytorch_metric_learning

    root = os.path.dirname(pytorch_metric_learning.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    if PML_CHUNKED in handle.read():
                        return (
                            f"pytorch-metric-learning {pml_version()} has {PML_CHUNKED} "
                            f"({os.path.relpath(os.path.join(folder, name), root)}), which "
                            f"this script does not time yet"
                        )
    return f"pytorch-metric-learning {pml_version()} has no {PML_CHUNKED}"


# ----------------------------------------------------------------------------------------------
# memory: what each implementation holds, and what a call needs on top (to skip what cannot fit)
# ----------------------------------------------------------------------------------------------

# Extra bytes per (anchor, key) pair at the peak of a forward+backward call: measured CPU peaks
# (float32, M = 1024, K = 4096 and 16384: dense 21.4-22.1, pml_loss 29.9-30.6) plus 15 %; the
# pair indices pml_loss is handed are counted by held_bytes, not here.
BYTES_PER_PAIR = {"dense": 26, "pml_loss": 34, "pml_xbm": 34}


def held_bytes(name: str, m: int, k: int, d: int, itemsize: int) -> int:
    """What an implementation holds across the call: the memory (K x D and labels), the batch,
    and for ``pml_loss`` the int64 pair indices it is handed (2 per pair)."""
    held = (k + m) * (d * itemsize + 8)
    if name == "pml_loss":
        held += 16 * m * k
    return held


def estimated_extra_bytes(
    name: str,
    m: int,
    k: int,
    d: int,
    itemsize: int,
    num_classes: int,
    same_fraction: float | None = None,
) -> float:
    """Rough peak extra memory of one forward+backward call (for skipping, not reporting).

    ``pml_xbm`` builds the pair indices (16 bytes a pair, and an M x K mask while it does) and
    the (positive pairs x M) bool matrix of its self-pair removal; ``fused`` is O((M + K) D).
    ``same_fraction``: the fraction of (anchor, key) pairs of one class (default: that of
    :func:`same_class_fraction`, for ``make_inputs`` labels).
    """
    pairs = m * k
    if name == "gemm":
        return float(m * k * itemsize + m * d * itemsize)
    if name == "fused":
        return 4.0 * (m + k) * d * itemsize + 32 * (m + k) + 64 * 2**20
    if name == "pml_xbm":
        # measured: 442 bytes a pair at M = 1024, K = 4096 (the removal's 435 and the indices)
        if same_fraction is None:
            same_fraction = same_class_fraction(num_classes)
        removal = same_fraction * pairs * m
        return removal + (16 + 2 + BYTES_PER_PAIR[name]) * pairs
    return float(BYTES_PER_PAIR[name] * pairs)
