"""Reference rows and memories: ``SupConLoss(ref_emb=...)``, ``CrossBatchMemory`` against
pytorch-metric-learning, and their buffers, state and errors."""

from __future__ import annotations

import io
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import mcsc
from mcsc.losses import supcon as supcon_module

pml = pytest.importorskip("pytorch_metric_learning.losses")

DIM = 6


def dense_two_set(anchors, labels, keys, key_labels, self_index, temperature, prevalence):
    """The per-anchor loss written out pair by pair in float64 (the definition, no masks
    shared with the op): anchor i against every key but ``self_index[i]``."""
    anchors, keys = F.normalize(anchors.double(), dim=1), F.normalize(keys.double(), dim=1)
    losses = []
    for i in range(anchors.shape[0]):
        contrasts = [j for j in range(keys.shape[0]) if j != int(self_index[i])]
        positives = [j for j in contrasts if key_labels[j] == labels[i]]
        if not positives:
            continue
        similarity = {j: float(anchors[i] @ keys[j]) / temperature for j in contrasts}
        counts = {}
        for j in contrasts:
            counts[int(key_labels[j])] = counts.get(int(key_labels[j]), 0) + 1
        weight = {j: 1.0 / counts[int(key_labels[j])] if prevalence else 1.0 for j in contrasts}
        log_denominator = math.log(sum(weight[j] * math.exp(similarity[j]) for j in contrasts))
        losses.append(log_denominator - sum(similarity[j] for j in positives) / len(positives))
    return sum(losses) / max(len(losses), 1)


def stream(seed, sizes, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        yield (
            torch.randn(n, DIM, generator=g, dtype=dtype),
            torch.randint(0, classes, (n,), generator=g),
        )


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}


def assert_gradient_close(ours, theirs):
    """Within 1e-5 (float32) or 1e-9 (float64) of the gradient's scale: element by element
    relative to the largest entry, since float32 entries near 0 are sums that cancel, which
    two implementations round differently."""
    scale = float(theirs.abs().max())
    assert scale > 0
    relative = 1e-5 if theirs.dtype == torch.float32 else 1e-9
    torch.testing.assert_close(ours, theirs, rtol=relative, atol=relative * scale)


# -------------------------------------------------------------------- SupConLoss(ref_emb=...)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ref_grad", [True, False])
def test_supcon_ref_emb_equals_pytorch_metric_learning(dtype, ref_grad):
    g = torch.Generator().manual_seed(3)
    for m, k, classes, temperature in ((12, 40, 3, 0.1), (50, 7, 4, 0.5), (9, 200, 5, 0.07)):
        embeddings = torch.randn(m, DIM, generator=g, dtype=dtype) * 2
        reference = torch.randn(k, DIM, generator=g, dtype=dtype)
        labels = torch.randint(0, classes, (m,), generator=g)
        ref_labels = torch.randint(0, classes, (k,), generator=g)
        results = []
        for loss in (mcsc.SupConLoss(temperature, weighting="none"), pml.SupConLoss(temperature)):
            anchors = embeddings.clone().requires_grad_()
            keys = reference.clone().requires_grad_(ref_grad)
            value = loss(anchors, labels, ref_emb=keys, ref_labels=ref_labels)
            value.backward()
            results.append((value.detach(), anchors.grad, keys.grad))
        (ours, ours_grad, ours_ref_grad), (theirs, theirs_grad, theirs_ref_grad) = results
        assert theirs > 0
        torch.testing.assert_close(ours, theirs, **tolerance(dtype))
        assert_gradient_close(ours_grad, theirs_grad)
        if ref_grad:
            assert theirs_ref_grad.abs().sum() > 0
            assert_gradient_close(ours_ref_grad, theirs_ref_grad)
        else:
            assert ours_ref_grad is None


