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

* :func:`gather_batch` gathers the per-image outputs the losses need (logits, labels; a few
  MB) from all ranks, in the single-process order (all labelled slices in rank order, then
  all unlabelled ones), keeping the autograd graph; this happens once per step;
* :class:`DistributedContrastiveLoss` takes those gathered logits and labels, so every rank
  builds the same cross pseudo-labels and draws the **same** pixel sample from the global
  batch with its identically seeded generator, then gathers with gradient only the embedding
  rows that were sampled (never whole 224^2 embedding maps) and runs the wrapped loss's
  reduction on the identical global set;
* BatchNorm statistics are global with
  :func:`mcsc.training.sync_batchnorm.convert_sync_batchnorm` (torch's SyncBatchNorm on GPUs,
  an equivalent autograd implementation on the CPU, where torch's is unavailable).

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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mcsc.losses.contrastive import MultiScaleContrastiveLoss
from mcsc.losses.pixel import EmbeddingMaps
from mcsc.training.sync_batchnorm import convert_sync_batchnorm


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


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The device a config's ``device`` names: ``auto`` (CUDA when available, else the CPU),
    ``cpu``, ``cuda`` or ``cuda:N``. With ``distributed`` a CUDA device is ``cuda:local_rank``
    (one GPU per process). Raises ValueError when CUDA is asked for and missing."""
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
                raise ValueError(
                    f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                    f"devices are visible: use --nproc_per_node <= the GPUs per node"
                )
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
    resolved = resolve_device(device, local_rank, world_size > 1)
    if world_size == 1:
        return DistributedContext(device=resolved)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            store=restart_store(world_size, timeout),
        )
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=resolved,
        backend=dist.get_backend(),
    )


def restart_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """The rendezvous store of this worker group when torchrun's agent hosts it, with keys of
    this restart only; None outside torchrun (``init_process_group`` then builds its own).

    torchrun keeps one store for all restarts of a job (``TORCHELASTIC_USE_AGENT_STORE``), and
    the process group's start-up keys (each rank's gloo address) are the same in every restart.
    A restarted rank could read the address of a peer killed in an earlier attempt: its
    connection is refused ("Gloo connectFullMesh failed") or both ranks wait for each other
    forever inside ``init_process_group``. Prefixing the keys with ``TORCHELASTIC_RESTART_COUNT``
    gives each restart a clean namespace, as torch 2.4 itself did (2.14 no longer does).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mcsc/restart_{restart}/default_pg", agent_store)


def destroy_distributed() -> None:
    """Tear the process group down (safe to call when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in a single-process run."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- models
def wrap_models(
    models: dict[str, nn.Module],
    context: DistributedContext,
    sync_batchnorm: bool = True,
    find_unused_parameters: bool = False,
) -> dict[str, nn.Module]:
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
                raise ValueError(
                    f"models[{name!r}] is itself a BatchNorm layer; wrap it in a container"
                )
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped[name] = DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )
    return wrapped


# ---------------------------------------------------------------------------- metrics
def all_reduce_mean(
    metrics: dict[str, float], device: torch.device | str = "cpu"
) -> dict[str, float]:
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
        return grad[ctx.offset : ctx.offset + ctx.count] * ctx.world, None, None


def gather_rows(
    tensor: torch.Tensor, group=None, sizes: Sequence[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
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


def gather_memory_rows(
    rows: torch.Tensor, labels: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (n_r, D) ``rows`` (detached) and (n_r,) ``labels``, concatenated in rank order.

    The ``memory_gather`` of a :class:`mcsc.losses.PixelContrastiveLoss` whose ranks each compute
    the loss of their own pixels (``loss.memory_gather = gather_memory_rows``): every rank then
    writes all ranks' sampled pixels to its pixel memory, in the same order, so the memories
    stay identical. No gradient flows through it. One process: the inputs (rows detached).
    The trainer's :class:`DistributedContrastiveLoss` needs none: its loss already sees the
    gathered global set.
    """
    rows = rows.detach()
    if get_world_size() == 1:
        return rows, labels
    sizes = _all_gather_sizes(rows.shape[0], rows.device, group)
    gathered_rows, _ = gather_rows(rows, group, sizes)
    gathered_labels, _ = gather_rows(labels, group, sizes)
    return gathered_rows.detach(), gathered_labels


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
        return [
            labelled + unlabelled for labelled, unlabelled in zip(self.labelled, self.unlabelled)
        ]

    def global_order(self) -> list[int]:
        """Positions, in the rank-order concatenation of local batches, of the global batch."""
        starts = [0]
        for size in self.sizes()[:-1]:
            starts.append(starts[-1] + size)
        order = [
            start + i for start, labelled in zip(starts, self.labelled) for i in range(labelled)
        ]
        order += [
            start + labelled + i
            for start, labelled, unlabelled in zip(starts, self.labelled, self.unlabelled)
            for i in range(unlabelled)
        ]
        return order

    def owners(self, use_unlabelled: bool = True) -> tuple[list[int], list[int]]:
        """For every image of the global batch (only the labelled ones when not
        ``use_unlabelled``): the rank holding it and its index in that rank's local batch."""
        ranks, local = [], []
        for rank, labelled in enumerate(self.labelled):
            ranks += [rank] * labelled
            local += list(range(labelled))
        if use_unlabelled:
            for rank, (labelled, unlabelled) in enumerate(zip(self.labelled, self.unlabelled)):
                ranks += [rank] * unlabelled
                local += list(range(labelled, labelled + unlabelled))
        return ranks, local


