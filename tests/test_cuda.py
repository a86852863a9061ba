"""CUDA kernels of mcsc::supcon_forward / supcon_backward.

The CUDA-specific checks, under each kernel family: N = 262144, D = 128 in under 1 GiB of extra
GPU memory; N * D above 2^31; bitwise determinism; agreement with the compiled CPU op. What every
backend must pass (reference, fp16/bf16 rule, gradcheck, opcheck, compile) is in
test_supcon_contract.py.
Every test is skipped with "needs a CUDA GPU" when no GPU is visible.
"""

from __future__ import annotations

import os

import pytest
import supcon_cases
import torch
from supcon_cases import (
    CASES,
    IGNORE,
    TEMPERATURE,
    misaligned_copy,
    reference_loss_and_grad,
    scaled_atol,
)

from mcsc import supcon_loss
from mcsc.ops import backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GIB = 1 << 30

# The fp16/bf16 kernel families MCSC_CUDA_KERNELS selects ("wmma" is the default): both, or
# only the one the environment names (.ci/gpu_check.sh runs one family per step).
KERNEL_FAMILIES = (
    [os.environ["MCSC_CUDA_KERNELS"]] if os.environ.get("MCSC_CUDA_KERNELS") else ["wmma", "mma"]
)


@pytest.fixture(autouse=True, params=KERNEL_FAMILIES)
def kernel_family(request, monkeypatch):
    """Every test runs under each kernel family (the op reads the variable on every call)."""
    monkeypatch.setenv("MCSC_CUDA_KERNELS", request.param)
    return request.param


def make_inputs(*case, **options):
    return supcon_cases.make_inputs(*case, device="cuda", **options)


def op_loss_and_grad(features, labels, offsets, prevalence, upstream):
    z = features.detach().requires_grad_(True)  # keeps the layout (clone would not, if strided)
    loss, lse, positives = torch.ops.mcsc.supcon_forward(
        z, labels, offsets, TEMPERATURE, prevalence, IGNORE
    )
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), lse, positives, z.grad


def test_cuda_backend_is_compiled():
    assert backend("cuda") == "compiled-cuda", (
        "mcsc._C has no CUDA kernels; build with a CUDA torch and nvcc (see README)"
    )


