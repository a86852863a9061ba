"""Multi-GPU and multi-node training on ``torch.distributed`` (launched with ``torchrun``).

``torchrun --nproc_per_node=K -m mcsc train ...`` starts K processes; each reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment (:func:`init_distributed`), trains its
own shard of every batch, and the networks are wrapped in ``DistributedDataParallel``
(:func:`wrap_models`). Backend: NCCL when the processes run on CUDA, gloo on the CPU.

**Equivalence with one process.** The configured batch sizes are *global*: with W processes
each rank gets ``batch_size / W`` slices, ``labeled_batch_size / W`` of them labelled
(:class:`mcsc.data.distributed_sampling.ShardedTwoStreamBatchSampler`). The losses of the
method are not sums over images — Dice pools its sums over the batch, the contrastive loss
contrasts pixels of different images and its block sampler mixes images — so every rank
computes the **whole single-process loss on the global batch**:

* :func:`gather_batch` gathers the per-image outputs the segmentation losses need (logits,
  labels; a few MB) from all ranks, in the single-process order (all labelled slices in rank
  order, then all unlabelled ones), keeping the autograd graph;
* :class:`DistributedContrastiveLoss` gathers the *integer* pseudo-label inputs (logits without
  gradient, labels), so every rank draws the **same** pixel sample from the global batch with
  its identically seeded generator, then gathers with gradient only the embedding rows that
  were sampled (never whole 224^2 embedding maps) and calls the same
  ``MultiScaleContrastiveLoss._losses`` on the identical global set;
* BatchNorm statistics are global with :func:`convert_sync_batchnorm` (torch's SyncBatchNorm on
  GPUs, :class:`CPUSyncBatchNorm`, an equivalent autograd implementation, on the CPU where
  torch's is unavailable).

So the loss value is the same on every rank and equal to one process's loss on the
concatenated batch. **Gradients**: every rank r back-propagates the same global loss L. The
gathers' backward (:class:`_GatherRows`) hands each rank ``W * dL/dx_r`` for its own rows
``x_r``, which is what the exact gradient of the sum over ranks, ``sum_r' dL_r'/dx_r`` with
``L_r' = L``, is — the reduce-scatter of the usual differentiable all-gather, here computed
without any communication because all ranks' loss gradients are identical. DDP then averages
the per-rank parameter gradients, ``(1/W) sum_r W dL/dtheta|_(via x_r) = dL/dtheta``: exactly
the single-process gradient. ``tests/test_distributed.py`` checks the loss, the gradients and
the updated parameters against one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mcsc.losses.contrastive import MultiScaleContrastiveLoss


# ---------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its rank, the world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process trains (a process group is up)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, checkpoints and outputs."""
        return self.rank == 0


