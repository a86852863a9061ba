"""The multi-scale cross supervised contrastive loss of MCSC, built on :func:`mcsc.supcon_loss`."""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mcsc.ops import supcon_loss

SAMPLERS = ("blocks", "balanced", "all")


class MultiScaleContrastiveLoss(nn.Module):
    """Cross supervised contrastive loss over CNN and Swin embeddings at several scales.

    For every scale the CNN and the Swin embeddings of the same images are pooled into one set.
    Labelled images carry their ground truth (both networks); unlabelled images carry **cross**
    pseudo-labels: CNN pixels take the Swin-UNet's prediction and Swin pixels the U-Net's. Label
    maps are computed at full resolution and resized to each scale with nearest-neighbour
    sampling. Pixels are then sampled (see below), all scales and groups are concatenated into
    one features / labels / segments set, and :func:`mcsc.supcon_loss` runs **once** per distinct
    temperature. The returned loss is the **sum over scales** of the per-scale losses (the public
    code adds its two scales' losses and weighs the sum by 0.001 in the trainer).

    Samplers (``sampler``):

    * ``"blocks"`` — the public code's scheme. Each (h, w) map is cut into ``b x b`` blocks,
      ``h // b - 1`` by ``w // b - 1`` of them from the top-left corner (the public code's count:
      224 with b = 19 gives 10 x 10 blocks covering 190 x 190; 28 with b = 14 gives one block;
      the rest is cropped). With ``shuffle_blocks`` every map (each network's map of each image,
      as in the public code) gets its own random block order; block group k gathers the k-th block
      of every map, so one group mixes locations of different slices. Groups with no
      foreground label are skipped. Per-scale loss: mean over groups of the group's mean loss
      over all its (non-ignored) pixels, pixels without a positive counting as 0 — the public
      code's ``loss.mean()``.
    * ``"balanced"`` — per image and network, up to ``pixels_per_class`` random pixels of every
      class present; with ``max_pixels_per_image`` the budget goes to the rarest classes of
      that map first (a frequent class is cut before a rare one). All sampled pixels of a scale
      form one segment; per-scale loss: mean over anchors that have a positive.
    * ``"all"`` — every pixel of every image, one segment per scale; mean over anchors. Only
      possible because the fused op is O(N) in memory.

    Args:
        scales: indices into the embedding lists given to ``forward`` that take part; ``None``
            uses every entry. With heads built as in :func:`mcsc.models.build_projection_heads`'s
            docstring, entry 0 is the full-resolution level and entry 1 the 1/8 level.
        sampler: ``"blocks"`` (default, the paper) | ``"balanced"`` | ``"all"``.
        temperature: one float, or one per used scale.
        weighting: ``"prevalence"`` (MCSC's class-balanced denominator, default) or ``"none"``.
        block_sizes: block side per used scale (an int applies to all); the paper: 19 at 224^2
            and 14 at 28^2.
        shuffle_blocks: shuffle the block order of every map (``"blocks"`` only).
        pixels_per_class: K of the ``"balanced"`` sampler.
        max_pixels_per_image: optional budget per image and network of the ``"balanced"`` sampler.
        confidence_threshold: if set, pseudo-labelled pixels whose teacher's softmax maximum is
            below it become ``ignore_index`` (neither anchors nor contrasts).
        ignore_index: label of pixels to leave out; must lie outside [0, num_classes).
        seed: seed of the module's own random generator (block shuffles, pixel sampling); two
            modules with the same seed and inputs give identical results.
    """

    def __init__(self, scales: Sequence[int] | None = None, sampler: str = "blocks",
                 temperature: float | Sequence[float] = 0.1, weighting: str = "prevalence",
                 block_sizes: int | Sequence[int] = (19, 14), shuffle_blocks: bool = True,
                 pixels_per_class: int = 256, max_pixels_per_image: int | None = None,
                 confidence_threshold: float | None = None, ignore_index: int = -1, seed: int = 0):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if weighting not in ("prevalence", "none"):
            raise ValueError(f"weighting must be 'prevalence' or 'none', got {weighting!r}")
        if scales is not None:
            scales = tuple(int(s) for s in scales)
            if not scales or len(set(scales)) != len(scales):
                raise ValueError(f"scales must be distinct indices, got {scales}")
        temperatures = _per_scale(temperature, "temperature", float)
        if any(not t > 0 for t in temperatures):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        sizes = _per_scale(block_sizes, "block_sizes", int)
        if any(b < 1 for b in sizes):
            raise ValueError(f"block_sizes must be positive, got {block_sizes}")
        if pixels_per_class < 1:
            raise ValueError(f"pixels_per_class must be positive, got {pixels_per_class}")
        if max_pixels_per_image is not None and max_pixels_per_image < 1:
            raise ValueError(f"max_pixels_per_image must be positive or None, got {max_pixels_per_image}")
        if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] or None, got {confidence_threshold}")
        self.scales, self.sampler, self.weighting = scales, sampler, weighting
        self.temperature, self.block_sizes = temperatures, sizes
        self.shuffle_blocks, self.pixels_per_class = bool(shuffle_blocks), int(pixels_per_class)
        self.max_pixels_per_image = max_pixels_per_image
        self.confidence_threshold, self.ignore_index = confidence_threshold, int(ignore_index)
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, cnn_embeddings: Sequence[torch.Tensor], swin_embeddings: Sequence[torch.Tensor],
                labels: torch.Tensor | None, cnn_logits: torch.Tensor, swin_logits: torch.Tensor,
                labelled_count: int, use_unlabelled: bool = True) -> tuple[torch.Tensor, dict]:
        """Compute the loss.

        Args:
            cnn_embeddings, swin_embeddings: per scale, (B, D, h_s, w_s) float embeddings
                (L2-normalised projections) of the B images; both networks' maps of one scale
                have the same shape.
            labels: (labelled_count, H, W) integer ground truth of the first ``labelled_count``
                images (values in [0, C) or ``ignore_index``), or None when there are none.
            cnn_logits, swin_logits: (B, C, H, W) full-resolution predictions of all B images;
                only the unlabelled ones are used (detached) to build the cross pseudo-labels.
            labelled_count: how many of the B images (the first ones) are labelled.
            use_unlabelled: False leaves the unlabelled images out (the public code does so
                before iteration 3000).

        Returns:
            ``(loss, diagnostics)``: the scalar loss (sum over scales) and a dict with
            ``sampler``, ``loss_per_scale`` (floats), ``pixels_per_class`` (per scale, rows
            entering the loss per class), ``segments`` (per scale), ``ignored`` (per scale,
            pixels dropped as ``ignore_index``) and ``rows`` (total rows of the set).
        """
        cnn_embeddings, swin_embeddings = list(cnn_embeddings), list(swin_embeddings)
        scales = self._check_inputs(cnn_embeddings, swin_embeddings, labels, cnn_logits, swin_logits,
                                    labelled_count)
        num_classes = cnn_logits.shape[1]
        images = cnn_logits.shape[0] if use_unlabelled else labelled_count
        cnn_targets, swin_targets = self._cross_targets(labels, cnn_logits, swin_logits, labelled_count, images)

        def select_rows(scale: int, rows: torch.Tensor) -> torch.Tensor:
            cnn, swin = cnn_embeddings[scale][:images], swin_embeddings[scale][:images]
            # map order as in the public code: all CNN maps, then all Swin maps
            return torch.cat([cnn, swin]).permute(0, 2, 3, 1).reshape(-1, cnn.shape[1])[rows]

        return self.contrast_sampled_rows(cnn_embeddings, swin_embeddings, scales, cnn_targets,
                                          swin_targets, num_classes, select_rows)

    def contrast_sampled_rows(self, cnn_embeddings: list[torch.Tensor], swin_embeddings: list[torch.Tensor],
                              scales: Sequence[int], cnn_targets: torch.Tensor, swin_targets: torch.Tensor,
                              num_classes: int, select_rows) -> tuple[torch.Tensor, dict]:
        """Sample every scale's rows, fetch their embeddings and run the op: the part of
        :meth:`forward` that the distributed wrapper shares (it fetches rows across ranks).

        Args:
            cnn_embeddings, swin_embeddings: per scale, (b, D, h_s, w_s) maps (only their sizes,
                and their place in the autograd graph, are used here).
            scales: the entries of the embedding lists that take part.
            cnn_targets, swin_targets: (images, H, W) int64 labels of every image in the set:
                the CNN maps' targets and the Swin maps' targets (cross pseudo-labels included).
            num_classes: C.
            select_rows: ``select_rows(scale, rows) -> (len(rows), D)`` embeddings of the sampled
                ``rows``, which index the scale's maps of all ``images`` images (all CNN maps,
                then all Swin maps) flattened pixel by pixel.

        Returns:
            ``(loss, diagnostics)`` as :meth:`forward`.
        """
        temperatures = _align(self.temperature, len(scales), "temperature")
        # block sizes only mean something to the block sampler
        block_sizes = _align(self.block_sizes, len(scales), "block_sizes") if self.sampler == "blocks" \
            else (0,) * len(scales)
        pieces = []
        diagnostics = {"sampler": self.sampler, "loss_per_scale": [], "pixels_per_class": [], "segments": [],
                       "ignored": [], "rows": 0}
        for position, s in enumerate(scales):
            size = tuple(cnn_embeddings[s].shape[2:])
            targets = torch.cat([_resize_labels(cnn_targets, size), _resize_labels(swin_targets, size)])
            rows, lengths = self._sample(targets, block_sizes[position], num_classes)
            flat = targets.reshape(-1)[rows]
            valid = flat != self.ignore_index
            diagnostics["ignored"].append(int((targets == self.ignore_index).sum()))
            lengths = _segment_valid_counts(valid, lengths)
            rows, flat = rows[valid], flat[valid]
            pieces.append((select_rows(s, rows), flat, lengths, temperatures[position]))
            diagnostics["pixels_per_class"].append(torch.bincount(flat, minlength=num_classes).tolist())
            diagnostics["segments"].append(int(lengths.numel()))
            diagnostics["rows"] += int(flat.numel())

        per_scale = self._losses(pieces, num_classes)
        diagnostics["loss_per_scale"] = [float(v) for v in per_scale.detach()]
        # `0 * sum` keeps every embedding map in the graph even when none of its rows was sampled
        loss = per_scale.sum() + 0.0 * sum(e.sum() for e in cnn_embeddings[:1] + swin_embeddings[:1])
        return loss, diagnostics

    def _check_inputs(self, cnn_embeddings, swin_embeddings, labels, cnn_logits, swin_logits,
                      labelled_count) -> tuple[int, ...]:
        if len(cnn_embeddings) == 0 or len(cnn_embeddings) != len(swin_embeddings):
            raise ValueError(f"cnn_embeddings and swin_embeddings must be non-empty lists of equal length, got "
                             f"{len(cnn_embeddings)} and {len(swin_embeddings)}")
        scales = self.scales if self.scales is not None else tuple(range(len(cnn_embeddings)))
        if any(not -len(cnn_embeddings) <= s < len(cnn_embeddings) for s in scales):
            raise ValueError(f"scales {scales} index outside the {len(cnn_embeddings)} embeddings given")
        if cnn_logits.dim() != 4 or cnn_logits.shape != swin_logits.shape:
            raise ValueError(f"cnn_logits and swin_logits must both be (B, C, H, W), got {tuple(cnn_logits.shape)} "
                             f"and {tuple(swin_logits.shape)}")
        batch, num_classes = cnn_logits.shape[:2]
        if 0 <= self.ignore_index < num_classes:
            raise ValueError(f"ignore_index={self.ignore_index} is a class index (num_classes={num_classes})")
        for s in scales:
            c, w = cnn_embeddings[s], swin_embeddings[s]
            if c.dim() != 4 or c.shape != w.shape or c.shape[0] != batch:
                raise ValueError(f"cnn_embeddings[{s}] and swin_embeddings[{s}] must both be (B={batch}, D, h, w), "
                                 f"got {tuple(c.shape)} and {tuple(w.shape)}")
            if c.shape[1] != cnn_embeddings[scales[0]].shape[1]:
                raise ValueError(f"all embeddings must have the same channel count, got {c.shape[1]} at scale {s}")
        if not 0 <= labelled_count <= batch:
            raise ValueError(f"labelled_count must be in [0, {batch}], got {labelled_count}")
        if labelled_count > 0:
            if labels is None:
                raise ValueError(f"labels is None but labelled_count={labelled_count}")
            expected = (labelled_count,) + tuple(cnn_logits.shape[2:])
            if tuple(labels.shape) != expected:
                raise ValueError(f"labels must be (labelled_count, H, W) = {expected}, got {tuple(labels.shape)}")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
            bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= num_classes))
            if bool(bad.any()):
                raise ValueError(f"labels must be in [0, {num_classes}) or ignore_index={self.ignore_index}")
        return scales

    def _cross_targets(self, labels, cnn_logits, swin_logits, labelled_count, images):
        """Full-resolution targets (images, H, W) int64 of the CNN and the Swin pixels."""
        parts_cnn, parts_swin = [], []
        if labelled_count > 0 and images > 0:
            truth = labels[:images].to(device=cnn_logits.device, dtype=torch.long)
            parts_cnn.append(truth)
            parts_swin.append(truth)
        if images > labelled_count:
            # the CNN is taught by the Swin-UNet's prediction and vice versa
            cnn_teacher = swin_logits[labelled_count:images].detach().float().softmax(dim=1)
            swin_teacher = cnn_logits[labelled_count:images].detach().float().softmax(dim=1)
            parts_cnn.append(self._pseudo_labels(cnn_teacher))
            parts_swin.append(self._pseudo_labels(swin_teacher))
        if not parts_cnn:
            empty = torch.empty((0,) + tuple(cnn_logits.shape[2:]), dtype=torch.long, device=cnn_logits.device)
            return empty, empty
        return torch.cat(parts_cnn), torch.cat(parts_swin)

    def _pseudo_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        confidence, prediction = probabilities.max(dim=1)
        if self.confidence_threshold is not None:
            prediction = prediction.masked_fill(confidence < self.confidence_threshold, self.ignore_index)
        return prediction

    def _sample(self, targets: torch.Tensor, block_size: int, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (into the flattened (maps * h * w) set) and segment lengths of one scale."""
        if self.sampler == "blocks":
            return block_rows(targets, block_size, self.shuffle_blocks, self.generator, self.ignore_index)
        if self.sampler == "balanced":
            rows = balanced_rows(targets, self.pixels_per_class, num_classes, self.generator, self.ignore_index,
                                 self.max_pixels_per_image)
        else:
            rows = torch.arange(targets.numel(), device=targets.device)
        return rows, torch.tensor([rows.numel()], dtype=torch.long, device=targets.device)

    def _losses(self, pieces, num_classes: int) -> torch.Tensor:
        """Per-scale losses (S,) from one supcon_loss call per distinct temperature."""
        device = pieces[0][0].device
        per_scale = torch.zeros(len(pieces), device=device, dtype=pieces[0][0].dtype)
        for temperature in dict.fromkeys(t for *_, t in pieces):
            members = [i for i, piece in enumerate(pieces) if piece[3] == temperature]
            features = torch.cat([pieces[i][0] for i in members])
            if features.shape[0] == 0:
                continue
            labels = torch.cat([pieces[i][1] for i in members])
            lengths = torch.cat([pieces[i][2] for i in members])
            scale_of_segment = torch.cat([torch.full_like(pieces[i][2], i) for i in members])
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            row_loss = supcon_loss(features, labels, temperature=temperature, segments=offsets,
                                   weighting=self.weighting, ignore_index=self.ignore_index, reduction="none")
            segment_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
            segment_sum = torch.zeros(lengths.numel(), device=device, dtype=row_loss.dtype)
            segment_sum = segment_sum.index_add(0, segment_of_row, row_loss)
            if self.sampler == "blocks":
                # mean over the group's pixels, then mean over the scale's groups
                groups = torch.bincount(scale_of_segment, minlength=len(pieces))
                weight = 1.0 / (lengths.clamp(min=1) * groups[scale_of_segment])
            else:
                # mean over the anchors (rows with a positive in their segment) of the scale
                pair = segment_of_row * num_classes + labels
                class_counts = torch.bincount(pair, minlength=lengths.numel() * num_classes)
                anchors = torch.zeros_like(lengths).index_add(0, segment_of_row, (class_counts[pair] > 1).long())
                weight = 1.0 / anchors.clamp(min=1)
            per_scale = per_scale.index_add(0, scale_of_segment, segment_sum * weight.to(segment_sum.dtype))
        return per_scale


def block_rows(targets: torch.Tensor, block_size: int, shuffle: bool, generator: torch.Generator,
               ignore_index: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and group lengths of the public code's block scheme for (M, h, w) label maps.

    Returns ``rows`` (int64, into the M * h * w flattened maps) listing group after group,
    within a group map after map and within a block row-major; and ``lengths`` (G,) int64 of
    the kept groups (groups whose labels are all background or ignored are dropped).
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
    rows = rows.reshape(count, -1)
    labels = targets.reshape(-1)[rows]
    keep = ((labels != ignore_index) & (labels != 0)).any(dim=1)
    rows = rows[keep]
    return rows.reshape(-1), torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long, device=device)


def balanced_rows(targets: torch.Tensor, pixels_per_class: int, num_classes: int, generator: torch.Generator,
                  ignore_index: int = -1, max_pixels_per_image: int | None = None) -> torch.Tensor:
    """Rows (int64, into the flattened (M, h, w) maps) of up to K random pixels per class per map.

    With ``max_pixels_per_image`` each map's budget is handed out to its classes from the rarest
    (fewest pixels in that map) to the most frequent, each taking ``min(K, available, left)``.
    Rows come out sorted by map, then class.
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


def _resize_labels(targets: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(targets.shape[1:]) == size:
        return targets
    return F.interpolate(targets[:, None].float(), size=size, mode="nearest")[:, 0].long()


def _segment_valid_counts(valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    return torch.zeros_like(lengths).index_add(0, segment, valid.long())


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
