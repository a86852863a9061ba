"""Inputs and expected values shared by the tests of the fused op: the contract every backend
passes (test_supcon_contract.py), the backend-specific tests (test_supcon_op.py for the CPU,
test_cuda.py on a GPU, test_cuda_emulated.py for the CUDA kernels emulated on the CPU), the
property-based tests (test_supcon_properties.py) and the compute-sanitizer case."""

from __future__ import annotations

from typing import NamedTuple

import torch

from mcsc import supcon_loss
from mcsc.reference import supcon_per_anchor_reference

TEMPERATURE = 0.1
IGNORE = -1

# (segment lengths, D, classes, fraction of ignored rows). Lengths straddle the 64-row tile
# (63, 64, 65, 129), include empty and one-row segments, and one segment is longer than the
# 1024 labels classify_rows stages at a time; D straddles the 32-column staging slice and the
# 128-column backward output chunk.
CASES = {
    "one-segment": ([200], 16, 3, 0.0),
    "varlen-empty-segments": ([0, 70, 0, 129, 1, 64, 0], 33, 4, 0.1),
    "one-class": ([97], 8, 1, 0.0),
    "many-classes-wide": ([300], 130, 40, 0.0),
    "ignored-rows": ([63, 65], 64, 3, 0.3),
    "deep": ([150], 257, 5, 0.05),
    "long-segment": ([1100, 30], 8, 3, 0.05),
}


def make_inputs(
    lengths, dim, num_classes, ignored, *, dtype=torch.float32, seed=0, device="cpu", max_norm=None
):
    """Features (N, D), labels (N,) int64 with IGNORE rows, offsets (S + 1,) int64.

    The features are unit rows, or with ``max_norm`` rows of norms uniform in
    [0.2, 1] * max_norm; N = sum(lengths) and the segments have the given lengths.
    """
    generator = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    features = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    features = torch.nn.functional.normalize(features, dim=1)
    if max_norm is not None:
        features *= max_norm * (
            0.2 + 0.8 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
        )
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < ignored] = IGNORE
    offsets = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)
    return (features.to(device=device, dtype=dtype), labels.to(device), offsets.to(device))


def misaligned_copy(features):
    """The same values, contiguous, starting one element past a 16-byte boundary (the CUDA
    kernels then read rows with scalar instead of vector loads)."""
    storage = torch.zeros(features.numel() + 1, dtype=features.dtype, device=features.device)
    shifted = storage[1:].view(features.shape).copy_(features)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    return shifted


def reference_loss_and_grad(
    features, labels, offsets, prevalence, upstream, temperature=TEMPERATURE, *, exact=True
):
    """The dense reference's per-anchor loss (N,), positives (N,) int64 and gradient
    d(sum upstream * loss)/dz (N, D): in float64 on the CPU (``exact``), or else eager PyTorch at
    the features' own dtype and device, the baseline of the 2x rule below."""
    if exact:
        features, labels, offsets = features.cpu().double(), labels.cpu(), offsets.cpu()
        upstream = upstream.cpu().double()
    z = features.detach().clone().requires_grad_(True)
    loss, positives = supcon_per_anchor_reference(
        z, labels, offsets, temperature, prevalence, IGNORE
    )
    grad = None
    if loss.requires_grad:  # not when no segment has a row
        (grad,) = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), z, allow_unused=True)
    return loss.detach(), positives, torch.zeros_like(z) if grad is None else grad


def scaled_atol(reference, relative):
    return relative * max(1.0, float(reference.abs().max())) if reference.numel() else relative


def assert_within_twice_eager_error(
    loss, grad, features, labels, offsets, upstream, prevalence=True, temperature=TEMPERATURE
):
    """Flash attention's rule for reduced precision: the kernel's error against float64 on the
    same (already rounded) inputs is at most twice that of eager PyTorch run at the inputs'
    dtype, plus a hair (relative to the result's size) for cases eager gets exact."""
    eager_loss, _, eager_grad = reference_loss_and_grad(
        features, labels, offsets, prevalence, upstream, temperature, exact=False
    )
    truth_loss, _, truth_grad = reference_loss_and_grad(
        features, labels, offsets, prevalence, upstream, temperature
    )
    for name, value, eager, truth in (
        ("loss", loss, eager_loss, truth_loss),
        ("grad", grad, eager_grad, truth_grad),
    ):
        assert bool(torch.isfinite(value).all()), f"{name} is not finite"
        if truth.numel() == 0:
            continue
        error = float((value.detach().cpu().double() - truth).abs().max())
        eager_error = float((eager.cpu().double() - truth).abs().max())
        assert error <= 2 * eager_error + 1e-6 * scaled_atol(truth, 1.0), (name, error, eager_error)


