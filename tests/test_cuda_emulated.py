"""The CUDA kernels, run on the CPU by an emulation of the CUDA thread model.

tests/cuda_emulation compiles csrc/cuda/supcon_kernels.cuh -- the very kernels and launch code
the CUDA op runs -- with g++ against a fiber-based emulator of threads, barriers, warp
shuffles and WMMA (see tests/cuda_emulation/include). This checks on a machine without a GPU
what test_cuda.py checks on one, as far as the emulation reaches:

* every multiply path (float64 FMA, float32 FMA, float32 TF32, fp16 and bf16 WMMA, and the
  fp16 and bf16 mma.sync kernels with ldmatrix and cp.async, MCSC_CUDA_KERNELS=mma) against
  the float64 reference, forward and gradient, over segment layouts with empty, one-row and
  long segments, ignored rows, absent classes and D past the tile widths;
* barrier placement: every kernel gives bitwise the same results when the threads between two
  barriers run in ascending or in descending order (a missing barrier changes them), and no
  barrier is reached by only part of a block or warp (the emulator raises);
* no read of shared memory the block has not written: the kernels' __shared__ variables are
  filled before every block with a pattern that differs between the two orders (NaN in one);
* WMMA and ldmatrix alignment rules (the emulator raises on a misaligned access), and cp.async
  copies that land only at the wait covering their group (a missing wait reads poison);
* memory bounds: every case and path again, built with AddressSanitizer (asan_check.py).

It does not check what only hardware shows: the memory model, WMMA's fragment register
layouts, whether mma.sync's layouts were read from the PTX ISA the same wrong way in the kernels
and the emulator, shared-memory and register limits, speed. Those are test_cuda.py's and
compute-sanitizer's, on a GPU.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from cuda_emulation import emulation
from cuda_emulation.emulation import PATHS
from cuda_emulation.reference_sets import run_reference_set
from supcon_cases import (
    CASES,
    IGNORE,
    KERNEL_REFERENCE_CASES,
    TEMPERATURE,
    ReferenceInputs,
    assert_matches_reference_set,
    make_inputs,
    make_reference_inputs,
    misaligned_copy,
    reference_loss_and_grad,
    scaled_atol,
)

from mcsc.ops import backend

# Relative tolerance against the float64 reference per exact path.
TOLERANCE = {
    "float64-fma": 1e-10,
    "float32-fma": 1e-4,
    "float32-tf32": 1e-2,
    "float32-fma-mma": 1e-4,
    "float32-tf32-mma": 1e-2,
}


@pytest.fixture(scope="module")
def emulated():
    if not emulation.cuda_header_dirs():
        pytest.skip("needs the CUDA headers (cuda_fp16.h): the CUDA toolkit or torch's CUDA wheels")
    kernels = emulation.load()
    assert kernels.poison_shared_memory() > 0, "found no __shared__ variable to poison"
    return kernels


def run(
    emulated,
    features,
    labels,
    offsets,
    prevalence,
    upstream,
    path,
    descending,
    temperature=TEMPERATURE,
):
    """(loss, lse, positives, d(sum upstream * loss)/dz) from the emulated kernels of `path`."""
    loss, lse, positives, _ = emulation.forward(
        emulated, path, features, labels, offsets, temperature, prevalence, IGNORE, descending
    )
    grad = emulation.backward(
        emulated,
        path,
        upstream,
        features,
        labels,
        offsets,
        lse,
        positives,
        temperature,
        prevalence,
        descending,
    )
    return loss, lse, positives, grad


def run_both_orders(emulated, *args, **options):
    """The results of run() with ascending thread order, checked bitwise equal to descending."""
    ascending = run(emulated, *args, descending=False, **options)
    descending = run(emulated, *args, descending=True, **options)
    for name, first, second in zip(("loss", "lse", "positives", "grad"), ascending, descending):
        assert torch.equal(first, second), (
            f"{name} depends on the order threads run between barriers: a barrier is missing, "
            f"or shared memory is read before the block writes it"
        )
    return ascending


@pytest.mark.parametrize("path", list(PATHS))
def test_unaligned_rows_match_vector_loads(emulated, path):
    """Rows that do not start on 16-byte boundaries take the scalar loads: same bits."""
    features, labels, offsets = make_inputs([70, 0, 129], 16, 4, 0.1, dtype=PATHS[path].dtype)
    upstream = torch.rand(
        features.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    aligned = run(emulated, features, labels, offsets, True, upstream, PATHS[path], False)
    unaligned = run_both_orders(
        emulated, misaligned_copy(features), labels, offsets, True, upstream, PATHS[path]
    )
    for name, first, second in zip(("loss", "lse", "positives", "grad"), aligned, unaligned):
        assert torch.equal(first, second), f"{name} differs between vector and scalar loads"


@pytest.mark.parametrize("path", ["float64-fma", "float32-fma", "bfloat16-wmma", "bfloat16-mma"])
def test_forward_column_splits_merge_to_one_split(emulated, path):
    """A small batch splits the forward's columns over up to 16 blocks per row block; the
    merged partial results match those of the fewest splits (a device of one SM)."""
    features, labels, offsets = make_inputs(*CASES["long-segment"], dtype=PATHS[path].dtype)
    outputs = {
        target: emulation.forward(
            emulated,
            PATHS[path],
            features,
            labels,
            offsets,
            TEMPERATURE,
            True,
            IGNORE,
            multiprocessors=target,
        )
        for target in (1, 4096)
    }
    (one_loss, one_lse, one_positives, _), (loss, lse, positives, _) = outputs[1], outputs[4096]
    assert torch.equal(positives, one_positives)
    anchors = positives > 0
    relative = TOLERANCE.get(path, 1e-2)  # the loss is rounded to bfloat16
    lse_relative = min(relative, 1e-5)  # lse is float32 or float64
    torch.testing.assert_close(lse[anchors], one_lse[anchors], rtol=lse_relative, atol=lse_relative)
    torch.testing.assert_close(
        loss.double(),
        one_loss.double(),
        rtol=relative,
        atol=scaled_atol(one_loss.double(), relative),
    )


@pytest.mark.parametrize("case", ["one-segment", "varlen-empty-segments", "deep"])
def test_matches_cpu_op(emulated, case):
    if backend("cpu") != "compiled-cpu":
        pytest.skip("the compiled CPU op is not available")
    features, labels, offsets = make_inputs(*CASES[case])
    upstream = torch.rand(features.shape[0], generator=torch.Generator().manual_seed(2))
    loss, lse, positives, grad = run(
        emulated, features, labels, offsets, True, upstream, PATHS["float32-fma"], False
    )
    z = features.clone().requires_grad_(True)
    cpu_loss, cpu_lse, cpu_positives, _ = torch.ops.mcsc.supcon_forward(
        z, labels, offsets, TEMPERATURE, True, IGNORE
    )
    (cpu_loss * upstream).sum().backward()
    cpu_loss = cpu_loss.detach()
    assert torch.equal(positives, cpu_positives)
    torch.testing.assert_close(loss, cpu_loss, rtol=1e-4, atol=scaled_atol(cpu_loss, 1e-4))
    anchors = cpu_positives > 0
    torch.testing.assert_close(lse[anchors], cpu_lse[anchors], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, z.grad, rtol=1e-4, atol=scaled_atol(z.grad, 1e-4))


@pytest.mark.parametrize("path", ["float64-fma", "float32-fma"])
def test_large_similarities(emulated, path):
    """Norm-10 features at t = 0.01: similarities up to 1e4, far past exp's range."""
    dtype = PATHS[path].dtype
    features, labels, offsets = make_inputs([90, 40], 12, 3, 0.1, dtype=dtype)
    features = features * 10
    upstream = torch.rand(features.shape[0], dtype=torch.float64)
    loss, _, _, grad = run_both_orders(
        emulated, features, labels, offsets, True, upstream, PATHS[path], temperature=0.01
    )
    ref_loss, _, ref_grad = reference_loss_and_grad(
        features, labels, offsets, True, upstream, temperature=0.01
    )
    relative = 1e-10 if dtype == torch.float64 else 1e-3
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(
        loss.double(), ref_loss, rtol=relative, atol=scaled_atol(ref_loss, relative)
    )
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=relative, atol=scaled_atol(ref_grad, relative)
    )


