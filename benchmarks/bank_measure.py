"""Measuring the cross-batch-memory step of ``bank_implementations.py``: which implementations
fit the memory budget at a size, their interleaved timing, their peak memory, and the largest
memory (K) each fits in a budget.

Timing: every round runs each implementation once, in rotating order, so machine load hits all
of them alike; a round of a loss times its call (``fwd``) and ``loss.backward()`` (``bwd``);
``fwd+bwd`` is their sum within the round; ``gemm`` is one phase (``fwd``). Before the first
size every implementation is called once on a small step (library initialisation, thread
pools); sizes get no warm-up call of their own (one PML call at the large sizes takes as long
as a round), so the median of the rounds is what counts.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` around the timed calls
(``memory.CudaPeaks``). CPU: a fresh worker process per implementation and size
(``python benchmarks/bank_measure.py JOBS_JSON``, glibc set to return freed blocks to the
kernel) builds the step, prepares the implementation, calls it once on a small step, then
measures the increase of the resident set's high-water mark over the call (``memory.py``
explains the method). Either way the step's inputs (the memory, the batch and, for ``pml_loss``,
the pair indices it is handed) are not counted: :func:`bank_implementations.held_bytes` adds
them where a budget is concerned.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import bank_implementations as bank
import memory
import numpy as np
import torch
from timing import NoPeaks, Rounds, error_summary, interleave, spread, time_call_and_backward

MODES = ("fwd", "bwd", "fwd+bwd")
WARMUP_SIZE = (128, 512)  # (M, K) of the warm-up step


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def available_bytes(device: str) -> float:
    """Memory free for a new allocation now: ``MemAvailable`` (CPU) or the GPU's free memory."""
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    return memory.meminfo_bytes("MemAvailable")


