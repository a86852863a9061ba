"""Benchmark the fused op with a reference set (a cross-batch memory) against
pytorch-metric-learning's CrossBatchMemory, its SupConLoss call alone and the dense formula.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_bank.py --out DIR      # CPU, float32
    python benchmarks/memory_bank.py --device cuda --out DIR                # float32 and bf16
    python benchmarks/memory_bank.py --from-csv DIR/memory_bank.csv --out DIR  # outputs again

One step of a cross-batch memory (``bank_implementations.py``): M anchors (D = 128) written
into a full memory of K keys, then every anchor against the K keys except its own copy;
forward and backward. Sizes: the CPU grid is a cross through the key size M = 4096, K = 65536
(K = 4096 .. 262144 at M = 4096, M = 1024 .. 8192 at K = 65536) and M = 1024, K = 4096, the only
size where PML's CrossBatchMemory fits the budget; ``--grid full`` (the GPU's default) every
M <= K. The key size runs first and again at the end (``key_repeat``, the implementations of
its goals only): on a shared machine the two runs show how far the ratios move.

An implementation runs at a size only when its inputs and estimated peak fit ``--mem-budget-gb``
(8 GiB; ``--key-mem-budget-gb`` for the key size) and 80 % of the free memory; otherwise its rows
say "over budget" with the estimate. The largest K each implementation fits in the budget comes
from a fit of its measured peaks (``bank_measure.py``).

Like ``run.py``, it times the ``mcsc`` Python imports (the installed package, or a tree built in
place and put on PYTHONPATH) and refuses the dense fallback unless ``--allow-reference``; the
implementations' losses and gradients are checked against ``fused`` on a small step first.
Writes ``DIR/memory_bank.csv`` (rewritten after every size), ``memory_bank_largest_k.csv``,
``memory_bank.md`` (tables and the targets), ``memory_bank_targets.json`` and one PNG per dtype
(``<device>_memory_bank_<dtype>.png``); the last thing printed is the targets table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
import warnings

# the package's own fallback warning: refused or restated below, with what to do
warnings.filterwarnings("ignore", message="mcsc: ")

import bank_implementations as bank  # noqa: E402
import bank_measure as measure  # noqa: E402
import bank_report as report  # noqa: E402
import installed  # noqa: E402
import reporting  # noqa: E402
import torch  # noqa: E402
from targets import Measure  # noqa: E402
from timing import Interrupted, Rounds, sigterm_interrupts  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Point:
    """One size to time: ``workload`` is "key", "grid" or "key_repeat"."""

    workload: str
    m: int
    k: int
    dtype: str
    rounds: Rounds
    budget_bytes: float
    impls: tuple = bank.ALL_IMPLS  # those of --impls that run here
    memory: bool = True  # measure CPU peak memory (the repeat does not)


@dataclasses.dataclass(frozen=True)
class PointCell:
    """A value of the rows at one size, for ``targets.Measure``."""

    workload: str
    impl: str
    m: int
    k: int
    dtype: str
    mode: str = "fwd+bwd"
    key: str = "median_ms"

    def row(self, rows: list[dict]) -> dict | None:
        for row in rows:
            if (row["workload"], row["impl"], row["mode"], row["M"], row["K"], row["dtype"]) == (
                self.workload,
                self.impl,
                self.mode,
                self.m,
                self.k,
                self.dtype,
            ):
                return row
        return None

    def read(self, rows: list[dict]):
        row = self.row(rows)
        return None if row is None else row.get(self.key)


def _sizes(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated (default: float32 on cpu, float32,bfloat16 on cuda)",
    )
    parser.add_argument(
        "--grid",
        choices=("cross", "full"),
        default=None,
        help="cross: K sweep at the key M, M sweep at the key K, and the smallest "
        "size; full: every M <= K (default: cross on cpu, full on cuda)",
    )
    parser.add_argument("--m", type=_sizes, default=[1024, 2048, 4096, 8192], help="anchors")
    parser.add_argument("--k", type=_sizes, default=[4096, 16384, 65536, 262144], help="keys")
    parser.add_argument("--key", default="4096x65536", help="the key size MxK")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--impls", default=",".join(bank.ALL_IMPLS))
    parser.add_argument(
        "--mem-budget-gb",
        type=float,
        default=8.0,
        help="skip what would need more (inputs + estimated peak), and the "
        "budget of the largest-K table",
    )
    parser.add_argument(
        "--key-mem-budget-gb",
        type=float,
        default=None,
        help="the budget at the key size (default --mem-budget-gb)",
    )
    parser.add_argument("--min-reps", type=int, default=None)
    parser.add_argument("--max-reps", type=int, default=None)
    parser.add_argument("--key-reps", type=int, default=None, help="rounds at the key size")
    parser.add_argument(
        "--point-budget-s",
        type=float,
        default=None,
        help="stop adding rounds at a size after this many seconds",
    )
    parser.add_argument("--no-repeat", action="store_true", help="do not repeat the key size")
    parser.add_argument(
        "--repeat-impls",
        default="gemm,fused,pml_loss,pml_xbm",
        help="the implementations of the repeated key size (those of its goals)",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no size after this many seconds (default: 240 on cuda, none on cpu)",
    )
    parser.add_argument("--no-memory", action="store_true", help="no CPU memory workers")
    parser.add_argument("--threads", type=int, default=None)
    installed.add_allow_option(parser)
    parser.add_argument("--machine-note", default="", help="appended to the machine column")
    parser.add_argument(
        "--from-csv",
        default=None,
        help="measure nothing: the tables, targets and plots of a memory_bank.csv written "
        "before (with the same --device, --dtypes, sizes and budget)",
    )
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    args.grid = args.grid or ("full" if cuda else "cross")
    args.key_m, args.key_k = (int(value) for value in args.key.lower().split("x"))
    args.impls = tuple(name for name in args.impls.split(",") if name)
    args.repeat_impls = tuple(name for name in args.repeat_impls.split(",") if name)
    unknown = (set(args.impls) | set(args.repeat_impls)) - set(bank.ALL_IMPLS)
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}; known: {bank.ALL_IMPLS}")
    if args.min_reps is None:
        args.min_reps = 5 if cuda else 3
    if args.max_reps is None:
        args.max_reps = max(args.min_reps, 20 if cuda else 5)
    if args.key_reps is None:
        args.key_reps = max(args.min_reps, 10 if cuda else 3)
    if args.point_budget_s is None:
        args.point_budget_s = 5.0 if cuda else 15.0
    if args.time_budget_s is None and cuda:
        args.time_budget_s = 240.0
    if args.key_mem_budget_gb is None:
        args.key_mem_budget_gb = args.mem_budget_gb
    return args


def grid_sizes(args) -> list[tuple[int, int]]:
    """The (M, K) of the grid, M <= K, smallest M * K first; the key size is not among them."""
    key = (args.key_m, args.key_k)
    if args.grid == "full":
        sizes = {(m, k) for m in args.m for k in args.k}
    else:
        sizes = {(args.key_m, k) for k in args.k} | {(m, args.key_k) for m in args.m}
        sizes.add((min(args.m), min(args.k)))
    return sorted((s for s in sizes if s[0] <= s[1] and s != key), key=lambda s: (s[0] * s[1], s))


def points(args) -> list[Point]:
    """Per dtype: the key size, the grid, the key size again."""
    rounds = Rounds(args.min_reps, args.max_reps, args.point_budget_s)
    key_rounds = Rounds(args.key_reps, args.key_reps, 0.0)
    budget, key_budget = args.mem_budget_gb * 2**30, args.key_mem_budget_gb * 2**30
    out = []
    for dtype in args.dtypes:
        out.append(Point("key", args.key_m, args.key_k, dtype, key_rounds, key_budget))
        out += [Point("grid", m, k, dtype, rounds, budget) for m, k in grid_sizes(args)]
        if not args.no_repeat:
            repeat = Point(
                "key_repeat",
                args.key_m,
                args.key_k,
                dtype,
                key_rounds,
                key_budget,
                args.repeat_impls,
                memory=False,
            )
            out.append(repeat)
    return out


# ----------------------------------------------------------------------------------------------
# one size
# ----------------------------------------------------------------------------------------------


def point_rows(
    point: Point, args, common: dict, skipped: dict, notes: dict, stats: dict, peaks: dict
) -> list[dict]:
    """One row per implementation and mode (``gemm``: ``fwd`` only)."""
    size = measure.itemsize(point.dtype)
    gemm = stats.get(("gemm", "fwd"))
    rows = []
    for name in (name for name in args.impls if name in point.impls):
        for mode in ("fwd",) if name == "gemm" else measure.MODES:
            row = dict(
                common,
                impl=name,
                mode=mode,
                M=point.m,
                K=point.k,
                D=args.d,
                C=args.classes,
                dtype=point.dtype,
                workload=point.workload,
                weighting="none",
                held_mb=bank.held_bytes(name, point.m, point.k, args.d, size) / 2**20,
                backend=common["backend"] if name == "fused" else "",
                note=skipped.get(name) or notes.get(name, ""),
            )
            if name == "gemm":
                row["note"] = (row["note"] + "; outputs preallocated").strip("; ")
            if (name, mode) in stats:
                median, low, high, count = stats[(name, mode)]
                row.update(
                    median_ms=median * 1e3,
                    p20_ms=low * 1e3,
                    p80_ms=high * 1e3,
                    reps=count,
                    peak_mem_mb=peaks.get((name, mode)),
                )
                if gemm:
                    row["x_gemm"] = median / gemm[0]
                fused = stats.get(("fused", mode))
                if fused and name != "gemm":
                    row["x_fused"] = median / fused[0]
            elif not row["note"]:
                row["note"] = "not measured"
            rows.append(row)
    return rows


def run_point(point: Point, args, common: dict, failed: dict, log=print) -> list[dict]:
    names = [name for name in args.impls if name in point.impls and name not in failed]
    runnable, skipped = measure.plan_point(
        names,
        point.m,
        point.k,
        args.d,
        point.dtype,
        args.classes,
        point.budget_bytes,
        measure.available_bytes(args.device),
    )
    skipped.update(failed)
    step = bank.make_step(
        point.m,
        point.k,
        args.d,
        args.classes,
        dtype=getattr(torch, point.dtype),
        device=args.device,
    )
    started = time.perf_counter()
    samples, peaks, notes = measure.time_point(runnable, step, args.device, point.rounds)
    log(
        f"  [{point.workload} {point.dtype}] M={point.m} K={point.k}: timed "
        f"{', '.join(runnable) or 'nothing'} in {time.perf_counter() - started:.1f}s"
        + (f"; skipped {', '.join(skipped)}" if skipped else "")
    )
    del step
    rows = point_rows(point, args, common, skipped, notes, measure.summarise(samples), peaks)
    if args.device == "cpu" and point.memory and not args.no_memory:
        timed = {row["impl"] for row in rows if row.get("median_ms") is not None}
        for name in runnable:
            if name not in timed or name == "gemm":
                continue
            # the worker builds the step anew: check the free memory again (a shared machine)
            _, late = measure.plan_point(
                [name],
                point.m,
                point.k,
                args.d,
                point.dtype,
                args.classes,
                point.budget_bytes,
                measure.available_bytes(args.device),
            )
            if late:
                for row in rows:
                    if row["impl"] == name:
                        row["note"] = row["note"] + "; memory not measured: " + late[name]
                        row["note"] = row["note"].strip("; ")
                continue
            job = measure.memory_job(
                name, point.m, point.k, args.d, args.classes, point.dtype, common["threads"]
            )
            result = measure.measure_cpu_memory(job, os.path.dirname(common["package"]))
            for row in rows:
                if row["impl"] != name:
                    continue
                if "error" in result:
                    row["note"] = (row["note"] + "; memory: " + result["error"]).strip("; ")
                else:
                    row["peak_mem_mb"] = result.get(row["mode"])
    return rows


# ----------------------------------------------------------------------------------------------
# agreement, largest K, targets
# ----------------------------------------------------------------------------------------------


def check_agreement(names, device: str, d: int = 32) -> tuple[list[str], dict]:
    """Loss and batch gradient of every loss implementation against ``fused`` on one small
    float32 step (PML normalises inside: its gradient is compared on the sphere's tangent
    space). Returns the report lines and ``{name: why it is not timed}``."""
    step = bank.make_step(96, 320, d, 5, seed=7, device=device)
    anchors = step.batch.detach()
    results = {}
    for name in ("fused",) + tuple(n for n in names if n not in ("fused", "gemm")):
        step.batch.grad = None
        loss = bank.prepare(name, step)()
        loss.backward()
        results[name] = (float(loss.detach()), step.batch.grad.detach().clone())
    lines, rejected = [], {}
    reference_loss, reference_grad = results.pop("fused")
    for name, (loss, grad) in results.items():
        expected = reference_grad
        if name.startswith("pml"):
            expected = expected - (expected * anchors).sum(1, keepdim=True) * anchors
        loss_err = abs(loss - reference_loss) / max(abs(reference_loss), 1e-12)
        grad_err = float((grad - expected).abs().max() / expected.abs().max().clamp(min=1e-30))
        ok = loss_err <= 2e-4 and grad_err <= 2e-4
        lines.append(
            f"  {name:9s} loss rel err {loss_err:.1e}  grad max rel err "
            f"{grad_err:.1e}  {'ok' if ok else 'MISMATCH'}"
        )
        if not ok:
            rejected[name] = (
                f"skipped: disagrees with fused (loss rel err {loss_err:.1e}, "
                f"grad rel err {grad_err:.1e})"
            )
    return lines, rejected


def largest_k_rows(rows: list[dict], args) -> list[dict]:
    """Per implementation (not gemm) and dtype, the largest K in ``--mem-budget-gb`` at every M
    of ``--m``, from the peaks measured at the key size and the grid."""
    budget = args.mem_budget_gb * 2**30
    out = []
    for dtype in args.dtypes:
        for name in bank.LOSS_IMPLS:
            if name not in args.impls:
                continue
            measured = [
                (r["M"], r["K"], r["peak_mem_mb"] * 2**20)
                for r in rows
                if r["impl"] == name
                and r["dtype"] == dtype
                and r["mode"] == "fwd+bwd"
                and r["workload"] in ("key", "grid")
                and r.get("peak_mem_mb") is not None
            ]
            fit = measure.fit_memory(name, measured)
            for m in args.m:
                row = {
                    "impl": name,
                    "dtype": dtype,
                    "M": m,
                    "budget_gib": args.mem_budget_gb,
                    "device": args.device,
                }
                at_m = [k for mm, k, _ in measured if mm == m]
                row["largest_measured_K"] = max(at_m) if at_m else None
                if fit is None:
                    row["note"] = f"too few measured sizes ({len(measured)}) to fit"
                else:
                    largest = measure.largest_k(
                        name, fit, m, args.d, measure.itemsize(dtype), budget
                    )
                    row.update(
                        largest_K=largest,
                        # no size measured at this M reaches the answer
                        extrapolated=not any(mm == m and k >= largest for mm, k, _ in measured),
                        fit_terms=" + ".join(f"{c:.3g}*{t}" for t, c in fit["terms"].items()),
                        fit_worst_relative_error=fit["worst_relative_error"],
                        fit_points=fit["points"],
                    )
                    if largest < m:  # a memory holds at least one batch
                        row.update(largest_K=0, note=f"no memory of K >= M = {m} rows fits")
                out.append(row)
    return out


def measures(args, dtype: str) -> list[Measure]:
    """The done-when targets at the key size (goals on the CPU in float32, context elsewhere)
    and context lines."""
    goals = args.device == "cpu" and dtype == "float32"
    m, k = args.key_m, args.key_k
    out = []
    for workload in ("key",) + (() if args.no_repeat else ("key_repeat",)):

        def cell(impl, mode="fwd+bwd", key="median_ms", workload=workload):
            return PointCell(workload, impl, m, k, dtype, mode, key)

        tag = f"M={m}, K={k}, {dtype}" + (", repeat" if workload == "key_repeat" else "")
        if workload == "key" or args.device == "cuda":
            out.append(
                Measure(
                    f"fused fwd+bwd peak extra MiB ({tag})",
                    cell("fused", key="peak_mem_mb"),
                    below=128 if goals else None,
                )
            )
        out += [
            Measure(
                f"PML CrossBatchMemory / fused, fwd+bwd time ({tag})",
                cell("pml_xbm"),
                cell("fused"),
                at_least=5 if goals else None,
            ),
            Measure(
                f"PML SupConLoss call alone / fused ({tag}); CrossBatchMemory >= this",
                cell("pml_loss"),
                cell("fused"),
                at_least=5 if goals else None,
            ),
            Measure(
                f"fused fwd+bwd / two GEMMs A K^T, P K ({tag})",
                cell("fused"),
                cell("gemm", "fwd"),
                at_most=1.3 if goals else None,
            ),
            Measure(f"dense / fused ({tag})", cell("dense"), cell("fused")),
            Measure(f"fused fwd+bwd ms ({tag})", cell("fused")),
        ]
    small_m, small_k = min(args.m), min(args.k)
    out.append(
        Measure(
            f"PML CrossBatchMemory / fused (M={small_m}, K={small_k}, {dtype})",
            PointCell("grid", "pml_xbm", small_m, small_k, dtype),
            PointCell("grid", "fused", small_m, small_k, dtype),
        )
    )
    return out


def evaluate(rows: list[dict], args) -> list[dict]:
    """Every measure's result; one not measured says why (its row's note: over budget...)."""
    results = []
    for dtype in args.dtypes:
        for item in measures(args, dtype):
            result = item.evaluate(rows)
            if result["value"] is None:
                for cell in (item.value, item.per):
                    row = cell.row(rows) if cell is not None else None
                    if row is not None and row.get("median_ms") is None and row.get("note"):
                        result["verdict"] += f" ({cell.impl}: {row['note']})"
                        break
            results.append(result)
    return results


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def write_outputs(rows, args, common, results=None) -> list[dict]:
    """The CSV; with ``results`` (the targets) also the largest-K CSV, the markdown, the JSON
    and the plots. Returns the largest-K rows ([] without ``results``)."""
    reporting.write_csv(rows, os.path.join(args.out, "memory_bank.csv"), report.COLUMNS)
    if results is None:
        return []
    largest = largest_k_rows(rows, args)
    reporting.write_csv(
        largest, os.path.join(args.out, "memory_bank_largest_k.csv"), report.LARGEST_K_COLUMNS
    )
    title = (
        f"{args.device}, {common['machine']}, torch {common['torch']}, {common['threads']} "
        f"threads, mcsc {common['backend']}, pytorch-metric-learning {common['pml']}"
    )
    with open(os.path.join(args.out, "memory_bank.md"), "w") as handle:
        handle.write(
            f"Cross-batch memory step, D = {args.d}, C = {args.classes}, SupCon weighting "
            f"'none', forward + backward; {title}\n\n{report.markdown_table(rows)}\n\n"
            f"Largest memory in {args.mem_budget_gb:g} GiB (inputs + fitted peak):\n\n"
            f"{report.markdown_largest_k(largest)}\n\n{reporting.markdown_targets(results)}\n\n"
            f"PML's chunked peer: {bank.pml_chunked_problem()}; not timed.\n"
        )
    with open(os.path.join(args.out, "memory_bank_targets.json"), "w") as handle:
        json.dump(
            {
                "common": common,
                "pml_chunked": bank.pml_chunked_problem(),
                "targets": results,
                "largest_k": largest,
            },
            handle,
            indent=1,
        )
    for dtype in args.dtypes:
        report.plot(
            rows,
            dtype,
            args.key_m,
            args.key_k,
            args.mem_budget_gb * 1024,
            os.path.join(args.out, f"{args.device}_memory_bank_{dtype}.png"),
            f"cross-batch memory step, D={args.d}, {dtype}: {title}",
        )
    return largest


INTEGER_COLUMNS = ("M", "K", "D", "C", "reps", "threads")
FLOAT_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "held_mb", "x_gemm", "x_fused")


def read_rows(path: str) -> list[dict]:
    """The rows of a ``memory_bank.csv``, numbers as numbers and empty cells as None."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in INTEGER_COLUMNS + FLOAT_COLUMNS:
            value = row.get(key)
            row[key] = (
                None if value in (None, "") else (int if key in INTEGER_COLUMNS else float)(value)
            )
    return rows


