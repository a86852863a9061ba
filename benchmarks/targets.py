"""The target sets of ``run.py --targets``: the workloads to time, and the measures computed from
their rows, each either a goal with a pass/fail verdict or context.

``cpu`` (2 cores, float32): at N = 8192, D = 128, C = 4, fused forward+backward against one
``z @ z.T`` and against dense PyTorch, its peak extra memory, and one training step of the public
MCSC code (100 segments of 3610 rows and one of 1960).

``gpu`` (an H200): at N = 16384, D = 128, C = 4 the bf16 time, FlexAttention's time over the
fused op's (bf16), dense over fused in float32 with TF32 off, the float32 time with TF32; the
float32 time at N = 262144; and N = 1,048,576 in bf16 within 1 GiB of extra memory.

All sets use one segment (except the training step), prevalence weights, temperature 0.1, and
medians of interleaved rounds; every ratio comes from one run. A dry run divides every size by
:data:`DRY_DIVISOR` and times one round: it runs every code path of the set in seconds, and its
numbers mean nothing.
"""

from __future__ import annotations

import dataclasses

import implementations as impls
from timing import Rounds, Workload

DRY_DIVISOR = 256
ONCE = Rounds(1, 1, 0.0)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One value of the result rows: ``key`` of the row of (workload, impl, mode)."""

    workload: str
    impl: str
    mode: str = "fwd+bwd"
    key: str = "median_ms"

    def read(self, rows: list[dict]):
        for row in rows:
            if (row["workload"], row["impl"], row["mode"]) == (self.workload, self.impl, self.mode):
                return row.get(self.key)
        return None


@dataclasses.dataclass(frozen=True)
class Measure:
    """``value`` (divided by ``per`` when given), with a goal (at most, at least or below a
    bound) or none: a context line, with what it is expected to be in ``expected``."""

    title: str
    value: Cell
    per: Cell | None = None
    at_most: float | None = None
    at_least: float | None = None
    below: float | None = None
    expected: str = ""

    def goal(self) -> str:
        if self.at_most is not None:
            return f"<= {self.at_most:g}"
        if self.at_least is not None:
            return f">= {self.at_least:g}"
        if self.below is not None:
            return f"< {self.below:g}"
        return self.expected

    def is_goal(self) -> bool:
        return (self.at_most, self.at_least, self.below) != (None, None, None)

    def evaluate(self, rows: list[dict]) -> dict:
        """``{"measure", "value", "goal", "ok", "verdict"}``; ``ok`` is None for context lines
        and for goals that were not measured."""
        value = self.value.read(rows)
        if self.per is not None:
            per = self.per.read(rows)
            value = value / per if value and per else None
        ok = None
        if self.is_goal() and value is not None:
            ok = (
                (self.at_most is None or value <= self.at_most)
                and (self.at_least is None or value >= self.at_least)
                and (self.below is None or value < self.below)
            )
        if not self.is_goal():
            verdict = "context"
        elif ok is None:
            verdict = "not measured"
        else:
            verdict = "PASS" if ok else "FAIL"
        return {
            "measure": self.title,
            "value": value,
            "goal": self.goal(),
            "ok": ok,
            "verdict": verdict,
        }


def _scaled(n: int, divisor: int) -> int:
    return max(16, n // divisor)


def cpu_targets(
    timed: Rounds, quick: bool = False, divisor: int = 1
) -> tuple[list[Workload], list[Measure]]:
    """The CPU target set: its workloads (most important first) and measures; ``timed``: the
    rounds of the main size."""
    n = _scaled(8192, divisor)
    step = [_scaled(size, divisor) for size in impls.training_step_sizes(10 if quick else 100)]
    single, training = f"target_N{n}", "target_training_step"
    workloads = [
        Workload(
            single, [[n]], 128, 4, "prevalence", ("gemm", "fused", "dense", "tiled"), rounds=timed
        ),
        Workload(
            training,
            [step],
            128,
            4,
            "prevalence",
            ("gemm", "fused", "dense"),
            rounds=Rounds(3, 3, 0.0) if divisor == 1 else ONCE,
        ),
    ]
    gemm = Cell(single, "gemm", "fwd")
    measures = [
        Measure(f"fused fwd+bwd / GEMM (N={n}, C=4)", Cell(single, "fused"), gemm, at_most=2.0),
        Measure(
            "dense fwd+bwd / fused fwd+bwd",
            Cell(single, "dense"),
            Cell(single, "fused"),
            at_least=5.0,
        ),
        Measure(
            "fused fwd+bwd peak extra MiB", Cell(single, "fused", key="peak_mem_mb"), at_most=64
        ),
        Measure(
            "dense fwd+bwd peak extra MiB",
            Cell(single, "dense", key="peak_mem_mb"),
            expected="~2048",
        ),
        Measure("tiled fwd+bwd / GEMM", Cell(single, "tiled"), gemm, expected="~2.9"),
        Measure("dense fwd+bwd / GEMM", Cell(single, "dense"), gemm, expected="~12"),
        Measure(
            "training step: dense block loop / fused",
            Cell(training, "dense"),
            Cell(training, "fused"),
            at_least=5.0,
        ),
    ]
    return workloads, measures


def gpu_targets(
    timed: Rounds, quick: bool = False, divisor: int = 1
) -> tuple[list[Workload], list[Measure]]:
    """The GPU target set: its workloads (most important and cheapest first) and measures;
    ``timed``: the rounds at N = 16384.

    The two largest sizes run one call each, without a warm-up call: the kernels are warm from
    the N = 16384 workloads, and at 1,048,576 rows one call takes seconds.
    """
    n, large, huge = (_scaled(size, divisor) for size in (16384, 262144, 1048576))
    bf16, fp32, tf32 = f"target_N{n}_bf16", f"target_N{n}_fp32", f"target_N{n}_tf32"
    big, biggest = f"target_N{large}_fp32", f"target_N{huge}_bf16"
    workloads = [
        Workload(
            bf16,
            [[n]],
            128,
            4,
            "prevalence",
            ("gemm", "fused", "flex", "dense", "compiled"),
            dtype="bfloat16",
            rounds=timed,
        ),
        Workload(fp32, [[n]], 128, 4, "prevalence", ("gemm", "fused", "dense"), rounds=timed),
        Workload(tf32, [[n]], 128, 4, "prevalence", ("gemm", "fused"), tf32=True, rounds=timed),
        Workload(big, [[large]], 128, 4, "prevalence", ("fused",), rounds=ONCE, warmup=False),
        Workload(
            biggest,
            [[huge]],
            128,
            4,
            "prevalence",
            ("fused",),
            dtype="bfloat16",
            rounds=ONCE,
            warmup=False,
        ),
    ]
    measures = [
        Measure(f"fused fwd+bwd ms, bf16, N={n}", Cell(bf16, "fused"), at_most=1.0),
        Measure(
            f"flex / fused fwd+bwd time, bf16, N={n}",
            Cell(bf16, "flex"),
            Cell(bf16, "fused"),
            at_least=1.5,
        ),
        Measure(
            f"dense / fused fwd+bwd time, float32 TF32 off, N={n}",
            Cell(fp32, "dense"),
            Cell(fp32, "fused"),
            at_least=4.0,
        ),
        Measure(f"fused fwd+bwd ms, float32 with TF32, N={n}", Cell(tf32, "fused"), at_most=1.5),
        Measure(f"fused fwd+bwd ms, float32, N={large}", Cell(big, "fused"), at_most=1200),
        Measure(
            f"fused fwd+bwd peak extra MiB, bf16, N={huge}",
            Cell(biggest, "fused", key="peak_mem_mb"),
            below=1024,
        ),
        Measure(
            f"fused fwd+bwd / one bf16 z @ z.T, N={n}",
            Cell(bf16, "fused"),
            Cell(bf16, "gemm", "fwd"),
        ),
        Measure(
            f"compiled / fused fwd+bwd time, bf16, N={n}",
            Cell(bf16, "compiled"),
            Cell(bf16, "fused"),
        ),
        Measure(
            f"dense / fused fwd+bwd time, bf16, N={n}", Cell(bf16, "dense"), Cell(bf16, "fused")
        ),
        Measure(f"fused fwd+bwd ms, float32 TF32 off, N={n}", Cell(fp32, "fused")),
        Measure(
            f"fused fwd+bwd peak extra MiB, float32, N={large}",
            Cell(big, "fused", key="peak_mem_mb"),
        ),
        Measure(f"fused fwd+bwd ms, bf16, N={huge}", Cell(biggest, "fused")),
    ]
    return workloads, measures


TARGET_SETS = {"cpu": cpu_targets, "gpu": gpu_targets}


def target_set(
    name: str, rounds: Rounds, quick: bool = False, dry: bool = False
) -> tuple[list[Workload], list[Measure]]:
    """The workloads and measures of the target set ``name`` ("cpu" or "gpu"); the main sizes
    get at least 7 rounds, or at least those of ``rounds`` (the command line's)."""
    if dry:
        return TARGET_SETS[name](ONCE, quick, DRY_DIVISOR)
    minimum = max(rounds.minimum, 7)
    timed = Rounds(minimum, max(minimum, rounds.maximum), rounds.budget_s)
    return TARGET_SETS[name](timed, quick, 1)