@pytest.mark.parametrize("prevalence", [True, False], ids=["prevalence", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_cpu_op(case, prevalence):
    if backend("cpu") != "compiled-cpu":
        pytest.skip("the compiled CPU op is not available")
    features, labels, offsets = make_inputs(*CASES[case])
    upstream = torch.rand(features.shape[0], device="cuda")
    loss, lse, positives, grad = op_loss_and_grad(features, labels, offsets, prevalence, upstream)
    cpu_loss, cpu_lse, cpu_positives, cpu_grad = op_loss_and_grad(
        features.cpu(), labels.cpu(), offsets.cpu(), prevalence, upstream.cpu()
    )
    assert torch.equal(positives.cpu(), cpu_positives)
    torch.testing.assert_close(loss.cpu(), cpu_loss, rtol=1e-4, atol=scaled_atol(cpu_loss, 1e-4))
    anchors = cpu_positives > 0
    torch.testing.assert_close(lse.cpu()[anchors], cpu_lse[anchors], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-4, atol=scaled_atol(cpu_grad, 1e-4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_n_fits_in_one_gib(dtype):
    n, dim = 262144, 128
    generator = torch.Generator(device="cuda").manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(n, dim, device="cuda", generator=generator), dim=1
    ).to(dtype)
    features.requires_grad_(True)
    labels = torch.randint(0, 4, (n,), device="cuda", generator=generator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss = supcon_loss(features, labels, temperature=TEMPERATURE)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    assert extra < GIB, f"used {extra / GIB:.2f} GiB of extra GPU memory"
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(features.grad).all())


def test_64_bit_indexing():
    """N * D > 2^31: the last segment's rows sit past element 2^31 of features and grad."""
    n_segments, length, dim = 4096, 512, 1040
    n = n_segments * length
    assert n * dim > 2**31
    needed = 4 * n * dim * 2  # features, grad and temporaries in bf16
    if torch.cuda.mem_get_info()[0] < needed:
        pytest.skip(f"needs {needed / GIB:.0f} GiB of free GPU memory")
    generator = torch.Generator(device="cuda").manual_seed(0)
    features = torch.empty(n, dim, device="cuda", dtype=torch.bfloat16)
    for start in range(0, n, 1 << 18):
        block = torch.randn(min(1 << 18, n - start), dim, device="cuda", generator=generator)
        features[start : start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    labels = torch.randint(0, 3, (n,), device="cuda", generator=generator)
    offsets = torch.arange(0, n + 1, length, device="cuda", dtype=torch.int64)
    features.requires_grad_(True)
    loss, _, positives = torch.ops.mcsc.supcon_forward(
        features, labels, offsets, TEMPERATURE, True, IGNORE
    )
    upstream = torch.rand(n, device="cuda", dtype=torch.bfloat16)
    (loss * upstream).sum().backward()
    for first in (0, n - length):
        rows = slice(first, first + length)
        z = features.detach()[rows]
        local = torch.tensor([0, length], dtype=torch.int64)
        ref_loss, ref_positives, ref_grad = reference_loss_and_grad(
            z, labels[rows], local, True, upstream[rows]
        )
        assert torch.equal(positives[rows].cpu().long(), ref_positives)
        torch.testing.assert_close(loss[rows].cpu().double(), ref_loss, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(
            features.grad[rows].cpu().double(),
            ref_grad,
            rtol=2e-2,
            atol=scaled_atol(ref_grad, 2e-2),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_deterministic(dtype):
    features, labels, offsets = make_inputs([1000, 0, 2500, 77], 96, 5, 0.1, dtype=dtype)
    upstream = torch.rand(features.shape[0], device="cuda")
    first = op_loss_and_grad(features, labels, offsets, True, upstream)
    second = op_loss_and_grad(features, labels, offsets, True, upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("api", ["allow_tf32", "fp32_precision"])
def test_tf32_follows_the_matmul_setting(api):
    """Either API turns TF32 on (the new one alone must not raise, as allowTF32CuBLAS would)."""
    features, labels, offsets = make_inputs([500], 128, 4, 0.0)
    upstream = torch.rand(features.shape[0], device="cuda")
    ref_loss, _, ref_grad = reference_loss_and_grad(features, labels, offsets, True, upstream)
    matmul = torch.backends.cuda.matmul
    previous = getattr(matmul, api)
    try:
        setattr(matmul, api, True if api == "allow_tf32" else "tf32")
        loss, _, _, grad = op_loss_and_grad(features, labels, offsets, True, upstream)
    finally:
        setattr(matmul, api, previous)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(
        grad.cpu().double(), ref_grad, rtol=2e-2, atol=scaled_atol(ref_grad, 2e-2)
    )


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
def test_unaligned_rows_match_vector_loads(dtype):
    """Rows off 16-byte boundaries take the kernels' scalar loads: bitwise the same results."""
    features, labels, offsets = make_inputs([70, 0, 129], 16, 4, 0.1, dtype=dtype)
    upstream = torch.rand(features.shape[0], device="cuda")
    aligned = op_loss_and_grad(features, labels, offsets, True, upstream)
    unaligned = op_loss_and_grad(misaligned_copy(features), labels, offsets, True, upstream)
    for name, first, second in zip(("loss", "lse", "positives", "grad"), aligned, unaligned):
        assert torch.equal(first, second), f"{name} differs between vector and scalar loads"


def test_inputs_on_different_devices_are_rejected():
    features, labels, offsets = make_inputs([50], 8, 3, 0.0)
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(features, labels.cpu(), segments=offsets)


def test_unknown_kernel_family_is_rejected(monkeypatch):
    features, labels, offsets = make_inputs(*CASES["one-segment"], dtype=torch.bfloat16)
    monkeypatch.setenv("MCSC_CUDA_KERNELS", "fastest")
    with pytest.raises(ValueError, match="MCSC_CUDA_KERNELS must be 'wmma' or 'mma'"):
        torch.ops.mcsc.supcon_forward(features, labels, offsets, TEMPERATURE, True, IGNORE)