def test_supcon_ref_emb_never_depends_on_label_identity():
    """PML drops the pairs (i, i) when ``ref_labels is labels``; ours is the same for a copy."""
    g = torch.Generator().manual_seed(4)
    embeddings = torch.randn(20, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (20,), generator=g)
    loss = mcsc.SupConLoss(0.1, weighting="none")
    same = loss(embeddings, labels, ref_emb=embeddings, ref_labels=labels)
    copy = loss(embeddings, labels, ref_emb=embeddings, ref_labels=labels.clone())
    torch.testing.assert_close(same, copy)
    torch.testing.assert_close(
        copy, pml.SupConLoss(0.1)(embeddings, labels, None, embeddings, labels.clone())
    )
    # the quirk we leave out is real in the pinned PML
    assert pml.SupConLoss(0.1)(
        embeddings, labels, None, embeddings, labels
    ).item() != pytest.approx(copy.item(), rel=1e-6)
    # reference rows are all contrasts; without them each row's own pair is excluded
    assert loss(embeddings, labels).item() != pytest.approx(same.item(), rel=1e-6)


def test_supcon_one_class_batch_keeps_its_loss():
    """PML returns 0 when no negative pair exists anywhere; the formula does not."""
    g = torch.Generator().manual_seed(8)
    anchors, keys = torch.randn(5, DIM, generator=g), torch.randn(7, DIM, generator=g)
    labels, key_labels = torch.zeros(5, dtype=torch.long), torch.zeros(7, dtype=torch.long)
    value = mcsc.SupConLoss(0.1, weighting="none")(
        anchors, labels, ref_emb=keys, ref_labels=key_labels
    )
    expected = dense_two_set(anchors, labels, keys, key_labels, torch.full((5,), -1), 0.1, False)
    assert value.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    assert pml.SupConLoss(0.1)(anchors, labels, None, keys, key_labels).item() == 0


def test_supcon_ref_emb_with_segments_and_prevalence():
    g = torch.Generator().manual_seed(5)
    anchors, keys = torch.randn(10, DIM, generator=g), torch.randn(14, DIM, generator=g)
    labels, key_labels = (
        torch.randint(0, 3, (10,), generator=g),
        torch.randint(0, 3, (14,), generator=g),
    )
    loss = mcsc.SupConLoss(0.2, reduction="none")
    per_anchor = loss(
        anchors,
        labels,
        torch.tensor([0, 4, 10]),
        ref_emb=keys,
        ref_labels=key_labels,
        ref_segments=torch.tensor([0, 9, 14]),
    )
    no_self = torch.full((10,), -1)
    for (a0, a1), (k0, k1) in (((0, 4), (0, 9)), ((4, 10), (9, 14))):
        for i in range(a0, a1):
            expected = dense_two_set(
                anchors[i : i + 1],
                labels[i : i + 1],
                keys[k0:k1],
                key_labels[k0:k1],
                no_self,
                0.2,
                True,
            )
            assert per_anchor[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_supcon_reference_argument_errors():
    embeddings, labels = torch.randn(6, DIM), torch.randint(0, 2, (6,))
    loss = mcsc.SupConLoss()
    with pytest.raises(ValueError, match="ref_labels"):
        loss(embeddings, labels, ref_emb=torch.randn(4, DIM))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(embeddings, labels, ref_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(
            embeddings,
            labels,
            ref_emb=torch.randn(4, DIM + 1),
            ref_labels=torch.zeros(4, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="ref_labels"):
        loss(
            embeddings,
            labels,
            ref_emb=torch.randn(4, DIM),
            ref_labels=torch.zeros(3, dtype=torch.long),
        )
    with pytest.raises(TypeError, match="ref_features"):
        loss(
            embeddings,
            labels,
            ref_emb=torch.randn(4, DIM).double(),
            ref_labels=torch.zeros(4, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="ref_segments"):
        loss(
            embeddings,
            labels,
            torch.tensor([0, 6]),
            ref_emb=torch.randn(4, DIM),
            ref_labels=torch.zeros(4, dtype=torch.long),
        )


# ------------------------------------------------------------------------ CrossBatchMemory
# 7 batches through a 20-row queue: wrap-around at the 3rd, a batch as large as the queue, a
# batch that ends exactly at the end, odd sizes
SIZES = (8, 8, 8, 5, 20, 3, 7, 9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_batch_memory_equals_pytorch_metric_learning(dtype):
    ours = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.1, weighting="none"), DIM, 20)
    theirs = pml.CrossBatchMemory(pml.SupConLoss(0.1), DIM, 20)
    wrapped = False
    for embeddings, labels in stream(0, SIZES, dtype=dtype):
        results = []
        for memory in (ours, theirs):
            rows = embeddings.clone().requires_grad_()
            value = memory(rows, labels)
            value.backward()
            results.append((value.detach(), rows.grad))
        wrapped |= ours.has_been_filled
        (value, grad), (expected, expected_grad) = results
        assert expected > 0
        torch.testing.assert_close(value, expected, **tolerance(dtype))
        assert_gradient_close(grad, expected_grad)
        assert (ours.queue_idx, ours.has_been_filled) == (theirs.queue_idx, theirs.has_been_filled)
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)
    assert wrapped and ours.embedding_memory.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_batch_memory_enqueue_mask_equals_pytorch_metric_learning(dtype):
    ours = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.2, weighting="none"), DIM, 16)
    theirs = pml.CrossBatchMemory(pml.SupConLoss(0.2), DIM, 16)
    g = torch.Generator().manual_seed(7)
    for embeddings, labels in stream(1, (12, 10, 14, 12, 9, 16, 11), dtype=dtype):
        mask = torch.rand(len(labels), generator=g) < 0.5
        mask[0], mask[-1] = True, False  # something to enqueue and something to anchor
        results = []
        for memory in (ours, theirs):
            rows = embeddings.clone().requires_grad_()
            value = memory(rows, labels, enqueue_mask=mask)
            value.backward()
            results.append((value.detach(), rows.grad))
        (value, grad), (expected, expected_grad) = results
        torch.testing.assert_close(value, expected, **tolerance(dtype))
        assert_gradient_close(grad, expected_grad)
        assert (
            grad[mask].abs().sum() == 0
        )  # enqueued rows are not anchors and the queue is detached
        assert (ours.queue_idx, ours.has_been_filled) == (theirs.queue_idx, theirs.has_been_filled)
    assert ours.has_been_filled


