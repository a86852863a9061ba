"""CUDA kernels of mcsc::supcon_forward / supcon_backward.

The CUDA-specific checks, under each kernel family: N = 262144, D = 128 in under 1 GiB of extra
GPU memory; N * D above 2^31; bitwise determinism; agreement with the compiled CPU op; and the
reference-set (two-set) call: every dtype against the float64 reference (the emulator's cases,
KERNEL_REFERENCE_CASES of tests/supcon_cases.py), through supcon_loss's autograd, the single set
as the reference set of itself, determinism, non-contiguous inputs, and 4096 anchors against
65536 keys in O((M + K) D) memory. What every backend must pass (reference, fp16/bf16 rule, gradcheck,
opcheck, compile) is in test_supcon_contract.py.
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
    KERNEL_REFERENCE_CASES,
    TEMPERATURE,
    ReferenceInputs,
    assert_matches_reference_set,
    make_reference_inputs,
    misaligned_copy,
    reference_loss_and_grad,
    reference_set_loss_and_grads,
    run_reference_set_call,
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
    loss, lse, positives, _ = torch.ops.mcsc.supcon_forward(
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
    loss, _, positives, _ = torch.ops.mcsc.supcon_forward(
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


# ---- The reference-set (two-set) call -----------------------------------------------------

# Relative tolerance against the float64 reference; fp16/bf16 follow the 2x-eager rule.
REFERENCE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def reference_set_op(inputs, prevalence, upstream):
    """(loss, lse, positives, anchor_grad, ref_grad) from torch.ops.mcsc on the GPU."""
    return run_reference_set_call(
        torch.ops.mcsc.supcon_forward, backward_on_gpu, inputs, prevalence, upstream
    )


def backward_on_gpu(upstream, features, labels, offsets, lse, *arguments, **options):
    """torch.ops.mcsc.supcon_backward with the upstream gradient moved to the GPU at lse's
    dtype."""
    return torch.ops.mcsc.supcon_backward(
        upstream.to(device="cuda", dtype=lse.dtype),
        features,
        labels,
        offsets,
        lse,
        *arguments,
        **options,
    )


def cuda_reference_inputs(case, dtype, seed=0):
    return make_reference_inputs(
        **KERNEL_REFERENCE_CASES[case], dtype=dtype, device="cuda", seed=seed
    )


@pytest.mark.parametrize("prevalence", [True, False], ids=["prevalence", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(KERNEL_REFERENCE_CASES))
def test_reference_set_matches_reference(case, dtype, prevalence):
    inputs = cuda_reference_inputs(case, dtype)
    upstream = torch.rand(inputs.features.shape[0], dtype=torch.float64)
    results = reference_set_op(inputs, prevalence, upstream)
    assert_matches_reference_set(
        results, inputs, prevalence, upstream, dtype, REFERENCE_TOLERANCE.get(dtype)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_set_through_supcon_loss(dtype):
    """supcon_loss's autograd on the GPU: the anchors' gradient from the forward's anchor_grad,
    the keys' from the backward, both as the reference's."""
    inputs = cuda_reference_inputs("varlen", dtype)
    features = inputs.features.clone().requires_grad_(True)
    keys = inputs.ref_features.clone().requires_grad_(True)
    loss = supcon_loss(
        features,
        inputs.labels,
        temperature=TEMPERATURE,
        segments=inputs.offsets,
        reduction="sum",
        ref_features=keys,
        ref_labels=inputs.ref_labels,
        ref_segments=inputs.ref_offsets,
        ref_self_index=inputs.ref_self_index,
    )
    loss.backward()
    upstream = torch.ones(inputs.features.shape[0], dtype=torch.float64)
    expected = reference_set_loss_and_grads(inputs, True, upstream)
    relative = REFERENCE_TOLERANCE.get(dtype, 2e-2)
    for name, value, truth in (
        ("loss", loss.detach().reshape(1), expected.loss.sum().reshape(1)),
        ("features.grad", features.grad, expected.grad_features),
        ("ref_features.grad", keys.grad, expected.grad_ref_features),
    ):
        torch.testing.assert_close(
            value.cpu().double(),
            truth,
            rtol=relative,
            atol=scaled_atol(truth, relative),
            msg=name,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_set_is_the_reference_set_of_itself(dtype):
    """Keys = anchors with own pairs i -> i: the single set's forward bits."""
    features, labels, offsets = make_inputs(*CASES["varlen-empty-segments"], dtype=dtype)
    itself = ReferenceInputs(
        features,
        labels,
        offsets,
        features,
        labels,
        offsets,
        torch.arange(features.shape[0], device="cuda"),
    )
    upstream = torch.rand(features.shape[0], dtype=torch.float64)
    loss, lse, positives, _, _ = reference_set_op(itself, True, upstream)
    one_loss, one_lse, one_positives, _ = torch.ops.mcsc.supcon_forward(
        features, labels, offsets, TEMPERATURE, True, IGNORE
    )
    assert torch.equal(loss, one_loss)
    assert torch.equal(lse, one_lse)
    assert torch.equal(positives, one_positives)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_set_deterministic(dtype):
    inputs = cuda_reference_inputs("many-keys", dtype)
    upstream = torch.rand(inputs.features.shape[0], dtype=torch.float64)
    first = reference_set_op(inputs, True, upstream)
    second = reference_set_op(inputs, True, upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_reference_set_non_contiguous_inputs():
    inputs = cuda_reference_inputs("varlen", torch.float32)
    upstream = torch.rand(inputs.features.shape[0], dtype=torch.float64)
    dense = reference_set_op(inputs, True, upstream)
    keys = inputs.ref_features
    strided_keys = torch.zeros(keys.shape[0], 2 * keys.shape[1], dtype=keys.dtype, device="cuda")[
        :, ::2
    ]
    strided_keys.copy_(keys)
    strided = inputs._replace(
        features=inputs.features.t().contiguous().t(),
        labels=torch.stack([inputs.labels, inputs.labels], dim=1)[:, 0],
        ref_features=strided_keys,
    )
    for a, b in zip(dense, reference_set_op(strided, True, upstream)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_reference_set_of_65536_keys_in_linear_memory(dtype):
    """4096 anchors against 65536 keys, D = 128, forward and both gradients: under 64 MiB of GPU
    memory beyond the inputs and their gradients (the similarity matrix alone would take 1 GiB
    in float32), with finite results."""
    m, k, dim = 4096, 65536, 128
    generator = torch.Generator(device="cuda").manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(m, dim, device="cuda", generator=generator), dim=1
    ).to(dtype)
    keys = torch.nn.functional.normalize(
        torch.randn(k, dim, device="cuda", generator=generator), dim=1
    ).to(dtype)
    labels = torch.randint(0, 10, (m,), device="cuda", generator=generator)
    key_labels = torch.randint(0, 10, (k,), device="cuda", generator=generator)
    features.requires_grad_(True)
    keys.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss = supcon_loss(
        features, labels, temperature=TEMPERATURE, ref_features=keys, ref_labels=key_labels
    )
    loss.backward()
    torch.cuda.synchronize()
    gradients = (features.numel() + keys.numel()) * features.element_size()
    extra = torch.cuda.max_memory_allocated() - baseline - gradients
    assert extra < 64 * (1 << 20), f"used {extra / (1 << 20):.0f} MiB beyond the gradients"
    assert bool(torch.isfinite(loss))
    assert bool(torch.isfinite(features.grad).all()) and bool(torch.isfinite(keys.grad).all())