def report_csv(args) -> int:
    """``--from-csv``: the outputs of a run that already measured."""
    rows = read_rows(args.from_csv)
    os.makedirs(args.out, exist_ok=True)
    common = {key: rows[0][key] for key in ("device", "threads", "torch", "pml", "machine")}
    common["backend"] = next((r["backend"] for r in rows if r["impl"] == "fused"), "")
    results = evaluate(rows, args)
    largest = write_outputs(rows, args, common, results)
    print(f"largest K in {args.mem_budget_gb:g} GiB:\n{report.markdown_largest_k(largest)}\n")
    print(reporting.format_targets(results, f"targets ({args.device}; from {args.from_csv})"))
    return 0


def main(argv=None) -> int:
    """Exit status: 0; 1 when an implementation disagrees with fused; 2 without CUDA; 3 when
    interrupted (SIGTERM)."""
    started = time.perf_counter()
    args = parse_args(argv)
    if args.from_csv:
        return report_csv(args)
    backend = installed.prepare_run(args)
    if backend is None:
        return 2
    common = installed.describe_run(args, backend, pml=bank.pml_version())
    print(f"PML's chunked peer: {bank.pml_chunked_problem()}; not timed")
    print("value agreement with fused (loss, batch gradient), float32:")
    lines, failed = check_agreement(args.impls, args.device)
    print("\n".join(lines))
    disagrees = bool(failed)
    rows, stopped = [], ""
    try:
        with sigterm_interrupts():
            for dtype in args.dtypes:
                if stopped:
                    break
                failed_here = dict(failed)
                failed_here.update(
                    measure.warm_up(args.impls, args.d, dtype, args.classes, args.device)
                )
                for point in (p for p in points(args) if p.dtype == dtype):
                    elapsed = time.perf_counter() - started
                    if args.time_budget_s is not None and elapsed > args.time_budget_s:
                        stopped = f"time budget of {args.time_budget_s:.0f}s spent"
                        break
                    rows += run_point(point, args, common, failed_here)
                    write_outputs(rows, args, common)  # partial results survive a kill
    except (Interrupted, KeyboardInterrupt):
        stopped = "interrupted"
    if stopped:
        print(f"stopped early: {stopped}; the sizes left were not run")
    results = evaluate(rows, args)
    largest = write_outputs(rows, args, common, results)
    print()
    print(report.console_table(rows))
    print(
        f"\nwrote {args.out}/memory_bank.csv ({len(rows)} rows) in "
        f"{time.perf_counter() - started:.0f}s" + (f"; {stopped}" if stopped else "")
    )
    print(f"\nlargest K in {args.mem_budget_gb:g} GiB:\n{report.markdown_largest_k(largest)}\n")
    print(
        reporting.format_targets(
            results, f"targets ({args.device}; ratios from medians of this run)"
        )
    )
    if stopped == "interrupted":
        return 3
    return 1 if disagrees else 0


if __name__ == "__main__":
    sys.exit(main())
