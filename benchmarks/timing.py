"""Interleaved timing of the implementations, one workload at a time, and their peak memory.

The implementations of one size are *interleaved*: every round runs each of them once, in
rotating order, so machine load hits all of them alike. A round of a loss implementation times
the forward (inputs require grad, as in training, so the forward saves what backward needs:
``fwd``), then ``loss.backward()`` (``bwd``); ``fwd+bwd`` is their sum within the same call.
``gemm`` times one ``z_s @ z_s.T`` per segment. Rows report the median and the 20th / 80th
percentiles over rounds, and ratios to ``gemm`` and ``dense`` of the same size computed from the
medians of this run.

Peak memory (``memory.py``): on the GPU it is read around every timed call; on the CPU a fresh
worker process per implementation measures it after the timing. An implementation whose
estimated memory does not fit the budget is skipped at that size, and its rows say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import time

import implementations as impls
import memory
import torch

TEMPERATURE = 0.1
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Rounds:
    """How many interleaved rounds to time at one size: at least ``minimum``, then more while
    the size has taken less than ``budget_s`` seconds, at most ``maximum``."""

    minimum: int
    maximum: int
    budget_s: float


@dataclasses.dataclass
class Workload:
    """Implementations timed on the same inputs at one or more sizes.

    ``points`` holds one list of segment sizes per N. ``tf32``: float32 matmuls may use TF32
    (``torch.backends.cuda.matmul.allow_tf32``) while the workload runs. ``rounds``: None for
    the command line's. ``warmup``: one untimed call per implementation first; False where the
    kernels are warm from an earlier workload and one call takes seconds.
    """

    name: str
    points: list
    d: int
    c: int
    weighting: str
    impls: tuple
    dtype: str = "float32"
    tf32: bool = False
    rounds: Rounds | None = None
    warmup: bool = True


@dataclasses.dataclass
class Settings:
    """What the command line decides for every workload."""

    device: str
    rounds: Rounds
    memory_budget_bytes: float
    common: dict  # columns shared by every row: device, threads, torch, machine
    backend: str  # mcsc.backend(device) of the process
    package: str  # the mcsc package directory the process imported (memory workers import it)
    exclude: frozenset = frozenset()
    rejected: dict = dataclasses.field(default_factory=dict)  # impl -> why it is not timed
    cpu_memory: bool = True  # peak memory in worker processes (CPU)
    one_memory_worker: bool = False  # one worker for the whole workload (quick runs)


def memory_budget_bytes(device: str, budget_gb: float | None) -> float:
    """``budget_gb`` GiB, or 60 % of the memory available now on ``device``."""
    if budget_gb is not None:
        return budget_gb * 2**30
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return 0.6 * free
    return 0.6 * memory.meminfo_bytes("MemAvailable")


def segments_label(sizes: list[int]) -> str:
    """``[3610, 3610, 1960]`` -> ``"2x3610+1x1960"``."""
    groups = []
    for size in sizes:
        if groups and groups[-1][1] == size:
            groups[-1][0] += 1
        else:
            groups.append([1, size])
    return "+".join(f"{count}x{size}" for count, size in groups)


def spread(values: list[float]) -> tuple[float, float]:
    """The 20th and 80th percentiles (linear interpolation between the closest ranks)."""
    if len(values) == 1:
        return values[0], values[0]
    quintiles = statistics.quantiles(values, n=5, method="inclusive")
    return quintiles[0], quintiles[3]


class Interrupted(BaseException):
    """SIGTERM (``timeout``): stop timing, report what was measured."""


def _interrupt(signum, frame):
    raise Interrupted()


@contextlib.contextmanager
def sigterm_interrupts():
    """Inside, SIGTERM raises :class:`Interrupted`; the handler before is restored on leaving."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def float32_matmul_tf32(enabled: bool):
    """Let float32 matmuls (cuBLAS and the fused op's CUDA kernels) use TF32 inside."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = before


# ----------------------------------------------------------------------------------------------
# one call of one implementation
# ----------------------------------------------------------------------------------------------


def _sync(device: str):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def warmup_bounds(bounds: list[int]) -> list[int]:
    """The bounds of :func:`implementations.warmup_sizes` of the workload's segments."""
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return impls.segment_bounds(impls.warmup_sizes(sizes))


class NoPeaks:
    """The CPU's stand-in for :class:`memory.CudaPeaks`: worker processes measure CPU memory."""

    def __init__(self):
        self.peaks = {}

    def end(self, mode: str) -> None:
        pass