@pytest.mark.parametrize(
    ("path", "dim"),
    [
        ("float16-mma", 256),
        ("bfloat16-mma", 264),
        ("float32-tf32-mma", 128),
        ("float32-tf32-mma", 136),
    ],
)
def test_mma_resident_rows_at_their_depth_limit(emulated, path, dim):
    """The deepest features whose row tile the mma kernels keep resident (512 bytes a row,
    every k step of the unrolled loop) and features one vector past it (the chunked kernels)
    match the float64 reference."""
    features, labels, offsets = make_inputs([100, 40], dim, 4, 0.1, dtype=PATHS[path].dtype)
    upstream = torch.rand(
        features.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    loss, _, _, grad = run_both_orders(
        emulated, features, labels, offsets, True, upstream, PATHS[path]
    )
    ref_loss, _, ref_grad = reference_loss_and_grad(features, labels, offsets, True, upstream)
    relative = TOLERANCE.get(path, 1e-2)  # fp16/bf16 outputs are rounded to their dtype
    torch.testing.assert_close(
        loss.double(), ref_loss, rtol=relative, atol=scaled_atol(ref_loss, relative)
    )
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=relative, atol=scaled_atol(ref_grad, relative)
    )


def test_unknown_kernel_family_is_rejected(emulated):
    features, labels, offsets = make_inputs(*CASES["one-segment"], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="MCSC_CUDA_KERNELS must be 'wmma' or 'mma'"):
        emulated.forward(
            features, labels, offsets, TEMPERATURE, True, IGNORE, False, False, kernels="fastest"
        )


