"""Benchmark the fused supervised contrastive loss against dense PyTorch and peer libraries.

    python benchmarks/run.py [--quick] [--device cpu|cuda] --out DIR
    python benchmarks/run.py --targets [--device cuda] --out DIR    # the target set, pass/fail
    python benchmarks/run.py --targets --target-set gpu --dry-run --device cpu --out DIR

It times the ``mcsc`` that Python imports (the installed package, or a source tree built in
place and put on PYTHONPATH) and refuses to time the dense fallback unless ``--allow-reference``
is given. Writes ``DIR/results.csv`` (``targets.csv`` with ``--targets``; one row per
implementation, mode and size, rewritten after every workload so partial results survive a
kill), ``DIR/table.md``, one PNG per workload (``DIR/<device>_<workload>.png``: fwd+bwd time and
peak memory against N) and prints a table. With ``--targets`` the last thing printed is one
table of the targets (measure, measured, goal, pass/fail), also written to ``targets.md`` and
``targets.json``.

Implementations: ``implementations.py``; before timing, every one's loss and gradient are
checked against ``fused`` on small inputs (``agreement.py``): one that disagrees is not timed, and
the script exits with status 1.
Timing and memory: ``timing.py`` and ``memory.py``; the target sets: ``targets.py``; output:
``reporting.py``.

Shared machines: PyTorch's OpenMP threads spin-wait between parallel regions by default. When
other processes compete for the cores, every parallel region can stall for a scheduler time
slice, which adds ~100 ms to a call made of many short regions (seen on the 2-core development
machine: fused N=1024 took 100 ms instead of 6 ms). Run with ``OMP_WAIT_POLICY=PASSIVE`` (or
``--threads 1``) there; the machine column records the policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

# the package's own fallback warning: refused or restated below, with what to do
warnings.filterwarnings("ignore", message="mcsc: ")

import agreement  # noqa: E402
import implementations as impls  # noqa: E402
import installed  # noqa: E402
import reporting  # noqa: E402
import targets  # noqa: E402
import timing  # noqa: E402
from timing import Interrupted, Rounds, Workload  # noqa: E402

GPU_TARGETS_TIME_BUDGET_S = 240.0


def sweep_workloads(device: str, quick: bool) -> list[Workload]:
    """The default workloads: sweeps over N at C = 4 and 14, both weightings, the training
    step; on the GPU up to N = 262144, with FlexAttention, and a bf16 sweep."""
    gpu = ("flex",) if device == "cuda" else ()
    sweep_prev = ("gemm", "fused", "dense", "tiled", "compiled") + gpu
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
        Workload(
            "sweep_C14_prevalence",
            [[n] for n in small],
            128,
            14,
            "prevalence",
            sweep_prev if not quick else ("gemm", "fused", "dense", "tiled"),
        ),
        Workload("sweep_C4_none", [[n] for n in small], 128, 4, "none", sweep_none),
        Workload(
            "training_step",
            [step],
            128,
            4,
            "prevalence",
            train if not quick else ("gemm", "fused", "dense", "tiled"),
        ),
    ]
    if device == "cuda":
        workloads.append(
            Workload(
                "sweep_C4_prevalence_bf16",
                [[n] for n in sizes],
                128,
                4,
                "prevalence",
                ("gemm", "fused", "dense", "tiled", "flex"),
                dtype="bfloat16",
            )
        )
    return workloads


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and a 10-block training step (< 3 min on 2 cores)",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="only the target set (see --target-set) and its pass/fail table",
    )
    parser.add_argument(
        "--target-set",
        choices=sorted(targets.TARGET_SETS),
        default=None,
        help="cpu: N=8192 against one GEMM and dense, peak memory, the training "
        "step; gpu: N=16384 bf16 time, flex/fused, dense/fused in float32, "
        "TF32 time, N=262144 float32 time, N=1048576 bf16 memory "
        "(default: the one of --device)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"sizes divided by {targets.DRY_DIVISOR}, one round, torch.compile "
        "tracing without code generation, float32 for bf16 on the CPU: "
        "every code path in seconds, numbers meaningless",
    )
    installed.add_allow_option(parser)
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no workload after this many seconds (default: "
        f"{GPU_TARGETS_TIME_BUDGET_S:.0f} for the gpu target set on the "
        "GPU, else none)",
    )
    parser.add_argument("--min-reps", type=int, default=None)
    parser.add_argument("--max-reps", type=int, default=None)
    parser.add_argument(
        "--point-budget-s",
        type=float,
        default=None,
        help="stop adding rounds at a size after this many seconds",
    )
    parser.add_argument("--mem-budget-gb", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory workers")
    parser.add_argument("--exclude", default="", help="comma-separated implementations to skip")
    parser.add_argument("--workloads", default="", help="comma-separated workload names")
    parser.add_argument("--machine-note", default="", help="appended to the machine column")
    args = parser.parse_args(argv)
    args.exclude = frozenset(s for s in args.exclude.split(",") if s)
    if args.min_reps is None:
        args.min_reps = 3 if args.quick else 4
    if args.max_reps is None:
        args.max_reps = max(args.min_reps, 3 if args.quick else 10)
    if args.point_budget_s is None:
        args.point_budget_s = 2.0 if args.quick else 10.0
    if args.target_set is None:
        args.target_set = "gpu" if args.device == "cuda" else "cpu"
    if (
        args.time_budget_s is None
        and args.targets
        and args.target_set == "gpu"
        and args.device == "cuda"
        and not args.dry_run
    ):
        args.time_budget_s = GPU_TARGETS_TIME_BUDGET_S
    return args


def kernel_description(backend: str) -> str:
    """Where the compiled library lives and when it was built ('' for the fallback)."""
    if not backend.startswith("compiled"):
        return ""
    from mcsc import _C

    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.path.getmtime(_C.__file__)))
    return f" ({os.path.basename(_C.__file__)} built {stamp} UTC)"


def selected_workloads(args) -> tuple[list[Workload], list]:
    """The workloads to run and, with --targets, the measures to evaluate."""
    rounds = Rounds(args.min_reps, args.max_reps, args.point_budget_s)
    if args.targets:
        workloads, measures = targets.target_set(args.target_set, rounds, args.quick, args.dry_run)
    else:
        selected = {s for s in args.workloads.split(",") if s}
        workloads = [
            wl
            for wl in sweep_workloads(args.device, args.quick)
            if not selected or wl.name in selected
        ]
        measures = []
        if args.dry_run:
            for wl in workloads:
                wl.points = [
                    [max(16, n // targets.DRY_DIVISOR) for n in sizes] for sizes in wl.points
                ]
                wl.rounds = targets.ONCE
    if args.dry_run and args.device == "cpu":
        for wl in workloads:  # the CPU op takes float32 and float64 only
            if wl.dtype in ("bfloat16", "float16"):
                wl.dtype = "float32"
    return workloads, measures


def time_workloads(workloads, settings, time_budget_s, started, csv_path) -> tuple[list[dict], str]:
    """Run the workloads in order, rewriting the CSV after each, starting none once
    ``time_budget_s`` seconds have passed since ``started`` (``time.perf_counter()``); returns
    the rows and why the run stopped early ('' when it did not)."""
    rows = []
    for index, workload in enumerate(workloads):
        elapsed = time.perf_counter() - started
        if time_budget_s is not None and elapsed > time_budget_s:
            left = ", ".join(wl.name for wl in workloads[index:])
            return rows, f"time budget of {time_budget_s:.0f}s spent: {left} not run"
        try:
            rows += timing.run_workload(workload, settings)
        except (Interrupted, KeyboardInterrupt):
            return rows, f"interrupted during {workload.name}"
        reporting.write_csv(rows, csv_path)  # partial results survive a kill
    return rows, ""


def write_plots(rows, args, common, backend) -> None:
    for wl in sorted({r["workload"] for r in rows}):
        sample = next(r for r in rows if r["workload"] == wl)
        title = (
            f"{wl}: D={sample['D']}, C={sample['C']}, {sample['weighting']}, "
            f"{sample['dtype']}, {args.device}, {common['threads']} threads, "
            f"fused={backend}"
        )
        reporting.plot_workload(rows, wl, os.path.join(args.out, f"{args.device}_{wl}.png"), title)


def report_targets(rows, measures, args, common, backend, stopped) -> None:
    """targets.md and targets.json, and the targets table, printed last."""
    results = [measure.evaluate(rows) for measure in measures]
    title = (
        f"{args.target_set} targets on {common['machine']} (mcsc {backend}; ratios from "
        f"medians of this run)"
    )
    if args.dry_run:
        title += "; DRY RUN: tiny sizes, the verdicts mean nothing"
    with open(os.path.join(args.out, "targets.md"), "w") as handle:
        handle.write(f"{title}\n\n{reporting.markdown_targets(results)}\n")
    with open(os.path.join(args.out, "targets.json"), "w") as handle:
        json.dump(
            {
                "backend": backend + kernel_description(backend),
                "machine": common["machine"],
                "threads": common["threads"],
                "dry_run": args.dry_run,
                "stopped": stopped,
                "targets": results,
            },
            handle,
            indent=1,
        )
    print()
    print(reporting.format_targets(results, title))


def main(argv=None) -> int:
    """Exit status: 0, 1 when an implementation disagrees with fused (it is not timed), 2
    without CUDA, 3 when interrupted (SIGTERM)."""
    started = time.perf_counter()
    args = parse_args(argv)
    backend = installed.prepare_run(args)
    if backend is None:
        return 2
    if args.dry_run:
        impls.set_compile_backend("eager")
    common = installed.describe_run(args, backend, kernel=kernel_description(backend))
    workloads, measures = selected_workloads(args)
    names = []
    for wl in workloads:
        names += [name for name in wl.impls if name not in names and name not in args.exclude]
    print("value agreement with fused (loss, gradient):")
    lines, rejected, disagrees = agreement.check_agreement(args.device, names)
    print("\n".join(lines))

    settings = timing.Settings(
        device=args.device,
        rounds=Rounds(args.min_reps, args.max_reps, args.point_budget_s),
        memory_budget_bytes=timing.memory_budget_bytes(args.device, args.mem_budget_gb),
        common=common,
        backend=backend,
        package=installed.package_directory(),
        exclude=args.exclude,
        rejected=rejected,
        cpu_memory=not args.no_memory,
        one_memory_worker=args.quick or args.dry_run,
    )
    csv_path = os.path.join(args.out, "targets.csv" if args.targets else "results.csv")
    with timing.sigterm_interrupts():
        rows, stopped = time_workloads(workloads, settings, args.time_budget_s, started, csv_path)
    reporting.write_csv(rows, csv_path)
    print()
    print(reporting.format_table(rows))
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(reporting.markdown_table(rows) + "\n")
    if not args.targets:
        write_plots(rows, args, common, backend)
    print(f"\nwrote {csv_path} ({len(rows)} rows) in {time.perf_counter() - started:.0f}s")
    for name, reason in rejected.items():
        print(f"not timed: {name} {reason}")
    if stopped:
        print(f"stopped early: {stopped}")
    if args.targets:
        report_targets(rows, measures, args, common, backend, stopped)
    if stopped.startswith("interrupted"):
        return 3
    return 1 if disagrees else 0


if __name__ == "__main__":
    sys.exit(main())
