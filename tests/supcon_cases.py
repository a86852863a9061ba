"""Inputs and expected values shared by the tests of the fused op: its CUDA kernels on a GPU
(test_cuda.py) and emulated on the CPU (test_cuda_emulated.py), the CPU op (test_supcon_op.py)
and the compute-sanitizer case (sanitizer_case.py)."""

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


def make_inputs(lengths, dim, num_classes, ignored, *, dtype=torch.float32, seed=0,
                device="cpu"):
    """Unit-norm features (N, D), labels (N,) int64 with IGNORE rows, offsets (S + 1,)."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    features = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    features = torch.nn.functional.normalize(features, dim=1)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < ignored] = IGNORE
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    return (features.to(device=device, dtype=dtype), labels.to(device), offsets.to(device))


def misaligned_copy(features):
    """The same values, contiguous, starting one element past a 16-byte boundary (the CUDA
    kernels then read rows with scalar instead of vector loads)."""
    storage = torch.zeros(features.numel() + 1, dtype=features.dtype, device=features.device)
    shifted = storage[1:].view(features.shape).copy_(features)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    return shifted


def reference_loss_and_grad(features, labels, offsets, prevalence, upstream,
                            temperature=TEMPERATURE):
    """float64 CPU reference: per-anchor loss, positives and d(sum upstream * loss)/dz."""
    z = features.detach().to("cpu", torch.float64).requires_grad_(True)
    loss, positives = supcon_per_anchor_reference(z, labels.cpu(), offsets.cpu(), temperature,
                                                  prevalence, IGNORE)
    (loss * upstream.to("cpu", torch.float64)).sum().backward()
    return loss.detach(), positives, z.grad


def scaled_atol(reference, relative):
    return relative * max(1.0, float(reference.abs().max()))


def assert_within_twice_eager_error(loss, grad, features, labels, offsets, upstream,
                                    prevalence=True):
    """Flash attention's rule for fp16/bf16: the kernel's error against float64 on the same
    (already rounded) inputs is at most twice that of eager PyTorch run at the inputs' dtype."""
    z = features.detach().clone().requires_grad_(True)
    eager_loss, _ = supcon_per_anchor_reference(z, labels, offsets, TEMPERATURE, prevalence,
                                                IGNORE)
    (eager_loss * upstream).sum().backward()
    truth_loss, _, truth_grad = reference_loss_and_grad(features, labels, offsets, prevalence,
                                                        upstream)

    def error(value, truth):
        return float((value.detach().cpu().double() - truth).abs().max())

    assert error(loss, truth_loss) <= 2 * error(eager_loss, truth_loss) + 1e-6
    assert error(grad, truth_grad) <= 2 * error(z.grad, truth_grad) + 1e-6


def assert_compiled_matches_eager(features, labels, segments=None, backend="aot_eager"):
    """torch.compile(fullgraph=True) of normalise + supcon_loss gives eager's loss and gradient."""

    def step(z):
        return supcon_loss(torch.nn.functional.normalize(z, dim=1), labels, segments=segments,
                           temperature=TEMPERATURE)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_z = features.clone().requires_grad_(True)
    compiled_z = features.clone().requires_grad_(True)
    eager = step(eager_z)
    eager.backward()
    result = compiled(compiled_z)
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)
