"""The emulated PTX instructions (tests/cuda_emulation/include/cuda/ptx.cuh) against the PTX ISA.

The tensor-core kernels depend on the exact register layouts of mma.sync and ldmatrix; a
layout misread the same way in a kernel and in the emulator would pass every emulated kernel
test. So the layouts are stated here a second time, in Python, from the PTX ISA's tables
("Matrix Fragments for mma.m16n8k16 with floating point type", "... for mma.m16n8k8" (.tf32),
and ldmatrix's fragment figure), and each instruction is run alone on matrices placed in
registers by these formulas (tests/cuda_emulation/instruction_kernels.cpp):

* mma: integer-valued A, B, C (every product and sum exact) must give torch's A @ B + C
  bitwise; TF32 operands are read with their upper 19 bits; to_tf32 rounds to nearest, ties
  away from zero;
* ldmatrix x1/x2/x4, with and without .trans: each lane's registers hold the elements of an
  iota tile the table names; lanes whose address the variant does not use are ignored;
* cp.async: a read before the covering wait sees the poisoned shared memory, after it the data;
  wait_group 1 lands the older group only; an invalid copy zero-fills without reading;
* dynamic shared memory (MCSC_DYNAMIC_SHARED_MEMORY) is one buffer per block, poisoned too;
* misuse is reported: a divergent mma, lanes at different warp instructions, a misaligned
  ldmatrix or cp.async, a missing wait, a missing commit.

Every kernel runs in both thread orders (the shared-memory poison differs between them).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from cuda_emulation import emulation

ORDERS = pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])

# The emulator's shared-memory poison as int32 bit patterns (0xff.. ascending, 0x7f.. descending).
POISON = {False: -1, True: 0x7F7F7F7F}


@pytest.fixture(scope="module")
def instructions():
    if not emulation.cuda_header_dirs():
        pytest.skip("needs the CUDA headers (cuda_fp16.h): the CUDA toolkit or torch's CUDA "
                    "wheels")
    module = emulation.load_instructions()
    assert module.poison_shared_memory() > 0, "found no __shared__ variable to poison"
    return module


# ---- The PTX ISA's fragment tables --------------------------------------------------------
# groupID = %laneid >> 2, threadID_in_group = %laneid % 4; element i of a lane counts from the
# low half of its first register.


def a_m16n8k16(lane: int, i: int) -> tuple[int, int]:
    """Multiplicand A of m16n8k16 (16 x 16, .f16/.bf16), element a_i, i in 0..7."""
    group, thread = lane >> 2, lane % 4
    row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
    col = thread * 2 + (i & 1) if i < 4 else thread * 2 + (i & 1) + 8
    return row, col


def b_m16n8k16(lane: int, i: int) -> tuple[int, int]:
    """Multiplicand B of m16n8k16 (16 x 8, .f16/.bf16), element b_i, i in 0..3."""
    group, thread = lane >> 2, lane % 4
    row = thread * 2 + (i & 1) if i < 2 else thread * 2 + (i & 1) + 8
    return row, group


def a_m16n8k8_tf32(lane: int, i: int) -> tuple[int, int]:
    """Multiplicand A of m16n8k8 (16 x 8, .tf32), element a_i, i in 0..3."""
    group, thread = lane >> 2, lane % 4
    row = group if i in (0, 2) else group + 8
    col = thread if i in (0, 1) else thread + 4
    return row, col


def b_m16n8k8_tf32(lane: int, i: int) -> tuple[int, int]:
    """Multiplicand B of m16n8k8 (8 x 8, .tf32), element b_i, i in 0..1."""
    group, thread = lane >> 2, lane % 4
    return (thread if i == 0 else thread + 4), group


def accumulator(lane: int, i: int) -> tuple[int, int]:
    """Accumulators C and D of m16n8k16 and m16n8k8 (16 x 8, .f32), element c_i, i in 0..3."""
    group, thread = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), thread * 2 + (i & 1)


def to_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns (int64) as int32."""
    return ((values + 2**31) % 2**32 - 2**31).to(torch.int32)