def test_cross_batch_memory_one_row_batch_excludes_its_own_copy():
    """PML's wrap-around test ``end <= start`` holds for one row: it keeps the self pair."""
    ours = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.1, weighting="none"), DIM, 10)
    theirs = pml.CrossBatchMemory(pml.SupConLoss(0.1), DIM, 10)
    for embeddings, labels in stream(2, (6,)):
        ours(embeddings, labels)
        theirs(embeddings, labels)
    row, label = torch.randn(1, DIM, dtype=torch.float64), torch.tensor([2])
    stored = ours.embedding_memory[:6].clone()
    stored_labels = ours.label_memory[:6].clone()
    assert (stored_labels == 2).any()
    value = ours(row, label)
    # the row against the rows stored before it: its own copy (slot 6) is not a contrast
    expected = pml.SupConLoss(0.1)(row, label, None, stored, stored_labels)
    torch.testing.assert_close(value, expected)
    assert theirs(row, label).item() != pytest.approx(value.item(), rel=1e-6)


def test_cross_batch_memory_prevalence_equals_the_definition():
    memory = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.3), DIM, 12)
    for step, (embeddings, labels) in enumerate(stream(3, (5, 5, 5, 4))):
        slots = (torch.arange(len(labels)) + memory.queue_idx) % 12
        value = memory(embeddings, labels)
        stored = memory.stored
        expected = dense_two_set(
            embeddings,
            labels,
            memory.embedding_memory[:stored],
            memory.label_memory[:stored],
            slots,
            0.3,
            True,
        )
        assert value.item() == pytest.approx(expected, rel=1e-9), step


@pytest.mark.parametrize("normalize", [True, False])
def test_cross_batch_memory_accumulates_gradients_over_calls(normalize):
    """Two calls, one backward: the second call's write must not break the first's graph."""
    batches = list(stream(9, (6, 6, 6)))
    grads = []
    for deferred in (True, False):
        memory = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.5, normalize=normalize), DIM, 10)
        rows = [F.normalize(e, dim=1).requires_grad_() for e, _ in batches]
        values = []
        for row, (_, labels) in zip(rows, batches):
            values.append(memory(row, labels))
            if not deferred:
                values[-1].backward()
        if deferred:  # gradient accumulation: one backward after all calls
            sum(values).backward()
        grads.append([r.grad for r in rows])
    for deferred, immediate in zip(*grads):
        assert deferred.abs().sum() > 0
        torch.testing.assert_close(deferred, immediate)