def assert_compiled_matches_eager(features, labels, segments=None, backend="aot_eager"):
    """torch.compile(fullgraph=True) of normalise + supcon_loss gives eager's loss and gradient."""

    def step(z):
        return supcon_loss(
            torch.nn.functional.normalize(z, dim=1),
            labels,
            segments=segments,
            temperature=TEMPERATURE,
        )

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_z = features.clone().requires_grad_(True)
    compiled_z = features.clone().requires_grad_(True)
    eager = step(eager_z)
    eager.backward()
    result = compiled(compiled_z)
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)


# ---- The reference set (anchors against separate key rows) ------------------------------------

# name -> options of make_reference_inputs. Key sets much larger and much smaller than the
# anchors; empty and one-row segments on either side (an anchor segment without keys, keys
# without anchors); ignored rows on both sides; classes absent from the keys and classes with a
# single key; self pairs marked for some anchors, and the cross-batch-memory layout (each
# segment's keys = its memory rows, then copies of the anchors that were enqueued); many short
# segments.
REFERENCE_CASES = {
    "keys-much-more": {"anchors": [300], "keys": [5000], "dim": 16, "classes": 4},
    "anchors-more": {"anchors": [1100], "keys": [300], "dim": 33, "classes": 4},
    "varlen-self": {
        "anchors": [0, 70, 1, 129, 0, 64, 5],
        "keys": [40, 0, 600, 1, 0, 300, 0],
        "dim": 8,
        "classes": 5,
        "ignored": 0.2,
        "self_index": "some",
    },
    "memory-and-batch": {
        "anchors": [200, 57],
        "keys": [1000, 130],
        "dim": 16,
        "classes": 6,
        "ignored": 0.05,
        "self_index": "memory",
    },
    "rare-key-classes": {"anchors": [150], "keys": [400], "dim": 8, "classes": 6, "rare": True},
    "deep": {"anchors": [100], "keys": [700], "dim": 257, "classes": 3},
    # 16 non-empty anchor segments: the CPU forward's key ranges are not cut into chunks
    "many-segments": {
        "anchors": [6, 1, 0, 9, 4] * 4,
        "keys": [30, 0, 12, 1, 50] * 4,
        "dim": 8,
        "classes": 3,
        "self_index": "some",
    },
}


# The CUDA kernels' reference-set cases (test_cuda.py, and the emulator's test_cuda_emulated.py
# and asan_check.py, small enough to emulate), as options of make_reference_inputs: empty and
# one-row segments on either side, ignored rows on both, anchor classes that no key has, keys
# far more numerous than anchors and the reverse, and own pairs marked for some anchors.
KERNEL_REFERENCE_CASES = {
    # Empty anchor segments against keys, anchors against no keys, one row against one row,
    # anchor segments straddling the 64- and 128-row tiles; D past the 32-column staging slice.
    "varlen": {
        "anchors": [70, 0, 5, 129, 1, 0],
        "keys": [100, 3, 0, 64, 1, 20],
        "dim": 33,
        "classes": 5,
        "key_classes": 4,
        "self_index": "some",
    },
    # K >> M: more keys than classify_rows stages at a time, and many column splits.
    "many-keys": {
        "anchors": [40],
        "keys": [1100],
        "dim": 8,
        "classes": 3,
        "ignored": 0.05,
        "self_index": "some",
    },
    # M >> K, without ref_self_index.
    "many-anchors": {"anchors": [300, 10], "keys": [20, 0], "dim": 16, "classes": 3},
    # D past the backward's 128 output columns and the mma kernels' resident depth; every
    # anchor has an own pair.
    "deep": {
        "anchors": [33],
        "keys": [70],
        "dim": 257,
        "classes": 4,
        "ignored": 0.0,
        "self_index": "some",
        "own_pairs": 1.0,
    },
}


