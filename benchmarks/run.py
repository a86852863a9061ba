"""Benchmark the fused supervised contrastive loss against dense PyTorch and peer libraries.

    PYTHONPATH=. python benchmarks/run.py [--quick] [--device cpu|cuda] --out DIR
    PYTHONPATH=. python benchmarks/run.py --targets [--device cuda] --out DIR   # issue targets

Writes ``DIR/results.csv`` (one row per implementation, mode and size), one PNG per workload
(``DIR/<workload>.png``: fwd+bwd time and peak memory against N, log scales) and prints a
table. Implementations: see ``implementations.py``. Before timing, every implementation's loss
and gradient are checked against ``fused`` on small inputs (the script stops if one disagrees).

Timing: the implementations of one size are *interleaved* (every round runs each of them once,
in rotating order) so machine load hits all of them alike; a round of a loss implementation
times the forward (inputs require grad, as in training, so the forward saves what backward
needs: ``fwd``), then ``loss.backward()`` (``bwd``); ``fwd+bwd`` is their sum within the same
call. ``gemm`` times one ``z_s @ z_s.T`` per segment. We report the median and the 20th / 80th
percentiles over rounds, and ratios to ``gemm`` and ``dense`` of the same size computed from the
medians of this run. Peak memory: see ``memory.py`` (CPU: a fresh worker process and its
``VmHWM`` high-water mark; CUDA: ``torch.cuda.max_memory_allocated``). An implementation whose
estimated memory does not fit (``--mem-budget-gb``, default 60 % of available RAM / GPU memory)
is skipped at that size, and the table says so.

Shared machines: PyTorch's OpenMP threads spin-wait between parallel regions by default. When
other processes compete for the cores, every parallel region can stall for a scheduler time
slice, which adds ~100 ms to a call made of many short regions (seen on the 2-core development
machine: fused N=1024 took 100 ms instead of 6 ms). Run with ``OMP_WAIT_POLICY=PASSIVE`` (or
``--threads 1``) there; the machine column records the policy.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

warnings.filterwarnings("ignore", message="mcsc: ")

import torch  # noqa: E402

import implementations as impls  # noqa: E402
import memory  # noqa: E402

TEMPERATURE = 0.1
COLUMNS = ["impl", "mode", "N", "D", "C", "segments", "dtype", "device", "median_ms", "p20_ms",
           "p80_ms", "peak_mem_mb", "threads", "torch", "machine",
           # extra columns (after the required ones)
           "weighting", "workload", "reps", "x_gemm", "dense_over_impl", "backend", "note"]
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass
class Workload:
    name: str
    points: list  # list of segment-size lists, one per N
    d: int
    c: int
    weighting: str
    impls: tuple
    dtype: str = "float32"


def segments_label(sizes: list[int]) -> str:
    groups = []
    for size in sizes:
        if groups and groups[-1][1] == size:
            groups[-1][0] += 1
        else:
            groups.append([1, size])
    return "+".join(f"{count}x{size}" for count, size in groups)


def machine_description(device: str, note: str = "") -> str:
    if device == "cuda":
        text = f"{torch.cuda.get_device_name()} ({platform.node()})"
    else:
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                for line in cpuinfo:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        mem_gb = _mem_available_bytes(total=True) / 2**30
        text = f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM"
    if os.environ.get("OMP_WAIT_POLICY"):
        text += f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    return f"{text}; {note}" if note else text


def _mem_available_bytes(total: bool = False) -> float:
    key = "MemTotal:" if total else "MemAvailable:"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(key):
                return int(line.split()[1]) * 1024.0
    return float("inf")


def memory_budget_bytes(device: str, budget_gb: float | None) -> float:
    if budget_gb is not None:
        return budget_gb * 2**30
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return 0.6 * free
    return 0.6 * _mem_available_bytes()


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------

def build_workloads(device: str, quick: bool) -> list[Workload]:
    sweep_prev = ("gemm", "fused", "dense", "tiled", "compiled")
    sweep_none = ("gemm", "fused", "dense", "tiled", "pml")
    train = ("gemm", "fused", "dense", "tiled", "compiled")
    if device == "cuda":
        sizes = [2**k for k in range(10, 19)]  # 1024 .. 262144
        step = impls.training_step_sizes()
        small = sizes
    elif quick:
        sizes = [1024, 2048, 4096]
        small = [1024, 2048]
        step = impls.training_step_sizes(blocks=4)
    else:
        sizes = [1024, 2048, 4096, 8192, 16384]
        small = sizes
        step = impls.training_step_sizes()
    workloads = [
        Workload("sweep_C4_prevalence", [[n] for n in sizes], 128, 4, "prevalence", sweep_prev),
        Workload("sweep_C14_prevalence", [[n] for n in small], 128, 14, "prevalence",
                 sweep_prev if not quick else ("gemm", "fused", "dense", "tiled")),
        Workload("sweep_C4_none", [[n] for n in small], 128, 4, "none", sweep_none),
        Workload("training_step", [step], 128, 4, "prevalence",
                 train if not quick else ("gemm", "fused", "dense", "tiled")),
    ]
    if device == "cuda":
        workloads.append(Workload("sweep_C4_prevalence_bf16", [[n] for n in sizes], 128, 4,
                                  "prevalence", ("gemm", "fused", "dense", "tiled"),
                                  dtype="bfloat16"))
    return workloads


# ----------------------------------------------------------------------------------------------
# value agreement
# ----------------------------------------------------------------------------------------------

def check_agreement(device: str, impl_names, dtype_name: str = "float32") -> list[str]:
    """Loss and gradient of every implementation against ``fused``; raises on disagreement."""
    lines = []
    dtype = getattr(torch, dtype_name)
    tol = {torch.float32: 2e-4, torch.float64: 1e-9}.get(dtype, 3e-2)
    cases = [
        ("prevalence, 3 segments, ignored rows", [300, 0, 211, 97], 4, "prevalence", 0.1),
        ("none, 3 segments, ignored rows", [300, 211, 97], 5, "none", 0.1),
        ("none, 1 segment", [512], 4, "none", 0.0),
        ("prevalence, 1 segment, C=14", [640], 14, "prevalence", 0.0),
    ]
    for title, sizes, c, weighting, ignore in cases:
        bounds = impls.segment_bounds(sizes)
        z0, y = impls.make_inputs(sum(sizes), 32, c, seed=7, dtype=dtype, device=device,
                                  ignore_fraction=ignore)
        results = {}
        for name in ("fused",) + tuple(n for n in impl_names if n not in ("fused", "gemm")):
            if not impls.supports(name, weighting, ignore > 0):
                continue
            if name == "compiled" and len(sizes) > 1:
                continue  # one compilation is enough to check the values
            z = z0.clone().requires_grad_(True)
            try:
                loss = impls.IMPLEMENTATIONS[name](z, y, bounds, TEMPERATURE, weighting)
                loss.backward()
            except Exception as error:
                if name == "compiled":
                    lines.append(f"  compiled: does not run ({type(error).__name__}); skipped")
                    continue
                raise
            results[name] = (loss.detach(), z.grad.detach())
        ref_loss, fused_grad = results["fused"]
        for name, (loss, grad) in results.items():
            if name == "fused":
                continue
            ref_grad = fused_grad
            if name == "pml":  # pml normalises inside: compare on the sphere's tangent space
                ref_grad = fused_grad - (fused_grad * z0).sum(1, keepdim=True) * z0
            loss_err = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-12)
            grad_err = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30))
            ok = loss_err <= tol and grad_err <= tol
            lines.append(f"  {title:38s} {name:9s} loss rel err {loss_err:.1e}  "
                         f"grad max rel err {grad_err:.1e}  {'ok' if ok else 'MISMATCH'}")
            if not ok:
                raise AssertionError(f"{name} disagrees with fused on '{title}': loss rel err "
                                     f"{loss_err:.2e}, grad rel err {grad_err:.2e} (tol {tol})")
    return lines


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def _sync(device: str):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def warmup_bounds(bounds: list[int]) -> list[int]:
    """The first (at most 2) segments: enough to initialise libraries, thread pools and
    compiled code for every block shape of the workload (the last segment too if it differs)."""
    if len(bounds) <= 3:
        return bounds
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    keep = [sizes[0], sizes[1]] + ([sizes[-1]] if sizes[-1] != sizes[0] else [])
    return impls.segment_bounds(keep)


def make_runner(name, z, y, weighting, device, blockwise=False):
    """A function ``runner(bounds) -> {mode: seconds}`` doing one call of ``name``."""
    sync = _sync(device)
    if name == "gemm":
        def run_gemm(bounds):
            sync()
            t0 = time.perf_counter()
            out = impls.gemm(z, bounds)
            sync()
            del out
            return {"fwd": time.perf_counter() - t0}
        return run_gemm
    def rows_of(bounds):  # warm-up calls cover only the first rows
        return z if bounds[-1] == z.shape[0] else z[:bounds[-1]]

    if blockwise:
        def run_blockwise(bounds):
            z.grad = None
            _, fwd, bwd = impls.blockwise_fwd_bwd(name, z, y, bounds, TEMPERATURE, weighting,
                                                  sync)
            return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
        return run_blockwise
    fn = impls.IMPLEMENTATIONS[name]

    def run_loss(bounds):
        z.grad = None
        sync()
        t0 = time.perf_counter()
        loss = fn(rows_of(bounds), y[:bounds[-1]], bounds, TEMPERATURE, weighting)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        return {"fwd": t1 - t0, "bwd": t2 - t1, "fwd+bwd": t2 - t0}
    return run_loss


def time_point(names, z, y, bounds, weighting, device, min_reps, max_reps, budget_s,
               blockwise=frozenset()):
    """Interleaved timing of one size; returns ({(impl, mode): [seconds]}, {impl: note})."""
    notes = {}
    runners = {name: make_runner(name, z, y, weighting, device, name in blockwise)
               for name in names}
    # warm-up (and compilation): one untimed call each, on the first blocks only
    for name in list(runners):
        started = time.perf_counter()
        try:
            runners[name](warmup_bounds(bounds))
        except Exception as error:
            notes[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
            del runners[name]
            continue
        if name == "compiled":
            notes[name] = f"first call (compile) {time.perf_counter() - started:.1f}s"
    samples = {(name, mode): [] for name in runners for mode in MODES}
    order = list(runners)
    started = time.perf_counter()
    for rep in range(max_reps):
        if rep >= min_reps and time.perf_counter() - started > budget_s:
            break
        shift = rep % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            for mode, seconds in runners[name](bounds).items():
                samples[(name, mode)].append(seconds)
    return {k: v for k, v in samples.items() if v}, notes


def _percentile(values, q):
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def run_workload(wl: Workload, args, common: dict, log=print) -> list[dict]:
    rows = []
    budget = memory_budget_bytes(args.device, args.mem_budget_gb)
    dtype = getattr(torch, wl.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    mem_jobs = {}  # impl -> list of (row indices, job)
    for sizes in wl.points:
        n = sum(sizes)
        bounds = impls.segment_bounds(sizes)
        label = segments_label(sizes)
        names, skipped, blockwise, block_notes = [], {}, set(), {}
        for name in wl.impls:
            if name != "gemm" and not impls.supports(name, wl.weighting, False):
                continue
            if name in args.exclude:
                continue
            need = impls.estimated_extra_bytes(name, sizes, wl.d, itemsize)
            if need > budget and len(sizes) > 1 and name in ("dense", "compiled", "pml"):
                lean = impls.estimated_extra_bytes(name, sizes, wl.d, itemsize, blockwise=True)
                if lean <= budget:
                    blockwise.add(name)
                    block_notes[name] = (f"backward after every block (one graph of all "
                                         f"blocks: est. {need / 2**30:.0f} GiB > budget)")
                    need = lean
            if need > budget:
                skipped[name] = (f"skipped: estimated {need / 2**30:.1f} GiB > budget "
                                 f"{budget / 2**30:.1f} GiB")
            else:
                names.append(name)
        z, y = impls.make_inputs(n, wl.d, wl.c, dtype=dtype, device=args.device)
        z.requires_grad_(True)
        started = time.perf_counter()
        samples, notes = time_point(names, z, y, bounds, wl.weighting, args.device,
                                    args.min_reps, args.max_reps, args.point_budget_s,
                                    blockwise=blockwise)
        for name, text in block_notes.items():
            notes[name] = "; ".join(t for t in (text, notes.get(name)) if t)
        log(f"  [{wl.name}] N={n} ({label}): timed {', '.join(names)} in "
            f"{time.perf_counter() - started:.1f}s")
        del z, y
        medians = {key: statistics.median(v) for key, v in samples.items()}
        point_rows = []
        for name in wl.impls:
            if name not in names and name not in skipped:
                continue
            modes = ("fwd",) if name == "gemm" else MODES
            for mode in modes:
                row = dict(common, impl=name, mode=mode, N=n, D=wl.d, C=wl.c, segments=label,
                           dtype=wl.dtype, weighting=wl.weighting, workload=wl.name,
                           note=skipped.get(name) or notes.get(name, ""))
                row["backend"] = impls_backend(name, args.device)
                values = samples.get((name, mode))
                if values:
                    row.update(median_ms=medians[(name, mode)] * 1e3,
                               p20_ms=_percentile(values, 0.2) * 1e3,
                               p80_ms=_percentile(values, 0.8) * 1e3, reps=len(values))
                    gemm = medians.get(("gemm", "fwd"))
                    dense = medians.get(("dense", mode))
                    if gemm:
                        row["x_gemm"] = medians[(name, mode)] / gemm
                    if dense and name != "gemm":
                        row["dense_over_impl"] = dense / medians[(name, mode)]
                elif not row["note"]:
                    row["note"] = "not measured"
                point_rows.append(row)
        base_index = len(rows)
        rows.extend(point_rows)
        if args.no_memory:
            continue
        for name in names:
            if name not in {r["impl"] for r in point_rows if r.get("median_ms") is not None}:
                continue
            job = {"impl": name, "sizes": sizes, "D": wl.d, "C": wl.c, "dtype": wl.dtype,
                   "device": args.device, "weighting": wl.weighting,
                   "temperature": TEMPERATURE, "threads": torch.get_num_threads(),
                   "blockwise": name in blockwise}
            indices = [base_index + i for i, r in enumerate(point_rows) if r["impl"] == name]
            mem_jobs.setdefault(name, []).append((indices, job))
    # peak memory: one fresh worker process per implementation (CPU; with --quick one per
    # workload) or in process (CUDA)
    if args.quick and args.device == "cpu" and mem_jobs:
        mem_jobs = {"all": [entry for entries in mem_jobs.values() for entry in entries]}
    for name, entries in mem_jobs.items():
        started = time.perf_counter()
        if args.device == "cpu":
            results = memory.measure_cpu_jobs([job for _, job in entries])
        else:
            results = []
            for _, job in entries:
                try:
                    results.append(memory.run_job(job))
                except Exception as error:
                    results.append({"error": f"{type(error).__name__}: {error}"[:200]})
                torch.cuda.empty_cache()
        log(f"  [{wl.name}] peak memory of {name}: {time.perf_counter() - started:.1f}s")
        for (indices, _), result in zip(entries, results):
            for index in indices:
                mode = rows[index]["mode"]
                if "error" in result:
                    rows[index]["note"] = (rows[index]["note"] + "; memory: "
                                           + result["error"]).strip("; ")
                elif mode in result:
                    rows[index]["peak_mem_mb"] = result[mode]
    return rows


def impls_backend(name: str, device: str) -> str:
    if name == "fused":
        import mcsc
        return mcsc.ops.backend(device)
    return ""


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------

def _fmt(value, spec):
    return "" if value is None or value == "" else format(value, spec)


def format_table(rows: list[dict], modes=MODES) -> str:
    header = (f"{'workload':22s} {'impl':9s} {'mode':8s} {'N':>7s} {'C':>3s} {'median ms':>10s} "
              f"{'p20-p80 ms':>17s} {'x GEMM':>7s} {'dense/impl':>10s} {'peak MiB':>9s}  note")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["mode"] not in modes:
            continue
        spread = ""
        if r.get("p20_ms") is not None:
            spread = f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}"
        lines.append(
            f"{r['workload']:22s} {r['impl']:9s} {r['mode']:8s} {r['N']:7d} {r['C']:3d} "
            f"{_fmt(r.get('median_ms'), '10.1f'):>10s} {spread:>17s} "
            f"{_fmt(r.get('x_gemm'), '7.2f'):>7s} {_fmt(r.get('dense_over_impl'), '10.2f'):>10s} "
            f"{_fmt(r.get('peak_mem_mb'), '9.1f'):>9s}  {r.get('note', '')}")
    return "\n".join(lines)


def markdown_table(rows: list[dict], mode: str = "fwd+bwd") -> str:
    """README table: median ms, ratios to GEMM and dense, peak MiB (one mode + GEMM rows)."""
    out = ["| workload | N | impl | mode | median ms (p20-p80) | x GEMM | dense / impl | "
           "peak MiB |",
           "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["impl"] != "gemm" and r["mode"] != mode:
            continue
        if r.get("median_ms") is None:
            out.append(f"| {r['workload']} | {r['N']} | {r['impl']} | {r['mode']} | "
                       f"{r.get('note', '')} | | | |")
            continue
        out.append(
            f"| {r['workload']} | {r['N']} | {r['impl']} | {r['mode']} | "
            f"{r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | "
            f"{_fmt(r.get('x_gemm'), '.2f')} | {_fmt(r.get('dense_over_impl'), '.2f')} | "
            f"{_fmt(r.get('peak_mem_mb'), '.1f')} |")
    return "\n".join(out)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else
                                 (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r[k]))
                             for k in COLUMNS})


def plot_workload(rows: list[dict], workload: str, path: str, title: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["workload"] == workload]
    if not mine:
        return False
    names = []
    for r in mine:
        if r["impl"] not in names:
            names.append(r["impl"])
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    ns = sorted({r["N"] for r in mine})
    single = len(ns) == 1
    for i, name in enumerate(names):
        mode = "fwd" if name == "gemm" else "fwd+bwd"
        pts = [r for r in mine if r["impl"] == name and r["mode"] == mode]
        t = [(r["N"], r["median_ms"]) for r in pts if r.get("median_ms") is not None]
        m = [(r["N"], r["peak_mem_mb"]) for r in pts if r.get("peak_mem_mb") is not None]
        label = "gemm (z @ z.T)" if name == "gemm" else name
        style = dict(marker="o", linestyle="--" if name == "gemm" else "-", label=label)
        if single:
            if t:
                ax_time.bar(i, t[0][1], label=label)
            if m:
                ax_mem.bar(i, max(m[0][1], 1e-3), label=label)
            continue
        if t:
            ax_time.plot(*zip(*t), **style)
        if m:
            ax_mem.plot(*zip(*[(n, max(v, 1e-2)) for n, v in m]), **style)
    if single:
        for ax in (ax_time, ax_mem):
            ax.set_xticks(range(len(names)), names, rotation=30)
            ax.set_yscale("log")
    else:
        for ax in (ax_time, ax_mem):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (rows)")
            ax.grid(True, which="both", alpha=0.3)
    ax_time.set_ylabel("fwd+bwd median time (ms)")
    ax_mem.set_ylabel("peak extra memory fwd+bwd (MiB)")
    ax_time.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# issue-2 CPU targets
# ----------------------------------------------------------------------------------------------

def target_workloads(args) -> list[tuple[Workload, int, int, float]]:
    """The issue targets as (workload, min reps, max reps, point budget s), most important first.

    CPU (issue 2): N=8192 against one GEMM and dense, and the training step. CUDA (issue 3):
    N=16384 float32 against dense, bfloat16 against one bfloat16 GEMM, and N=262144 float32 for
    the peak extra memory.
    """
    reps = max(args.min_reps, 7)
    timed = (reps, max(reps, args.max_reps), args.point_budget_s)
    once = (1, 1, 0.0)
    if args.device == "cuda":
        four = ("gemm", "fused", "dense", "tiled")
        return [
            (Workload("target_N16384", [[16384]], 128, 4, "prevalence", four), *timed),
            (Workload("target_N16384_bf16", [[16384]], 128, 4, "prevalence", four,
                      dtype="bfloat16"), *timed),
            (Workload("target_N65536_bf16", [[65536]], 128, 4, "prevalence",
                      ("gemm", "fused", "tiled"), dtype="bfloat16"), 3, 3, 0.0),
            (Workload("target_N262144", [[262144]], 128, 4, "prevalence", ("gemm", "fused")),
             *once),
        ]
    blocks = 10 if args.quick else 100
    return [
        (Workload("target_N8192", [[8192]], 128, 4, "prevalence",
                  ("gemm", "fused", "dense", "tiled")), *timed),
        (Workload("target_training_step", [impls.training_step_sizes(blocks)], 128, 4,
                  "prevalence", ("gemm", "fused", "dense")), 3, 3, 0.0),
    ]


def summarize_targets(rows: list[dict], device: str = "cpu"
                      ) -> list[tuple[str, float | None, str, bool | None]]:
    """(title, value, target, met) for each issue target; ``met`` is None for context lines."""
    def get(workload, impl, mode="fwd+bwd", key="median_ms"):
        for r in rows:
            if r["workload"] == workload and r["impl"] == impl and r["mode"] == mode:
                return r.get(key)
        return None

    def ratio(a, b):
        return a / b if a and b else None

    def line(title, value, target, at_most=None, at_least=None):
        met = None
        if value is not None and at_most is not None:
            met = value <= at_most
        if value is not None and at_least is not None:
            met = value >= at_least
        return title, value, target, met

    if device == "cuda":
        bf16 = "target_N16384_bf16"
        return [
            line("dense fwd+bwd / fused fwd+bwd (N=16384, fp32)",
                 ratio(get("target_N16384", "dense"), get("target_N16384", "fused")), ">= 5",
                 at_least=5.0),
            line("fused fwd+bwd / bf16 GEMM (N=16384, bf16)",
                 ratio(get(bf16, "fused"), get(bf16, "gemm", "fwd")), "<= 3", at_most=3.0),
            line("fused fwd+bwd peak extra MiB (N=262144, fp32)",
                 get("target_N262144", "fused", key="peak_mem_mb"), "< 1024", at_most=1024),
            line("fused fwd+bwd / bf16 GEMM (N=65536, context)",
                 ratio(get("target_N65536_bf16", "fused"),
                       get("target_N65536_bf16", "gemm", "fwd")), ""),
            line("fused fwd+bwd / fp32 GEMM (N=16384, context)",
                 ratio(get("target_N16384", "fused"), get("target_N16384", "gemm", "fwd")), ""),
            line("tiled fwd+bwd / fused fwd+bwd (N=16384, fp32, context)",
                 ratio(get("target_N16384", "tiled"), get("target_N16384", "fused")), ""),
            line("fused fwd+bwd ms (N=262144, fp32, context)",
                 get("target_N262144", "fused"), ""),
        ]
    cpu = "target_N8192"
    return [
        line("fused fwd+bwd / GEMM (N=8192, C=4)",
             ratio(get(cpu, "fused"), get(cpu, "gemm", "fwd")), "<= 2.0", at_most=2.0),
        line("dense fwd+bwd / fused fwd+bwd", ratio(get(cpu, "dense"), get(cpu, "fused")),
             ">= 5", at_least=5.0),
        line("fused fwd+bwd peak extra MiB", get(cpu, "fused", key="peak_mem_mb"), "<= 64",
             at_most=64),
        line("dense fwd+bwd peak extra MiB (context)", get(cpu, "dense", key="peak_mem_mb"),
             "~2048"),
        line("tiled fwd+bwd / GEMM (context)", ratio(get(cpu, "tiled"), get(cpu, "gemm", "fwd")),
             "~2.9"),
        line("dense fwd+bwd / GEMM (context)", ratio(get(cpu, "dense"), get(cpu, "gemm", "fwd")),
             "~12"),
        line("training step: dense block loop / fused",
             ratio(get("target_training_step", "dense"), get("target_training_step", "fused")),
             ">= 5", at_least=5.0),
    ]


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and a 10-block training step (< 3 min on 2 cores)")
    parser.add_argument("--targets", action="store_true",
                        help="only the issue targets: CPU (issue 2) N=8192 and the training step; "
                             "CUDA (issue 3) N=16384 fp32 and bf16, N=262144 memory")
    parser.add_argument("--min-reps", type=int, default=None)
    parser.add_argument("--max-reps", type=int, default=None)
    parser.add_argument("--point-budget-s", type=float, default=None,
                        help="stop adding rounds at a size after this many seconds")
    parser.add_argument("--mem-budget-gb", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory workers")
    parser.add_argument("--exclude", default="", help="comma-separated implementations to skip")
    parser.add_argument("--workloads", default="", help="comma-separated workload names")
    parser.add_argument("--machine-note", default="", help="appended to the machine column")
    args = parser.parse_args(argv)
    args.exclude = {s for s in args.exclude.split(",") if s}
    if args.min_reps is None:
        args.min_reps = 3 if args.quick else 4
    if args.max_reps is None:
        args.max_reps = max(args.min_reps, 3 if args.quick else 10)
    if args.point_budget_s is None:
        args.point_budget_s = 2.0 if args.quick else 10.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    import mcsc
    backend = mcsc.ops.backend(args.device)
    common = {"device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__,
              "machine": machine_description(args.device, args.machine_note)}
    kernel = ""
    if backend.startswith("compiled"):
        from mcsc import _C
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.path.getmtime(_C.__file__)))
        kernel = f" ({os.path.basename(_C.__file__)} built {stamp} UTC)"
    print(f"mcsc backend: {backend}{kernel}; torch {torch.__version__}; threads "
          f"{common['threads']}; machine: {common['machine']}")
    if backend == "reference":
        print("WARNING: the compiled kernel is not loaded; 'fused' runs the dense reference "
              f"fallback ({mcsc.ops.extension_problem()})")
    wall = time.perf_counter()
    names = impls.ALL_IMPLS if not args.targets else ("gemm", "fused", "dense", "tiled")
    names = tuple(n for n in names if n not in args.exclude)
    print("value agreement with fused (loss, gradient):")
    for line in check_agreement(args.device, names):
        print(line)

    csv_name = "targets.csv" if args.targets else "results.csv"
    rows = []
    if args.targets:
        for wl, min_reps, max_reps, point_budget_s in target_workloads(args):
            reps = argparse.Namespace(**{**vars(args), "min_reps": min_reps,
                                         "max_reps": max_reps, "point_budget_s": point_budget_s})
            rows += run_workload(wl, reps, common)
            write_csv(rows, os.path.join(args.out, csv_name))  # partial results survive a kill
    else:
        selected = {s for s in args.workloads.split(",") if s}
        for wl in build_workloads(args.device, args.quick):
            if selected and wl.name not in selected:
                continue
            rows += run_workload(wl, args, common)
            write_csv(rows, os.path.join(args.out, csv_name))
    write_csv(rows, os.path.join(args.out, csv_name))
    print()
    print(format_table(rows))
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(markdown_table(rows) + "\n")
    if args.targets:
        issue = "issue-3 CUDA" if args.device == "cuda" else "issue-2 CPU"
        print(f"\n{issue} targets (ratios from medians of this run):")
        summary = summarize_targets(rows, args.device)
        for title, value, target, ok in summary:
            verdict = "" if ok is None else ("PASS" if ok else "FAIL")
            print(f"  {title:42s} {_fmt(value, '8.2f'):>8s}   target {target:7s} {verdict}")
        with open(os.path.join(args.out, "targets.json"), "w") as handle:
            json.dump({"backend": backend + kernel, "machine": common["machine"],
                       "threads": common["threads"],
                       "targets": [dict(name=t, value=v, target=g, ok=o)
                                   for t, v, g, o in summary]}, handle, indent=1)
    else:
        for wl in sorted({r["workload"] for r in rows}):
            sample = next(r for r in rows if r["workload"] == wl)
            title = (f"{wl}: D={sample['D']}, C={sample['C']}, {sample['weighting']}, "
                     f"{sample['dtype']}, {args.device}, {common['threads']} threads, "
                     f"fused={backend}")
            plot_workload(rows, wl, os.path.join(args.out, f"{args.device}_{wl}.png"), title)
    print(f"\nwrote {os.path.join(args.out, csv_name)} ({len(rows)} rows) in "
          f"{time.perf_counter() - wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