# ---- The reference-set (two-set) call: anchors against keys ------------------------------


REFERENCE_OUTPUTS = ("loss", "lse", "positives", "anchor_grad", "ref_grad")


def run_reference_set_both_orders(emulated, inputs, prevalence, upstream, path, **options):
    """run_reference_set's results, checked bitwise equal between the two thread orders."""
    ascending = run_reference_set(emulated, inputs, prevalence, upstream, path, False, **options)
    descending = run_reference_set(emulated, inputs, prevalence, upstream, path, True, **options)
    for name, first, second in zip(REFERENCE_OUTPUTS, ascending, descending):
        assert torch.equal(first, second), (
            f"{name} depends on the order threads run between barriers: a barrier is missing, "
            f"or shared memory is read before the block writes it"
        )
    return ascending


def reference_upstream(inputs, seed=1):
    return torch.rand(
        inputs.features.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def assert_reference_set_matches(results, inputs, prevalence, upstream, path):
    """The emulated two-set results of `path` against the float64 reference."""
    assert_matches_reference_set(
        results, inputs, prevalence, upstream, PATHS[path].dtype, TOLERANCE.get(path)
    )


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    ("case", "prevalence"),
    [
        ("varlen", True),
        ("varlen", False),
        ("many-keys", True),
        ("many-anchors", True),
        ("deep", True),
    ],
)
def test_reference_set_matches_reference(emulated, path, case, prevalence):
    """Anchors against keys: forward (loss, lse, positives), the anchors' own gradients and the
    keys' gradient against the float64 reference, differentiated with autograd."""
    inputs = make_reference_inputs(**KERNEL_REFERENCE_CASES[case], dtype=PATHS[path].dtype)
    upstream = reference_upstream(inputs)
    results = run_reference_set_both_orders(emulated, inputs, prevalence, upstream, PATHS[path])
    assert_reference_set_matches(results, inputs, prevalence, upstream, path)