class ReferenceInputs(NamedTuple):
    """Anchors (M, D), labels (M,), offsets (S + 1,), keys (K, D), key labels (K,), key offsets
    (S + 1,) and each anchor's own key row (M,) int64 (-1 for none) or None."""

    features: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    ref_features: torch.Tensor
    ref_labels: torch.Tensor
    ref_offsets: torch.Tensor
    ref_self_index: torch.Tensor | None

    def reference_args(self) -> dict:
        """The op's reference-set keyword arguments."""
        return {
            "ref_features": self.ref_features,
            "ref_labels": self.ref_labels,
            "ref_segments": self.ref_offsets,
            "ref_self_index": self.ref_self_index,
        }


def make_reference_inputs(
    anchors,
    keys,
    dim,
    classes,
    ignored=0.1,
    self_index=None,
    rare=False,
    *,
    key_classes=None,
    own_pairs=0.5,
    dtype=torch.float32,
    seed=0,
    device="cpu",
    max_norm=None,
):
    """A reference-set call's inputs: ``anchors`` and ``keys`` are the segment lengths of both
    sets (the same number of segments), rows as in make_inputs.

    self_index: None (no self pairs); "some" (a fraction ``own_pairs``, about half by default,
    of the anchors get a distinct key of their segment overwritten with their own row and
    label); "memory" (each segment's keys are its ``keys`` memory rows followed by copies of
    the anchors that were enqueued, every anchor but one in seven; the key lengths grow by those
    copies). rare: class 0 is removed from the
    keys (anchors of class 0 have no positive) and class 1 keeps a single key per segment.
    key_classes: the keys' labels are drawn from [0, key_classes) (default ``classes``; anchor
    classes past it are absent from the keys, and their anchors get no self pair).
    """
    generator = torch.Generator().manual_seed(seed)

    def rows(n):
        z = torch.nn.functional.normalize(
            torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1
        )
        if max_norm is not None:
            z *= max_norm * (0.2 + 0.8 * torch.rand(n, 1, generator=generator, dtype=torch.float64))
        return z

    def row_labels(n, count=classes):
        labels = torch.randint(0, count, (n,), generator=generator)
        labels[torch.rand(n, generator=generator) < ignored] = IGNORE
        return labels

    anchor_offsets = torch.tensor([0, *anchors]).cumsum(0)
    features, labels = rows(sum(anchors)), row_labels(sum(anchors))
    key_parts, label_parts, own = [], [], torch.full((sum(anchors),), -1, dtype=torch.int64)
    key_start = 0
    for segment, memory in enumerate(keys):
        begin, end = int(anchor_offsets[segment]), int(anchor_offsets[segment + 1])
        key_rows = rows(memory)
        key_labels = row_labels(memory, classes if key_classes is None else key_classes)
        if rare:
            key_labels[key_labels == 0] = 2 % classes
            single = (key_labels == 1).nonzero().flatten()
            key_labels[single[1:]] = IGNORE
        if self_index == "some" and memory > 0:
            order = torch.randperm(memory, generator=generator)
            for position, i in enumerate(range(begin, end)):
                if (
                    position < memory
                    and torch.rand(1, generator=generator) < own_pairs
                    and (key_classes is None or labels[i] < key_classes)
                ):
                    j = int(order[position])
                    key_rows[j], key_labels[j], own[i] = features[i], labels[i], key_start + j
        elif self_index == "memory":
            enqueued = [i for i in range(begin, end) if i % 7 != 3]
            for position, i in enumerate(enqueued):
                own[i] = key_start + memory + position
            key_rows = torch.cat([key_rows, features[enqueued]])
            key_labels = torch.cat([key_labels, labels[enqueued]])
        key_parts.append(key_rows)
        label_parts.append(key_labels)
        key_start += key_rows.shape[0]
    ref_features = torch.cat(key_parts) if key_parts else rows(0)
    ref_labels = torch.cat(label_parts)
    ref_offsets = torch.tensor([0, *(part.shape[0] for part in key_parts)]).cumsum(0)
    return ReferenceInputs(
        features.to(device=device, dtype=dtype),
        labels.to(device),
        anchor_offsets.to(device),
        ref_features.to(device=device, dtype=dtype),
        ref_labels.to(device),
        ref_offsets.to(device),
        None if self_index is None else own.to(device),
    )