def make_runner(name, z, y, weighting, device, blockwise=False):
    """``runner(bounds) -> ({mode: seconds}, {mode: peak MiB})`` doing one call of ``name``
    on the first ``bounds[-1]`` rows; the peaks are measured on the GPU only."""
    sync = _sync(device)
    peaks = memory.CudaPeaks if device == "cuda" else NoPeaks

    def start():
        sync()
        return peaks()

    if name == "gemm":

        def run_gemm(bounds):
            tracker = start()
            started = time.perf_counter()
            out = impls.gemm(z, bounds)
            sync()
            seconds = time.perf_counter() - started
            tracker.end("fwd")
            del out
            return {"fwd": seconds}, tracker.peaks

        return run_gemm

    if blockwise:

        def run_blockwise(bounds):
            z.grad = None
            tracker = start()
            _, fwd, bwd = impls.blockwise_fwd_bwd(name, z, y, bounds, TEMPERATURE, weighting, sync)
            tracker.end("fwd+bwd")
            return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}, tracker.peaks

        return run_blockwise

    function = impls.IMPLEMENTATIONS[name]

    def run_loss(bounds):
        rows = z if bounds[-1] == z.shape[0] else z[: bounds[-1]]
        z.grad = None
        tracker = start()
        return time_call_and_backward(
            lambda: function(rows, y[: bounds[-1]], bounds, TEMPERATURE, weighting), sync, tracker
        )

    return run_loss


def time_call_and_backward(call, sync, tracker):
    """``({mode: seconds}, {mode: peak MiB})`` of ``loss = call()`` (``fwd``) and
    ``loss.backward()`` (``bwd``, and their sum ``fwd+bwd``); ``fwd`` alone when ``call``
    returns None. ``sync`` waits for the device; ``tracker`` (:class:`memory.CudaPeaks` or
    :class:`NoPeaks`) was started just before."""
    started = time.perf_counter()
    loss = call()
    sync()
    forward = time.perf_counter() - started
    tracker.end("fwd")
    if loss is None:
        return {"fwd": forward}, tracker.peaks
    started = time.perf_counter()
    loss.backward()
    sync()
    backward = time.perf_counter() - started
    tracker.end("bwd")
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}, tracker.peaks


def error_summary(error: Exception, limit: int = 80) -> str:
    """``"Type: first line of the message"``, the line cut to ``limit`` characters."""
    first_line = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:limit]}"


def time_point(
    names, z, y, bounds, weighting, device, rounds: Rounds, blockwise=frozenset(), warmup=True
):
    """Interleaved timing of one size.

    Returns ``({(impl, mode): [seconds]}, {(impl, mode): peak MiB}, {impl: note})``; an
    implementation that raises is dropped with its error as the note.
    """
    notes = {}
    runners = {
        name: make_runner(name, z, y, weighting, device, name in blockwise) for name in names
    }
    if warmup:  # and compilation: one untimed call each, on the first blocks only
        for name in list(runners):
            started = time.perf_counter()
            try:
                runners[name](warmup_bounds(bounds))
            except Exception as error:
                notes[name] = f"failed: {error_summary(error)}"
                del runners[name]
                continue
            if name in impls.COMPILED_IMPLS:
                notes[name] = f"first call (compile) {time.perf_counter() - started:.1f}s"
    samples, peaks = interleave(runners, rounds, notes, bounds)
    return samples, peaks, notes


def interleave(runners: dict, rounds: Rounds, notes: dict, *args) -> tuple[dict, dict]:
    """Call every ``runners[name](*args) -> ({mode: seconds}, {mode: peak MiB})`` once a round,
    in rotating order, for as many rounds as ``rounds`` allows. A runner that raises is dropped
    with its error in ``notes[name]``. Returns ``({(name, mode): [seconds]}, {(name, mode):
    highest peak MiB})``."""
    runners = dict(runners)
    samples, peaks = {}, {}
    order = list(runners)
    started = time.perf_counter()
    for index in range(rounds.maximum):
        if index >= rounds.minimum and time.perf_counter() - started > rounds.budget_s:
            break
        shift = index % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            if name not in runners:
                continue
            try:
                seconds, peak = runners[name](*args)
            except Exception as error:
                notes[name] = f"failed: {error_summary(error)}"
                del runners[name]
                continue
            for mode, value in seconds.items():
                samples.setdefault((name, mode), []).append(value)
            for mode, value in peak.items():
                peaks[(name, mode)] = max(peaks.get((name, mode), 0.0), value)
    return samples, peaks


