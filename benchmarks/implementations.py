"""The implementations the benchmark compares, all with the semantics of ``mcsc.supcon_loss``.

Every implementation is a function ``loss = f(z, y, bounds, temperature, weighting)`` that returns
the scalar loss with ``reduction="mean"`` (mean over anchors, i.e. valid rows with at least one
positive, over all segments); ``bounds`` is the Python list of segment offsets ``[0, ..., N]``.

* ``fused``    -- ``mcsc.supcon_loss`` (the compiled kernel, or its dense fallback; see
  ``mcsc.ops.backend()``).
* ``dense``    -- the public MCSC code's formula written as users write it: per block (segment),
  ``logits = z @ z.T / t``, float N x N masks, class-prevalence weights from per-class counts
  (``exp_logits / (n_{y_j} - mask_ij)``), exp, row sums, log, masked mean over positives.  The
  training-step workload loops over blocks exactly like the public ``BlockConLoss``.
* ``tiled``    -- the strongest thing a user can write without a kernel: a custom
  ``torch.autograd.Function`` that walks row chunks of every segment (``B x n`` buffers, never
  ``n x n``), saves only the per-row log-denominator, and recomputes the similarities in the
  backward pass (one GEMM forward, three backward).  Tricks: rows sorted by class inside each
  segment (class weights then scale ``B x D`` operands, not ``B x n`` buffers), the
  Cauchy-Schwarz bound ``|z_i| max|z| / t`` as the stabilising shift folded into ``addmm``.
  Unfused: each chunk still round-trips memory for exp and the row sums, and it does not use
  the symmetry ``s_ij = s_ji``.
* ``pml``      -- pytorch-metric-learning's ``SupConLoss`` (only ``weighting="none"``; it
  normalises embeddings itself (cosine similarity), so on L2-normalised inputs its loss equals
  ours and its gradient equals ours projected on the tangent space of the unit sphere).
* ``compiled`` -- ``torch.compile`` (default settings, Inductor) of the dense per-block function,
  where it compiles.
* ``flex``     -- the loss through FlexAttention (``torch.compile(flex_attention)``), the strongest
  thing a GPU user can write in plain PyTorch: ``score_mod`` adds log w_i(y_j), the block mask
  removes the diagonal, ignored rows and other segments, the returned log-sum-exp is the
  log-denominator (differentiable), and the positive term comes from class sums as in the op.
  GPU only: torch has no FlexAttention backward on the CPU (its CPU forward, uncompiled, serves
  the value tests).
* ``gemm``     -- not a loss: one ``z_s @ z_s.T`` per segment, the physical reference.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F

from mcsc import supcon_loss

IGNORE_INDEX = -1
LOSS_IMPLS = ("fused", "dense", "tiled", "pml", "compiled", "flex")
COMPILED_IMPLS = ("compiled", "flex")  # torch.compile: the first call at a shape compiles
ALL_IMPLS = ("gemm",) + LOSS_IMPLS


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def class_probabilities(num_classes: int) -> torch.Tensor:
    """Segmentation-like imbalance: background holds 60 %, the rest decays like 1/k."""
    if num_classes == 1:
        return torch.ones(1)
    rest = 1.0 / torch.arange(1, num_classes, dtype=torch.float64)
    rest = 0.4 * rest / rest.sum()
    return torch.cat([torch.tensor([0.6], dtype=torch.float64), rest])


def make_inputs(
    n: int,
    d: int,
    num_classes: int,
    *,
    seed: int = 0,
    dtype=torch.float32,
    device="cpu",
    ignore_fraction: float = 0.0,
):
    """L2-normalised random embeddings (N, D) and imbalanced int64 labels (N,)."""
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)
    y = torch.multinomial(
        class_probabilities(num_classes), n, replacement=True, generator=generator
    )
    if ignore_fraction > 0:
        ignored = torch.rand(n, generator=generator) < ignore_fraction
        y = torch.where(ignored, torch.full_like(y, IGNORE_INDEX), y)
    return z.to(dtype=dtype, device=device), y.to(device)


def segment_bounds(sizes: list[int]) -> list[int]:
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return bounds


def warmup_sizes(sizes: list[int]) -> list[int]:
    """The segments an untimed first call runs: all of them when there are at most 2, else the
    first two and the last if it differs (enough to initialise libraries, thread pools and
    compiled code for every block shape of the workload)."""
    if len(sizes) <= 2:
        return list(sizes)
    return [sizes[0], sizes[1]] + ([sizes[-1]] if sizes[-1] != sizes[0] else [])


def training_step_sizes(blocks: int = 100) -> list[int]:
    """One step of the public MCSC code: ``blocks`` groups of 3610 rows (10 x 19 x 19) at the
    224^2 scale plus one group of 1960 rows (10 x 14 x 14) at the 28^2 scale."""
    return [3610] * blocks + [1960]


# ----------------------------------------------------------------------------------------------
# fused
# ----------------------------------------------------------------------------------------------


def fused(z, y, bounds, temperature, weighting):
    segments = None
    if len(bounds) > 2:
        segments = torch.tensor(bounds, dtype=torch.int64, device=z.device)
    return supcon_loss(
        z,
        y,
        temperature=temperature,
        segments=segments,
        weighting=weighting,
        ignore_index=IGNORE_INDEX,
    )


# ----------------------------------------------------------------------------------------------
# dense: the public formula, N x N tensors
# ----------------------------------------------------------------------------------------------


def dense_block(z, y, temperature: float, prevalence: bool, num_classes: int, has_ignored: bool):
    """Sum of per-anchor losses and number of anchors of one block, public-code style.

    Python-level arguments only (no data-dependent control flow), so ``torch.compile`` can
    trace the whole block.
    """
    n = z.shape[0]
    logits = torch.div(torch.matmul(z, z.T), temperature)
    same = torch.eq(y.view(-1, 1), y.view(1, -1)).to(z.dtype)
    logits_mask = 1.0 - torch.eye(n, dtype=z.dtype, device=z.device)
    if has_ignored:
        valid_f = (y != IGNORE_INDEX).to(z.dtype)
        logits_mask = logits_mask * valid_f.view(-1, 1) * valid_f.view(1, -1)
    mask = same * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    if prevalence:
        classes = torch.arange(num_classes, device=z.device)
        counts = torch.eq(y.view(-1, 1), classes.view(1, -1)).sum(0).to(z.dtype)
        column_count = counts[y.clamp(min=0)]
        if has_ignored:
            column_count = torch.where(y != IGNORE_INDEX, column_count, 1.0)
        per_ins_weight = column_count.view(1, -1) - mask  # n_{y_j} - [y_j == y_i, j != i]
        exp_logits = exp_logits.div(per_ins_weight)
    denominator = exp_logits.sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(denominator.clamp(min=torch.finfo(z.dtype).tiny))
    num_positives = mask.sum(1)
    mean_log_prob_pos = (mask * log_prob).sum(1) / num_positives.clamp(min=1)
    is_anchor = num_positives > 0
    loss = torch.where(is_anchor, -mean_log_prob_pos, torch.zeros_like(mean_log_prob_pos))
    return loss.sum(), is_anchor.sum()


def _block_loop(block_fn, z, y, bounds, temperature, weighting):
    prevalence = weighting == "prevalence"
    num_classes = int(y.max()) + 1 if y.numel() else 1
    has_ignored = bool((y == IGNORE_INDEX).any())
    total = z.new_zeros(())
    anchors = 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop <= start:
            continue
        block_sum, block_anchors = block_fn(
            z[start:stop], y[start:stop], temperature, prevalence, num_classes, has_ignored
        )
        total = total + block_sum
        anchors = anchors + block_anchors
    if isinstance(anchors, int):
        anchors = torch.tensor(anchors)
    return total / anchors.clamp(min=1).to(z.dtype)


def dense(z, y, bounds, temperature, weighting):
    return _block_loop(dense_block, z, y, bounds, temperature, weighting)


_COMPILE_BACKEND = {"name": "inductor"}
_COMPILED = {}


def set_compile_backend(backend: str) -> None:
    """The ``torch.compile`` backend of ``compiled`` and ``flex``: ``"inductor"`` (what users
    run, the default) or ``"eager"`` (Dynamo traces the code but generates none: a dry run checks
    every code path in seconds instead of minutes of code generation)."""
    _COMPILE_BACKEND["name"] = backend
    _COMPILED.clear()


def compiled_function(function, dynamic: bool | None = None):
    """``torch.compile(function, dynamic=dynamic)`` with the current backend, once per process.

    ``dynamic=None`` (torch's default): static shapes first, automatic dynamic shapes after the
    first recompilation for a new size; ``False``: a static compilation for every shape.
    """
    if (function, dynamic) not in _COMPILED:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED[(function, dynamic)] = torch.compile(
            function, dynamic=dynamic, backend=_COMPILE_BACKEND["name"]
        )
    return _COMPILED[(function, dynamic)]


def compiled(z, y, bounds, temperature, weighting):
    # default settings, as a user writes it
    return _block_loop(compiled_function(dense_block), z, y, bounds, temperature, weighting)


# ----------------------------------------------------------------------------------------------
# tiled: chunked, memory-lean, unfused
# ----------------------------------------------------------------------------------------------


def tile_rows(n: int, budget_elements: int = 1 << 22) -> int:
    """Rows per chunk so that one (B x n) buffer holds about 4 Mi elements (16 MiB in fp32)."""
    return int(max(64, min(n, budget_elements // max(n, 1))))


class _Segment:
    """One segment, its valid rows sorted by class so that every class is a column range."""

    def __init__(self, z, y, start, stop, num_classes, prevalence, temperature):
        ys = y[start:stop]
        valid_rows = torch.nonzero(ys != IGNORE_INDEX).squeeze(1)
        classes, order = torch.sort(ys[valid_rows], stable=True)
        self.rows = start + valid_rows[order]  # original row of each sorted row
        self.z = z[self.rows]
        self.classes = classes
        counts = torch.bincount(classes, minlength=num_classes).to(z.dtype)
        self.counts = counts
        self.ranges = []
        offset = 0
        for c, count in enumerate(counts.tolist()):
            if count > 0:
                self.ranges.append((c, offset, offset + int(count)))
            offset += int(count)
        # W[i, c] = 1 / (n_c - [c == y_i]) (prevalence) or 1
        n = self.z.shape[0]
        if prevalence:
            weights = (1.0 / counts.clamp(min=1)).expand(n, num_classes).clone()
            weights[torch.arange(n, device=z.device), classes] = 1.0 / (counts[classes] - 1).clamp(
                min=1
            )
        else:
            weights = torch.ones(n, num_classes, dtype=z.dtype, device=z.device)
        self.weights = weights
        self.positives = counts[classes] - 1
        self.class_sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device)
        self.class_sums.index_add_(0, classes, self.z)
        # provable upper bound of s_ij (Cauchy-Schwarz): no row-max pass needed
        norms = self.z.norm(dim=1)
        self.bound = norms * (norms.max() if n else 0.0) / temperature
        self.prevalence = prevalence

    def column_groups(self):
        """(class, start, stop) column ranges that share a weight; one range without weights."""
        if self.prevalence:
            return self.ranges
        return [(None, 0, self.z.shape[0])] if self.z.shape[0] else []


class TiledSupCon(torch.autograd.Function):
    """Per-anchor losses (N,), chunked over rows; saves only O(N) state besides the inputs.

    Rows of each segment are sorted by class (ignored rows dropped), so the prevalence weight
    of a (row, class) pair scales B x D GEMM operands and results instead of B x n buffers;
    the stabilising shift is folded into the GEMM (``addmm``) as a per-row bound.
    """

    @staticmethod
    def forward(ctx, z, y, bounds, temperature, prevalence, num_classes):
        n_total = z.shape[0]
        losses = z.new_zeros(n_total)
        lse = z.new_zeros(n_total)
        anchor = torch.zeros(n_total, dtype=torch.bool, device=z.device)
        inv_t = 1.0 / temperature
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop <= start:
                continue
            seg = _Segment(z, y, start, stop, num_classes, prevalence, temperature)
            n = seg.z.shape[0]
            if n == 0:
                continue
            zt = seg.z.T
            seg_lse = torch.empty(n, dtype=z.dtype, device=z.device)
            rows = tile_rows(n)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                s = torch.addmm(-seg.bound[r0:r1].unsqueeze(1), seg.z[r0:r1] * inv_t, zt)
                s[:, r0:r1].diagonal().fill_(-math.inf)
                s.exp_()
                denominator = torch.zeros(r1 - r0, dtype=z.dtype, device=z.device)
                for c, c0, c1 in seg.column_groups():
                    part = s[:, c0:c1].sum(1)
                    denominator += part if c is None else part * seg.weights[r0:r1, c]
                seg_lse[r0:r1] = torch.log(denominator.clamp(min=1e-38)) + seg.bound[r0:r1]
            positive_sum = (seg.z * (seg.class_sums[seg.classes] - seg.z)).sum(1) * inv_t
            is_anchor = seg.positives > 0
            seg_loss = seg_lse - positive_sum / seg.positives.clamp(min=1)
            losses[seg.rows] = torch.where(is_anchor, seg_loss, torch.zeros_like(seg_loss))
            lse[seg.rows] = seg_lse
            anchor[seg.rows] = is_anchor
        ctx.save_for_backward(z, y, lse, anchor)
        ctx.bounds, ctx.temperature = bounds, temperature
        ctx.prevalence, ctx.num_classes = prevalence, num_classes
        ctx.mark_non_differentiable(anchor)
        return losses, anchor

    @staticmethod
    def backward(ctx, grad_losses, _grad_anchor):
        z, y, lse, anchor = ctx.saved_tensors
        inv_t = 1.0 / ctx.temperature
        grad_z = torch.zeros_like(z)
        a_all = grad_losses * anchor.to(grad_losses.dtype)
        for start, stop in zip(ctx.bounds[:-1], ctx.bounds[1:]):
            if stop <= start:
                continue
            seg = _Segment(z, y, start, stop, ctx.num_classes, ctx.prevalence, ctx.temperature)
            n = seg.z.shape[0]
            if n == 0:
                continue
            a = a_all[seg.rows]
            # G_ij = a_i w_i(y_j) exp(s_ij - lse_i); a_i >= 0 folded into the exponent
            signed = bool((a < 0).any())
            shift = ((0.0 if signed else torch.log(a)) - lse[seg.rows]).unsqueeze(1)
            zt = seg.z.T
            dz = torch.zeros_like(seg.z)
            rows = tile_rows(n)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                zr = seg.z[r0:r1] * inv_t
                p = torch.addmm(shift[r0:r1], zr, zt)
                p[:, r0:r1].diagonal().fill_(-math.inf)
                p.exp_()
                if signed:
                    p.mul_(a[r0:r1].unsqueeze(1))
                for c, c0, c1 in seg.column_groups():
                    block = p[:, c0:c1]
                    if c is None:
                        dz[r0:r1].addmm_(block, seg.z[c0:c1], alpha=inv_t)
                        dz[c0:c1].addmm_(block.T, zr)
                    else:
                        w = seg.weights[r0:r1, c : c + 1]
                        dz[r0:r1].addcmul_(w, block @ seg.z[c0:c1], value=inv_t)
                        dz[c0:c1].addmm_(block.T, zr * w)
            b = (a / seg.positives.clamp(min=1)).unsqueeze(1)
            weighted_class_sums = torch.zeros_like(seg.class_sums).index_add_(
                0, seg.classes, b * seg.z
            )
            dz.sub_(
                (b * (seg.class_sums[seg.classes] - 2.0 * seg.z) + weighted_class_sums[seg.classes])
                * inv_t
            )
            grad_z[seg.rows] = dz
        return grad_z, None, None, None, None, None


def tiled(z, y, bounds, temperature, weighting):
    num_classes = int(y.max()) + 1 if y.numel() else 1
    losses, anchor = TiledSupCon.apply(
        z, y, bounds, temperature, weighting == "prevalence", num_classes
    )
    return losses.sum() / anchor.sum().clamp(min=1).to(z.dtype)


# ----------------------------------------------------------------------------------------------
# flex: FlexAttention, the GPU user's peer
# ----------------------------------------------------------------------------------------------


def flex_loss(z, y, bounds, temperature, weighting, *, attention, build_block_mask):
    """The loss through FlexAttention: ``attention`` is ``flex_attention`` (or a compiled
    version), ``build_block_mask`` is ``create_block_mask`` (or a compiled version).

    One (1, 1, N, D) "query" that is also the "key"; the log-sum-exp FlexAttention returns for
    every row is the log-denominator log sum_j w_i(y_j) exp(s_ij). Everything that depends on
    the labels (tables, block mask) is rebuilt on every call, as a training step must.
    """
    from torch.nn.attention import flex_attention as flex_module

    n, d = z.shape
    device = z.device
    sizes = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes, output_size=n)
    num_classes = int(y.max()) + 1 if y.numel() else 1
    valid = y != IGNORE_INDEX
    group = segment * num_classes + y.clamp(min=0)  # (segment, class) of every row
    counts = torch.zeros(len(sizes) * num_classes, device=device).index_add_(
        0, group, valid.float()
    )
    row_counts = counts[group]  # n_{y_i} in the row's segment
    positives = row_counts - 1
    anchor = valid & (positives > 0)

    def mask_mod(batch, head, row, column):
        # Rows that are not anchors keep only their diagonal: their log-sum-exp is never used,
        # and a row with no entry at all gives -inf, which backward would have to survive.
        pair = valid[column] & (segment[row] == segment[column]) & (row != column)
        return (anchor[row] & pair) | (~anchor[row] & (row == column))

    score_mod = None
    if weighting == "prevalence":
        # log w_i(y_j) = -log(n_{y_j} - [y_j == y_i]); the clamp only guards masked pairs
        log_other = torch.log(row_counts.clamp(min=1))
        log_same = torch.log(positives.clamp(min=1))

        def score_mod(score, batch, head, row, column):
            same = y[row] == y[column]
            return score - torch.where(same, log_same[column], log_other[column])

    block_mask = build_block_mask(mask_mod, None, None, n, n, device=device)
    query = z.view(1, 1, n, d)
    # FlexAttention's GPU kernels need head dimensions >= 16, the values' too: the output is
    # never used, so the values are 16 columns of zeros
    values = z.new_zeros(1, 1, n, 16)
    options = dict(score_mod=score_mod, block_mask=block_mask, scale=1.0 / temperature)
    if hasattr(flex_module, "AuxRequest"):
        _, aux = attention(
            query, query, values, **options, return_aux=flex_module.AuxRequest(lse=True)
        )
        lse = aux.lse.view(n)
    else:  # torch < 2.9 returns the log-sum-exp through the older flag
        _, lse = attention(query, query, values, **options, return_lse=True)
        lse = lse.view(n)
    # positive term from class sums: sum_{p in P(i)} s_ip = z_i . (S_{y_i} - z_i) / t
    features = z.float()
    class_sums = torch.zeros(len(sizes) * num_classes, d, device=device).index_add_(
        0, group, features * valid.unsqueeze(1)
    )
    positive_sum = (features * (class_sums[group] - features)).sum(1) / temperature
    per_anchor = torch.where(
        anchor, lse - positive_sum / positives.clamp(min=1), torch.zeros_like(lse)
    )
    return (per_anchor.sum() / anchor.sum().clamp(min=1)).to(z.dtype)


def flex_functions(device_type: str):
    """``(attention, build_block_mask)`` as ``flex`` runs them on ``device_type``.

    On the GPU, as a user runs them: ``torch.compile`` of ``flex_attention`` and of
    ``create_block_mask`` (which otherwise materialises the N x N mask), with static shapes as
    FlexAttention's examples compile them (kernels specialised to the size, one compilation per
    size). On the CPU both uncompiled, forward only: torch's compiled CPU FlexAttention returns
    no log-sum-exp.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device_type == "cpu":
        return flex_attention, create_block_mask
    return (
        compiled_function(flex_attention, dynamic=False),
        compiled_function(create_block_mask, dynamic=False),
    )