def run_reference_set_call(forward, backward, inputs: ReferenceInputs, prevalence, upstream):
    """(loss, lse, positives, anchor_grad, ref_grad) of the CUDA kernels' two-set call: the
    forward with anchor_gradient, then the keys' backward of sum(upstream * loss) from the saved
    lse and positives. forward and backward take the arguments of mcsc::supcon_forward and
    mcsc::supcon_backward (torch.ops.mcsc's on a GPU, or the emulator's of one path)."""
    keys = inputs.reference_args()
    loss, lse, positives, anchor_grad = forward(
        inputs.features,
        inputs.labels,
        inputs.offsets,
        TEMPERATURE,
        prevalence,
        IGNORE,
        anchor_gradient=True,
        **keys,
    )
    ref_grad = backward(
        upstream,
        inputs.features,
        inputs.labels,
        inputs.offsets,
        lse,
        positives,
        TEMPERATURE,
        prevalence,
        ignore_index=IGNORE,
        **keys,
    )
    return loss, lse, positives, anchor_grad, ref_grad


class ReferenceSetExpected(NamedTuple):
    loss: torch.Tensor  # (M,)
    positives: torch.Tensor  # (M,) int64
    grad_features: torch.Tensor  # (M, D)
    grad_ref_features: torch.Tensor  # (K, D): d(sum upstream * loss) / d ref_features


def reference_set_loss_and_grads(
    inputs: ReferenceInputs,
    prevalence,
    upstream,
    *,
    exact=True,
    temperature=TEMPERATURE,
    upstream_on_features=True,
) -> ReferenceSetExpected:
    """The dense reference's per-anchor loss (M,), positives (M,) int64 and the gradients of
    sum(upstream * loss) with respect to the anchors (M, D) and the keys (K, D): in float64 on
    the CPU (``exact``), or else eager PyTorch at the inputs' own dtype and device (the baseline
    of the 2x rule). Without ``upstream_on_features`` the anchors' gradient is that of sum(loss):
    row i is d loss_i / d features_i (each loss_i depends on anchor i alone among the anchors),
    what the kernels' forward gives with anchor_gradient=True."""
    if exact:
        inputs = ReferenceInputs(
            *(
                None
                if value is None
                else value.cpu().double()
                if value.is_floating_point()
                else value.cpu()
                for value in inputs
            )
        )
        upstream = upstream.cpu().double()
    features = inputs.features.detach().clone().requires_grad_(True)
    keys = inputs.ref_features.detach().clone().requires_grad_(True)
    loss, positives = supcon_per_anchor_reference(
        features,
        inputs.labels,
        inputs.offsets,
        temperature,
        prevalence,
        IGNORE,
        keys,
        inputs.ref_labels,
        inputs.ref_offsets,
        inputs.ref_self_index,
    )
    grad_features, grad_keys = torch.zeros_like(features), torch.zeros_like(keys)
    if loss.requires_grad:  # not when no anchor segment has a row
        weighted = (loss * upstream.to(loss.device, loss.dtype)).sum()
        if upstream_on_features:
            grads = torch.autograd.grad(weighted, (features, keys), allow_unused=True)
        else:
            grads = (
                torch.autograd.grad(loss.sum(), features, retain_graph=True, allow_unused=True)[0],
                torch.autograd.grad(weighted, keys, allow_unused=True)[0],
            )
        grad_features = grads[0] if grads[0] is not None else grad_features
        grad_keys = grads[1] if grads[1] is not None else grad_keys
    return ReferenceSetExpected(loss.detach(), positives, grad_features, grad_keys)


def reference_set_lse(inputs: ReferenceInputs, loss, positives, temperature=TEMPERATURE):
    """The lse the op saves: lse_i = loss_i + (1/|P(i)|) sum_{p in P(i)} s_ip for anchors
    (positives > 0), else 0; from the reference's float64 loss and positives, on the CPU."""
    features, keys = inputs.features.cpu().double(), inputs.ref_features.cpu().double()
    labels, ref_labels = inputs.labels.cpu(), inputs.ref_labels.cpu()
    offsets, ref_offsets = inputs.offsets.cpu(), inputs.ref_offsets.cpu()
    self_index = None if inputs.ref_self_index is None else inputs.ref_self_index.cpu()
    lse = torch.zeros_like(loss)
    for s in range(offsets.shape[0] - 1):
        start, stop = int(offsets[s]), int(offsets[s + 1])
        key_start, key_stop = int(ref_offsets[s]), int(ref_offsets[s + 1])
        if stop <= start or key_stop <= key_start:
            continue
        similarity = features[start:stop] @ keys[key_start:key_stop].T / temperature
        columns = torch.arange(key_start, key_stop)
        own = torch.zeros_like(similarity, dtype=torch.bool)
        if self_index is not None:
            own = columns[None, :] == self_index[start:stop, None]
        anchor_labels = labels[start:stop, None]
        positive = (
            (anchor_labels == ref_labels[None, key_start:key_stop])
            & (anchor_labels != IGNORE)
            & ~own
        )
        count = positives[start:stop].clamp(min=1).to(similarity.dtype)
        mean = (similarity * positive).sum(dim=1) / count
        lse[start:stop] = torch.where(positives[start:stop] > 0, loss[start:stop] + mean, 0)
    return lse