def _resolve_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if distributed:
            # one GPU per process: LOCAL_RANK picks it (an explicit index would make all
            # processes of a node share one GPU)
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                                 f"devices are visible: use --nproc_per_node <= the GPUs per node")
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistributedContext:
    """Start the process group from the ``torchrun`` environment; a no-op for one process.

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and torchrun's ``MASTER_ADDR`` /
    ``MASTER_PORT`` through the ``env://`` rendezvous). ``device`` as in the config: ``auto``
    (CUDA when available), ``cpu`` or ``cuda``; under several processes a CUDA device is
    ``cuda:LOCAL_RANK``. Backend: NCCL on CUDA, gloo on the CPU. ``timeout_minutes`` bounds how
    long a collective waits for a lagging rank (rank 0 validates and tests alone).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    resolved = _resolve_device(device, local_rank, world_size > 1)
    if world_size == 1:
        return DistributedContext(device=resolved)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved,
                              backend=dist.get_backend())


def destroy_distributed() -> None:
    """Tear the process group down (safe to call when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in a single-process run."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- models
class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks, for CPU tensors (gloo).

    torch's ``nn.SyncBatchNorm`` runs only on GPUs (and DDP refuses it on CPU modules). Here
    the statistics are computed with two differentiable all-reduces (the sums, then the
    centred sums of squares), giving exactly the batch statistics of the concatenated batch;
    the running statistics are updated as BatchNorm does. Outside a process group, or in eval
    mode, it is plain BatchNorm. Same parameters, buffers and state-dict keys as BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if self.training and group is not None and dist.get_world_size(group) > 1:
            return self._sync_forward(input, group)
        return super().forward(input)

    def _sync_forward(self, input: torch.Tensor, group) -> torch.Tensor:
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor(float(input.numel() // max(input.shape[1], 1)), dtype=input.dtype,
                             device=input.device)
        dist.all_reduce(count, group=group)
        mean = _all_reduce_sum(input.sum(dims), group) / count
        centred = input - mean.view(shape)
        var = _all_reduce_sum((centred * centred).sum(dims), group) / count
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return output


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Make every ``BatchNorm*d`` of ``module`` use the statistics of all ranks, in place.

    CUDA modules get torch's ``nn.SyncBatchNorm``, CPU modules :class:`CPUSyncBatchNorm`. The
    new layers share the old ones' parameters and buffers, so optimisers built before the
    conversion keep working and state-dict keys do not change. Returns the converted module
    (a new object only when ``module`` itself is a BatchNorm layer).
    """
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, process_group)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        return converted
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_models(models: dict[str, nn.Module], context: DistributedContext, sync_batchnorm: bool = True,
                find_unused_parameters: bool = False) -> dict[str, nn.Module]:
    """Wrap every module of ``models`` (networks and heads) in DistributedDataParallel.

    With ``sync_batchnorm`` the BatchNorm layers are converted first (in place, so the modules
    of ``models`` stay the ones that hold the weights: save and evaluate those, run the
    training forward through the wrappers). Without it each rank normalises with its own
    shard's statistics — cheaper, but then the step is not that of one process. One process:
    returns ``models`` unchanged (as a new dict). DDP broadcasts rank 0's weights at wrap time,
    so all ranks start identical.
    """
    if not context.enabled:
        return dict(models)
    wrapped = {}
    for name, model in models.items():
        if sync_batchnorm:
            converted = convert_sync_batchnorm(model)
            if converted is not model:
                raise ValueError(f"models[{name!r}] is itself a BatchNorm layer; wrap it in a container")
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped[name] = DistributedDataParallel(model, device_ids=device_ids,
                                                find_unused_parameters=find_unused_parameters)
    return wrapped


# ---------------------------------------------------------------------------- metrics
class NullWriter:
    """Stands in for the TensorBoard ``SummaryWriter`` on ranks > 0 (only rank 0 writes)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def all_reduce_mean(metrics: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean over ranks of a dict of floats (every rank must pass the same keys, in any order)."""
    if get_world_size() == 1 or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= get_world_size()
    reduced = dict(zip(keys, values.tolist()))
    return {k: float(reduced[k]) for k in metrics}


# ---------------------------------------------------------------------------- gathers
class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient is the all-reduced incoming gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


def _all_gather_sizes(size: int, device: torch.device, group=None) -> list[int]:
    world = dist.get_world_size(group)
    local = torch.tensor([size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


class _GatherRows(torch.autograd.Function):
    """Concatenate the (n_r, ...) tensors of all ranks along dim 0, in rank order.

    Forward: pad to the largest n_r, all-gather, trim. Backward: ``world_size`` times this
    rank's slice of the incoming gradient. That is the exact gradient when **every rank
    computes the same loss from the gathered tensor** (the module docstring derives it): the
    gradient of the sum of the W identical losses with respect to this rank's rows is W times
    one loss's gradient, so no reduce-scatter is needed, and DDP's division by W restores the
    single-process gradient. Do not use it for losses that differ between ranks.
    """

    @staticmethod
    def forward(ctx, tensor, sizes, group):
        world = len(sizes)
        rank = dist.get_rank(group)
        ctx.offset, ctx.count, ctx.world = sum(sizes[:rank]), sizes[rank], world
        longest = max(sizes)
        tensor = tensor.contiguous()
        if longest == 0:
            return tensor.clone()
        if tensor.shape[0] < longest:
            pad = tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        buffers = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(buffers, tensor, group=group)
        return torch.cat([b[:n] for b, n in zip(buffers, sizes)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.offset:ctx.offset + ctx.count] * ctx.world, None, None


def gather_rows(tensor: torch.Tensor, group=None, sizes: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """All ranks' ``tensor`` (variable length along dim 0) concatenated in rank order.

    Differentiable under the same-loss-on-every-rank rule of :class:`_GatherRows`. Returns
    ``(gathered, sizes)``; pass ``sizes`` when already known to skip their exchange. One
    process: ``(tensor, [len(tensor)])``.
    """
    if get_world_size() == 1:
        return tensor, [tensor.shape[0]]
    if sizes is None:
        sizes = _all_gather_sizes(tensor.shape[0], tensor.device, group)
    return _GatherRows.apply(tensor, list(sizes), group), list(sizes)


@dataclass(frozen=True)
class BatchLayout:
    """How a global two-stream batch is split over ranks: per rank, labelled and unlabelled counts.

    The global (single-process) order is all ranks' labelled slices in rank order, then all
    ranks' unlabelled slices in rank order; each rank holds its labelled slices first.
    """

    labelled: tuple[int, ...]
    unlabelled: tuple[int, ...]
    rank: int = 0

    @property
    def total_labelled(self) -> int:
        return sum(self.labelled)

    @property
    def total(self) -> int:
        return sum(self.labelled) + sum(self.unlabelled)

    def sizes(self) -> list[int]:
        return [l + u for l, u in zip(self.labelled, self.unlabelled)]

    def global_order(self) -> list[int]:
        """Positions, in the rank-order concatenation of local batches, of the global batch."""
        starts = [0]
        for size in self.sizes()[:-1]:
            starts.append(starts[-1] + size)
        order = [s + i for s, l in zip(starts, self.labelled) for i in range(l)]
        order += [s + l + i for s, l, u in zip(starts, self.labelled, self.unlabelled) for i in range(u)]
        return order

    def owners(self, use_unlabelled: bool = True) -> tuple[list[int], list[int]]:
        """For every image of the global batch (only the labelled ones when not
        ``use_unlabelled``): the rank holding it and its index in that rank's local batch."""
        ranks, local = [], []
        for r, l in enumerate(self.labelled):
            ranks += [r] * l
            local += list(range(l))
        if use_unlabelled:
            for r, (l, u) in enumerate(zip(self.labelled, self.unlabelled)):
                ranks += [r] * u
                local += list(range(l, l + u))
        return ranks, local


def batch_layout(batch_size: int, labelled_count: int, device: torch.device | str = "cpu",
                 group=None) -> BatchLayout:
    """Exchange the local (batch size, labelled count) of every rank."""
    if not 0 <= labelled_count <= batch_size:
        raise ValueError(f"labelled_count must be in [0, {batch_size}], got {labelled_count}")
    if get_world_size() == 1:
        return BatchLayout((labelled_count,), (batch_size - labelled_count,), 0)
    mine = torch.tensor([labelled_count, batch_size - labelled_count], dtype=torch.long, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    counts = torch.stack(parts).tolist()
    return BatchLayout(tuple(c[0] for c in counts), tuple(c[1] for c in counts), dist.get_rank(group))


def gather_batch(tensor: torch.Tensor, layout: BatchLayout, group=None) -> torch.Tensor:
    """The global batch of a per-image tensor (local (B_r, ...) -> global (B, ...)).

    Rows come in the single-process order of :class:`BatchLayout` (labelled first). Keeps the
    autograd graph (same-loss-on-every-rank rule, see :class:`_GatherRows`); for integer
    tensors it is a plain gather.
    """
    if get_world_size() == 1:
        return tensor
    if tensor.shape[0] != layout.sizes()[layout.rank]:
        raise ValueError(f"tensor has {tensor.shape[0]} rows but this rank's batch has {layout.sizes()[layout.rank]}")
    gathered, _ = gather_rows(tensor, group, layout.sizes())
    return gathered[torch.tensor(layout.global_order(), device=tensor.device)]


# --------------------------------------------------------------------- contrastive loss
class DistributedContrastiveLoss(nn.Module):
    """A :class:`MultiScaleContrastiveLoss` over the global batch of all ranks.

    Called with the same arguments as the wrapped loss, all **local** (this rank's embeddings,
    labels of its labelled images, logits, its labelled count). Returns the loss and diagnostics
    of the wrapped loss on the global batch (same value on every rank):

    1. the labels and the (detached) logits of all ranks are gathered — the cross pseudo-labels
       and so the pixel sample depend only on them — and every rank draws the sample of the
       global batch with the wrapped loss's sampler and generator (identically seeded on all
       ranks, so the draws agree);
    2. each rank picks, among the sampled rows, those of its own images from its local
       embedding maps; these rows alone are gathered (with gradient) and put back into the
       global row order;
    3. the wrapped loss's per-scale reduction runs on that set.

    One process: exactly the wrapped loss.
    """

    def __init__(self, loss: MultiScaleContrastiveLoss, group=None):
        super().__init__()
        self.loss = loss
        self.group = group

    @property
    def generator(self) -> torch.Generator:
        """The wrapped loss's generator (checkpointed for an exact resume)."""
        return self.loss.generator

    def forward(self, cnn_embeddings, swin_embeddings, labels, cnn_logits, swin_logits, labelled_count: int,
                use_unlabelled: bool = True):
        if get_world_size() == 1:
            return self.loss(cnn_embeddings, swin_embeddings, labels, cnn_logits, swin_logits, labelled_count,
                             use_unlabelled)
        loss, group = self.loss, self.group
        cnn_embeddings, swin_embeddings = list(cnn_embeddings), list(swin_embeddings)
        device = cnn_logits.device
        if any(e.shape[0] != cnn_logits.shape[0] for e in cnn_embeddings + swin_embeddings):
            raise ValueError(f"every embedding map must hold this rank's {cnn_logits.shape[0]} images")
        layout = batch_layout(cnn_logits.shape[0], labelled_count, device, group)
        if labelled_count > 0 and (labels is None or labels.shape[0] != labelled_count):
            raise ValueError(f"labels must hold the {labelled_count} labelled images of this rank")
        local_labels = labels if labelled_count > 0 else cnn_logits.new_zeros((0,) + tuple(cnn_logits.shape[2:]),
                                                                               dtype=torch.long)
        global_labels, _ = gather_rows(local_labels.to(torch.long).contiguous(), group, list(layout.labelled))
        global_cnn_logits = gather_batch(cnn_logits.detach(), layout, group)
        global_swin_logits = gather_batch(swin_logits.detach(), layout, group)
        total, total_labelled = layout.total, layout.total_labelled
        # shape-only stand-ins of the global embedding maps for the wrapped loss's input checks
        cnn_stand_ins, swin_stand_ins = ([e.new_zeros(()).expand((total,) + tuple(e.shape[1:])) for e in maps]
                                         for maps in (cnn_embeddings, swin_embeddings))
        scales = loss._check_inputs(cnn_stand_ins, swin_stand_ins, global_labels if total_labelled else None,
                                    global_cnn_logits, global_swin_logits, total_labelled)
        num_classes = cnn_logits.shape[1]
        images = total if use_unlabelled else total_labelled
        local_images = layout.sizes()[layout.rank] if use_unlabelled else layout.labelled[layout.rank]
        cnn_targets, swin_targets = loss._cross_targets(global_labels, global_cnn_logits, global_swin_logits,
                                                        total_labelled, images)
        owner_list, local_list = layout.owners(use_unlabelled)
        owner = torch.tensor(owner_list, dtype=torch.long, device=device)
        local_index = torch.tensor(local_list, dtype=torch.long, device=device)

        def select_rows(scale: int, rows: torch.Tensor) -> torch.Tensor:
            cnn, swin = cnn_embeddings[scale][:local_images], swin_embeddings[scale][:local_images]
            pixels = cnn.shape[2] * cnn.shape[3]
            local_features = torch.cat([cnn, swin]).permute(0, 2, 3, 1).reshape(-1, cnn.shape[1])
            # global row -> (network, global image, pixel) -> the owning rank's local row
            maps, pixel = rows // pixels, rows % pixels
            network, image = maps // images, maps % images
            row_owner = owner[image]
            mine = row_owner == layout.rank
            local_rows = (network[mine] * local_images + local_index[image[mine]]) * pixels + pixel[mine]
            gathered, _ = gather_rows(local_features[local_rows], group)
            # gathered holds the rows grouped by rank, each group in global order
            by_rank = torch.argsort(row_owner, stable=True)
            return gathered[torch.argsort(by_rank)]

        return loss.contrast_sampled_rows(cnn_embeddings, swin_embeddings, scales, cnn_targets, swin_targets,
                                          num_classes, select_rows)