def flex(z, y, bounds, temperature, weighting):
    attention, build_block_mask = flex_functions(z.device.type)
    with warnings.catch_warnings():  # uncompiled on the CPU on purpose
        warnings.filterwarnings("ignore", message="flex_attention called without")
        return flex_loss(
            z,
            y,
            bounds,
            temperature,
            weighting,
            attention=attention,
            build_block_mask=build_block_mask,
        )


# ----------------------------------------------------------------------------------------------
# pytorch-metric-learning
# ----------------------------------------------------------------------------------------------

_PML_LOSS = {}


def pml(z, y, bounds, temperature, weighting):
    if weighting != "none":
        raise ValueError("pytorch-metric-learning's SupConLoss has no prevalence weighting")
    if temperature not in _PML_LOSS:
        from pytorch_metric_learning.losses import SupConLoss

        _PML_LOSS[temperature] = SupConLoss(temperature=temperature)
    loss_fn = _PML_LOSS[temperature]
    if len(bounds) == 2:
        return loss_fn(z, y)
    # pml has no segments: mean over blocks weighted by their anchors (= mean over anchors)
    total, anchors = z.new_zeros(()), 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ys = y[start:stop]
        counts = torch.bincount(ys, minlength=1)
        block_anchors = int((counts[ys] > 1).sum())
        if block_anchors:
            total = total + loss_fn(z[start:stop], ys) * block_anchors
            anchors += block_anchors
    return total / max(anchors, 1)