@pytest.mark.parametrize("path", list(PATHS))
def test_one_set_is_the_reference_set_of_itself(emulated, path):
    """The single-set call is the two-set call with keys = anchors and own pairs i -> i: the
    same forward bits, and gradients (anchors' and keys' summed) that agree with the single
    set's."""
    features, labels, offsets = make_inputs(
        *CASES["varlen-empty-segments"], dtype=PATHS[path].dtype
    )
    upstream = torch.rand(
        features.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(6)
    )
    one_set = run_both_orders(emulated, features, labels, offsets, True, upstream, PATHS[path])
    itself = ReferenceInputs(
        features, labels, offsets, features, labels, offsets, torch.arange(features.shape[0])
    )
    loss, lse, positives, anchor_grad, ref_grad = run_reference_set_both_orders(
        emulated, itself, True, upstream, PATHS[path]
    )
    assert torch.equal(loss, one_set[0])
    assert torch.equal(lse, one_set[1])
    assert torch.equal(positives, one_set[2])
    both = (upstream.to(anchor_grad.dtype)[:, None] * anchor_grad).double() + ref_grad.double()
    relative = TOLERANCE.get(path, 1e-2)  # fp16/bf16 gradients are rounded to their dtype
    single = one_set[3].double()
    torch.testing.assert_close(both, single, rtol=relative, atol=scaled_atol(single, relative))


@pytest.mark.parametrize("path", list(PATHS))
def test_reference_set_unaligned_rows_match_vector_loads(emulated, path):
    """Anchors and keys off 16-byte boundaries take the scalar loads: the same bits."""
    inputs = make_reference_inputs(
        [70, 0, 20], [30, 9, 129], 16, 4, 0.1, "some", dtype=PATHS[path].dtype
    )
    upstream = reference_upstream(inputs)
    aligned = run_reference_set(emulated, inputs, True, upstream, PATHS[path], False)
    shifted = inputs._replace(
        features=misaligned_copy(inputs.features), ref_features=misaligned_copy(inputs.ref_features)
    )
    unaligned = run_reference_set_both_orders(emulated, shifted, True, upstream, PATHS[path])
    for name, first, second in zip(REFERENCE_OUTPUTS, aligned, unaligned):
        assert torch.equal(first, second), f"{name} differs between vector and scalar loads"


@pytest.mark.parametrize("path", ["float32-fma", "bfloat16-wmma", "float16-mma"])
def test_reference_set_non_contiguous_inputs(emulated, path):
    """Transposed anchors, strided keys and strided labels and self indices: the bits of their
    contiguous copies."""
    inputs = make_reference_inputs(**KERNEL_REFERENCE_CASES["varlen"], dtype=PATHS[path].dtype)
    upstream = reference_upstream(inputs)
    dense = run_reference_set(emulated, inputs, True, upstream, PATHS[path], False)
    keys = inputs.ref_features
    strided_keys = torch.zeros(keys.shape[0], 2 * keys.shape[1], dtype=keys.dtype)[:, ::2]
    strided_keys.copy_(keys)
    strided = inputs._replace(
        features=inputs.features.t().contiguous().t(),
        labels=torch.stack([inputs.labels, inputs.labels], dim=1)[:, 0],
        ref_features=strided_keys,
        ref_labels=torch.stack([inputs.ref_labels, inputs.ref_labels], dim=1)[:, 1],
        ref_self_index=torch.stack([inputs.ref_self_index] * 2, dim=1)[:, 0],
    )
    assert not any(t.is_contiguous() for t in strided[:2] + strided[3:5] + strided[6:])
    for name, first, second in zip(
        REFERENCE_OUTPUTS,
        dense,
        run_reference_set(emulated, strided, True, upstream, PATHS[path], False),
    ):
        assert torch.equal(first, second), name


