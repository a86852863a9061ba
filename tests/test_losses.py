"""Multi-scale cross contrastive loss, its samplers, and the segmentation losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from mcsc.losses import (
    DiceLoss,
    MultiScaleContrastiveLoss,
    balanced_rows,
    block_rows,
    cross_teaching_loss,
    pixel,
    sigmoid_rampup,
    supervised_loss,
)

C = 3


def dense_public_supcon(z, y, temperature):
    """The public code's per-block loss, written out densely in float64: prevalence-weighted
    denominator, mean log-probability over positives, mean over *all* rows (0 without positive)."""
    z, n = z.double(), z.shape[0]
    s = z @ z.T / temperature
    same = y[:, None] == y[None, :]
    off_diag = ~torch.eye(n, dtype=torch.bool)
    counts = torch.bincount(y, minlength=C).double()[y]  # n_{y_j}, per column
    weight = 1.0 / (counts[None, :] - same.double())
    den = (torch.exp(s) * weight * off_diag).sum(1)
    positives = same & off_diag
    pos_count = positives.sum(1)
    mean_pos = (s * positives).sum(1) / pos_count.clamp(min=1)
    loss = torch.where(pos_count > 0, torch.log(den) - mean_pos, torch.zeros_like(den))
    return loss.mean()


def make_batch(seed=0, batch=4, labelled=2, sizes=(36, 12), dim=8, size=36):
    """Embeddings per scale, labels and logits; the top-left quarter is background everywhere."""
    g = torch.Generator().manual_seed(seed)
    cnn = [
        F.normalize(torch.randn(batch, dim, s, s, generator=g), dim=1).requires_grad_()
        for s in sizes
    ]
    swin = [
        F.normalize(torch.randn(batch, dim, s, s, generator=g), dim=1).requires_grad_()
        for s in sizes
    ]
    labels = torch.randint(0, C, (labelled, size, size), generator=g)
    cnn_logits = torch.randn(batch, C, size, size, generator=g)
    swin_logits = torch.randn(batch, C, size, size, generator=g)
    half = size // 2
    labels[:, :half, :half] = 0
    cnn_logits[:, 0, :half, :half] += 20
    swin_logits[:, 0, :half, :half] += 20
    return cnn, swin, labels, cnn_logits, swin_logits


def zoom_labels(labels, size):
    """(M, H, W) labels resized as the public code does, with scipy (the independent reference)."""
    factors = (1, size / labels.shape[1], size / labels.shape[2])
    return torch.from_numpy(ndimage.zoom(labels.numpy(), factors, order=0)).long()


def cross_targets(labels, cnn_logits, swin_logits, labelled):
    cnn = torch.cat([labels, swin_logits[labelled:].argmax(1)])
    swin = torch.cat([labels, cnn_logits[labelled:].argmax(1)])
    return cnn, swin


def dense_blocks(cnn_emb, swin_emb, cnn_t, swin_t, block, temperature, order=None, published=False):
    """Straightforward per-block loop: group k takes block order[m][k] of every map m. With
    ``published`` the group's labels are flattened as the public code does: row y of every map,
    then row y + 1 (height first), against features flattened map by map."""
    maps_f = torch.cat([cnn_emb, swin_emb]).detach()
    size = maps_f.shape[-1]
    maps_y = torch.cat([zoom_labels(t, size) for t in (cnn_t, swin_t)])
    per = size // block - 1
    blocks = [(i, j) for i in range(per) for j in range(per)]
    losses = []
    for k in range(len(blocks)):
        zs, ys = [], []
        for m in range(maps_f.shape[0]):
            i, j = blocks[order[m][k]] if order is not None else blocks[k]
            zs.append(
                maps_f[m, :, i * block : (i + 1) * block, j * block : (j + 1) * block]
                .reshape(maps_f.shape[1], -1)
                .T
            )
            ys.append(maps_y[m, i * block : (i + 1) * block, j * block : (j + 1) * block])
        z = torch.cat(zs)
        y = (
            torch.stack(ys).transpose(0, 1).reshape(-1)
            if published
            else torch.cat([v.reshape(-1) for v in ys])
        )
        if y.sum() == 0:
            continue
        losses.append(dense_public_supcon(z, y, temperature))
    return torch.stack(losses).mean(), len(losses)


def test_blocks_equals_dense_per_block_computation():
    cnn, swin, labels, cl, sl = make_batch()
    criterion = MultiScaleContrastiveLoss(
        sampler="blocks", block_sizes=(5, 4), shuffle_blocks=False, temperature=0.1
    )
    loss = criterion(cnn, swin, labels, cl, sl, labelled_count=2)
    diag = criterion.diagnostics
    ct, st = cross_targets(labels, cl, sl, 2)
    expected, groups = zip(
        *(dense_blocks(cnn[s], swin[s], ct, st, b, 0.1) for s, b in ((0, 5), (1, 4)))
    )
    torch.testing.assert_close(loss.double(), sum(expected), rtol=1e-5, atol=1e-6)
    assert diag.segments.tolist() == list(groups)
    assert groups[0] < 36  # 6x6 blocks, the all-background top-left ones are skipped
    assert diag.loss_per_scale.tolist() == pytest.approx([float(e) for e in expected], rel=1e-5)


def test_blocks_shuffled_equals_dense_with_the_same_block_orders():
    cnn, swin, labels, cl, sl = make_batch(seed=1)
    seed = 7
    criterion = MultiScaleContrastiveLoss(
        scales=[0], sampler="blocks", block_sizes=5, temperature=0.2, seed=seed
    )
    loss = criterion(cnn, swin, labels, cl, sl, labelled_count=2)
    diag = criterion.diagnostics
    # documented scheme: one random order per map (4 CNN maps then 4 Swin maps), argsort of uniforms
    order = torch.argsort(
        torch.rand(8, 36, generator=torch.Generator().manual_seed(seed)), dim=1
    ).tolist()
    ct, st = cross_targets(labels, cl, sl, 2)
    expected, groups = dense_blocks(cnn[0], swin[0], ct, st, 5, 0.2, order=order)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert (
        diag.segments.tolist() == [groups] and groups == 36
    )  # shuffling mixes foreground into every group


@pytest.mark.parametrize("scales", [[0], [1]])
def test_published_label_order_equals_the_public_pairing(scales):
    cnn, swin, labels, cl, sl = make_batch(seed=2)
    seed, block = 11, (5, 4)[scales[0]]
    criterion = MultiScaleContrastiveLoss(
        scales=scales, sampler="blocks", block_sizes=block, seed=seed, published_label_order=True
    )
    loss = criterion(cnn, swin, labels, cl, sl, labelled_count=2)
    size = cnn[scales[0]].shape[-1]
    per = size // block - 1
    order = torch.argsort(
        torch.rand(8, per * per, generator=torch.Generator().manual_seed(seed)), dim=1
    ).tolist()
    ct, st = cross_targets(labels, cl, sl, 2)
    expected, groups = dense_blocks(
        cnn[scales[0]], swin[scales[0]], ct, st, block, 0.1, order=order, published=True
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert criterion.diagnostics.segments.tolist() == [groups]
    paired = MultiScaleContrastiveLoss(
        scales=scales, sampler="blocks", block_sizes=block, seed=seed
    )
    assert paired(cnn, swin, labels, cl, sl, labelled_count=2).item() != pytest.approx(
        loss.item(), rel=1e-3
    )


def test_published_label_order_mispairs_pixels_of_different_maps():
    targets = torch.arange(2 * 12 * 12).reshape(2, 12, 12)  # every pixel its own label
    for published in (False, True):
        rows, labels, _ = block_rows(
            targets, 3, shuffle=False, generator=torch.Generator(), published_label_order=published
        )
        own = labels == targets.reshape(-1)[rows]
        if not published:
            assert bool(own.all())
        else:
            # within a group of M = 2 maps of 3x3, position (m, y, x) carries the label of pixel
            # (y', x) of map m' where m * 3 + y = y' * 2 + m': 2 of the 6 block rows keep their own
            assert own.float().mean().item() == pytest.approx(2 / 6)
            assert torch.equal(
                torch.sort(labels).values, torch.sort(targets.reshape(-1)[rows]).values
            )
    with pytest.raises(ValueError, match="published_label_order"):
        MultiScaleContrastiveLoss(sampler="all", published_label_order=True)


def test_block_rows_structure():
    targets = torch.arange(1, 3 * 400 + 1).reshape(3, 20, 20)  # every pixel its own class
    rows, labels, lengths = block_rows(
        targets, 6, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(labels, targets.reshape(-1)[rows])
    # 20 // 6 - 1 = 2 blocks per side from the top-left corner; the rest is cropped
    assert lengths.tolist() == [3 * 36] * 4
    groups = rows.reshape(4, 3, 36)
    for m in range(3):
        taken = groups[:, m].reshape(-1)
        assert torch.equal(
            taken // 400, torch.full_like(taken, m)
        )  # one block of every map per group
        pixels = taken % 400
        assert (
            pixels.unique().numel() == 4 * 36
            and int((pixels // 20).max()) < 12
            and int((pixels % 20).max()) < 12
        )
    with pytest.raises(ValueError, match="leaves no block"):
        block_rows(targets, 11, shuffle=False, generator=torch.Generator())


def test_one_supcon_call_per_distinct_temperature(monkeypatch):
    calls = []
    original = pixel.supcon_loss

    def counting(features, labels, **kwargs):
        calls.append((features.shape[0], kwargs["temperature"], kwargs["segments"].numel() - 1))
        return original(features, labels, **kwargs)

    monkeypatch.setattr(pixel, "supcon_loss", counting)
    cnn, swin, labels, cl, sl = make_batch()
    MultiScaleContrastiveLoss(block_sizes=(5, 4))(cnn, swin, labels, cl, sl, labelled_count=2)
    assert len(calls) == 1 and calls[0][1] == 0.1 and calls[0][2] > 1
    calls.clear()
    MultiScaleContrastiveLoss(block_sizes=(5, 4), temperature=(0.1, 0.5))(
        cnn, swin, labels, cl, sl, 2
    )
    assert sorted(t for _, t, _ in calls) == [0.1, 0.5]


def test_balanced_respects_k_and_rare_classes_first():
    targets = torch.zeros(2, 10, 10, dtype=torch.long)
    targets[:, :3, :] = 1  # 30 pixels of class 1
    targets[:, 9, :2] = 2  # 2 pixels of class 2, 68 of class 0
    targets[1, 5, 5] = -1  # ignored
    g = torch.Generator().manual_seed(0)
    rows = balanced_rows(targets, 10, C, g)
    picked = targets.reshape(-1)[rows]
    maps = rows // 100
    for m in range(2):
        assert torch.bincount(picked[maps == m], minlength=C).tolist() == [10, 10, 2]
    assert rows.unique().numel() == rows.numel() and bool((picked >= 0).all())
    # a budget of 15 per map goes to the rarest classes first: class 2 (2), class 1 (10), class 0 (3)
    rows = balanced_rows(targets, 10, C, g, max_pixels_per_image=15)
    picked, maps = targets.reshape(-1)[rows], rows // 100
    for m in range(2):
        assert torch.bincount(picked[maps == m], minlength=C).tolist() == [3, 10, 2]


def test_balanced_sampler_in_the_loss():
    cnn, swin, labels, cl, sl = make_batch()
    criterion = MultiScaleContrastiveLoss(
        sampler="balanced", pixels_per_class=7, block_sizes=(5, 4)
    )
    loss = criterion(cnn, swin, labels, cl, sl, labelled_count=2)
    diag = criterion.diagnostics
    # 8 maps (4 images x 2 networks), at most 7 pixels per class each, all classes present at 36x36
    assert diag.pixels_per_class[0].tolist() == [8 * 7] * C
    assert all(n <= 8 * 7 for n in diag.pixels_per_class[1].tolist())
    assert diag.segments.tolist() == [1, 1] and torch.isfinite(loss)


def test_all_sampler_is_the_plain_loss_over_every_pixel():
    cnn, swin, labels, cl, sl = make_batch()
    criterion = MultiScaleContrastiveLoss(scales=[1], sampler="all", weighting="none")
    loss = criterion(cnn, swin, labels, cl, sl, labelled_count=2)
    diag = criterion.diagnostics
    ct, st = cross_targets(labels, cl, sl, 2)
    y = torch.cat([zoom_labels(t, 12) for t in (ct, st)])
    z = torch.cat([cnn[1], swin[1]]).permute(0, 2, 3, 1).reshape(-1, 8).double()
    y = y.reshape(-1)
    # standard SupCon (weighting "none"), mean over anchors
    s = z @ z.T / 0.1
    off = ~torch.eye(len(y), dtype=torch.bool)
    positives = (y[:, None] == y[None, :]) & off
    per_row = torch.logsumexp(s.masked_fill(~off, -math.inf), 1) - (s * positives).sum(
        1
    ) / positives.sum(1)
    torch.testing.assert_close(loss.double(), per_row.mean(), rtol=1e-5, atol=1e-6)
    assert diag.rows == 2 * 4 * 144 and int(diag.pixels_per_class[0].sum()) == 2 * 4 * 144


def test_only_labelled_images_and_confidence_threshold():
    cnn, swin, labels, cl, sl = make_batch()
    criterion = MultiScaleContrastiveLoss(scales=[1], sampler="all")
    criterion(cnn, swin, labels, cl, sl, labelled_count=2, use_unlabelled=False)
    assert criterion.diagnostics.rows == 2 * 2 * 144
    threshold = 0.6
    criterion = MultiScaleContrastiveLoss(scales=[1], sampler="all", confidence_threshold=threshold)
    criterion(cnn, swin, labels, cl, sl, labelled_count=2)
    diag = criterion.diagnostics
    low = [zoom_labels((lg[2:].softmax(1).amax(1) < threshold).long(), 12) for lg in (sl, cl)]
    ignored = int(sum(m.sum() for m in low))
    assert 0 < ignored and diag.ignored.tolist() == [ignored] and diag.rows == 2 * 4 * 144 - ignored


def test_determinism_under_a_fixed_seed():
    cnn, swin, labels, cl, sl = make_batch()
    for sampler in ("blocks", "balanced"):
        results = []
        for seed in (3, 3, 4):
            criterion = MultiScaleContrastiveLoss(
                sampler=sampler, block_sizes=(5, 4), pixels_per_class=5, seed=seed
            )
            results.append(
                (
                    criterion(cnn, swin, labels, cl, sl, labelled_count=2).item(),
                    criterion.diagnostics.pixels_per_class.tolist(),
                )
            )
        assert results[0] == results[1]
        assert results[0][0] != results[2][0]


def test_gradient_reaches_both_networks_embeddings():
    cnn, swin, labels, cl, sl = make_batch()
    loss = MultiScaleContrastiveLoss(block_sizes=(5, 4))(
        cnn, swin, labels, cl, sl, labelled_count=2
    )
    loss.backward()
    for e in cnn + swin:
        assert e.grad is not None and e.grad.abs().sum() > 0


def test_contrastive_bad_inputs():
    cnn, swin, labels, cl, sl = make_batch()
    with pytest.raises(ValueError, match="sampler"):
        MultiScaleContrastiveLoss(sampler="random")
    with pytest.raises(ValueError, match="labels must be"):
        MultiScaleContrastiveLoss()(cnn, swin, labels[:1], cl, sl, labelled_count=2)
    with pytest.raises(ValueError, match="ignore_index"):
        MultiScaleContrastiveLoss(ignore_index=1)(cnn, swin, labels, cl, sl, labelled_count=2)
    with pytest.raises(ValueError, match="block_sizes"):
        MultiScaleContrastiveLoss(block_sizes=(5, 4, 3))(
            cnn, swin, labels, cl, sl, labelled_count=2
        )


def test_dice_supervised_and_cross_teaching():
    labels = torch.randint(0, C, (2, 8, 8))
    perfect = F.one_hot(labels, C).permute(0, 3, 1, 2).float()
    assert DiceLoss(C)(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert DiceLoss(C)(1 - perfect, labels).item() == pytest.approx(1.0, abs=1e-6)
    logits = torch.randn(2, C, 8, 8, requires_grad=True)
    expected = 0.5 * (F.cross_entropy(logits, labels) + DiceLoss(C)(logits.softmax(1), labels))
    torch.testing.assert_close(supervised_loss(logits, labels, C), expected)
    other = torch.randn(2, C, 8, 8, requires_grad=True)
    loss = cross_teaching_loss(logits, other)
    torch.testing.assert_close(loss, DiceLoss(C)(logits.softmax(1), other.argmax(1)))
    loss.backward()
    assert other.grad is None and logits.grad.abs().sum() > 0


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 200) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(100, 200) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(500, 200) == 1.0 and sigmoid_rampup(3, 0) == 1.0


@pytest.mark.parametrize("sampler", ["blocks", "balanced", "all"])
def test_no_images_gives_a_zero_loss_that_backpropagates(sampler):
    cnn, swin, _, cl, sl = make_batch()
    criterion = MultiScaleContrastiveLoss(sampler=sampler, block_sizes=(5, 4))
    loss = criterion(cnn, swin, None, cl, sl, labelled_count=0, use_unlabelled=False)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert loss.item() == 0.0 and criterion.diagnostics.rows == 0
    loss.backward()
    assert cnn[0].grad is not None
