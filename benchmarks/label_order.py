"""What the public code's feature/label pairing changes, measured on one realistic batch.

The public MCSC block loss flattens a block group's embeddings map by map (map, y, x) but its
labels row by row across maps (y, map, x). ``MultiScaleContrastiveLoss(published_label_order=True)``
reproduces that pairing; the default pairs every pixel with its own label. This script builds
the paper's step at 224 x 224 (batch 8, 4 labelled, the U-Net and the Swin-UNet with their
projection heads, random weights, the blocks sampler with blocks of 19 and 14, cross
pseudo-labels for the unlabelled images) on synthetic phantom slices and computes, with the
same block shuffles, both losses and their gradients with respect to the embeddings and the
projection heads' weights; then again with every embedding pulled towards a prototype of its
class (``--separations``), standing in for a trained network whose embeddings separate the
classes.

    PYTHONPATH=. python benchmarks/label_order.py [--seed 0] [--threads 2] [--separations 0 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mcsc.data.synthetic import make_case
from mcsc.losses import MultiScaleContrastiveLoss, resize_labels
from mcsc.losses.pixel import block_rows
from mcsc.models import SwinUNet, UNet, build_projection_heads, feature_index

SIZE, BATCH, LABELLED = 224, 8, 4


def phantom_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(8, 1, 224, 224) images and (8, 224, 224) labels: the slice with most foreground of 8 phantoms."""
    images, labels = [], []
    for case in range(BATCH):
        image, label = make_case(seed * 100 + case, size=SIZE, depth=6)
        best = int(np.argmax((label > 0).sum(axis=(1, 2))))
        images.append(torch.from_numpy(image[best]))
        labels.append(torch.from_numpy(label[best]))
    return torch.stack(images)[:, None], torch.stack(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--separations", type=float, nargs="+", default=[0.0, 1.0],
                        help="0: the networks' embeddings as they are; > 0: pulled towards class prototypes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = phantom_batch(args.seed)
    cnn, swin = UNet(), SwinUNet()
    heads = build_projection_heads([16, 128], [96, 192])
    with torch.no_grad():
        a, b = cnn(images), swin(images)
        cnn_features = [a.features[0], a.features[feature_index(cnn, 8)]]
        swin_features = [b.features[0], b.features[feature_index(swin, 8)]]

    criterion = MultiScaleContrastiveLoss(seed=args.seed)
    targets = criterion.targets(labels[:LABELLED], a.logits, b.logits, LABELLED)
    print(f"batch {BATCH} ({LABELLED} labelled) at {SIZE}x{SIZE}, blocks 19 and 14, seed {args.seed}")
    # the loss's draws: one generator, scale after scale
    own_draws, published_draws = (torch.Generator().manual_seed(args.seed) for _ in range(2))
    for size, block in ((224, 19), (28, 14)):
        scale_targets = resize_labels(targets, (size, size))
        own = block_rows(scale_targets, block, True, own_draws)
        swapped = block_rows(scale_targets, block, True, published_draws, published_label_order=True)
        wrong = (swapped.labels != own.labels)[own.labels > 0].float().mean().item()
        print(f"scale {size}x{size}: {wrong:.1%} of the foreground rows carry a wrong label")
    prototypes = torch.nn.functional.normalize(torch.randn(4, 128, generator=torch.Generator().manual_seed(1)), dim=1)
    for separation in args.separations:
        compare(heads, cnn_features, swin_features, labels, a.logits, b.logits, targets, prototypes, separation,
                args.seed)


def compare(heads, cnn_features, swin_features, labels, cnn_logits, swin_logits, targets, prototypes,
            separation: float, seed: int) -> None:
    """Both pairings on the same embeddings; ``separation`` > 0 pulls every pixel's embedding
    towards its class's prototype, standing in for a network that has learnt to separate them."""
    results = {}
    for published in (False, True):
        heads.zero_grad()
        cnn_emb, swin_emb = heads(cnn_features, swin_features)
        if separation > 0:
            pulled = []
            for embedding in cnn_emb + swin_emb:
                own = resize_labels(targets, embedding.shape[2:]).reshape(2, BATCH, *embedding.shape[2:])
                network = len(pulled) // len(cnn_emb)
                pull = prototypes[own[network]].permute(0, 3, 1, 2)
                pulled.append(torch.nn.functional.normalize(embedding + separation * pull, dim=1))
            cnn_emb, swin_emb = pulled[:len(cnn_emb)], pulled[len(cnn_emb):]
        for embedding in cnn_emb + swin_emb:
            embedding.retain_grad()
        criterion = MultiScaleContrastiveLoss(published_label_order=published, seed=seed)
        loss = criterion(cnn_emb, swin_emb, labels[:LABELLED], cnn_logits, swin_logits, labelled_count=LABELLED)
        loss.backward()
        results[published] = {
            "loss": loss.item(),
            "per_scale": criterion.diagnostics.loss_per_scale.tolist(),
            "embedding_grad": torch.cat([e.grad.reshape(-1) for e in cnn_emb + swin_emb]),
            "head_grad": torch.cat([p.grad.reshape(-1) for p in heads.parameters()]),
        }
    paired, published = results[False], results[True]
    scales = ", ".join(f"{own:.4f} vs {theirs:.4f}" for own, theirs in zip(paired["per_scale"], published["per_scale"]))
    print(f"separation {separation:g}: loss {paired['loss']:.4f} (own labels) vs {published['loss']:.4f} "
          f"(published order); per scale {scales}")
    for name in ("embedding_grad", "head_grad"):
        mine, theirs = paired[name], published[name]
        relative = ((theirs - mine).norm() / mine.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(mine, theirs, dim=0).item()
        print(f"  {name}: |g_published - g_own| / |g_own| = {relative:.3f}, cosine {cosine:.3f}")


if __name__ == "__main__":
    main()