def plan_point(names, m, k, d, dtype, num_classes, budget_bytes, available, same_fraction=None):
    """``(names to run, {name: why not})`` at one size: an implementation runs when what it
    holds and its estimated peak fit both ``budget_bytes`` and 80 % of ``available`` (the
    machine's free memory now: never run a shared machine out of memory). ``same_fraction``:
    as in :func:`bank_implementations.estimated_extra_bytes`."""
    size = itemsize(dtype)
    limit = min(budget_bytes, 0.8 * available)
    run, skipped = [], {}
    for name in names:
        need = bank.held_bytes(name, m, k, d, size) + bank.estimated_extra_bytes(
            name, m, k, d, size, num_classes, same_fraction
        )
        if need > limit:
            why = "budget" if limit == budget_bytes else "80 % of the free memory"
            skipped[name] = (
                f"over budget: estimated {need / 2**30:.1f} GiB > {why} {limit / 2**30:.1f} GiB"
            )
        else:
            run.append(name)
    return run, skipped


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def make_runner(call, step: bank.Step, device: str):
    """``runner() -> ({mode: seconds}, {mode: peak MiB})``: one call and its backward; the
    peaks are measured on the GPU only."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peaks = memory.CudaPeaks if device == "cuda" else NoPeaks

    def run():
        step.batch.grad = None
        sync()
        return time_call_and_backward(call, sync, peaks())

    return run


def warm_up(names, d, dtype, num_classes, device) -> dict:
    """One call of each implementation on a small step; ``{name: note}`` of those that fail."""
    step = bank.make_step(
        *WARMUP_SIZE, d, num_classes, seed=5, dtype=getattr(torch, dtype), device=device
    )
    failed = {}
    for name in names:
        try:
            make_runner(bank.prepare(name, step), step, device)()
        except Exception as error:
            failed[name] = f"failed: {error_summary(error)}"
    return failed


def time_point(names, step: bank.Step, device: str, rounds: Rounds):
    """Interleaved timing of one size. Returns ``({(name, mode): [seconds]}, {(name, mode):
    peak MiB}, {name: note})``; an implementation that raises is dropped with its error."""
    notes, runners = {}, {}
    for name in names:
        try:
            runners[name] = make_runner(bank.prepare(name, step), step, device)
        except Exception as error:
            notes[name] = f"failed: {error_summary(error)}"
    samples, peaks = interleave(runners, rounds, notes)
    return samples, peaks, notes


def summarise(samples: dict) -> dict:
    """``{(name, mode): (median, p20, p80, count)}`` in seconds."""
    return {
        key: (statistics.median(values), *spread(values), len(values))
        for key, values in samples.items()
    }


# ----------------------------------------------------------------------------------------------
# CPU peak memory, in a fresh worker process per implementation and size
# ----------------------------------------------------------------------------------------------


def memory_job(name, m, k, d, num_classes, dtype, threads) -> dict:
    return {
        "impl": name,
        "M": m,
        "K": k,
        "D": d,
        "C": num_classes,
        "dtype": dtype,
        "threads": threads,
    }


def measure_cpu_memory(job: dict, package_parent: str, timeout: float = 900.0) -> dict:
    """Peak extra MiB (``fwd``, ``bwd``, ``fwd+bwd``; ``fwd`` alone for ``gemm``) of one job in
    a fresh worker that imports the ``mcsc`` found in ``package_parent``, or ``{"error"}``."""
    (result,) = memory.measure_cpu_jobs(
        [job], package_parent, timeout=timeout, script=os.path.abspath(__file__)
    )
    return result


def run_memory_job(job: dict) -> dict:
    """In the worker: build the step, prepare, warm up on a small step, measure."""
    dtype = getattr(torch, job["dtype"])
    warm = bank.make_step(*WARMUP_SIZE, job["D"], job["C"], seed=5, dtype=dtype)
    make_runner(bank.prepare(job["impl"], warm), warm, "cpu")()
    del warm
    step = bank.make_step(job["M"], job["K"], job["D"], job["C"], dtype=dtype)
    call = bank.prepare(job["impl"], step)

    def run_forward():
        step.batch.grad = None
        return call()

    def run_backward(loss):
        loss.backward()

    single = "fwd" if job["impl"] == "gemm" else None
    return memory.measure_cpu_in_process(run_forward, run_backward, single)


def _error_text(error: Exception) -> str:
    """A failed job's note in the worker's output."""
    return error_summary(error, 200)


# ----------------------------------------------------------------------------------------------
# the largest memory that fits a budget
# ----------------------------------------------------------------------------------------------

# The terms of each implementation's peak extra memory (bytes) as a function of (M, K); all are
# linear in K at a fixed M, so the budget gives K in closed form. PML's CrossBatchMemory gets one
# term: its self-pair removal's (positive pairs x M) matrix is 98 % of its peak at M = 1024
# (measured) and more at larger M, and the budget lets it run at one size only.
MEMORY_TERMS = {
    "fused": (("1", lambda m, k: 1.0), ("M", lambda m, k: m), ("K", lambda m, k: k)),
    "dense": (("1", lambda m, k: 1.0), ("MK", lambda m, k: m * k)),
    "pml_loss": (("1", lambda m, k: 1.0), ("MK", lambda m, k: m * k)),
    "pml_xbm": (("M^2 K", lambda m, k: m * m * k),),
}


def fit_memory(name: str, points: list[tuple[int, int, float]]) -> dict | None:
    """Least-squares fit (relative errors) of the peak extra bytes ``points`` = [(M, K, bytes)]
    with the terms of :data:`MEMORY_TERMS`; a term whose coefficient comes out negative is
    dropped and the rest refitted. None when there are fewer points than terms."""
    terms = list(MEMORY_TERMS[name])
    points = [p for p in points if p[2] > 0]
    while terms:
        if len(points) < len(terms):
            return None
        matrix = np.array([[term(m, k) / value for _, term in terms] for m, k, value in points])
        coefficients, *_ = np.linalg.lstsq(matrix, np.ones(len(points)), rcond=None)
        if (coefficients >= 0).all():
            fitted = {label: float(c) for (label, _), c in zip(terms, coefficients)}
            worst = max(
                abs(sum(c * term(m, k) for (_, term), c in zip(terms, coefficients)) / value - 1)
                for m, k, value in points
            )
            return {"terms": fitted, "worst_relative_error": float(worst), "points": len(points)}
        terms.pop(int(np.argmin(coefficients)))
    return None


def _term_value(label: str, m: int) -> tuple[float, float]:
    """``(constant part, per-K part)`` of a term at M = m."""
    parts = {"1": (1.0, 0.0), "M": (m, 0.0), "K": (0.0, 1.0), "MK": (0.0, m), "M^2 K": (0.0, m * m)}
    return parts[label]


def largest_k(name: str, fit: dict, m: int, d: int, size: int, budget_bytes: float) -> int:
    """The largest K (a multiple of 1024) whose held memory (``held_bytes``) plus fitted peak
    extra memory fit ``budget_bytes`` at M = ``m``; 0 when none does."""
    constant = bank.held_bytes(name, m, 0, d, size)
    per_key = bank.held_bytes(name, m, 1, d, size) - constant
    for label, coefficient in fit["terms"].items():
        fixed, per_k = _term_value(label, m)
        constant += coefficient * fixed
        per_key += coefficient * per_k
    if constant >= budget_bytes:
        return 0
    return int((budget_bytes - constant) / per_key) // 1024 * 1024


if __name__ == "__main__":
    memory.serve_jobs(json.loads(sys.argv[1]), run_memory_job, _error_text, trim_between_jobs=False)
