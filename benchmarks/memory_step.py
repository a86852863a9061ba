"""Benchmark one training step of the package's memory losses, as users call them: forward
and backward of ``mcsc.CrossBatchMemory`` against pytorch-metric-learning's, and of
``mcsc.PixelContrastiveLoss`` with and without its per-class pixel memory.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_step.py --out DIR    # CPU, 1 thread

Cross-batch memory (``xbm``): ``mcsc.CrossBatchMemory(mcsc.SupConLoss(temperature=0.1,
weighting="none"), embedding_size=D, memory_size=K)`` and PML's
``CrossBatchMemory(SupConLoss(temperature=0.1), embedding_size=D, memory_size=K)``; a step is
``memory(embeddings, labels).backward()`` on a new batch of M rows (``torch.randn``, labels
uniform over ``--xbm-classes``, as the README's example), sizes ``--xbm-sizes`` (M x K). Before
timing, each module's queue is filled by ceil(K / M) steps on random batches (no gradient), so
every timed step contrasts its batch against a full queue (and writes over the oldest rows, as
in training). PML runs only where what it holds plus its estimated peak (its self-pair removal
builds a bool matrix of (same-class pairs) x M entries, ``bank_implementations.py``) fit
``--mem-budget-gb`` and 80 % of the free memory; otherwise its rows say "over budget" with the
estimate. Before timing, both modules' losses and gradients are compared on a few small steps
(the queue wrapping around): they must agree (loss within 1e-5 relative).

Pixel memory (``pixel``): ``mcsc.PixelContrastiveLoss(sampler="balanced",
pixels_per_class=64, memory_per_class=Q)`` for Q in ``--queues`` (0: no memory) on
L2-normalised (B, D, 28, 28) embedding maps with (B, 224, 224) labels uniform over C classes,
as in the README's example; B = 8, C = 4, D = 128 sample 8 x 4 x 64 = 2048 pixels a step. The
memory is filled (training mode, no gradient) before timing.

Timing (``timing.interleave``, ``--threads`` 1 by default): the modules of one group (both
cross-batch memories at one size; the pixel loss at every Q) run in rotating order, one step
each per round, at least ``--min-reps`` rounds, more while the group has taken less than
``--point-budget-s``, at most ``--max-reps``; a step's inputs are drawn before its clock
starts. Rows give the median and the 20th / 80th percentiles of ``fwd`` (the loss call, queue
write included), ``bwd`` and ``fwd+bwd``. Peak extra memory: a fresh worker process per module
and size (``memory.py``; this file is the worker when its one argument is a JSON job list)
builds the module, fills it, runs one step, then measures the next step's high-water mark
over what the filled module and the step's inputs already hold.

Like ``run.py``, it times the ``mcsc`` that Python imports and refuses the dense fallback unless
``--allow-reference``. Writes ``DIR/memory_step.csv`` (rewritten after every size) and
``DIR/memory_step.md``; the last thing printed is the table of fwd+bwd steps. CSV columns
(:data:`COLUMNS`): ``M`` the batch rows or the sampled pixels, ``K`` the queue's rows (C x Q for
the pixel loss), ``Q`` the pixel memory per class, ``x_baseline`` the median over mcsc's at the
same size (or over the pixel loss without memory), ``peak_mem_mb`` the peak extra MiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings

# the package's own fallback warning: refused or restated below, with what to do
warnings.filterwarnings("ignore", message="mcsc: ")

import bank_implementations as bank  # noqa: E402
import bank_measure  # noqa: E402
import installed  # noqa: E402
import memory  # noqa: E402
import reporting  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from reporting import _fmt, _ms  # noqa: E402
from timing import (  # noqa: E402
    Interrupted,
    NoPeaks,
    Rounds,
    error_summary,
    interleave,
    sigterm_interrupts,
    time_call_and_backward,
)

import mcsc  # noqa: E402

TEMPERATURE = 0.1
MODES = ("fwd", "bwd", "fwd+bwd")
BENCHMARKS = ("xbm", "pixel")
# the implementations' budget estimates in bank_implementations.py
BANK_NAMES = {"mcsc": "fused", "pml": "pml_xbm"}
NAMES = {
    ("xbm", "mcsc"): "mcsc CrossBatchMemory",
    ("xbm", "pml"): "PML CrossBatchMemory",
    ("pixel", "mcsc"): "mcsc PixelContrastiveLoss",
}
COLUMNS = [
    "benchmark",
    "impl",
    "mode",
    "M",
    "K",
    "Q",
    "C",
    "D",
    "inputs",
    "dtype",
    "device",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "peak_mem_mb",
    "x_baseline",
    "threads",
    "torch",
    "pml",
    "machine",
    "backend",
    "note",
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One module at one size.

    ``xbm``: ``impl`` "mcsc" or "pml", ``batch`` rows M against a queue of ``queue`` rows K.
    ``pixel``: ``impl`` "mcsc", ``batch`` maps of ``map_size``^2 embeddings with
    ``label_size``^2 labels, ``pixels_per_class`` and ``queue`` = Q rows per class.
    """

    benchmark: str
    impl: str
    batch: int
    queue: int
    d: int
    classes: int
    pixels_per_class: int = 0
    map_size: int = 0
    label_size: int = 0
    seed: int = 0

    def inputs_text(self) -> str:
        if self.benchmark == "xbm":
            return f"batch {self.batch}x{self.d}, labels uniform over {self.classes}"
        return (
            f"maps {self.batch}x{self.d}x{self.map_size}x{self.map_size}, labels "
            f"{self.batch}x{self.label_size}x{self.label_size} uniform over {self.classes}, "
            f"{self.pixels_per_class} per class"
        )