@pytest.mark.parametrize("path", ["float64-fma", "bfloat16-mma"])
def test_reference_set_label_types_and_values(emulated, path):
    """int32 anchor labels with int64 keys' labels, and huge sparse ids: the bits of compact
    int64 ids."""
    inputs = make_reference_inputs(**KERNEL_REFERENCE_CASES["varlen"], dtype=PATHS[path].dtype)
    upstream = reference_upstream(inputs)
    expected = run_reference_set(emulated, inputs, True, upstream, PATHS[path], False)

    def huge(labels):
        return torch.where(labels == IGNORE, labels, labels * (1 << 40) + 7)

    for other in (
        inputs._replace(labels=inputs.labels.int()),
        inputs._replace(ref_labels=inputs.ref_labels.int()),
        inputs._replace(labels=huge(inputs.labels), ref_labels=huge(inputs.ref_labels)),
    ):
        result = run_reference_set(emulated, other, True, upstream, PATHS[path], False)
        for name, value, expected_value in zip(REFERENCE_OUTPUTS, result, expected):
            assert torch.equal(value, expected_value), name


@pytest.mark.parametrize("path", ["float64-fma", "float32-tf32-mma"])
def test_reference_set_column_splits_merge_to_one_split(emulated, path):
    """Few anchors against many keys split the forward's columns over up to 16 blocks; the
    merged results match those of one split."""
    inputs = make_reference_inputs(**KERNEL_REFERENCE_CASES["many-keys"], dtype=PATHS[path].dtype)
    upstream = reference_upstream(inputs)
    one = run_reference_set(emulated, inputs, True, upstream, PATHS[path], False, multiprocessors=1)
    many = run_reference_set(
        emulated, inputs, True, upstream, PATHS[path], False, multiprocessors=4096
    )
    assert torch.equal(one[2], many[2])
    relative = TOLERANCE[path]
    for name, first, second in zip(REFERENCE_OUTPUTS, one, many):
        torch.testing.assert_close(
            second.double(), first.double(), rtol=relative, atol=relative, msg=name
        )


@pytest.mark.parametrize("path", ["float64-fma", "float16-wmma", "bfloat16-mma"])
def test_reference_set_unchecked_self_indices_follow_the_reference(emulated, path):
    """Self indices that the Python checks reject (and that compiled calls poison) are read
    safely. Where the dense reference defines their meaning -- a key of another segment, past
    K, far past int32, negative, an ignored key of the anchor's segment: no own pair is
    counted off -- the kernels give its values; a key of another label gives finite ones."""
    inputs = make_reference_inputs(**KERNEL_REFERENCE_CASES["varlen"], dtype=PATHS[path].dtype)
    k = inputs.ref_features.shape[0]
    self_index = inputs.ref_self_index.clone()
    for row, value in ((1, 101), (3, k + 3), (4, 1 << 40), (5, -7), (6, k)):
        self_index[row] = value
    segment_3 = torch.arange(103, 167)
    self_index[80] = int(segment_3[inputs.ref_labels[segment_3] == IGNORE][0])
    unchecked = inputs._replace(ref_self_index=self_index)
    upstream = reference_upstream(inputs)
    results = run_reference_set_both_orders(emulated, unchecked, True, upstream, PATHS[path])
    assert_reference_set_matches(results, unchecked, True, upstream, path)

    other_label = self_index.clone()
    key = int(torch.nonzero(inputs.ref_labels[:100] != inputs.labels[0])[0])
    other_label[0] = key
    results = run_reference_set_both_orders(
        emulated, inputs._replace(ref_self_index=other_label), True, upstream, PATHS[path]
    )
    for name, value in zip(REFERENCE_OUTPUTS, results):
        assert bool(torch.isfinite(value.double()[value.double() > -math.inf]).all()), name