def test_cross_batch_memory_never_builds_the_batch_by_memory_matrix(monkeypatch):
    calls = []
    real = supcon_module.supcon_loss

    def spy(features, labels, **kwargs):
        calls.append((tuple(features.shape), tuple(kwargs["ref_features"].shape)))
        return real(features, labels, **kwargs)

    monkeypatch.setattr(supcon_module, "supcon_loss", spy)
    memory = mcsc.CrossBatchMemory(mcsc.SupConLoss(), DIM, 30)
    for embeddings, labels in stream(4, (8, 8, 8, 8)):
        memory(embeddings, labels)
    assert calls == [
        ((8, DIM), (8, DIM)),
        ((8, DIM), (16, DIM)),
        ((8, DIM), (24, DIM)),
        ((8, DIM), (30, DIM)),
    ]


def test_cross_batch_memory_buffers_move_and_round_trip():
    first = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.1, weighting="none"), DIM, 20)
    assert set(first.state_dict()) == {"embedding_memory", "label_memory", "_extra_state"}
    batches = list(stream(5, (8, 8, 8, 6, 9, 8)))
    for embeddings, labels in batches[:3]:
        first(embeddings, labels)
    assert first.embedding_memory.dtype == torch.float64  # followed its input
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.1, weighting="none"), DIM, 20)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert (second.queue_idx, second.has_been_filled) == (4, True)
    assert torch.equal(second.embedding_memory, first.embedding_memory)
    for embeddings, labels in batches[3:]:
        assert first(embeddings, labels).item() == second(embeddings, labels).item()
    moved = second.to(torch.float32)
    assert moved.embedding_memory.dtype == torch.float32 and moved.label_memory.dtype == torch.long
    second.reset_queue()
    assert second.stored == 0 and second.embedding_memory.abs().sum() == 0
    # an empty queue: the batch contrasts against itself only (the single-set loss)
    embeddings, labels = batches[0]
    torch.testing.assert_close(
        second(embeddings.float(), labels),
        mcsc.SupConLoss(0.1, weighting="none")(embeddings.float(), labels),
    )


def test_cross_batch_memory_empty_enqueue_changes_nothing():
    memory = mcsc.CrossBatchMemory(mcsc.SupConLoss(0.1, weighting="none"), DIM, 20)
    embeddings, labels = next(stream(6, (6,)))
    memory(embeddings, labels)
    anchors, anchor_labels = next(stream(7, (4,)))
    value = memory(anchors, anchor_labels, enqueue_mask=torch.zeros(4, dtype=torch.bool))
    assert (memory.queue_idx, memory.has_been_filled) == (6, False)
    expected = pml.SupConLoss(0.1)(anchors, anchor_labels, None, embeddings, labels)
    torch.testing.assert_close(value, expected)


