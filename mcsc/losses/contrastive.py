"""The multi-scale cross supervised contrastive loss of MCSC, built on :class:`PixelContrastiveLoss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mcsc.losses.pixel import (
    ContrastiveDiagnostics,
    EmbeddingMaps,
    PixelContrastiveLoss,
)


class MultiScaleContrastiveLoss(nn.Module):
    """Cross supervised contrastive loss over CNN and Swin embeddings at several scales.

    For every scale the CNN and the Swin embeddings of the same images are pooled into one set
    of maps (all CNN maps, then all Swin maps, as in the public code). Labelled images carry
    their ground truth (both networks); unlabelled images carry **cross** pseudo-labels: CNN
    pixels take the Swin-UNet's prediction and Swin pixels the U-Net's. The label maps are made
    at full resolution and the rest is :class:`mcsc.losses.PixelContrastiveLoss` (label
    resizing to each scale, the samplers ``blocks`` / ``balanced`` / ``all``, one
    :func:`mcsc.supcon_loss` call per distinct temperature, the sum over scales). The public code
    adds its two scales' losses and weighs the sum by 0.001 in each network's loss.

    Args:
        scales: indices into the embedding lists given to ``forward`` that take part; ``None``
            uses every entry. With heads built as in :func:`mcsc.models.build_projection_heads`'s
            docstring, entry 0 is the full-resolution level and entry 1 the 1/8 level.
        sampler, temperature, weighting, block_sizes, shuffle_blocks, pixels_per_class,
            max_pixels_per_image, ignore_index, published_label_order, seed, memory_per_class:
            as in :class:`PixelContrastiveLoss` (one map there is one network's map of one
            image here; per-scale values follow ``scales``; the pixel memory, off by default,
            holds both networks' sampled pixels of each scale).
        confidence_threshold: if set, pseudo-labelled pixels whose teacher's softmax maximum is
            below it become ``ignore_index`` (neither anchors nor contrasts).

    The module's random state is ``generator`` (checkpoint it for an exact resume); after a call,
    :attr:`diagnostics` describes it (:class:`mcsc.losses.ContrastiveDiagnostics`).
    """

    def __init__(
        self,
        scales: Sequence[int] | None = None,
        sampler: str = "blocks",
        temperature: float | Sequence[float] = 0.1,
        weighting: str = "prevalence",
        block_sizes: int | Sequence[int] = (19, 14),
        shuffle_blocks: bool = True,
        pixels_per_class: int = 256,
        max_pixels_per_image: int | None = None,
        confidence_threshold: float | None = None,
        ignore_index: int = -1,
        published_label_order: bool = False,
        seed: int = 0,
        memory_per_class: int = 0,
    ):
        super().__init__()
        if scales is not None:
            scales = tuple(int(s) for s in scales)
            if not scales or len(set(scales)) != len(scales):
                raise ValueError(f"scales must be distinct indices, got {scales}")
        if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(
                f"confidence_threshold must be in [0, 1] or None, got {confidence_threshold}"
            )
        self.scales, self.confidence_threshold = scales, confidence_threshold
        self.pixel_loss = PixelContrastiveLoss(
            sampler=sampler,
            temperature=temperature,
            weighting=weighting,
            block_sizes=block_sizes,
            shuffle_blocks=shuffle_blocks,
            pixels_per_class=pixels_per_class,
            max_pixels_per_image=max_pixels_per_image,
            ignore_index=ignore_index,
            published_label_order=published_label_order,
            seed=seed,
            memory_per_class=memory_per_class,
        )

    @property
    def generator(self) -> torch.Generator:
        """The random generator of the pixel sampling."""
        return self.pixel_loss.generator

    @property
    def diagnostics(self) -> ContrastiveDiagnostics | None:
        """What the last call did (None before the first)."""
        return self.pixel_loss.diagnostics

    def forward(
        self,
        cnn_embeddings: Sequence[torch.Tensor],
        swin_embeddings: Sequence[torch.Tensor],
        labels: torch.Tensor | None,
        cnn_logits: torch.Tensor,
        swin_logits: torch.Tensor,
        labelled_count: int,
        use_unlabelled: bool = True,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            cnn_embeddings, swin_embeddings: per scale, (B, D, h_s, w_s) float embeddings
                (L2-normalised projections) of the B images; both networks' maps of one scale
                have the same shape.
            labels: (labelled_count, H, W) integer ground truth of the first ``labelled_count``
                images (values in [0, C) or ``ignore_index``), or None when there are none.
            cnn_logits, swin_logits: (B, C, H, W) full-resolution float predictions of all B
                images; only the unlabelled ones are used (detached) for the cross pseudo-labels.
            labelled_count: how many of the B images (the first ones) are labelled.
            use_unlabelled: False leaves the unlabelled images out (the public code does so
                before iteration 3000).

        Returns:
            The scalar loss (sum over scales), of the embeddings' dtype.
        """
        scales = self.select_scales(cnn_embeddings, swin_embeddings, cnn_logits.shape[0])
        targets = self.targets(labels, cnn_logits, swin_logits, labelled_count, use_unlabelled)
        images = targets.shape[0] // 2
        maps = [
            EmbeddingMaps([cnn_embeddings[s][:images], swin_embeddings[s][:images]]) for s in scales
        ]
        return self.pixel_loss.contrast(targets, maps, cnn_logits.shape[1])

    def select_scales(
        self,
        cnn_embeddings: Sequence[torch.Tensor],
        swin_embeddings: Sequence[torch.Tensor],
        batch: int,
    ) -> tuple[int, ...]:
        """Check the per-scale (batch, D, h, w) embedding lists; returns the used scale indices."""
        if len(cnn_embeddings) == 0 or len(cnn_embeddings) != len(swin_embeddings):
            raise ValueError(
                f"cnn_embeddings and swin_embeddings must be non-empty lists of equal length, got "
                f"{len(cnn_embeddings)} and {len(swin_embeddings)}"
            )
        scales = self.scales if self.scales is not None else tuple(range(len(cnn_embeddings)))
        if any(not -len(cnn_embeddings) <= s < len(cnn_embeddings) for s in scales):
            raise ValueError(
                f"scales {scales} index outside the {len(cnn_embeddings)} embeddings given"
            )
        for s in scales:
            cnn, swin = cnn_embeddings[s], swin_embeddings[s]
            if cnn.dim() != 4 or cnn.shape != swin.shape or cnn.shape[0] != batch:
                raise ValueError(
                    f"cnn_embeddings[{s}] and swin_embeddings[{s}] must both be (B={batch}, D, h, w), "
                    f"got {tuple(cnn.shape)} and {tuple(swin.shape)}"
                )
            if cnn.shape[1] != cnn_embeddings[scales[0]].shape[1]:
                raise ValueError(
                    f"all embeddings must have the same channel count, got {cnn.shape[1]} at scale {s}"
                )
        return scales

    def targets(
        self,
        labels: torch.Tensor | None,
        cnn_logits: torch.Tensor,
        swin_logits: torch.Tensor,
        labelled_count: int,
        use_unlabelled: bool = True,
    ) -> torch.Tensor:
        """Full-resolution labels of the contrasted maps: (2 * images, H, W) int64.

        Rows ``[0, images)`` are the CNN maps' targets, rows ``[images, 2 * images)`` the Swin
        maps' (ground truth, then cross pseudo-labels), where ``images`` is B, or
        ``labelled_count`` when not ``use_unlabelled``. Arguments as in :meth:`forward`.
        """
        if cnn_logits.dim() != 4 or cnn_logits.shape != swin_logits.shape:
            raise ValueError(
                f"cnn_logits and swin_logits must both be (B, C, H, W), got {tuple(cnn_logits.shape)} "
                f"and {tuple(swin_logits.shape)}"
            )
        batch, num_classes = cnn_logits.shape[:2]
        ignore_index = self.pixel_loss.ignore_index
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a class index (num_classes={num_classes})"
            )
        if not 0 <= labelled_count <= batch:
            raise ValueError(f"labelled_count must be in [0, {batch}], got {labelled_count}")
        images = batch if use_unlabelled else labelled_count
        cnn_parts, swin_parts = [], []
        if labelled_count > 0:
            if labels is None:
                raise ValueError(f"labels is None but labelled_count={labelled_count}")
            expected = (labelled_count,) + tuple(cnn_logits.shape[2:])
            if tuple(labels.shape) != expected:
                raise ValueError(
                    f"labels must be (labelled_count, H, W) = {expected}, got {tuple(labels.shape)}"
                )
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
            if bool(bad.any()):
                raise ValueError(
                    f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}"
                )
            truth = labels.to(device=cnn_logits.device, dtype=torch.long)
            cnn_parts.append(truth)
            swin_parts.append(truth)
        if images > labelled_count:
            # the CNN is taught by the Swin-UNet's prediction and vice versa
            cnn_parts.append(self._pseudo_labels(swin_logits[labelled_count:images]))
            swin_parts.append(self._pseudo_labels(cnn_logits[labelled_count:images]))
        if not cnn_parts:
            return torch.empty(
                (0,) + tuple(cnn_logits.shape[2:]), dtype=torch.long, device=cnn_logits.device
            )
        return torch.cat(cnn_parts + swin_parts)

    def _pseudo_labels(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        confidence, prediction = teacher_logits.detach().float().softmax(dim=1).max(dim=1)
        if self.confidence_threshold is not None:
            prediction = prediction.masked_fill(
                confidence < self.confidence_threshold, self.pixel_loss.ignore_index
            )
        return prediction