@pytest.mark.parametrize("path", ["float64-fma", "float32-tf32", "bfloat16-mma"])
def test_reference_set_with_an_empty_side(emulated, path):
    """No anchors: the keys' gradient is zero. No keys: no anchor has a positive, the losses
    and the anchors' gradients are zero, and the keys' gradient is empty."""
    dtype = PATHS[path].dtype
    inputs = make_reference_inputs([0, 0], [30, 7], 12, 3, 0.1, None, dtype=dtype)
    upstream = reference_upstream(inputs)
    loss, lse, positives, anchor_grad, ref_grad = run_reference_set_both_orders(
        emulated, inputs, True, upstream, PATHS[path]
    )
    assert loss.shape == lse.shape == positives.shape == (0,) and anchor_grad.shape == (0, 12)
    assert torch.equal(ref_grad, torch.zeros(37, 12, dtype=dtype))

    inputs = make_reference_inputs([25, 6], [0, 0], 12, 3, 0.2, "some", dtype=dtype)
    upstream = reference_upstream(inputs)
    loss, _, positives, anchor_grad, ref_grad = run_reference_set_both_orders(
        emulated, inputs, True, upstream, PATHS[path]
    )
    valid = inputs.labels != IGNORE
    assert torch.equal(positives.long(), torch.where(valid, 0, -1))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(anchor_grad, torch.zeros_like(anchor_grad))
    assert ref_grad.shape == (0, 12)


@pytest.mark.parametrize("path", ["float32-fma", "float16-mma"])
def test_reference_set_nan_upstream_poisons_the_keys_gradient(emulated, path):
    """The compiled-call policy's poison reaches the keys: a NaN upstream gradient makes the
    gradient of every valid key that valid anchors contrast against NaN."""
    inputs = make_reference_inputs(**KERNEL_REFERENCE_CASES["varlen"], dtype=PATHS[path].dtype)
    upstream = torch.full((inputs.features.shape[0],), float("nan"), dtype=torch.float64)
    *_, ref_grad = run_reference_set(emulated, inputs, True, upstream, PATHS[path], False)
    # Keys of segments 0 and 3, where many anchors with positives are.
    keys = torch.cat([torch.arange(0, 100), torch.arange(103, 167)])
    valid = inputs.ref_labels[keys] != IGNORE
    assert bool(torch.isnan(ref_grad[keys[valid]]).all())


# ---- The emulator's own checks: each would catch a real mistake in a kernel ----------------


@pytest.mark.parametrize(
    "kernel, message",
    [
        (
            "divergent_barrier",
            "divergent __syncthreads in block (0, 0): 128 threads wait at it, 128 have exited",
        ),
        ("divergent_shuffle", "divergent warp barrier"),
        ("misaligned_wmma", "wmma::load_matrix_sync: the pointer is not 256-bit aligned"),
    ],
)
def test_emulator_reports_misuse(emulated, kernel, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        emulated.misuse(kernel, 1.0, False)


@pytest.mark.parametrize(
    "kernel, correct",
    [
        ("neighbour", lambda base: base + (torch.arange(256) + 1) % 256),
        ("wmma_store", lambda base: torch.full((256,), 8.0 * base)),
    ],
)
def test_emulator_exposes_missing_barriers(emulated, kernel, correct):
    """With the barrier (or __syncwarp) both thread orders give the right values; without it
    each order leaves some thread reading a value another thread has not written yet."""
    for base, descending in ((1.0, False), (2.0, True), (3.0, False), (4.0, True)):
        synchronised = emulated.misuse(f"{kernel}_synchronised", base, descending)
        assert torch.equal(synchronised, correct(base).float())
        racy = emulated.misuse(f"{kernel}_racy", base + 0.5, descending)
        assert not torch.equal(racy, correct(base + 0.5).float())


def test_no_out_of_bounds_access_under_address_sanitizer():
    """Every case and multiply path once more, built with -fsanitize=address (a CPU memcheck:
    reads past a segment's last row or the last feature column would be caught here even
    where they leave the results unchanged)."""
    if not emulation.cuda_header_dirs():
        pytest.skip("needs the CUDA headers (cuda_fp16.h)")
    libasan = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("needs gcc's AddressSanitizer runtime (libasan)")
    environment = dict(
        os.environ,
        LD_PRELOAD=libasan,
        ASAN_OPTIONS="detect_leaks=0",
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    script = emulation.HERE / "asan_check.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=environment, timeout=1800
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR: AddressSanitizer" not in output, output[-6000:]
    assert "all cases ran" in result.stdout