def make_module(case: Case) -> torch.nn.Module:
    """The module as a user builds it."""
    if case.benchmark == "pixel":
        return mcsc.PixelContrastiveLoss(
            sampler="balanced",
            pixels_per_class=case.pixels_per_class,
            memory_per_class=case.queue,
        )
    if case.impl == "mcsc":
        return mcsc.CrossBatchMemory(
            mcsc.SupConLoss(temperature=TEMPERATURE, weighting="none"),
            embedding_size=case.d,
            memory_size=case.queue,
        )
    from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss

    return CrossBatchMemory(
        SupConLoss(temperature=TEMPERATURE), embedding_size=case.d, memory_size=case.queue
    )


def draw_inputs(case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A new batch: (embeddings, labels), the embeddings a leaf requiring grad (as a network's
    output): (M, D) ``randn`` rows, or (B, D, h, w) L2-normalised maps with (B, H, W) labels."""
    if case.benchmark == "xbm":
        embeddings = torch.randn(case.batch, case.d, generator=generator)
        labels = torch.randint(0, case.classes, (case.batch,), generator=generator)
        return embeddings.requires_grad_(True), labels
    maps = torch.randn(case.batch, case.d, case.map_size, case.map_size, generator=generator)
    size = case.label_size
    labels = torch.randint(0, case.classes, (case.batch, size, size), generator=generator)
    return F.normalize(maps, dim=1).requires_grad_(True), labels


class Step:
    """A module of ``case`` with its memory full, and the inputs of its steps.

    ``inputs()`` draws a new batch (leaf tensors requiring grad, as a network's output);
    ``loss(inputs)`` is the module's call; ``pixels``: the rows the pixel loss sampled at the
    warm-up step (the batch rows for ``xbm``).
    """

    def __init__(self, case: Case):
        self.case = case
        self.module = make_module(case)
        self.generator = torch.Generator().manual_seed(case.seed)
        self.fill()
        inputs = self.inputs()
        self.loss(inputs).backward()  # warm-up: library initialisation, thread pools
        self.pixels = case.batch
        if case.benchmark == "pixel":
            self.pixels = self.module.diagnostics.rows

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return draw_inputs(self.case, self.generator)

    def loss(self, inputs) -> torch.Tensor:
        return self.module(*inputs)

    def full(self) -> bool:
        if self.case.benchmark == "xbm":
            return bool(self.module.has_been_filled)
        count = self.module.memory_count if self.case.queue else None
        return count is None or (count.numel() > 0 and int(count.min()) == self.case.queue)

    def fill(self) -> None:
        """Steps on random batches, without gradient, until the memory is full."""
        case = self.case
        per_step = case.batch if case.benchmark == "xbm" else case.batch * case.pixels_per_class
        needed = math.ceil(case.queue / per_step)
        with torch.no_grad():
            for _ in range(2 * needed + 2):
                if self.full():
                    return
                self.loss(self.inputs())
        if not self.full():
            raise RuntimeError(f"the memory is not full after {2 * needed + 2} steps")

    def run(self):
        """One timed step: ``({mode: seconds}, {})``."""
        inputs = self.inputs()
        return time_call_and_backward(lambda: self.loss(inputs), lambda: None, NoPeaks())


# ----------------------------------------------------------------------------------------------
# the two modules agree
# ----------------------------------------------------------------------------------------------


def check_agreement(d: int = 16, steps: int = 6) -> tuple[list[str], dict]:
    """mcsc's and PML's cross-batch memories on the same small batches (M = 24 rows, a queue
    of 80, so it wraps around): every step's loss within 1e-5 relative, the batch gradient
    within 1e-4 of its largest entry. Returns the report lines and ``{"pml": why not}``."""
    case = Case("xbm", "mcsc", 24, 80, d, 5)
    modules = {name: make_module(dataclasses.replace(case, impl=name)) for name in BANK_NAMES}
    generator = torch.Generator().manual_seed(11)
    loss_err = grad_err = 0.0
    for _ in range(steps):
        embeddings, labels = draw_inputs(case, generator)
        results = {}
        for name, module in modules.items():
            rows = embeddings.detach().clone().requires_grad_(True)
            loss = module(rows, labels)
            loss.backward()
            results[name] = (float(loss.detach()), rows.grad)
        (loss, grad), (pml_loss, pml_grad) = results["mcsc"], results["pml"]
        loss_err = max(loss_err, abs(pml_loss - loss) / max(abs(loss), 1e-30))
        grad_err = max(grad_err, float((pml_grad - grad).abs().max() / grad.abs().max()))
    ok = loss_err <= 1e-5 and grad_err <= 1e-4
    line = (
        f"  PML CrossBatchMemory vs mcsc, {steps} steps of 24 rows into a queue of 80: loss "
        f"max rel err {loss_err:.1e}, grad max rel err {grad_err:.1e}  "
        + ("ok" if ok else "MISMATCH")
    )
    rejected = {} if ok else {"pml": f"skipped: disagrees with mcsc (loss rel err {loss_err:.1e})"}
    return [line], rejected


# ----------------------------------------------------------------------------------------------
# the sizes
# ----------------------------------------------------------------------------------------------


def groups(args) -> list[tuple[str, list[Case]]]:
    """``(label, cases timed together)``: one group per cross-batch size, one for the pixel
    loss's queues."""
    out = []
    if "xbm" in args.benchmarks:
        for m, k in args.xbm_sizes:
            cases = [Case("xbm", name, m, k, args.d, args.xbm_classes) for name in args.impls]
            out.append((f"xbm M={m} K={k}", cases))
    if "pixel" in args.benchmarks:
        cases = [
            Case(
                "pixel",
                "mcsc",
                args.maps,
                q,
                args.d,
                args.pixel_classes,
                args.pixels_per_class,
                args.map_size,
                args.label_size,
            )
            for q in args.queues
        ]
        out.append((f"pixel Q={','.join(str(q) for q in args.queues)}", cases))
    return out


def over_budget(case: Case, budget_bytes: float) -> str:
    """Why ``case`` is not run ('' when it fits): a cross-batch memory's held and estimated
    peak bytes against the budget and 80 % of the free memory (``bank_measure.plan_point``)."""
    if case.benchmark != "xbm":
        return ""
    name = BANK_NAMES[case.impl]
    _, skipped = bank_measure.plan_point(
        [name],
        case.batch,
        case.queue,
        case.d,
        "float32",
        case.classes,
        budget_bytes,
        bank_measure.available_bytes("cpu"),
        same_fraction=1.0 / case.classes,
    )
    return skipped.get(name, "")


def case_rows(case: Case, pixels: int | None, stats: dict, common: dict, note: str) -> list[dict]:
    rows = []
    pixel = case.benchmark == "pixel"
    for mode in MODES:
        row = dict(
            common,
            benchmark=case.benchmark,
            impl=case.impl,
            mode=mode,
            M=pixels if pixel else case.batch,
            K=case.queue * case.classes if pixel else case.queue,
            Q=case.queue if pixel else None,
            C=case.classes,
            D=case.d,
            inputs=case.inputs_text(),
            dtype="float32",
            backend=common["backend"] if case.impl == "mcsc" else "",
            note=note,
        )
        if (case, mode) in stats:
            median, low, high, count = stats[(case, mode)]
            row.update(median_ms=median * 1e3, p20_ms=low * 1e3, p80_ms=high * 1e3, reps=count)
        elif not note:
            row["note"] = "not measured"
        rows.append(row)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``x_baseline``: the median over that of the group's first case in the same mode (mcsc
    at the same size for ``xbm``, no memory for ``pixel``)."""
    first = {}
    for row in rows:
        first.setdefault(row["mode"], row)
    for row in rows:
        base = first[row["mode"]].get("median_ms")
        if base and row.get("median_ms") is not None:
            row["x_baseline"] = row["median_ms"] / base


def run_group(cases: list[Case], args, common: dict, rejected: dict, log=print) -> list[dict]:
    """Fill every module of one group, time them interleaved, then measure their peaks."""
    budget = args.mem_budget_gb * 2**30
    notes, steps, pixels = {}, {}, {}
    for case in cases:
        why = rejected.get(case.impl) or over_budget(case, budget)
        if why:
            notes[case] = why
            continue
        started = time.perf_counter()
        try:
            steps[case] = Step(case)
        except Exception as error:  # MemoryError, a PML failure: say so, time the others
            notes[case] = f"failed: {error_summary(error)}"
            continue
        pixels[case] = steps[case].pixels
        log(
            f"  filled {case.impl} {case.benchmark} (Q/K={case.queue}) in "
            f"{time.perf_counter() - started:.1f}s"
        )
    rounds = Rounds(args.min_reps, args.max_reps, args.point_budget_s)
    started = time.perf_counter()
    samples, _ = interleave({case: step.run for case, step in steps.items()}, rounds, notes)
    log(f"  timed {len(steps)} modules in {time.perf_counter() - started:.1f}s")
    del steps
    stats = bank_measure.summarise(samples)
    by_case = {
        case: case_rows(case, pixels.get(case), stats, common, notes.get(case, ""))
        for case in cases
    }
    rows = [row for case in cases for row in by_case[case]]
    add_ratios(rows)
    if args.no_memory:
        return rows
    for case, mine in by_case.items():
        if not any(row.get("median_ms") is not None for row in mine):
            continue
        why = over_budget(case, budget)  # the worker fills the module again: check again
        if why:
            for row in mine:
                row["note"] = (row["note"] + "; memory not measured: " + why).strip("; ")
            continue
        job = dict(dataclasses.asdict(case), threads=common["threads"])
        (result,) = memory.measure_cpu_jobs(
            [job], os.path.dirname(common["package"]), script=os.path.abspath(__file__)
        )
        for row in mine:
            if "error" in result:
                row["note"] = (row["note"] + "; memory: " + result["error"]).strip("; ")
            else:
                row["peak_mem_mb"] = result.get(row["mode"])
    return rows


def run_memory_job(job: dict) -> dict:
    """In the worker: fill the module, one step, then the peaks of the next step's phases."""
    step = Step(Case(**{field.name: job[field.name] for field in dataclasses.fields(Case)}))
    inputs = step.inputs()

    def run_backward(loss):
        loss.backward()

    return memory.measure_cpu_in_process(lambda: step.loss(inputs), run_backward)


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def _size(row: dict) -> tuple[str, str]:
    """The table's M and memory cells."""
    if row["benchmark"] == "pixel":
        return f"{row['M']} pixels", f"Q={row['Q']} ({row['K']} rows)"
    return f"{row['M']} rows", f"K={row['K']}"


def _mib(value) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def markdown_table(rows: list[dict]) -> str:
    out = [
        "| implementation | M | memory | fwd+bwd ms (p20-p80) | reps | x baseline | "
        "peak extra MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (r for r in rows if r["mode"] == "fwd+bwd"):
        m, k = _size(row)
        name = NAMES[(row["benchmark"], row["impl"])]
        if row.get("median_ms") is None:
            out.append(f"| {name} | {m} | {k} | {row['note']} | | | |")
            continue
        out.append(
            f"| {name} | {m} | {k} | {_ms(row['median_ms'])} ({_ms(row['p20_ms'])}-"
            f"{_ms(row['p80_ms'])}) | {row['reps']} | {_fmt(row.get('x_baseline'), '.2f')} | "
            f"{_mib(row.get('peak_mem_mb'))} |"
        )
    return "\n".join(out)


def console_table(rows: list[dict]) -> str:
    header = (
        f"{'implementation':26s} {'M':>12s} {'memory':>20s} {'fwd+bwd ms':>10s} "
        f"{'p20-p80 ms':>15s} {'x base':>6s} {'peak MiB':>8s}  note"
    )
    lines = [header, "-" * len(header)]
    for row in (r for r in rows if r["mode"] == "fwd+bwd"):
        m, k = _size(row)
        spread = ""
        if row.get("p20_ms") is not None:
            spread = f"{_ms(row['p20_ms'])}-{_ms(row['p80_ms'])}"
        lines.append(
            f"{NAMES[(row['benchmark'], row['impl'])]:26s} {m:>12s} {k:>20s} "
            f"{_ms(row.get('median_ms')):>10s} {spread:>15s} "
            f"{_fmt(row.get('x_baseline'), '6.2f'):>6s} {_mib(row.get('peak_mem_mb')):>8s}"
            f"  {row.get('note', '')}"
        )
    return "\n".join(lines)


def write_outputs(rows: list[dict], args, common: dict, command: str) -> None:
    reporting.write_csv(rows, os.path.join(args.out, "memory_step.csv"), COLUMNS)
    with open(os.path.join(args.out, "memory_step.md"), "w") as handle:
        handle.write(
            f"One training step (forward + backward) of the memory losses, float32; "
            f"{common['device']}, {common['machine']}, torch {common['torch']}, "
            f"{common['threads']} threads, mcsc {common['backend']}, pytorch-metric-learning "
            f"{common['pml']}.\n\n`{command}`\n\n{markdown_table(rows)}\n\n"
            f"M: the batch rows (cross-batch memory) or the sampled pixels (pixel loss); "
            f"memory: the queue's rows, or Q per class (C x Q rows); x baseline: over mcsc at "
            f"the same size, or over the pixel loss without memory. Peak extra: over the "
            f"filled module and the step's inputs.\n"
        )


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in pair.lower().split("x")) for pair in text.split(",") if pair]


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--benchmarks", default=",".join(BENCHMARKS), help="comma-separated: xbm, pixel"
    )
    parser.add_argument(
        "--xbm-sizes",
        type=_pairs,
        default=_pairs("512x16384,1024x65536"),
        help="cross-batch memory sizes MxK (batch rows x queue rows), comma-separated",
    )
    parser.add_argument("--xbm-classes", type=int, default=10, help="labels of the batches")
    parser.add_argument("--impls", default="mcsc,pml", help="cross-batch memories: mcsc, pml")
    parser.add_argument(
        "--queues", type=_ints, default=[0, 1024, 4096], help="pixel memory Q per class"
    )
    parser.add_argument("--maps", type=int, default=8, help="pixel loss: embedding maps B")
    parser.add_argument("--pixel-classes", type=int, default=4)
    parser.add_argument("--pixels-per-class", type=int, default=64)
    parser.add_argument("--map-size", type=int, default=28, help="embedding map side")
    parser.add_argument("--label-size", type=int, default=224, help="label map side")
    parser.add_argument("--d", type=int, default=128, help="embedding width D")
    parser.add_argument(
        "--mem-budget-gb",
        type=float,
        default=8.0,
        help="skip a cross-batch memory whose queue, batch and estimated peak need more",
    )
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-reps", type=int, default=15)
    parser.add_argument(
        "--point-budget-s",
        type=float,
        default=15.0,
        help="stop adding rounds at a size after this many seconds",
    )
    parser.add_argument("--no-memory", action="store_true", help="no memory workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    installed.add_allow_option(parser)
    parser.add_argument("--machine-note", default="", help="appended to the machine column")
    args = parser.parse_args(argv)
    args.device = "cpu"
    args.benchmarks = tuple(name for name in args.benchmarks.split(",") if name)
    args.impls = tuple(name for name in args.impls.split(",") if name)
    if set(args.benchmarks) - set(BENCHMARKS):
        parser.error(f"unknown benchmarks {args.benchmarks}; known: {BENCHMARKS}")
    if set(args.impls) - set(BANK_NAMES) or not args.impls:
        parser.error(f"unknown implementations {args.impls}; known: {tuple(BANK_NAMES)}")
    if any(m > k for m, k in args.xbm_sizes):
        parser.error("a cross-batch memory's batch must fit in its queue (M <= K)")
    return args


def main(argv=None) -> int:
    """Exit status: 0; 1 when the two cross-batch memories disagree; 3 when interrupted."""
    started = time.perf_counter()
    args = parse_args(argv)
    command = "python benchmarks/memory_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("OMP_WAIT_POLICY"):
        command = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} {command}"
    backend = installed.prepare_run(args)
    common = installed.describe_run(args, backend, pml=bank.pml_version())
    rejected = {}
    if "xbm" in args.benchmarks and "pml" in args.impls:
        print("value agreement, float32:")
        lines, rejected = check_agreement()
        print("\n".join(lines))
    rows, stopped = [], ""
    try:
        with sigterm_interrupts():
            for label, cases in groups(args):
                print(f"[{label}]")
                rows += run_group(cases, args, common, rejected)
                write_outputs(rows, args, common, command)  # partial results survive a kill
    except (Interrupted, KeyboardInterrupt):
        stopped = "interrupted"
        print("stopped early: interrupted; the sizes left were not run")
    write_outputs(rows, args, common, command)
    print(
        f"\nwrote {args.out}/memory_step.csv ({len(rows)} rows) in "
        f"{time.perf_counter() - started:.0f}s\n"
    )
    print(console_table(rows))
    if stopped:
        return 3
    return 1 if rejected else 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("["):  # a memory worker (memory.py)
        memory.serve_jobs(json.loads(sys.argv[1]), run_memory_job, bank_measure._error_text, False)
    else:
        sys.exit(main())