def test_cross_batch_memory_bad_input():
    loss = mcsc.SupConLoss()
    with pytest.raises(ValueError, match="memory_size"):
        mcsc.CrossBatchMemory(loss, DIM, 0)
    with pytest.raises(ValueError, match="embedding_size"):
        mcsc.CrossBatchMemory(loss, 0, 8)
    with pytest.raises(TypeError, match="loss"):
        mcsc.CrossBatchMemory(pml.SupConLoss(), DIM, 8)
    memory = mcsc.CrossBatchMemory(loss, DIM, 8)
    labels = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="memory_size"):
        memory(torch.randn(9, DIM), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding_size"):
        memory(torch.randn(5, DIM + 1), labels)
    with pytest.raises(ValueError, match="labels"):
        memory(torch.randn(5, DIM), labels[:4])
    with pytest.raises(TypeError, match="enqueue_mask"):
        memory(torch.randn(5, DIM), labels, enqueue_mask=torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="enqueue_mask"):
        memory(torch.randn(5, DIM), labels, enqueue_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="enqueue_mask"):
        memory(
            torch.randn(12, DIM),
            torch.zeros(12, dtype=torch.long),
            enqueue_mask=torch.ones(12, dtype=torch.bool),
        )
    # a rejected batch leaves the queue as it was
    memory(torch.randn(5, DIM), torch.tensor([0, 1, 0, 1, 2]))
    before = memory.embedding_memory.clone(), memory.label_memory.clone(), memory.queue_idx
    with pytest.raises(ValueError, match="labels"):
        memory(torch.randn(5, DIM), torch.tensor([0, -3, 1, 1, 0]))
    with pytest.raises(ValueError, match="NaN"):
        memory(torch.full((5, DIM), float("nan")), torch.tensor([0, 1, 1, 0, 2]))
    assert torch.equal(memory.embedding_memory, before[0]) and torch.equal(
        memory.label_memory, before[1]
    )
    assert memory.queue_idx == before[2]


# --------------------------------------------------------------------------- pixel memory
def pixel_batch(seed, batch=2, dim=4, sizes=((4, 6), (2, 3)), classes=3, dtype=torch.float64):
    """Unit embedding maps per scale and (B, 4, 6) labels with a few ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    maps = [
        F.normalize(torch.randn(batch, dim, h, w, generator=g, dtype=dtype), dim=1).requires_grad_()
        for h, w in sizes
    ]
    labels = torch.randint(0, classes, (batch,) + sizes[0], generator=g)
    labels[0, 0, :2] = -1
    return maps, labels


def scale_rows(embedding, labels, ignore_index=-1):
    """The 'all' sampler's rows of one scale: every valid pixel in (map, y, x) order."""
    targets = mcsc.losses.resize_labels(labels, embedding.shape[2:]).reshape(-1)
    rows = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    valid = targets != ignore_index
    return rows[valid], targets[valid]


def dense_memory_loss(anchors, labels, stored, stored_labels, temperature, prevalence):
    """The memory loss of one scale, densely with autograd: keys = cat(anchors, stored), each
    anchor's own key excluded, mean over anchors with a positive."""
    keys = torch.cat([anchors, stored])
    key_labels = torch.cat([labels, stored_labels])
    n = anchors.shape[0]
    similarity = anchors @ keys.T / temperature
    contrast = torch.ones_like(similarity, dtype=torch.bool)
    contrast[torch.arange(n), torch.arange(n)] = False
    same = (labels[:, None] == key_labels[None, :]) & contrast
    if prevalence:
        counts = contrast[:, :, None] & (key_labels[None, :, None] == key_labels[None, None, :])
        per_class = (counts & contrast[:, None, :]).sum(2).to(similarity.dtype)
        weight = 1.0 / per_class.clamp(min=1)
    else:
        weight = torch.ones_like(similarity)
    terms = torch.where(contrast, weight * torch.exp(similarity), torch.zeros_like(similarity))
    positives = same.sum(1)
    mean_positive = (similarity * same).sum(1) / positives.clamp(min=1)
    per_anchor = torch.log(terms.sum(1)) - mean_positive
    anchor = positives > 0
    return per_anchor[anchor].sum() / anchor.sum().clamp(min=1)


def memory_loss(capacity=6, **options):
    options = {"sampler": "all", "temperature": 0.2, **options}
    return mcsc.PixelContrastiveLoss(memory_per_class=capacity, **options)


@pytest.mark.parametrize("weighting", ["prevalence", "none"])
def test_pixel_memory_loss_equals_the_dense_definition(weighting):
    loss = memory_loss(weighting=weighting)
    history = {}
    for step in range(4):
        maps, labels = pixel_batch(step)
        before = [
            [loss.memory_rows(scale, c).clone() for c in range(3)] if step else []
            for scale in range(2)
        ]
        value = loss(maps, labels)
        value.backward()
        copies = [m.detach().clone().requires_grad_() for m in maps]
        expected = 0
        for scale, embedding in enumerate(copies):
            anchors, anchor_labels = scale_rows(embedding, labels)
            stored = torch.cat(before[scale]) if step else anchors.new_zeros((0, 4))
            stored_labels = (
                torch.cat([torch.full((len(r),), c) for c, r in enumerate(before[scale])])
                if step
                else torch.zeros(0, dtype=torch.long)
            )
            expected = expected + dense_memory_loss(
                anchors, anchor_labels, stored, stored_labels, 0.2, weighting == "prevalence"
            )
        expected.backward()
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
        for mine, theirs in zip(maps, copies):
            assert theirs.grad.abs().sum() > 0
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-12)
        history[step] = value.item()
    # the memory changes the loss: a module without it differs after the first step
    plain = mcsc.PixelContrastiveLoss(sampler="all", temperature=0.2, weighting=weighting)
    maps, labels = pixel_batch(0)
    assert plain(maps, labels).item() == pytest.approx(history[0], rel=1e-12)
    maps, labels = pixel_batch(3)
    assert plain(maps, labels).item() != pytest.approx(history[3], rel=1e-4)