def pack(matrix: torch.Tensor, coordinate, elements: int) -> torch.Tensor:
    """One warp's registers (32, registers) holding `matrix` by the table `coordinate`.

    16-bit matrices put two elements in a register (the lower-indexed in the low half);
    float32 (tf32) matrices one."""
    if matrix.dtype == torch.float32:
        bits = matrix.view(torch.int32).long() & 0xFFFFFFFF
        per_register = 1
    else:
        bits = matrix.view(torch.int16).long() & 0xFFFF
        per_register = 2
    registers = torch.zeros(32, elements // per_register, dtype=torch.int64)
    for lane in range(32):
        for i in range(elements):
            row, col = coordinate(lane, i)
            registers[lane, i // per_register] |= bits[row, col] << (16 * (i % per_register))
    return to_int32(registers)


def pack_accumulator(matrix: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([matrix[accumulator(lane, i)] for i in range(4)])
                        for lane in range(32)])


def unpack_accumulator(registers: torch.Tensor) -> torch.Tensor:
    matrix = torch.full((16, 8), float("nan"))
    for lane in range(32):
        for i in range(4):
            matrix[accumulator(lane, i)] = registers[lane, i]
    return matrix


# (operand dtype, K, table of A, elements of A per lane, table of B, elements of B per lane)
SHAPES = {
    "f16": (torch.float16, 16, a_m16n8k16, 8, b_m16n8k16, 4),
    "bf16": (torch.bfloat16, 16, a_m16n8k16, 8, b_m16n8k16, 4),
    "tf32": (torch.float32, 8, a_m16n8k8_tf32, 4, b_m16n8k8_tf32, 2),
}


def run_mma(instructions, kind, matrices, descending, lanes=32):
    """D of each warp's (A, B, C) in `matrices`, through the emulated mma."""
    dtype, _, table_a, elements_a, table_b, elements_b = SHAPES[kind]
    a = torch.cat([pack(a_matrix.to(dtype), table_a, elements_a) for a_matrix, _, _ in matrices])
    b = torch.cat([pack(b_matrix.to(dtype), table_b, elements_b) for _, b_matrix, _ in matrices])
    c = torch.cat([pack_accumulator(c_matrix) for _, _, c_matrix in matrices])
    d = instructions.mma(kind, a, b, c, lanes, descending)
    return [unpack_accumulator(d[32 * w:32 * (w + 1)]) for w in range(len(matrices))]


@ORDERS
@pytest.mark.parametrize("kind", list(SHAPES))
def test_mma_fragment_layout(instructions, kind, descending):
    """Integer matrices, so every product and partial sum is exact: D must equal A @ B + C
    bitwise, in each of two warps with different matrices."""
    _, k, *_ = SHAPES[kind]
    generator = torch.Generator().manual_seed(len(kind))
    matrices = [(torch.randint(-8, 9, (16, k), generator=generator).float(),
                 torch.randint(-8, 9, (k, 8), generator=generator).float(),
                 torch.randint(-64, 65, (16, 8), generator=generator).float())
                for _ in range(2)]
    for (a, b, c), d in zip(matrices, run_mma(instructions, kind, matrices, descending)):
        assert torch.equal(d, a @ b + c), f"{kind}: D differs from A @ B + C"


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_mma_random_values(instructions, kind):
    """Random operands rounded to the 16-bit type: float sums, close to float64's."""
    dtype, *_ = SHAPES[kind]
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(16, 16, generator=generator).to(dtype).float()
    b = torch.randn(16, 8, generator=generator).to(dtype).float()
    c = torch.randn(16, 8, generator=generator)
    (d,) = run_mma(instructions, kind, [(a, b, c)], descending=False)
    expected = (a.double() @ b.double() + c.double()).float()
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)


# ---- TF32 ---------------------------------------------------------------------------------

TF32_QUANTUM_OF_SMALLEST = 2.0 ** (-126 - 10)  # spacing of TF32 values below 2^-125


