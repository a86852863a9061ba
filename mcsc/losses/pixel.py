"""Pixel supervised contrastive loss for any segmentation network, built on :func:`mcsc.supcon_loss`.

:class:`PixelContrastiveLoss` takes embedding maps (one per scale) and a label map, resizes the
labels to every scale, samples pixels with one of three samplers and runs the fused op once per
distinct temperature. :class:`mcsc.losses.MultiScaleContrastiveLoss` (the method's cross
two-network loss) is built on its :meth:`PixelContrastiveLoss.contrast` step.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mcsc.ops import WEIGHTINGS, supcon_loss

SAMPLERS = ("blocks", "balanced", "all")


class PixelSample(NamedTuple):
    """The pixels one scale contributes: which embedding rows, with which labels, in which segments.

    ``rows``: (n,) int64 indices into the scale's maps flattened as (map, y, x); ``labels``:
    (n,) int64 the label each row carries (never ``ignore_index``); ``lengths``: (G,) int64
    segment lengths (rows only interact within their segment), summing to n.
    """

    rows: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor


class ScaleSet(NamedTuple):
    """One scale's input to the op: ``features`` (n, D) float, ``labels`` (n,) int64,
    ``lengths`` (G,) int64 segment lengths and the scale's ``temperature``."""

    features: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    temperature: float


@dataclass(frozen=True)
class ContrastiveDiagnostics:
    """What the last call of a pixel contrastive loss did, one entry per used scale.

    Tensors stay on the loss's device and are detached, so recording them costs no host
    synchronisation; read them with ``.tolist()``.

    Attributes:
        sampler: the sampler's name.
        loss_per_scale: (S,) float, each scale's loss (the returned loss is their sum).
        pixels_per_class: (S, C) int64, rows entering the op per class.
        segments: (S,) int64, segments (block groups, or 1) per scale.
        ignored: (S,) int64, pixels of the resized label maps equal to ``ignore_index``.
    """

    sampler: str
    loss_per_scale: torch.Tensor
    pixels_per_class: torch.Tensor
    segments: torch.Tensor
    ignored: torch.Tensor

    @property
    def rows(self) -> int:
        """Rows of all scales that entered the op."""
        return int(self.pixels_per_class.sum())


class EmbeddingMaps:
    """The embedding maps of one scale, read row by row without copying them.

    Args:
        parts: (B_k, D, h, w) float tensors (same D, h, w) that together form the scale's
            M = sum B_k maps, in order; e.g. one network's maps, or two networks' maps of
            the same images.

    Row r of the scale is pixel ``(y, x) = divmod(r % (h * w), w)`` of map ``r // (h * w)``.
    """

    def __init__(self, parts: Sequence[torch.Tensor]):
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("EmbeddingMaps needs at least one (B, D, h, w) tensor")
        first = self.parts[0]
        for part in self.parts:
            if (
                not isinstance(part, torch.Tensor)
                or part.dim() != 4
                or part.shape[1:] != first.shape[1:]
            ):
                raise ValueError(
                    f"embedding maps must be (B, D, h, w) tensors of one D, h, w, got "
                    f"{[tuple(p.shape) for p in self.parts]}"
                )

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the maps."""
        return tuple(self.parts[0].shape[2:])

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), D) embeddings of the given (n,) int64 rows, differentiable."""
        h, w = self.size
        maps, pixel = rows // (h * w), rows % (h * w)
        y, x = pixel // w, pixel % w
        if len(self.parts) == 1:
            return self.parts[0][maps, :, y, x]
        counts = torch.tensor([p.shape[0] for p in self.parts], device=rows.device)
        starts = counts.cumsum(0) - counts
        part_of = torch.bucketize(maps, starts[1:], right=True)
        pieces, positions = [], []
        for k, part in enumerate(self.parts):
            mine = (part_of == k).nonzero().squeeze(1)
            pieces.append(part[maps[mine] - starts[k], :, y[mine], x[mine]])
            positions.append(mine)
        return torch.cat(pieces)[torch.argsort(torch.cat(positions))]

    def graph_anchor(self) -> torch.Tensor:
        """A zero that depends on every part, so every map gets a (zero) gradient even when none
        of its rows is sampled (autograd and DistributedDataParallel need every output used)."""
        return sum(part.sum() for part in self.parts) * 0.0


