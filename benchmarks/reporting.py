"""What the benchmarks write: the CSV, the text and markdown tables, the plots, the machine.

The CSV has one row per implementation, mode and size: ``impl, mode, N, D, C, segments, dtype,
device, median_ms, p20_ms, p80_ms, peak_mem_mb, threads, torch, machine``, then ``weighting,
workload, reps, x_gemm, dense_over_impl, backend, note, tf32``.
"""

from __future__ import annotations

import csv
import os
import platform

import memory
import torch
from timing import MODES

COLUMNS = [
    "impl",
    "mode",
    "N",
    "D",
    "C",
    "segments",
    "dtype",
    "device",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
    "threads",
    "torch",
    "machine",
    # extra columns (after the required ones)
    "weighting",
    "workload",
    "reps",
    "x_gemm",
    "dense_over_impl",
    "backend",
    "note",
    "tf32",
]


def machine_description(device: str, note: str = "") -> str:
    """The GPU, or the CPU model, cores and RAM; the OpenMP wait policy when set; ``note``."""
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
        mem_gb = memory.meminfo_bytes("MemTotal") / 2**30
        text = f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM"
    if os.environ.get("OMP_WAIT_POLICY"):
        text += f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    return f"{text}; {note}" if note else text


def _fmt(value, spec):
    return "" if value is None or value == "" else format(value, spec)


def _ms(value) -> str:
    """Milliseconds with two decimals below 10 ms (GPU times), one above."""
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def format_table(rows: list[dict], modes=MODES) -> str:
    """The console table of result rows (those of ``modes``)."""
    header = (
        f"{'workload':22s} {'impl':9s} {'mode':8s} {'N':>7s} {'C':>3s} {'median ms':>10s} "
        f"{'p20-p80 ms':>17s} {'x GEMM':>7s} {'dense/impl':>10s} {'peak MiB':>9s}  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["mode"] not in modes:
            continue
        spread = ""
        if r.get("p20_ms") is not None:
            spread = f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}"
        lines.append(
            f"{r['workload']:22s} {r['impl']:9s} {r['mode']:8s} {r['N']:7d} {r['C']:3d} "
            f"{_ms(r.get('median_ms')):>10s} {spread:>17s} "
            f"{_fmt(r.get('x_gemm'), '7.2f'):>7s} {_fmt(r.get('dense_over_impl'), '10.2f'):>10s} "
            f"{_fmt(r.get('peak_mem_mb'), '9.1f'):>9s}  {r.get('note', '')}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict], mode: str = "fwd+bwd") -> str:
    """README table: median ms, ratios to GEMM and dense, peak MiB (one mode + GEMM rows)."""
    out = [
        "| workload | N | impl | mode | median ms (p20-p80) | x GEMM | dense / impl | peak MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["impl"] != "gemm" and r["mode"] != mode:
            continue
        if r.get("median_ms") is None:
            out.append(
                f"| {r['workload']} | {r['N']} | {r['impl']} | {r['mode']} | "
                f"{r.get('note', '')} | | | |"
            )
            continue
        out.append(
            f"| {r['workload']} | {r['N']} | {r['impl']} | {r['mode']} | "
            f"{_ms(r['median_ms'])} ({_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}) | "
            f"{_fmt(r.get('x_gemm'), '.2f')} | {_fmt(r.get('dense_over_impl'), '.2f')} | "
            f"{_fmt(r.get('peak_mem_mb'), '.1f')} |"
        )
    return "\n".join(out)


def write_csv(rows: list[dict], path: str, columns: list[str] = COLUMNS) -> None:
    """The rows as CSV with ``columns`` (floats to 4 significant digits, None as empty)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    k: (
                        ""
                        if r.get(k) is None
                        else (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r[k])
                    )
                    for k in columns
                }
            )


def plot_workload(rows: list[dict], workload: str, path: str, title: str) -> bool:
    """fwd+bwd time and peak memory against N (log scales; bars for one size) as a PNG;
    False when ``rows`` has nothing of ``workload``."""
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


def format_targets(results: list[dict], title: str) -> str:
    """The targets as one console table: measure, measured, goal, pass/fail."""
    width = max([len("measure")] + [len(r["measure"]) for r in results])
    lines = [
        title,
        f"{'measure':{width}s} {'measured':>10s}  {'goal':10s} pass/fail",
        "-" * (width + 34),
    ]
    for r in results:
        lines.append(
            f"{r['measure']:{width}s} {_fmt(r['value'], '10.2f') or '-':>10s}  "
            f"{r['goal']:10s} {r['verdict']}"
        )
    return "\n".join(lines)


def markdown_targets(results: list[dict]) -> str:
    """The targets as a markdown table."""
    out = ["| measure | measured | goal | pass/fail |", "|---|---:|---:|---|"]
    for r in results:
        out.append(
            f"| {r['measure']} | {_fmt(r['value'], '.2f') or '-'} | {r['goal']} | {r['verdict']} |"
        )
    return "\n".join(out)
