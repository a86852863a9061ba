"""Inputs and expected values shared by the tests of the fused op: the contract every backend
passes (test_supcon_contract.py), the backend-specific tests (test_supcon_op.py for the CPU,
test_cuda.py on a GPU, test_cuda_emulated.py for the CUDA kernels emulated on the CPU), the
property-based tests (test_supcon_properties.py) and the compute-sanitizer case."""

from __future__ import annotations

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