def assert_reference_set_within_twice_eager_error(
    inputs: ReferenceInputs,
    results,
    upstream,
    prevalence=True,
    temperature=TEMPERATURE,
    *,
    upstream_on_features=True,
):
    """The 2x-eager rule of assert_within_twice_eager_error for a reference-set call's
    (loss, grad_features, grad_ref_features); grad_features as reference_set_loss_and_grads'
    with ``upstream_on_features``."""
    options = {"temperature": temperature, "upstream_on_features": upstream_on_features}
    eager = reference_set_loss_and_grads(inputs, prevalence, upstream, exact=False, **options)
    truth = reference_set_loss_and_grads(inputs, prevalence, upstream, **options)
    for name, value, eager_value, true_value in zip(
        ("loss", "grad_features", "grad_ref_features"),
        results,
        (eager.loss, eager.grad_features, eager.grad_ref_features),
        (truth.loss, truth.grad_features, truth.grad_ref_features),
    ):
        assert bool(torch.isfinite(value).all()), f"{name} is not finite"
        if true_value.numel() == 0:
            continue
        error = float((value.detach().cpu().double() - true_value).abs().max())
        eager_error = float((eager_value.cpu().double() - true_value).abs().max())
        assert error <= 2 * eager_error + 1e-6 * scaled_atol(true_value, 1.0), (
            name,
            error,
            eager_error,
        )


def assert_matches_reference_set(results, inputs, prevalence, upstream, dtype, relative):
    """Two-set results (loss, lse, positives, anchor_grad, ref_grad) of the CUDA kernels (on a
    GPU or emulated) run on features of `dtype` against the float64 reference: anchor_grad is
    the forward's (row i: d loss_i / d features_i), ref_grad the keys' backward of
    sum(upstream * loss). Checks dtypes and shapes, positives exactly; lse of the anchors within
    `relative` (1e-4 for fp16/bf16, whose products are exact); loss, anchor_grad and ref_grad
    within `relative` of the largest expected magnitude, or, with relative None (fp16/bf16),
    within twice eager PyTorch's error at that dtype."""
    loss, lse, positives, anchor_grad, ref_grad = results
    expected = reference_set_loss_and_grads(
        inputs, prevalence, upstream, upstream_on_features=False
    )
    expected_lse = reference_set_lse(inputs, expected.loss, expected.positives)
    m, d = inputs.features.shape
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == dtype and ref_grad.dtype == dtype
    assert lse.dtype == anchor_grad.dtype == accumulation
    assert anchor_grad.shape == (m, d) and ref_grad.shape == inputs.ref_features.shape
    assert positives.dtype == torch.int32
    assert torch.equal(positives.cpu().long(), expected.positives)
    anchors = expected.positives > 0
    lse = lse.cpu()
    assert bool(torch.isfinite(lse[anchors]).all())
    lse_relative = relative or 1e-4
    torch.testing.assert_close(
        lse[anchors].double(),
        expected_lse[anchors],
        rtol=lse_relative,
        atol=scaled_atol(expected_lse, lse_relative),
    )
    if relative is None:
        assert_reference_set_within_twice_eager_error(
            inputs, (loss, anchor_grad, ref_grad), upstream, prevalence, upstream_on_features=False
        )
        return
    for name, value, truth in (
        ("loss", loss, expected.loss),
        ("anchor_grad", anchor_grad, expected.grad_features),
        ("ref_grad", ref_grad, expected.grad_ref_features),
    ):
        truth = truth.double()
        torch.testing.assert_close(
            value.detach().cpu().double(),
            truth,
            rtol=relative,
            atol=scaled_atol(truth, relative),
            msg=name,
        )