def batch_layout(
    batch_size: int, labelled_count: int, device: torch.device | str = "cpu", group=None
) -> BatchLayout:
    """Exchange the local (batch size, labelled count) of every rank."""
    if not 0 <= labelled_count <= batch_size:
        raise ValueError(f"labelled_count must be in [0, {batch_size}], got {labelled_count}")
    if get_world_size() == 1:
        return BatchLayout((labelled_count,), (batch_size - labelled_count,), 0)
    mine = torch.tensor(
        [labelled_count, batch_size - labelled_count], dtype=torch.long, device=device
    )
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    counts = torch.stack(parts).tolist()
    return BatchLayout(
        tuple(c[0] for c in counts), tuple(c[1] for c in counts), dist.get_rank(group)
    )


def gather_batch(tensor: torch.Tensor, layout: BatchLayout, group=None) -> torch.Tensor:
    """The global batch of a per-image tensor (local (B_r, ...) -> global (B, ...)).

    Rows come in the single-process order of :class:`BatchLayout` (labelled first). Keeps the
    autograd graph (same-loss-on-every-rank rule, see :class:`_GatherRows`); for integer
    tensors it is a plain gather.
    """
    if get_world_size() == 1:
        return tensor
    if tensor.shape[0] != layout.sizes()[layout.rank]:
        raise ValueError(
            f"tensor has {tensor.shape[0]} rows but this rank's batch has {layout.sizes()[layout.rank]}"
        )
    gathered, _ = gather_rows(tensor, group, layout.sizes())
    return gathered[torch.tensor(layout.global_order(), device=tensor.device)]