def test_pixel_memory_is_fifo_per_class_with_capacity():
    capacity = 5
    loss = memory_loss(capacity)
    arrived = {(scale, c): [] for scale in range(2) for c in range(3)}
    for step in range(5):
        maps, labels = pixel_batch(10 + step)
        loss(maps, labels)
        for scale, embedding in enumerate(maps):
            rows, row_labels = scale_rows(embedding.detach(), labels)
            for c in range(3):
                arrived[scale, c] += list(rows[row_labels == c])
            for c in range(3):
                held = loss.memory_rows(scale, c)
                expected = arrived[scale, c][-capacity:]
                assert held.shape[0] == len(expected) == min(capacity, len(arrived[scale, c]))
                if expected:
                    torch.testing.assert_close(held, torch.stack(expected), rtol=0, atol=0)
    assert loss.memory_embeddings.shape == (2, 3, capacity, 4)
    assert not loss.memory_embeddings.requires_grad and loss.memory_embeddings.grad_fn is None
    assert int(loss.memory_count.max()) == capacity  # more than capacity arrived


def test_pixel_memory_keeps_the_newest_rows_of_a_large_step():
    loss = memory_loss(3)
    maps, labels = pixel_batch(20, sizes=((4, 6),))
    loss(maps, labels)
    rows, row_labels = scale_rows(maps[0].detach(), labels)
    for c in range(3):
        torch.testing.assert_close(
            loss.memory_rows(0, c), rows[row_labels == c][-3:], rtol=0, atol=0
        )
    arrived = [int((row_labels == c).sum()) for c in range(3)]
    assert max(arrived) > 3  # a class brought more than the capacity
    # the next write goes after the newest row: min(arrived, capacity) slots from 0
    assert loss.memory_position.tolist() == [[min(n, 3) % 3 for n in arrived]]
    assert loss.memory_count.tolist() == [[min(n, 3) for n in arrived]]


def test_pixel_memory_state_dict_eval_and_growth():
    loss = memory_loss(4, sampler="balanced", pixels_per_class=3, seed=5)
    assert "memory_embeddings" in loss.state_dict()
    for step in range(3):
        loss(*pixel_batch(30 + step))
    saved = {k: v.clone() for k, v in loss.state_dict().items()}
    twin = memory_loss(4, sampler="balanced", pixels_per_class=3, seed=5)
    twin.load_state_dict(saved)
    twin.generator.set_state(loss.generator.get_state())
    for step in range(3, 5):
        maps, labels = pixel_batch(30 + step)
        assert loss(maps, labels).item() == twin(maps, labels).item()
    assert torch.equal(loss.memory_embeddings, twin.memory_embeddings)
    # outside training the memory is read, not written
    frozen = loss.memory_embeddings.clone()
    loss.eval()
    loss(*pixel_batch(40))
    assert torch.equal(loss.memory_embeddings, frozen)
    loss.train()
    # a larger class id grows the memory, the stored rows stay
    kept = [loss.memory_rows(0, c).clone() for c in range(3)]
    maps, labels = pixel_batch(41, classes=5)
    loss.eval()
    loss(maps, labels)  # read with the grown class count, nothing written
    loss.train()
    for c in range(3):
        torch.testing.assert_close(loss.memory_rows(0, c), kept[c], rtol=0, atol=0)
    loss(maps, labels)
    assert loss.memory_embeddings.shape[:2] == (2, 5)
    assert (loss.memory_count[:, 3:] > 0).any()
    moved = loss.to(torch.float32)
    assert moved.memory_embeddings.dtype == torch.float32 and moved.memory_count.dtype == torch.long
    loss.reset_memory()
    assert loss.memory_embeddings.numel() == 0
    maps, labels = pixel_batch(42)
    loss(maps, labels)
    assert loss.memory_embeddings.shape[:2] == (2, 3)