class PixelContrastiveLoss(nn.Module):
    """Supervised contrastive loss over the pixels of segmentation embeddings, at one or more scales.

    For every scale the label map is resized to the embedding map's size (:func:`resize_labels`),
    pixels are sampled, and all scales go into one segmented set for :func:`mcsc.supcon_loss`
    (one call per distinct temperature). The result is the **sum over scales** of the per-scale
    losses, as the method adds its scales' losses.

    Samplers (``sampler``):

    * ``"blocks"`` — the public MCSC code's scheme. Each (h, w) map is cut into ``b x b`` blocks,
      ``h // b - 1`` by ``w // b - 1`` of them from the top-left corner (224 with b = 19 gives
      10 x 10 blocks covering 190 x 190; 28 with b = 14 gives one block; the rest is cropped).
      With ``shuffle_blocks`` every map gets its own random block order; block group k gathers
      the k-th block of every map, so one group mixes locations of different images. Groups
      with no foreground (label > 0) are skipped. Per-scale loss: mean over groups of the
      group's mean over all its valid pixels, pixels without a positive counting as 0 (the
      public code's ``loss.mean()``).
    * ``"balanced"`` — per map, up to ``pixels_per_class`` random pixels of every class present;
      with ``max_pixels_per_image`` each map's budget goes to its rarest classes first. One
      segment per scale; per-scale loss: mean over anchors that have a positive.
    * ``"all"`` — every pixel, one segment per scale; mean over anchors. Possible because the
      fused op needs memory linear in the number of pixels.

    Args:
        sampler: ``"blocks"`` | ``"balanced"`` | ``"all"``.
        temperature: one float > 0, or one per scale.
        weighting: ``"prevalence"`` (MCSC's class-balanced denominator) or ``"none"`` (SupCon).
        block_sizes: block side per scale (an int applies to every scale); the paper uses 19 at
            224^2 and 14 at 28^2.
        shuffle_blocks: shuffle the block order of every map (``"blocks"`` only).
        pixels_per_class: K of the ``"balanced"`` sampler.
        max_pixels_per_image: optional budget per map of the ``"balanced"`` sampler.
        ignore_index: label of pixels that are neither anchors nor contrasts.
        published_label_order: ``"blocks"`` only. False (default) pairs every pixel's embedding
            with its own label. True reproduces the public code exactly: within a block group it
            flattens the embeddings map by map (map, y, x) but the labels row by row across maps
            (y, map, x), so with more than one map most pixels carry another pixel's label.
            Only for reproducing the published numbers.
        seed: seed of the module's own generator (block orders, pixel draws): the same seed and
            inputs give the same loss. ``generator`` holds its state (checkpoint it to resume).
        memory_per_class: Q > 0 keeps a pixel memory of Q rows per class and scale (see below);
            0 (default) keeps none. Needs the ``"balanced"`` or ``"all"`` sampler.

    **Pixel memory** (``memory_per_class`` = Q > 0; ContrastiveSeg's per-class pixel queue,
    Wang et al. 2021). For every scale and class the module keeps the last Q sampled pixel
    embeddings of that class as a first-in first-out queue, detached. At a training step
    (``self.training``), per scale:

    1. anchors: the step's sampled pixels A (n rows);
    2. contrasts of anchor i: the other sampled pixels of the step and every stored row of the
       memory as it was before the step (all classes), with the same weighting rules over that
       union; anchors with no positive there take no part. In the op's terms the reference set
       is ``cat([A, memory])`` with ``ref_self_index[i] = i``, so gradient reaches A both as
       anchors and as contrasts and none reaches the memory; with an empty memory the loss
       and its gradient are those of the module without memory;
    3. after the loss is computed, A (detached) is written to the memory, class by class in
       sample order, the oldest rows making room; when one step brings more than Q pixels of a
       class, its last Q (in sample order) are kept.

    The memory follows the first call's embedding width, dtype and number of scales and grows
    when a larger class id appears. Buffers (``state_dict``, ``.to()``): ``memory_embeddings``
    (S, C, Q, D) float, ``memory_count`` (S, C) int64 (rows held), ``memory_position`` (S, C)
    int64 (next slot), empty until the first step. Outside training (``.eval()``) the memory
    is used but not written. ``memory_gather``, when set, maps a scale's (n, D) detached rows
    and (n,) labels to the rows to enqueue: under DistributedDataParallel with per-rank
    losses, :func:`mcsc.training.distributed.gather_memory_rows` makes every rank enqueue all
    ranks' rows, so all memories stay identical (the trainer's
    :class:`~mcsc.training.distributed.DistributedContrastiveLoss` already contrasts the
    gathered global set and needs none). Cost per step and scale: the op runs against
    n + C * Q rows instead of n (time about (1 + C Q / n) times), and the memory holds
    S * C * Q * D floats.

    Call: ``loss(embeddings, labels)`` with ``embeddings`` one (B, D, h, w) float tensor or a
    list of them (one per scale, any h, w, the same B and D; normalise them first if the
    method wants unit vectors), and ``labels`` (B, H, W) integer class ids in [0, C) or
    ``ignore_index``. Returns a scalar tensor of the embeddings' dtype. :attr:`diagnostics`
    then holds a :class:`ContrastiveDiagnostics` of the call.
    """

    def __init__(
        self,
        sampler: str = "blocks",
        temperature: float | Sequence[float] = 0.1,
        weighting: str = "prevalence",
        block_sizes: int | Sequence[int] = (19, 14),
        shuffle_blocks: bool = True,
        pixels_per_class: int = 256,
        max_pixels_per_image: int | None = None,
        ignore_index: int = -1,
        published_label_order: bool = False,
        seed: int = 0,
        memory_per_class: int = 0,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        temperatures = _per_scale(temperature, "temperature", float)
        if any(not value > 0 for value in temperatures):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        sizes = _per_scale(block_sizes, "block_sizes", int)
        if any(size < 1 for size in sizes):
            raise ValueError(f"block_sizes must be positive, got {block_sizes}")
        if pixels_per_class < 1:
            raise ValueError(f"pixels_per_class must be positive, got {pixels_per_class}")
        if max_pixels_per_image is not None and max_pixels_per_image < 1:
            raise ValueError(
                f"max_pixels_per_image must be positive or None, got {max_pixels_per_image}"
            )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if published_label_order and sampler != "blocks":
            raise ValueError(
                f"published_label_order applies to the 'blocks' sampler only, got sampler={sampler!r}"
            )
        self.sampler, self.weighting = sampler, weighting
        self.temperature, self.block_sizes = temperatures, sizes
        self.shuffle_blocks, self.pixels_per_class = bool(shuffle_blocks), int(pixels_per_class)
        self.max_pixels_per_image = max_pixels_per_image
        self.ignore_index, self.published_label_order = (
            int(ignore_index),
            bool(published_label_order),
        )
        if isinstance(memory_per_class, bool) or not isinstance(memory_per_class, numbers.Integral):
            raise TypeError(
                f"memory_per_class must be an int, got {type(memory_per_class).__name__}"
            )
        if memory_per_class < 0:
            raise ValueError(f"memory_per_class must be >= 0, got {memory_per_class}")
        if memory_per_class > 0 and sampler == "blocks":
            raise ValueError(
                "memory_per_class needs the 'balanced' or 'all' sampler: the 'blocks' sampler's "
                "block groups each have their own contrasts, so the memory would be copied into "
                "every group"
            )
        self.generator = torch.Generator().manual_seed(int(seed))
        self.diagnostics: ContrastiveDiagnostics | None = None
        self.memory_per_class = int(memory_per_class)
        self.memory_gather: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None
        if self.memory_per_class:
            self.register_buffer("memory_embeddings", torch.zeros(0, 0, self.memory_per_class, 0))
            self.register_buffer("memory_count", torch.zeros(0, 0, dtype=torch.long))
            self.register_buffer("memory_position", torch.zeros(0, 0, dtype=torch.long))

    def forward(
        self, embeddings: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        """The loss of (B, D, h, w) embeddings (or a list, one per scale) against (B, H, W) labels.

        Returns a scalar of the embeddings' dtype (the sum over scales).
        """
        maps = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
        if not maps:
            raise ValueError("embeddings must be a (B, D, h, w) tensor or a non-empty list of them")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dim() != 3:
            raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        for scale, embedding in enumerate(maps):
            if not isinstance(embedding, torch.Tensor) or embedding.dim() != 4:
                raise ValueError(f"embeddings[{scale}] must be a (B, D, h, w) tensor")
            if embedding.shape[0] != labels.shape[0] or embedding.shape[1] != maps[0].shape[1]:
                raise ValueError(
                    f"embeddings[{scale}] has shape {tuple(embedding.shape)}; every scale needs "
                    f"B={labels.shape[0]} (the labels' batch) and D={maps[0].shape[1]}"
                )
            if embedding.device != labels.device:
                raise ValueError(
                    f"labels are on {labels.device} but embeddings[{scale}] on {embedding.device}"
                )
        labels = labels.long()
        valid = labels[labels != self.ignore_index]
        if bool((valid < 0).any()):
            raise ValueError(
                f"labels must be >= 0 or ignore_index={self.ignore_index}; found {int(valid.min())}"
            )
        num_classes = int(valid.max()) + 1 if valid.numel() else 1
        return self.contrast(
            labels, [EmbeddingMaps([embedding]) for embedding in maps], num_classes
        )

    def contrast(
        self, labels: torch.Tensor, maps: Sequence[EmbeddingMaps], num_classes: int
    ) -> torch.Tensor:
        """The loss of checked inputs: the step that :meth:`forward` and the method's losses share.

        Args:
            labels: (M, H, W) int64 labels of the M maps, in [0, num_classes) or ``ignore_index``.
            maps: per scale, the M embedding maps of that scale (an :class:`EmbeddingMaps`, or any
                object with its ``size``, ``rows`` and ``graph_anchor``, e.g. one that fetches rows
                held by other processes).
            num_classes: C.

        Returns:
            The scalar loss (sum over scales); sets :attr:`diagnostics`.
        """
        temperatures = _align(self.temperature, len(maps), "temperature")
        # block sizes only mean something to the block sampler
        block_sizes = (
            _align(self.block_sizes, len(maps), "block_sizes")
            if self.sampler == "blocks"
            else (0,) * len(maps)
        )
        sets, ignored = [], []
        for position, scale_maps in enumerate(maps):
            targets = resize_labels(labels, scale_maps.size)
            ignored.append((targets == self.ignore_index).sum())
            sample = self._sample(targets, block_sizes[position], num_classes)
            sets.append(
                ScaleSet(
                    scale_maps.rows(sample.rows),
                    sample.labels,
                    sample.lengths,
                    temperatures[position],
                )
            )
        if self.memory_per_class:
            num_classes = self._prepare_memory(sets, num_classes)
        per_scale = self._losses(sets, num_classes)
        if self.memory_per_class and self.training:
            for scale, scale_set in enumerate(sets):
                self._enqueue(scale, scale_set.features.detach(), scale_set.labels)
        device = per_scale.device
        self.diagnostics = ContrastiveDiagnostics(
            sampler=self.sampler,
            loss_per_scale=per_scale.detach(),
            pixels_per_class=torch.stack(
                [torch.bincount(s.labels, minlength=num_classes)[:num_classes] for s in sets]
            ).to(device),
            segments=torch.tensor([s.lengths.numel() for s in sets], device=device),
            ignored=torch.stack(ignored).to(device),
        )
        return per_scale.sum() + sum(scale_maps.graph_anchor() for scale_maps in maps)

    def _sample(self, targets: torch.Tensor, block_size: int, num_classes: int) -> PixelSample:
        """The valid sampled pixels of one scale's (M, h, w) label maps."""
        if self.sampler == "blocks":
            sample = block_rows(
                targets,
                block_size,
                self.shuffle_blocks,
                self.generator,
                self.ignore_index,
                self.published_label_order,
            )
        else:
            if self.sampler == "balanced":
                rows = balanced_rows(
                    targets,
                    self.pixels_per_class,
                    num_classes,
                    self.generator,
                    self.ignore_index,
                    self.max_pixels_per_image,
                )
            else:
                rows = torch.arange(targets.numel(), device=targets.device)
            lengths = torch.tensor([rows.numel()], dtype=torch.long, device=targets.device)
            sample = PixelSample(rows, targets.reshape(-1)[rows], lengths)
        valid = sample.labels != self.ignore_index
        segment = torch.repeat_interleave(
            torch.arange(sample.lengths.numel(), device=valid.device), sample.lengths
        )
        lengths = torch.zeros_like(sample.lengths).index_add(0, segment, valid.long())
        return PixelSample(sample.rows[valid], sample.labels[valid], lengths)

    def _losses(self, sets: Sequence[ScaleSet], num_classes: int) -> torch.Tensor:
        """Per-scale losses (S,) from one supcon_loss call per distinct temperature."""
        device, dtype = sets[0].features.device, sets[0].features.dtype
        per_scale = torch.zeros(len(sets), device=device, dtype=dtype)
        for temperature in dict.fromkeys(s.temperature for s in sets):
            members = [i for i, s in enumerate(sets) if s.temperature == temperature]
            features = torch.cat([sets[i].features for i in members])
            if features.shape[0] == 0:
                continue
            labels = torch.cat([sets[i].labels for i in members])
            lengths = torch.cat([sets[i].lengths for i in members])
            scale_of_segment = torch.cat([torch.full_like(sets[i].lengths, i) for i in members])
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            segment_of_row = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=device), lengths
            )
            reference = {}
            if self.memory_per_class:
                reference = self._memory_reference(
                    members, sets, features, labels, offsets, segment_of_row
                )
            row_loss = supcon_loss(
                features,
                labels,
                temperature=temperature,
                segments=offsets,
                weighting=self.weighting,
                ignore_index=self.ignore_index,
                reduction="none",
                **reference,
            )
            segment_sum = torch.zeros(lengths.numel(), device=device, dtype=row_loss.dtype)
            segment_sum = segment_sum.index_add(0, segment_of_row, row_loss)
            if self.sampler == "blocks":
                # mean over the group's pixels, then mean over the scale's groups
                groups = torch.bincount(scale_of_segment, minlength=len(sets))
                count = lengths.clamp(min=1) * groups[scale_of_segment]
            else:
                # mean over the anchors (rows with a positive among their contrasts) of the scale
                pair = segment_of_row * num_classes + labels
                class_counts = torch.bincount(pair, minlength=lengths.numel() * num_classes)
                positives = class_counts[pair] - 1
                if self.memory_per_class:
                    # the stored rows of the anchor's class in its scale's memory count too
                    positives = (
                        positives + self.memory_count[scale_of_segment[segment_of_row], labels]
                    )
                anchors = torch.zeros_like(lengths).index_add(
                    0, segment_of_row, (positives > 0).long()
                )
                count = anchors.clamp(min=1)
            per_scale = per_scale.index_add(
                0, scale_of_segment, segment_sum / count.to(segment_sum.dtype)
            )
        return per_scale

    # ------------------------------------------------------------------------ pixel memory
    def _prepare_memory(self, sets: Sequence[ScaleSet], num_classes: int) -> int:
        """Allocate the memory at the first step (or grow its classes); returns the class count
        the step's bookkeeping uses (at least the memory's)."""
        scales, width = len(sets), sets[0].features.shape[1]
        reference = sets[0].features
        if self.memory_embeddings.numel() == 0 and self.memory_count.numel() == 0:
            self.memory_embeddings = reference.new_zeros(
                (scales, num_classes, self.memory_per_class, width)
            ).detach()
            self.memory_count = torch.zeros(
                (scales, num_classes), dtype=torch.long, device=reference.device
            )
            self.memory_position = torch.zeros_like(self.memory_count)
        held_scales, held_classes, _, held_width = self.memory_embeddings.shape
        if held_scales != scales or held_width != width:
            raise ValueError(
                f"the pixel memory holds {held_scales} scales of width {held_width}, but this call "
                f"has {scales} scales of width {width}; call reset_memory() to start a new one"
            )
        if self.memory_embeddings.device != reference.device or (
            self.memory_embeddings.dtype != reference.dtype
        ):
            self.memory_embeddings = self.memory_embeddings.to(reference.device, reference.dtype)
            self.memory_count = self.memory_count.to(reference.device)
            self.memory_position = self.memory_position.to(reference.device)
        if num_classes > held_classes:
            extra = num_classes - held_classes
            self.memory_embeddings = torch.cat(
                [
                    self.memory_embeddings,
                    self.memory_embeddings.new_zeros((scales, extra, self.memory_per_class, width)),
                ],
                dim=1,
            )
            self.memory_count = torch.cat(
                [self.memory_count, self.memory_count.new_zeros((scales, extra))], dim=1
            )
            self.memory_position = torch.cat(
                [self.memory_position, self.memory_position.new_zeros((scales, extra))], dim=1
            )
        return max(num_classes, held_classes)

    def _memory_reference(self, members, sets, features, labels, offsets, segment_of_row):
        """The op's reference arguments for one temperature's call: per member scale, its
        sampled rows followed by its whole memory (empty slots carry ``ignore_index``)."""
        classes, capacity = self.memory_embeddings.shape[1:3]
        slot = torch.arange(capacity, device=features.device)
        ref_features, ref_labels, ref_lengths = [], [], []
        for scale in members:
            stored = self.memory_embeddings[scale].to(features.dtype).reshape(-1, features.shape[1])
            held = slot[None, :] < self.memory_count[scale][:, None]  # (C, Q)
            class_of_slot = torch.arange(classes, device=features.device)[:, None].expand(
                classes, capacity
            )
            stored_labels = torch.where(held, class_of_slot, self.ignore_index).reshape(-1)
            ref_features += [sets[scale].features, stored]
            ref_labels += [sets[scale].labels, stored_labels]
            ref_lengths.append(sets[scale].features.shape[0] + stored.shape[0])
        ref_lengths = torch.tensor(ref_lengths, dtype=torch.long, device=features.device)
        ref_offsets = torch.cat([ref_lengths.new_zeros(1), ref_lengths.cumsum(0)])
        # anchor r of segment k is row r - offsets[k] of that segment's part of the reference
        rows = torch.arange(features.shape[0], device=features.device)
        self_index = ref_offsets[segment_of_row] + rows - offsets[segment_of_row]
        return {
            "ref_features": torch.cat(ref_features),
            "ref_labels": torch.cat(ref_labels),
            "ref_segments": ref_offsets,
            "ref_self_index": self_index,
        }

    def _enqueue(self, scale: int, rows: torch.Tensor, labels: torch.Tensor) -> None:
        """Write one scale's (n, D) detached rows with (n,) labels to its per-class queues."""
        if self.memory_gather is not None:
            rows, labels = self.memory_gather(rows, labels)
            rows = rows.detach()
        classes, capacity = self.memory_embeddings.shape[1:3]
        if labels.numel() and int(labels.max()) >= classes:
            raise ValueError(
                f"memory_gather returned label {int(labels.max())} beyond the memory's {classes} "
                f"classes"
            )
        order = torch.argsort(labels, stable=True)  # grouped by class, sample order kept
        sorted_labels = labels[order]
        arrived = torch.bincount(labels, minlength=classes)
        rank = (
            torch.arange(labels.numel(), device=labels.device)
            - (arrived.cumsum(0) - arrived)[sorted_labels]
        )
        # only the newest `capacity` rows of a class can survive this step
        dropped = (arrived - capacity).clamp(min=0)
        keep = rank >= dropped[sorted_labels]
        kept_labels = sorted_labels[keep]
        written = rank[keep] - dropped[kept_labels]
        position = self.memory_position[scale]
        slots = (position[kept_labels] + written) % capacity
        self.memory_embeddings[scale, kept_labels, slots] = rows[order[keep]].to(
            self.memory_embeddings.dtype
        )
        stored = arrived.clamp(max=capacity)
        self.memory_position[scale] = (position + stored) % capacity
        self.memory_count[scale] = (self.memory_count[scale] + stored).clamp(max=capacity)

    def memory_rows(self, scale: int, class_index: int) -> torch.Tensor:
        """The (count, D) rows the memory holds for ``class_index`` at ``scale``, oldest first."""
        if not self.memory_per_class:
            raise ValueError("this loss keeps no pixel memory (memory_per_class=0)")
        if self.memory_count.numel() == 0 or class_index >= self.memory_count.shape[1]:
            width = self.memory_embeddings.shape[-1]
            return self.memory_embeddings.new_zeros((0, width))
        count = int(self.memory_count[scale, class_index])
        capacity = self.memory_per_class
        position = int(self.memory_position[scale, class_index])
        slots = (position - count + torch.arange(count)) % capacity
        return self.memory_embeddings[scale, class_index, slots.to(self.memory_embeddings.device)]

    def reset_memory(self) -> None:
        """Empty the pixel memory (it is allocated again at the next step)."""
        if not self.memory_per_class:
            return
        device = self.memory_count.device
        self.memory_embeddings = torch.zeros(0, 0, self.memory_per_class, 0, device=device)
        self.memory_count = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.memory_position = torch.zeros(0, 0, dtype=torch.long, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the memory's shape is set by the first step: take the saved one before loading
        for name in ("memory_embeddings", "memory_count", "memory_position"):
            key = prefix + name
            if self.memory_per_class and key in state_dict:
                current = getattr(self, name)
                saved = state_dict[key]
                setattr(self, name, current.new_empty(saved.shape, dtype=saved.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of (M, H, W) integer label maps to (M, h, w), as the method does.

    The public MCSC code makes its coarse labels with ``scipy.ndimage.zoom(order=0)``; this is
    the same mapping in torch: output index o of an axis of length n -> m takes input index
    ``floor(o * (n - 1) / (m - 1) + 0.5)`` (first and last pixels aligned, halves rounded up;
    an output axis of length 1 takes index 0). 224 -> 28 takes 0, 8, 17, 25, ..., 223, not
    every 8th pixel. (scipy's default ``mode="constant"`` also writes 0 into the last row or
    column when floating-point rounding puts its coordinate just past the edge, e.g. 64 -> 28;
    that artefact is left out: this equals ``zoom(order=0, mode="nearest")`` on every shape, and
    the default mode at 224 -> 28.) Returns ``labels`` itself when it already has the size.
    """
    size = tuple(int(s) for s in size)
    if tuple(labels.shape[1:]) == size:
        return labels
    rows = _zoom_indices(labels.shape[1], size[0], labels.device)
    columns = _zoom_indices(labels.shape[2], size[1], labels.device)
    return labels[:, rows[:, None], columns[None, :]]


def _zoom_indices(length: int, size: int, device: torch.device) -> torch.Tensor:
    step = (length - 1) / (size - 1) if size > 1 else 1.0
    positions = torch.arange(size, dtype=torch.float64) * step
    return torch.floor(positions + 0.5).long().clamp(max=length - 1).to(device)


def block_rows(
    targets: torch.Tensor,
    block_size: int,
    shuffle: bool,
    generator: torch.Generator,
    ignore_index: int = -1,
    published_label_order: bool = False,
) -> PixelSample:
    """The public code's block groups of (M, h, w) label maps.

    ``rows`` lists group after group, within a group map after map, within a block row-major;
    ``lengths`` (G,) are the kept groups' sizes (groups whose labels are all background or
    ignored are dropped); ``labels`` are the rows' own labels, or with
    ``published_label_order`` the public code's pairing (see :class:`PixelContrastiveLoss`).
    ``rows`` and ``labels`` still contain ignored pixels.
    """
    maps, h, w = targets.shape
    per_h, per_w = h // block_size - 1, w // block_size - 1
    if per_h < 1 or per_w < 1:
        raise ValueError(
            f"block_sizes entry {block_size} leaves no block on a {h}x{w} map (the public scheme "
            f"uses h // block - 1 blocks per side); use a smaller block or another sampler"
        )
    device = targets.device
    count = per_h * per_w
    inner = torch.arange(block_size, device=device)
    corner = (
        torch.arange(per_h, device=device)[:, None] * block_size * w
        + torch.arange(per_w, device=device)[None, :] * block_size
    ).reshape(-1)
    local = (
        corner[:, None] + (inner[:, None] * w + inner[None, :]).reshape(-1)[None, :]
    )  # (count, b*b)
    if shuffle:
        order = torch.argsort(torch.rand(maps, count, generator=generator), dim=1).to(device)
    else:
        order = torch.arange(count, device=device).expand(maps, count)
    # rows[k, m] = pixels of block order[m, k] of map m
    rows = local[order.t()] + (torch.arange(maps, device=device) * h * w)[None, :, None]
    if published_label_order:
        # labels flattened (y, map, x) against features flattened (map, y, x)
        label_rows = (
            rows.reshape(count, maps, block_size, block_size).transpose(1, 2).reshape(count, -1)
        )
    else:
        label_rows = rows.reshape(count, -1)
    rows = rows.reshape(count, -1)
    labels = targets.reshape(-1)[label_rows]
    keep = ((labels != ignore_index) & (labels != 0)).any(dim=1)
    rows, labels = rows[keep], labels[keep]
    lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long, device=device)
    return PixelSample(rows.reshape(-1), labels.reshape(-1), lengths)


def balanced_rows(
    targets: torch.Tensor,
    pixels_per_class: int,
    num_classes: int,
    generator: torch.Generator,
    ignore_index: int = -1,
    max_pixels_per_image: int | None = None,
) -> torch.Tensor:
    """Rows (int64, into the flattened (M, h, w) maps) of up to K random pixels per class per map.

    With ``max_pixels_per_image`` each map's budget is handed out to its classes from the rarest
    (fewest pixels in that map) to the most frequent, each taking ``min(K, available, left)``.
    Rows come out sorted by map, then class; ignored pixels are never drawn.
    """
    maps = targets.shape[0]
    device = targets.device
    flat = targets.reshape(maps, targets[0].numel() if maps else 0)
    valid = flat != ignore_index
    # (map, class) groups; ignored pixels go to one extra group that is never sampled
    group = torch.arange(maps, device=device)[:, None] * num_classes + flat.clamp(min=0)
    group = torch.where(valid, group, maps * num_classes).reshape(-1)
    sizes = torch.bincount(group, minlength=maps * num_classes + 1)
    counts = sizes[:-1].reshape(maps, num_classes)
    quota = counts.clamp(max=pixels_per_class)
    if max_pixels_per_image is not None:
        order = torch.sort(counts, dim=1, stable=True).indices
        wanted = quota.gather(1, order)
        before = wanted.cumsum(1) - wanted
        granted = (max_pixels_per_image - before).clamp(min=0).minimum(wanted)
        quota = torch.zeros_like(quota).scatter(1, order, granted)
    # random rank of every pixel within its group
    noise = torch.rand(group.numel(), generator=generator, dtype=torch.float64).to(device)
    order = torch.argsort(group.double() + noise)
    sorted_group = group[order]
    starts = sizes.cumsum(0) - sizes
    rank = torch.arange(order.numel(), device=device) - starts[sorted_group]
    limit = torch.cat([quota.reshape(-1), quota.new_zeros(1)])
    return order[rank < limit[sorted_group]]


def _per_scale(value, name: str, kind) -> tuple:
    if isinstance(value, numbers.Number):
        return (kind(value),)
    values = tuple(kind(v) for v in value)
    if not values:
        raise ValueError(f"{name} must be a number or a non-empty sequence, got {value!r}")
    return values


def _align(values: tuple, count: int, name: str) -> tuple:
    """A one-element tuple applies to every scale; otherwise one value per used scale."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but {count} scales are used")
    return values