# --------------------------------------------------------------------- contrastive loss
class ShardedEmbeddingMaps(EmbeddingMaps):
    """One scale's embedding maps of the global batch when each rank holds only its own images.

    The global maps are the CNN maps of the ``images`` contrasted images of the global batch,
    then their Swin maps (the order of :class:`MultiScaleContrastiveLoss`); this rank holds its
    local (B_r, D, h, w) CNN and Swin maps. :meth:`rows` takes global rows (the same on every
    rank), reads the ones of this rank's images from its local maps, gathers only those rows
    from all ranks (with gradient, see :class:`_GatherRows`) and returns them in global order.
    """

    def __init__(
        self,
        cnn: torch.Tensor,
        swin: torch.Tensor,
        layout: BatchLayout,
        use_unlabelled: bool,
        group=None,
    ):
        super().__init__([cnn, swin])
        owners, local_index = layout.owners(use_unlabelled)
        self.images, self.rank, self.world_size = len(owners), layout.rank, len(layout.labelled)
        self.local_batch, self.group = cnn.shape[0], group
        self.owner = torch.tensor(owners, dtype=torch.long, device=cnn.device)
        self.local_index = torch.tensor(local_index, dtype=torch.long, device=cnn.device)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), D) embeddings of global rows (every rank passes the same ``rows``)."""
        pixels = self.size[0] * self.size[1]
        maps, pixel = rows // pixels, rows % pixels
        network, image = maps // self.images, maps % self.images
        row_owner = self.owner[image]
        mine = row_owner == self.rank
        local_rows = (
            network[mine] * self.local_batch + self.local_index[image[mine]]
        ) * pixels + pixel[mine]
        # every rank knows every row's owner, so the gather needs no exchange of sizes
        sizes = torch.bincount(row_owner, minlength=self.world_size).tolist()
        gathered, _ = gather_rows(super().rows(local_rows), self.group, sizes)
        # gathered holds the rows grouped by rank, each group in global order
        by_rank = torch.argsort(row_owner, stable=True)
        return gathered[torch.argsort(by_rank)]


class DistributedContrastiveLoss(nn.Module):
    """A :class:`MultiScaleContrastiveLoss` over the global batch of all ranks.

    Called with the wrapped loss's arguments, where the embeddings are this rank's **local**
    maps and the labels, logits and labelled count are those of the **global** batch (what
    :func:`gather_batch` returns, which the trainer needs for its other losses anyway), plus
    the :class:`BatchLayout` of the step. Every rank then

    1. builds the cross targets of the global batch and draws the pixel sample with the wrapped
       loss's generator (identically seeded on all ranks, so the draws agree);
    2. reads the sampled rows of its own images from its local maps and gathers only those
       rows (with gradient) from all ranks (:class:`ShardedEmbeddingMaps`);
    3. runs the wrapped loss's reduction on that set: the same value on every rank, equal to
       the single-process loss of the global batch.

    One process, or ``layout=None`` with one process: exactly the wrapped loss.
    """

    def __init__(self, loss: MultiScaleContrastiveLoss, group=None):
        super().__init__()
        self.loss = loss
        self.group = group

    @property
    def generator(self) -> torch.Generator:
        """The wrapped loss's generator (checkpointed for an exact resume)."""
        return self.loss.generator

    @property
    def diagnostics(self):
        """The wrapped loss's :attr:`MultiScaleContrastiveLoss.diagnostics` (global batch)."""
        return self.loss.diagnostics

    def forward(
        self,
        cnn_embeddings: Sequence[torch.Tensor],
        swin_embeddings: Sequence[torch.Tensor],
        labels: torch.Tensor | None,
        cnn_logits: torch.Tensor,
        swin_logits: torch.Tensor,
        labelled_count: int,
        use_unlabelled: bool = True,
        layout: BatchLayout | None = None,
    ) -> torch.Tensor:
        """The loss of the global batch (a scalar, the same on every rank).

        Args:
            cnn_embeddings, swin_embeddings: per scale, this rank's (B_r, D, h_s, w_s) maps.
            labels: (labelled_count, H, W) integer labels of the global batch's labelled images.
            cnn_logits, swin_logits: (B, C, H, W) logits of the global batch (detached here).
            labelled_count: labelled images of the global batch.
            use_unlabelled: as in :class:`MultiScaleContrastiveLoss`.
            layout: how the global batch is split over ranks (:func:`batch_layout`); required
                under several processes.
        """
        if get_world_size() == 1:
            return self.loss(
                cnn_embeddings,
                swin_embeddings,
                labels,
                cnn_logits,
                swin_logits,
                labelled_count,
                use_unlabelled,
            )
        if layout is None:
            raise ValueError(
                "layout (the BatchLayout of the step) is required under several processes"
            )
        if cnn_logits.shape[0] != layout.total or labelled_count != layout.total_labelled:
            raise ValueError(
                f"cnn_logits hold {cnn_logits.shape[0]} images and labelled_count is {labelled_count}, "
                f"but the global batch has {layout.total} images, {layout.total_labelled} labelled: "
                f"pass the gathered logits and labels"
            )
        scales = self.loss.select_scales(
            cnn_embeddings, swin_embeddings, layout.sizes()[layout.rank]
        )
        targets = self.loss.targets(labels, cnn_logits, swin_logits, labelled_count, use_unlabelled)
        maps = [
            ShardedEmbeddingMaps(
                cnn_embeddings[s], swin_embeddings[s], layout, use_unlabelled, self.group
            )
            for s in scales
        ]
        return self.loss.pixel_loss.contrast(targets, maps, cnn_logits.shape[1])