# ----------------------------------------------------------------------------------------------
# one workload
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Which implementations run at one size, and how."""

    names: list
    skipped: dict  # impl -> why it does not run
    blockwise: set  # impls that run backward after every block to fit the memory budget
    notes: dict  # impl -> note for its rows


def plan_point(workload: Workload, sizes: list[int], settings: Settings) -> Plan:
    """The implementations of ``workload`` that can run ``sizes`` within the memory budget."""
    plan = Plan([], {}, set(), {})
    budget = settings.memory_budget_bytes
    itemsize = torch.empty((), dtype=getattr(torch, workload.dtype)).element_size()
    for name in workload.impls:
        if name != "gemm" and not impls.supports(name, workload.weighting, False):
            continue
        if name in settings.exclude:
            continue
        if name in settings.rejected:
            plan.skipped[name] = f"skipped: {settings.rejected[name]}"
            continue
        if impls.unavailable(name, settings.device):
            plan.skipped[name] = f"skipped: {impls.unavailable(name, settings.device)}"
            continue
        need = impls.estimated_extra_bytes(name, sizes, workload.d, itemsize)
        if need > budget and len(sizes) > 1 and name in ("dense", "compiled", "pml"):
            lean = impls.estimated_extra_bytes(name, sizes, workload.d, itemsize, blockwise=True)
            if lean <= budget:
                plan.blockwise.add(name)
                plan.notes[name] = (
                    f"backward after every block (one graph of all blocks: "
                    f"est. {need / 2**30:.0f} GiB > budget)"
                )
                need = lean
        if need > budget:
            plan.skipped[name] = (
                f"skipped: estimated {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
            )
        else:
            plan.names.append(name)
    return plan


def point_rows(
    workload: Workload,
    sizes: list[int],
    plan: Plan,
    samples: dict,
    peaks: dict,
    notes: dict,
    settings: Settings,
) -> list[dict]:
    """The result rows of one size: one per implementation and mode."""
    medians = {key: statistics.median(values) for key, values in samples.items()}
    gemm = medians.get(("gemm", "fwd"))
    rows = []
    for name in workload.impls:
        if name not in plan.names and name not in plan.skipped:
            continue
        note = plan.skipped.get(name) or "; ".join(
            text for text in (plan.notes.get(name), notes.get(name)) if text
        )
        for mode in ("fwd",) if name == "gemm" else MODES:
            row = dict(
                settings.common,
                impl=name,
                mode=mode,
                N=sum(sizes),
                D=workload.d,
                C=workload.c,
                segments=segments_label(sizes),
                dtype=workload.dtype,
                tf32=workload.tf32,
                weighting=workload.weighting,
                workload=workload.name,
                note=note,
                backend=settings.backend if name == "fused" else "",
            )
            values = samples.get((name, mode))
            if values:
                low, high = spread(values)
                median = medians[(name, mode)]
                row.update(
                    median_ms=median * 1e3,
                    p20_ms=low * 1e3,
                    p80_ms=high * 1e3,
                    reps=len(values),
                    peak_mem_mb=peaks.get((name, mode)),
                )
                dense = medians.get(("dense", mode))
                if gemm:
                    row["x_gemm"] = median / gemm
                if dense and name != "gemm":
                    row["dense_over_impl"] = dense / median
            elif not row["note"]:
                row["note"] = "not measured"
            rows.append(row)
    return rows


def _memory_job(workload: Workload, sizes: list[int], name: str, plan: Plan) -> dict:
    return {
        "impl": name,
        "sizes": sizes,
        "D": workload.d,
        "C": workload.c,
        "dtype": workload.dtype,
        "weighting": workload.weighting,
        "temperature": TEMPERATURE,
        "threads": torch.get_num_threads(),
        "blockwise": name in plan.blockwise,
    }


def add_cpu_memory(rows: list[dict], entries: list, settings: Settings, log) -> None:
    """Measure the peak memory of ``entries`` (``(rows of one impl and size, job)``) in worker
    processes, one per implementation (or one in all), and write it into those rows."""
    groups = {}
    for entry in entries:
        key = "all" if settings.one_memory_worker else entry[1]["impl"]
        groups.setdefault(key, []).append(entry)
    for name, group in groups.items():
        started = time.perf_counter()
        results = memory.measure_cpu_jobs(
            [job for _, job in group], os.path.dirname(settings.package)
        )
        log(f"  peak memory of {name}: {time.perf_counter() - started:.1f}s")
        for (job_rows, _), result in zip(group, results):
            for row in job_rows:
                if "error" in result:
                    row["note"] = (row["note"] + "; memory: " + result["error"]).strip("; ")
                elif row["mode"] in result:
                    row["peak_mem_mb"] = result[row["mode"]]


def run_workload(workload: Workload, settings: Settings, log=print) -> list[dict]:
    """Time every size of ``workload``; returns its rows (with peak memory)."""
    rows, memory_entries = [], []
    rounds = workload.rounds or settings.rounds
    with float32_matmul_tf32(workload.tf32):
        for sizes in workload.points:
            plan = plan_point(workload, sizes, settings)
            z, y = impls.make_inputs(
                sum(sizes),
                workload.d,
                workload.c,
                dtype=getattr(torch, workload.dtype),
                device=settings.device,
            )
            z.requires_grad_(True)
            started = time.perf_counter()
            samples, peaks, notes = time_point(
                plan.names,
                z,
                y,
                impls.segment_bounds(sizes),
                workload.weighting,
                settings.device,
                rounds,
                blockwise=plan.blockwise,
                warmup=workload.warmup,
            )
            log(
                f"  [{workload.name}] N={sum(sizes)} ({segments_label(sizes)}): timed "
                f"{', '.join(plan.names) or 'nothing'} in {time.perf_counter() - started:.1f}s"
            )
            del z, y
            new_rows = point_rows(workload, sizes, plan, samples, peaks, notes, settings)
            rows.extend(new_rows)
            if settings.device != "cpu" or not settings.cpu_memory:
                continue
            timed = {row["impl"] for row in new_rows if row.get("median_ms") is not None}
            for name in plan.names:
                if name in timed:
                    memory_entries.append(
                        (
                            [row for row in new_rows if row["impl"] == name],
                            _memory_job(workload, sizes, name, plan),
                        )
                    )
    if memory_entries:
        add_cpu_memory(rows, memory_entries, settings, log)
    return rows
