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
# segment's keys = its memory rows, then copies of the anchors that were enqueued).
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


def make_reference_inputs(
    anchors,
    keys,
    dim,
    classes,
    ignored=0.1,
    self_index=None,
    rare=False,
    *,
    dtype=torch.float32,
    seed=0,
    device="cpu",
    max_norm=None,
):
    """A reference-set call's inputs: ``anchors`` and ``keys`` are the segment lengths of both
    sets (the same number of segments), rows as in make_inputs.

    self_index: None (no self pairs); "some" (about half of the anchors get a distinct key of
    their segment overwritten with their own row and label); "memory" (each segment's keys are
    its ``keys`` memory rows followed by copies of the anchors that were enqueued, every anchor
    but one in seven; the key lengths grow by those copies). rare: class 0 is removed from the
    keys (anchors of class 0 have no positive) and class 1 keeps a single key per segment.
    """
    generator = torch.Generator().manual_seed(seed)

    def rows(n):
        z = torch.nn.functional.normalize(
            torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1
        )
        if max_norm is not None:
            z *= max_norm * (0.2 + 0.8 * torch.rand(n, 1, generator=generator, dtype=torch.float64))
        return z

    def row_labels(n):
        labels = torch.randint(0, classes, (n,), generator=generator)
        labels[torch.rand(n, generator=generator) < ignored] = IGNORE
        return labels

    anchor_offsets = torch.tensor([0, *anchors]).cumsum(0)
    features, labels = rows(sum(anchors)), row_labels(sum(anchors))
    key_parts, label_parts, own = [], [], torch.full((sum(anchors),), -1, dtype=torch.int64)
    key_start = 0
    for segment, memory in enumerate(keys):
        begin, end = int(anchor_offsets[segment]), int(anchor_offsets[segment + 1])
        key_rows, key_labels = rows(memory), row_labels(memory)
        if rare:
            key_labels[key_labels == 0] = 2 % classes
            single = (key_labels == 1).nonzero().flatten()
            key_labels[single[1:]] = IGNORE
        if self_index == "some" and memory > 0:
            order = torch.randperm(memory, generator=generator)
            for position, i in enumerate(range(begin, end)):
                if position < memory and torch.rand(1, generator=generator) < 0.5:
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


def reference_set_loss_and_grads(
    inputs: ReferenceInputs, prevalence, upstream, *, exact=True, temperature=TEMPERATURE
):
    """The dense reference's per-anchor loss (M,), positives (M,) int64 and the gradients of
    sum(upstream * loss) with respect to the anchors (M, D) and the keys (K, D): in float64 on
    the CPU (``exact``), or else eager PyTorch at the inputs' own dtype and device."""
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
        grads = torch.autograd.grad(
            (loss * upstream.to(loss.dtype)).sum(), (features, keys), allow_unused=True
        )
        grad_features = grads[0] if grads[0] is not None else grad_features
        grad_keys = grads[1] if grads[1] is not None else grad_keys
    return loss.detach(), positives, grad_features, grad_keys


def assert_reference_set_within_twice_eager_error(
    inputs: ReferenceInputs, results, upstream, prevalence=True, temperature=TEMPERATURE
):
    """The 2x-eager rule of assert_within_twice_eager_error for a reference-set call's
    (loss, grad_features, grad_ref_features)."""
    eager = reference_set_loss_and_grads(
        inputs, prevalence, upstream, exact=False, temperature=temperature
    )
    truth = reference_set_loss_and_grads(inputs, prevalence, upstream, temperature=temperature)
    for name, value, eager_value, true_value in zip(
        ("loss", "grad_features", "grad_ref_features"),
        results,
        (eager[0], eager[2], eager[3]),
        (truth[0], truth[2], truth[3]),
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
