"""Pixel supervised contrastive loss for any segmentation network, built on :func:`mcsc.supcon_loss`.

:class:`PixelContrastiveLoss` takes embedding maps (one per scale) and a label map, resizes the
labels to every scale, samples pixels with one of three samplers and runs the fused op once per
distinct temperature. :class:`mcsc.losses.MultiScaleContrastiveLoss` (the method's cross
two-network loss) is built on its :meth:`PixelContrastiveLoss.contrast` step.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
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
            if not isinstance(part, torch.Tensor) or part.dim() != 4 or part.shape[1:] != first.shape[1:]:
                raise ValueError(f"embedding maps must be (B, D, h, w) tensors of one D, h, w, got "
                                 f"{[tuple(p.shape) for p in self.parts]}")

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

    Call: ``loss(embeddings, labels)`` with ``embeddings`` one (B, D, h, w) float tensor or a
    list of them (one per scale, any h, w, the same B and D; normalise them first if the
    method wants unit vectors), and ``labels`` (B, H, W) integer class ids in [0, C) or
    ``ignore_index``. Returns a scalar tensor of the embeddings' dtype. :attr:`diagnostics`
    then holds a :class:`ContrastiveDiagnostics` of the call.
    """

    def __init__(self, sampler: str = "blocks", temperature: float | Sequence[float] = 0.1,
                 weighting: str = "prevalence", block_sizes: int | Sequence[int] = (19, 14),
                 shuffle_blocks: bool = True, pixels_per_class: int = 256, max_pixels_per_image: int | None = None,
                 ignore_index: int = -1, published_label_order: bool = False, seed: int = 0):
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
            raise ValueError(f"max_pixels_per_image must be positive or None, got {max_pixels_per_image}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if published_label_order and sampler != "blocks":
            raise ValueError(f"published_label_order applies to the 'blocks' sampler only, got sampler={sampler!r}")
        self.sampler, self.weighting = sampler, weighting
        self.temperature, self.block_sizes = temperatures, sizes
        self.shuffle_blocks, self.pixels_per_class = bool(shuffle_blocks), int(pixels_per_class)
        self.max_pixels_per_image = max_pixels_per_image
        self.ignore_index, self.published_label_order = int(ignore_index), bool(published_label_order)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.diagnostics: ContrastiveDiagnostics | None = None

    def forward(self, embeddings: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
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
                raise ValueError(f"embeddings[{scale}] has shape {tuple(embedding.shape)}; every scale needs "
                                 f"B={labels.shape[0]} (the labels' batch) and D={maps[0].shape[1]}")
            if embedding.device != labels.device:
                raise ValueError(f"labels are on {labels.device} but embeddings[{scale}] on {embedding.device}")
        labels = labels.long()
        valid = labels[labels != self.ignore_index]
        if bool((valid < 0).any()):
            raise ValueError(f"labels must be >= 0 or ignore_index={self.ignore_index}; found {int(valid.min())}")
        num_classes = int(valid.max()) + 1 if valid.numel() else 1
        return self.contrast(labels, [EmbeddingMaps([embedding]) for embedding in maps], num_classes)

    def contrast(self, labels: torch.Tensor, maps: Sequence[EmbeddingMaps], num_classes: int) -> torch.Tensor:
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
        block_sizes = _align(self.block_sizes, len(maps), "block_sizes") if self.sampler == "blocks" \
            else (0,) * len(maps)
        sets, ignored = [], []
        for position, scale_maps in enumerate(maps):
            targets = resize_labels(labels, scale_maps.size)
            ignored.append((targets == self.ignore_index).sum())
            sample = self._sample(targets, block_sizes[position], num_classes)
            sets.append(ScaleSet(scale_maps.rows(sample.rows), sample.labels, sample.lengths, temperatures[position]))
        per_scale = self._losses(sets, num_classes)
        device = per_scale.device
        self.diagnostics = ContrastiveDiagnostics(
            sampler=self.sampler,
            loss_per_scale=per_scale.detach(),
            pixels_per_class=torch.stack([torch.bincount(s.labels, minlength=num_classes)[:num_classes]
                                          for s in sets]).to(device),
            segments=torch.tensor([s.lengths.numel() for s in sets], device=device),
            ignored=torch.stack(ignored).to(device),
        )
        return per_scale.sum() + sum(scale_maps.graph_anchor() for scale_maps in maps)

    def _sample(self, targets: torch.Tensor, block_size: int, num_classes: int) -> PixelSample:
        """The valid sampled pixels of one scale's (M, h, w) label maps."""
        if self.sampler == "blocks":
            sample = block_rows(targets, block_size, self.shuffle_blocks, self.generator, self.ignore_index,
                                self.published_label_order)
        else:
            if self.sampler == "balanced":
                rows = balanced_rows(targets, self.pixels_per_class, num_classes, self.generator, self.ignore_index,
                                     self.max_pixels_per_image)
            else:
                rows = torch.arange(targets.numel(), device=targets.device)
            lengths = torch.tensor([rows.numel()], dtype=torch.long, device=targets.device)
            sample = PixelSample(rows, targets.reshape(-1)[rows], lengths)
        valid = sample.labels != self.ignore_index
        segment = torch.repeat_interleave(torch.arange(sample.lengths.numel(), device=valid.device), sample.lengths)
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
            row_loss = supcon_loss(features, labels, temperature=temperature, segments=offsets,
                                   weighting=self.weighting, ignore_index=self.ignore_index, reduction="none")
            segment_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
            segment_sum = torch.zeros(lengths.numel(), device=device, dtype=row_loss.dtype)
            segment_sum = segment_sum.index_add(0, segment_of_row, row_loss)
            if self.sampler == "blocks":
                # mean over the group's pixels, then mean over the scale's groups
                groups = torch.bincount(scale_of_segment, minlength=len(sets))
                weight = 1.0 / (lengths.clamp(min=1) * groups[scale_of_segment])
            else:
                # mean over the anchors (rows with a positive in their segment) of the scale
                pair = segment_of_row * num_classes + labels
                class_counts = torch.bincount(pair, minlength=lengths.numel() * num_classes)
                anchors = torch.zeros_like(lengths).index_add(0, segment_of_row, (class_counts[pair] > 1).long())
                weight = 1.0 / anchors.clamp(min=1)
            per_scale = per_scale.index_add(0, scale_of_segment, segment_sum * weight.to(segment_sum.dtype))
        return per_scale


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


def block_rows(targets: torch.Tensor, block_size: int, shuffle: bool, generator: torch.Generator,
               ignore_index: int = -1, published_label_order: bool = False) -> PixelSample:
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
        raise ValueError(f"block_sizes entry {block_size} leaves no block on a {h}x{w} map (the public scheme "
                         f"uses h // block - 1 blocks per side); use a smaller block or another sampler")
    device = targets.device
    count = per_h * per_w
    inner = torch.arange(block_size, device=device)
    corner = (torch.arange(per_h, device=device)[:, None] * block_size * w
              + torch.arange(per_w, device=device)[None, :] * block_size).reshape(-1)
    local = corner[:, None] + (inner[:, None] * w + inner[None, :]).reshape(-1)[None, :]  # (count, b*b)
    if shuffle:
        order = torch.argsort(torch.rand(maps, count, generator=generator), dim=1).to(device)
    else:
        order = torch.arange(count, device=device).expand(maps, count)
    # rows[k, m] = pixels of block order[m, k] of map m
    rows = local[order.t()] + (torch.arange(maps, device=device) * h * w)[None, :, None]
    if published_label_order:
        # labels flattened (y, map, x) against features flattened (map, y, x)
        label_rows = rows.reshape(count, maps, block_size, block_size).transpose(1, 2).reshape(count, -1)
    else:
        label_rows = rows.reshape(count, -1)
    rows = rows.reshape(count, -1)
    labels = targets.reshape(-1)[label_rows]
    keep = ((labels != ignore_index) & (labels != 0)).any(dim=1)
    rows, labels = rows[keep], labels[keep]
    lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long, device=device)
    return PixelSample(rows.reshape(-1), labels.reshape(-1), lengths)


def balanced_rows(targets: torch.Tensor, pixels_per_class: int, num_classes: int, generator: torch.Generator,
                  ignore_index: int = -1, max_pixels_per_image: int | None = None) -> torch.Tensor:
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