def tf32_quantum(x: float) -> float:
    """The spacing of TF32 values (10 explicit significand bits) around x."""
    _, exponent = math.frexp(x)  # x = m 2^exponent, 0.5 <= |m| < 1
    return max(2.0 ** (exponent - 11), TF32_QUANTUM_OF_SMALLEST)


def tf32_rounded(x: float) -> float:
    """x to the nearest TF32 value, ties away from zero (cvt.rna.tf32.f32)."""
    if not math.isfinite(x) or x == 0:
        return x
    quantum = tf32_quantum(x)
    return math.copysign(math.floor(abs(x) / quantum + 0.5) * quantum, x)


def tf32_truncated(x: float) -> float:
    """x with the bits below TF32's significand dropped (how mma reads a float32 operand)."""
    if not math.isfinite(x) or x == 0:
        return x
    quantum = tf32_quantum(x)
    return math.copysign(math.floor(abs(x) / quantum) * quantum, x)


def test_to_tf32_rounds_to_nearest_ties_away(instructions):
    generator = torch.Generator().manual_seed(7)
    one = 1.0
    step = 2.0**-10  # TF32's spacing in [1, 2)
    special = [one + step / 2, one + 3 * step / 2, -(one + step / 2), one + step / 2 - 2.0**-23,
               2.0**-130, 3 * 2.0**-137, 2.0**-140, 3.4028234e38, -3.4028234e38, 0.0, -0.0,
               float("inf"), float("-inf")]
    values = torch.cat([torch.tensor(special), torch.randn(2000, generator=generator) * 1e3,
                        torch.randn(200, generator=generator) * 1e-39])
    bits = instructions.to_tf32(values)
    assert bool(((bits & 0x1FFF) == 0).all()), "a TF32 pattern keeps bits below the significand"
    got = bits.view(torch.float32)
    expected = torch.tensor([tf32_rounded(float(x)) for x in values], dtype=torch.float64)
    assert torch.equal(got.double(), expected.float().double())
    assert bool(torch.isnan(instructions.to_tf32(torch.tensor([float("nan")])).view(
        torch.float32)).all())


def test_tf32_mma_reads_the_upper_19_bits(instructions):
    """float32 operands that are not TF32 values enter the product truncated."""
    generator = torch.Generator().manual_seed(9)
    a = 1 + torch.rand(16, 8, generator=generator)
    b = 1 + torch.rand(8, 8, generator=generator)
    c = torch.zeros(16, 8)
    (d,) = run_mma(instructions, "tf32", [(a, b, c)], descending=False)
    truncated_a = torch.tensor([[tf32_truncated(float(x)) for x in row] for row in a])
    truncated_b = torch.tensor([[tf32_truncated(float(x)) for x in row] for row in b])
    expected = truncated_a.double() @ truncated_b.double()
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(d.double(), a.double() @ b.double(), rtol=1e-5, atol=0)


# ---- ldmatrix -----------------------------------------------------------------------------

TILE_ROWS, TILE_COLS = 64, 16  # the kernel's shared tile: 64 rows of 16 int16 (32 bytes)