# ----------------------------------------------------------------------------------------------
# gemm reference
# ----------------------------------------------------------------------------------------------


def gemm(z, bounds):
    out = None
    for start, stop in zip(bounds[:-1], bounds[1:]):
        zs = z[start:stop]
        out = torch.mm(zs, zs.T)
    return out


IMPLEMENTATIONS = {
    "fused": fused,
    "dense": dense,
    "tiled": tiled,
    "pml": pml,
    "compiled": compiled,
    "flex": flex,
}


def supports(impl: str, weighting: str, has_ignored: bool) -> bool:
    if impl == "pml":
        return weighting == "none" and not has_ignored
    return True


def unavailable(impl: str, device: str) -> str:
    """Why ``impl`` cannot run forward and backward on ``device`` ('' when it can)."""
    if impl == "flex" and torch.device(device).type == "cpu":
        return "FlexAttention has no backward on the CPU"
    return ""


# (saved per block until backward, transient at the peak) in units of n_block^2 elements,
# calibrated on measured CPU peaks with a margin (dense: 4.5 saved, 9 at the peak of one block)
_SQUARE_FACTORS = {"dense": (5, 10), "pml": (8, 12), "compiled": (2, 6), "gemm": (0, 1)}


def estimated_extra_bytes(
    impl: str, sizes: list[int], d: int, itemsize: int, blockwise: bool = False
) -> int:
    """Rough peak extra memory of a fwd+bwd call, used to skip sizes that cannot fit.

    ``blockwise``: the N x N implementations run backward after every block (gradient
    accumulation), so only one block's graph is alive at a time.
    """
    n_max = max(sizes) if sizes else 0
    linear = sum(sizes) * d * itemsize
    if impl in _SQUARE_FACTORS:
        saved, peak = _SQUARE_FACTORS[impl]
        others = 0 if blockwise else sum(n * n for n in sizes) - n_max * n_max
        return (saved * others + peak * n_max * n_max) * itemsize + 4 * linear
    if impl == "tiled":
        return 4 * (1 << 22) * itemsize + 6 * linear
    if impl == "flex":  # float32 copies of the features, and the block mask's indices
        blocks = -(-sum(sizes) // 128)
        return 6 * linear + 3 * sum(sizes) * d * 4 + 16 * blocks * blocks
    return 6 * linear  # fused: O(N D)


def count_anchors(y, bounds) -> int:
    total = 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ys = y[start:stop]
        ys = ys[ys != IGNORE_INDEX]
        if ys.numel():
            counts = torch.bincount(ys)
            total += int((counts[ys] > 1).sum())
    return total


def blockwise_fwd_bwd(impl: str, z, y, bounds, temperature, weighting, sync=lambda: None):
    """Loss, forward seconds and backward seconds of an N x N implementation run block by block
    with a backward after every block (gradient accumulation into ``z.grad``): same loss and
    gradient as one backward of the summed loss, with one block's graph alive at a time. Each
    block gets its own leaf (``z[a:b].detach().requires_grad_()``) so autograd does not build a
    full-size gradient per block."""
    anchors = max(count_anchors(y, bounds), 1)
    block_share = [
        count_anchors(y[a:b], [0, b - a]) / anchors for a, b in zip(bounds[:-1], bounds[1:])
    ]
    fn = IMPLEMENTATIONS[impl]
    grad = torch.zeros_like(z)
    total = 0.0
    fwd = bwd = 0.0
    for start, stop, share in zip(bounds[:-1], bounds[1:], block_share):
        if stop <= start:
            continue
        zb = z[start:stop].detach().requires_grad_(True)
        block_bounds = [0, stop - start]
        sync()
        t0 = time.perf_counter()
        loss = fn(zb, y[start:stop], block_bounds, temperature, weighting) * share
        sync()
        t1 = time.perf_counter()
        loss.backward()
        grad[start:stop] += zb.grad
        sync()
        t2 = time.perf_counter()
        fwd += t1 - t0
        bwd += t2 - t1
        total += float(loss)
    z.grad = grad if z.grad is None else z.grad + grad
    return total, fwd, bwd