def test_pixel_memory_bad_settings():
    with pytest.raises(ValueError, match="memory_per_class"):
        mcsc.PixelContrastiveLoss(sampler="blocks", memory_per_class=4)
    with pytest.raises(ValueError, match="memory_per_class"):
        mcsc.PixelContrastiveLoss(sampler="all", memory_per_class=-1)
    with pytest.raises(TypeError, match="memory_per_class"):
        mcsc.PixelContrastiveLoss(sampler="all", memory_per_class=2.5)
    with pytest.raises(ValueError, match="memory_per_class"):
        mcsc.PixelContrastiveLoss(sampler="all").memory_rows(0, 0)
    assert "memory_embeddings" not in mcsc.PixelContrastiveLoss(sampler="all").state_dict()
    loss = memory_loss()
    loss(*pixel_batch(50))
    with pytest.raises(ValueError, match="reset_memory"):
        loss(*pixel_batch(51, sizes=((4, 6),)))


# ---------------------------------------------------------------- the trainer's config key
def test_trainer_config_key_for_the_pixel_memory(tmp_path):
    from mcsc_fixtures import tiny_config

    from mcsc.training.config import Config, preset
    from mcsc.training.trainer import Trainer

    assert Config().loss.contrastive_memory_per_class == 0
    assert preset("acdc", "paper").loss.contrastive_memory_per_class == 0
    for bad in (-1, 2.5, True):
        config = tiny_config()
        config.loss.contrastive_memory_per_class = bad
        with pytest.raises(ValueError, match="contrastive_memory_per_class"):
            config.validate()
    config = tiny_config()
    config.loss.contrastive_sampler = "blocks"
    config.loss.contrastive_memory_per_class = 8
    with pytest.raises(ValueError, match="contrastive_sampler"):
        config.validate()

    config = tiny_config(iterations=3)
    config.set("loss.contrastive_memory_per_class=16")
    config.validate()
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.fit()
    pixel = trainer.losses["contrastive"].loss.pixel_loss  # inside the DDP-ready wrapper
    assert pixel.memory_per_class == 16
    assert pixel.memory_count.sum() > 0 and int(pixel.memory_count.max()) <= 16


def test_a_resumed_run_continues_with_the_pixel_memory(tmp_path):
    """The pixel memory is training state: it is saved in the checkpoints, so a run resumed
    halfway ends with the same memory and the same weights as one run straight through."""
    from mcsc_fixtures import tiny_config

    from mcsc.training import TrainingStopped
    from mcsc.training.trainer import Trainer

    def config(iterations):
        settings = tiny_config(iterations=iterations)
        settings.set("loss.contrastive_memory_per_class=16")
        settings.validate()
        return settings

    def pixel_loss(trainer):
        return trainer.losses["contrastive"].loss.pixel_loss

    class StoppedAfterTwoSteps(Trainer):
        def train_step(self, batch, iteration):
            logs = super().train_step(batch, iteration)
            if iteration == 1:  # stop politely after the second step: it is checkpointed
                os.kill(os.getpid(), signal.SIGUSR1)
            return logs

    straight = Trainer(config(4), tmp_path / "straight", progress=False)
    straight.fit()
    with pytest.raises(TrainingStopped):
        StoppedAfterTwoSteps(config(4), tmp_path / "halves", progress=False).fit()
    resumed = Trainer(config(4), tmp_path / "halves", resume="auto", progress=False)
    resumed.fit()
    assert resumed.iteration == straight.iteration == 4
    for name, value in pixel_loss(straight).state_dict().items():
        assert torch.equal(pixel_loss(resumed).state_dict()[name], value), name
    for name, model in straight.models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(resumed.models[name].state_dict()[key], value), (name, key)