def ldmatrix_expected(tile: torch.Tensor, offsets: list[int], matrices: int,
                      transpose: bool) -> torch.Tensor:
    """Each lane's registers (32, matrices) as (low, high) element pairs, by the ISA: lanes
    8m .. 8m+7 give the rows of matrix m; lane L's register m holds row L / 4, columns
    2 (L % 4) and 2 (L % 4) + 1 of matrix m, or of its transpose with .trans."""
    flat = tile.flatten()
    expected = torch.zeros(32, matrices, 2, dtype=torch.int64)
    for m in range(matrices):
        matrix = torch.stack([flat[offsets[8 * m + r]:offsets[8 * m + r] + 8]
                              for r in range(8)])
        if transpose:
            matrix = matrix.T
        for lane in range(32):
            expected[lane, m, 0] = matrix[lane // 4, 2 * (lane % 4)]
            expected[lane, m, 1] = matrix[lane // 4, 2 * (lane % 4) + 1]
    return expected


@ORDERS
@pytest.mark.parametrize("transpose", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_ldmatrix_fragment_layout(instructions, matrices, transpose, descending):
    tile = torch.arange(TILE_ROWS * TILE_COLS, dtype=torch.int16).reshape(TILE_ROWS, TILE_COLS)
    generator = torch.Generator().manual_seed(matrices + 10 * transpose)
    rows = torch.randperm(TILE_ROWS, generator=generator)[:32]
    halves = torch.randint(0, 2, (32,), generator=generator)
    offsets = [int(row) * TILE_COLS + 8 * int(half) for row, half in zip(rows, halves)]
    # Lanes past 8 * matrices supply no row: their (misaligned) addresses must be ignored.
    offsets = [offset if lane < 8 * matrices else 3 for lane, offset in enumerate(offsets)]
    registers = instructions.ldmatrix(matrices, transpose, tile, torch.tensor(offsets),
                                      descending).long()
    got = torch.stack([registers & 0xFFFF, (registers >> 16) & 0xFFFF], dim=-1)
    assert torch.equal(got, ldmatrix_expected(tile, offsets, matrices, transpose))


# ---- cp.async -----------------------------------------------------------------------------


@ORDERS
@pytest.mark.parametrize("size", [4, 8, 16])
def test_cp_async_lands_at_the_covering_wait(instructions, size, descending):
    """Two groups per thread: nothing before a wait (the poison is read), the older group
    after wait_group 1, both after wait_group 0."""
    source = torch.arange(64 * 8, dtype=torch.float32) + 1
    out = instructions.cp_async(size, True, source, descending)  # (thread, stage, float)
    expected = source.reshape(64, 8)
    before, after_one, after_all = out[:, 0].view(torch.int32), out[:, 1], out[:, 2]
    assert bool((before == POISON[descending]).all()), "a copy landed before its wait"
    assert torch.equal(after_one[:, :4], expected[:, :4])
    assert bool((after_one[:, 4:].view(torch.int32) == POISON[descending]).all()), (
        "wait_group 1 landed the newest group too")
    assert torch.equal(after_all, expected)


@ORDERS
def test_cp_async_invalid_zero_fills(instructions, descending):
    """valid = false: the destination becomes zeros and the (null) source is not read."""
    source = torch.arange(64 * 8, dtype=torch.float32) + 1
    out = instructions.cp_async(16, False, source, descending)
    assert torch.equal(out[:, 2, :4], source.reshape(64, 8)[:, :4])
    assert torch.equal(out[:, 2, 4:], torch.zeros(64, 4))


# ---- Dynamic shared memory ----------------------------------------------------------------


@ORDERS
def test_dynamic_shared_memory_is_shared_and_poisoned(instructions, descending):
    """MCSC_DYNAMIC_SHARED_MEMORY: one buffer for the block's threads, poisoned before each of
    the two blocks like the static __shared__ variables."""
    out = instructions.dynamic_shared(2, descending)
    assert torch.equal(out[:, 0], (torch.arange(64) + 1) % 64 + 0.5)
    assert bool((out[:, 1].view(torch.int32) == POISON[descending]).all())


# ---- Misuse -------------------------------------------------------------------------------


@ORDERS
@pytest.mark.parametrize("kernel, message", [
    ("divergent_mma", ("divergent warp barrier in block (0, 0): 16 of the 32 lanes of warp 0 "
                       "wait at mma_m16n8k16_bf16, the others do not")),
    ("mismatched_warp", ("divergent warp in block (0, 0): lane 0 of warp 0 waits at "
                         "mma_m16n8k16_f16, lane 16 at ldmatrix_x1")),
    ("misaligned_ldmatrix", "ldmatrix_x4: the row address of lane 3 is not 16-byte aligned"),
    ("misaligned_cp_async", "cp_async<16>: an address of thread"),
    ("missing_wait", ("exits with cp.async copies that no wait covered (1 committed groups not "
                      "waited for, 0 copies never committed)")),
    ("missing_commit", ("exits with cp.async copies that no wait covered (0 committed groups "
                        "not waited for, 1 copies never committed)")),
])
def test_misuse_is_reported(instructions, kernel, message, descending):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        instructions.misuse(kernel, descending)
