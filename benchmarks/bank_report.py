"""What ``memory_bank.py`` writes: the CSV of the sizes, the CSV of the largest memories that
fit, the markdown tables and the plot.

``memory_bank.csv`` has one row per implementation, mode and size: the columns of
:data:`COLUMNS` (``x_gemm``: the median over the median of the two GEMMs of the same size and
run; ``x_fused``: over the fused op's; ``held_mb``: the inputs the implementation holds, not
counted in ``peak_mem_mb``). ``memory_bank_largest_k.csv``: per implementation, dtype and M, the
largest K that fits the budget, from a fit of the measured peaks (:data:`LARGEST_K_COLUMNS`).
"""

from __future__ import annotations

import textwrap

from reporting import _fmt, _ms

COLUMNS = [
    "impl",
    "mode",
    "M",
    "K",
    "D",
    "C",
    "dtype",
    "device",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "peak_mem_mb",
    "held_mb",
    "x_gemm",
    "x_fused",
    "workload",
    "weighting",
    "threads",
    "torch",
    "pml",
    "machine",
    "backend",
    "note",
]
LARGEST_K_COLUMNS = [
    "impl",
    "dtype",
    "M",
    "budget_gib",
    "largest_K",
    "largest_measured_K",
    "extrapolated",
    "fit_terms",
    "fit_worst_relative_error",
    "fit_points",
    "device",
    "note",
]
COLORS = {"gemm": "C0", "fused": "C1", "pml_xbm": "C2", "pml_loss": "C3", "dense": "C4"}
NAMES = {
    "fused": "mcsc fused",
    "pml_xbm": "PML CrossBatchMemory",
    "pml_loss": "PML SupConLoss call alone",
    "dense": "dense (mcsc.reference)",
    "gemm": "two GEMMs (A K^T, P K)",
}


def _time_cell(row: dict) -> str:
    if row.get("median_ms") is None:
        return row.get("note") or "not measured"
    return f"{_ms(row['median_ms'])} ({_ms(row['p20_ms'])}-{_ms(row['p80_ms'])})"


def markdown_table(rows: list[dict], workloads=("key", "grid")) -> str:
    """fwd+bwd (and the GEMMs) of every size: median ms (p20-p80), x GEMM, x fused, peak MiB."""
    out = [
        "| dtype | M | K | implementation | fwd+bwd ms (p20-p80) | x GEMMs | x fused | peak extra MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["workload"] not in workloads or row["mode"] != (
            "fwd" if row["impl"] == "gemm" else "fwd+bwd"
        ):
            continue
        out.append(
            f"| {row['dtype']} | {row['M']} | {row['K']} | {NAMES.get(row['impl'], row['impl'])} | "
            f"{_time_cell(row)} | {_fmt(row.get('x_gemm'), '.2f')} | "
            f"{_fmt(row.get('x_fused'), '.1f')} | {_fmt(row.get('peak_mem_mb'), '.0f')} |"
        )
    return "\n".join(out)


def console_table(rows: list[dict]) -> str:
    header = (
        f"{'workload':10s} {'dtype':8s} {'M':>5s} {'K':>7s} {'impl':9s} {'mode':8s} "
        f"{'median ms':>10s} {'p20-p80 ms':>17s} {'x GEMMs':>7s} {'x fused':>7s} "
        f"{'peak MiB':>9s}  note"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        spread = ""
        if row.get("p20_ms") is not None:
            spread = f"{_ms(row['p20_ms'])}-{_ms(row['p80_ms'])}"
        lines.append(
            f"{row['workload']:10s} {row['dtype']:8s} {row['M']:5d} {row['K']:7d} "
            f"{row['impl']:9s} {row['mode']:8s} {_ms(row.get('median_ms')):>10s} {spread:>17s} "
            f"{_fmt(row.get('x_gemm'), '7.2f'):>7s} {_fmt(row.get('x_fused'), '7.1f'):>7s} "
            f"{_fmt(row.get('peak_mem_mb'), '9.1f'):>9s}  {row.get('note', '')}"
        )
    return "\n".join(lines)


def markdown_largest_k(rows: list[dict]) -> str:
    out = [
        "| dtype | M | implementation | largest K in budget | largest K measured | fit |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        largest = "" if row.get("largest_K") is None else f"{row['largest_K']:,}"
        if row.get("largest_K") == 0 and row.get("note"):
            largest = f"none: {row['note']}"
        elif row.get("extrapolated"):
            largest += " (extrapolated)"
        fit = row.get("fit_terms") or ""
        out.append(
            f"| {row['dtype']} | {row['M']} | {NAMES.get(row['impl'], row['impl'])} | "
            f"{largest or row.get('note', '')} | {_fmt(row.get('largest_measured_K'), ',')} | "
            f"{fit} |"
        )
    return "\n".join(out)


def plot(
    rows: list[dict], dtype: str, key_m: int, key_k: int, budget_mib: float, path: str, title: str
) -> bool:
    """fwd+bwd time and peak extra memory against K at M = ``key_m`` (top) and against M at
    K = ``key_k`` (bottom), log scales, as a PNG; False when nothing was timed in ``dtype``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["dtype"] == dtype and r["workload"] in ("key", "grid")]
    if not any(r.get("median_ms") is not None for r in mine):
        return False
    names = []
    for row in mine:
        if row["impl"] not in names:
            names.append(row["impl"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=80)
    slices = (("K", "M", key_m), ("M", "K", key_k))
    for (axis_name, fixed_name, fixed), (ax_time, ax_mem) in zip(slices, axes):
        for name in names:
            mode = "fwd" if name == "gemm" else "fwd+bwd"
            points = sorted(
                (r[axis_name], r)
                for r in mine
                if r["impl"] == name and r["mode"] == mode and r[fixed_name] == fixed
            )
            style = dict(
                marker="o",
                linestyle="--" if name == "gemm" else "-",
                color=COLORS.get(name),
                label=NAMES.get(name, name),
            )
            times = [(x, r["median_ms"]) for x, r in points if r.get("median_ms") is not None]
            peaks = [
                (x, max(r["peak_mem_mb"], 1e-2))
                for x, r in points
                if r.get("peak_mem_mb") is not None
            ]
            if times:
                ax_time.plot(*zip(*times), **style)
            if peaks:
                ax_mem.plot(*zip(*peaks), **style)
        ax_mem.axhline(
            budget_mib, color="grey", linestyle=":", label="budget (less the inputs held)"
        )
        for ax in (ax_time, ax_mem):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(
                f"{axis_name} ({'keys' if axis_name == 'K' else 'anchors'}), {fixed_name} = {fixed}"
            )
            ax.grid(True, which="both", alpha=0.3)
        ax_time.set_ylabel("fwd+bwd median ms")
        ax_mem.set_ylabel("peak extra MiB, fwd+bwd")
    axes[0][0].legend(fontsize=7)
    axes[0][1].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
