"""What the fused op buys a training run: one MCSC step of the trainer, timed per sampler.

Runs the trainer's own ``Trainer.train_step`` (the paper's recipe unless ``--config`` says
otherwise: U-Net and Swin-UNet at 224x224, batch 8 with 4 labelled, bfloat16 autocast and TF32
on CUDA) on batches of the synthetic data, with unlabelled pixels in the contrastive loss, for:

* ``blocks``: the public code's 19x19 / 14x14 block groups, through the fused op;
* ``balanced``: up to ``pixels_per_class`` pixels per class, image and network;
* ``all``: every pixel of both scales in one set (about 815 000 rows at batch 8, 224x224);
* ``blocks-dense``: the block groups through a dense N x N PyTorch loss per group, looped in
  Python (the public code's way);
* ``no-contrastive``: cross teaching alone (the same networks and batches), the baseline.

For each it reports the median step time, iterations per second, the peak GPU memory of the
timed steps, and the share of a step spent in the contrastive loss (its heads, forward and
backward): ``1 - baseline step / step``. Writes ``OUT/training_step.csv`` and prints a table::

    python benchmarks/training_step.py --device cuda --out runs/training_step

It imports the installed ``mcsc`` (or the one on ``PYTHONPATH``) and refuses to time the dense
fallback of an uncompiled op unless ``--allow-reference`` is given (as the other benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import installed
import torch

import mcsc
from mcsc import reference
from mcsc.losses import pixel as pixel_loss_module
from mcsc.training.config import Config, load_yaml, preset
from mcsc.training.trainer import Trainer

VARIANTS = {  # name: (method, sampler, dense loss)
    "no-contrastive": ("cross-teaching", "blocks", False),
    "blocks": ("mcsc", "blocks", False),
    "balanced": ("mcsc", "balanced", False),
    "all": ("mcsc", "all", False),
    "blocks-dense": ("mcsc", "blocks", True),
}
COLUMNS = [
    "variant",
    "method",
    "sampler",
    "loss",
    "device",
    "patch_size",
    "batch_size",
    "timed_steps",
    "median_step_ms",
    "min_step_ms",
    "iterations_per_second",
    "peak_memory_mib",
    "contrastive_share",
    "backend",
    "torch",
]


def dense_supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    segments: torch.Tensor | None = None,
    weighting: str = "prevalence",
    ignore_index: int = -1,
    reduction: str = "none",
    num_classes: int | None = None,
) -> torch.Tensor:
    """Per-anchor losses as ``mcsc.supcon_loss(..., reduction="none")``, computed densely: the
    (n x n) similarities of every segment in turn, as the public code loops over block groups.

    ``features`` (N, D) float, ``labels`` (N,) int64, ``segments`` (S + 1,) int64 offsets;
    returns (N,) of ``features.dtype``. ``num_classes`` is accepted for the same signature.
    """
    if reduction != "none":
        raise ValueError(
            f"reduction must be 'none' (what the multi-scale loss asks for), got {reduction!r}"
        )
    if segments is None:
        segments = torch.tensor([0, features.shape[0]])
    per_anchor, _ = reference.supcon_per_anchor_reference(
        features, labels, segments, float(temperature), weighting == "prevalence", int(ignore_index)
    )
    return per_anchor


@contextlib.contextmanager
def dense_contrastive_op():
    """Make the multi-scale contrastive loss call :func:`dense_supcon_loss` instead of the op."""
    if not hasattr(pixel_loss_module, "supcon_loss"):
        raise RuntimeError(
            "mcsc.losses.pixel no longer calls supcon_loss by that name: "
            "update benchmarks/training_step.py"
        )
    fused = pixel_loss_module.supcon_loss
    pixel_loss_module.supcon_loss = dense_supcon_loss
    try:
        yield
    finally:
        pixel_loss_module.supcon_loss = fused


def variant_config(base: Config, method: str, sampler: str, device: str, batches: int) -> Config:
    config = Config.from_dict(base.to_dict())
    config.train.iterations = max(config.train.iterations, batches)
    config.train.method = method
    config.loss.contrastive_sampler = sampler
    config.train.device = device
    config.data.num_workers = 0
    return config


def time_variant(
    name: str, base: Config, device: str, steps: int, warmup: int, max_seconds: float, out: Path
) -> dict:
    """Median step time and peak memory of one variant on pre-loaded batches."""
    method, sampler, dense = VARIANTS[name]
    config = variant_config(base, method, sampler, device, warmup + steps)
    trainer = Trainer(config, out / name, progress=False)
    trainer.setup()
    batches = []
    for batch in trainer.train_loader():  # loaded before timing: data loading is not a step
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    for model in trainer.models.values():
        model.train()
    cuda = trainer.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(trainer.device)

    # unlabelled pixels take part in the contrastive loss from this iteration on
    first = config.loss.labelled_only_until
    durations = []
    with dense_contrastive_op() if dense else contextlib.nullcontext():
        started = time.perf_counter()
        for index, batch in enumerate(batches):
            if index == warmup and cuda:
                torch.cuda.reset_peak_memory_stats(trainer.device)
            sync()
            begin = time.perf_counter()
            trainer.train_step(batch, first + index)
            sync()
            if index >= warmup:
                durations.append(time.perf_counter() - begin)
                if time.perf_counter() - started > max_seconds:
                    break
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda else float("nan")
    median = statistics.median(durations)
    return {
        "variant": name,
        "method": method,
        "sampler": sampler if method == "mcsc" else "",
        "loss": ("dense" if dense else "fused") if method == "mcsc" else "",
        "device": str(trainer.device),
        "patch_size": config.data.patch_size,
        "batch_size": config.train.batch_size,
        "timed_steps": len(durations),
        "median_step_ms": 1e3 * median,
        "min_step_ms": 1e3 * min(durations),
        "iterations_per_second": 1.0 / median,
        "peak_memory_mib": peak,
        "backend": mcsc.backend(trainer.device),
        "torch": torch.__version__,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| variant | step (ms, median) | iterations/s | peak GPU memory (MiB) | contrastive share |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        share, peak = row["contrastive_share"], row["peak_memory_mib"]
        lines.append(
            f"| {row['variant']} | {row['median_step_ms']:.1f} | {row['iterations_per_second']:.2f} | "
            f"{'n/a (CPU)' if math.isnan(peak) else f'{peak:.0f}'} | "
            f"{'' if share == '' else f'{100 * share:.0f} %'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--config", help="YAML file over the paper recipe (e.g. tiny networks for a CPU check)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (allocations, autotuning)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=40.0,
        help="stop timing a variant after this long (at least one step is timed)",
    )
    parser.add_argument(
        installed.ALLOW_FLAG,
        action="store_true",
        help="time even when the op runs its dense pure-PyTorch fallback",
    )
    parser.add_argument("--out", required=True, help="folder for training_step.csv")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    installed.require_compiled(device.type, args.allow_reference)
    base = preset("synthetic", "paper")
    if args.config:
        values = load_yaml(args.config)
        base.update({key: value for key, value in values.items() if key != "recipe"}, args.config)
    if "no-contrastive" in args.variants:  # the baseline first: every share needs it
        args.variants = ["no-contrastive"] + [v for v in args.variants if v != "no-contrastive"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for name in args.variants:
            row = time_variant(
                name, base, args.device, args.steps, args.warmup, args.max_seconds, Path(runs)
            )
            rows.append(row)
            print(
                f"{name}: {row['median_step_ms']:.1f} ms per step over {row['timed_steps']} steps",
                flush=True,
            )
    baseline = next(
        (row["median_step_ms"] for row in rows if row["variant"] == "no-contrastive"), None
    )
    for row in rows:
        row["contrastive_share"] = (
            ""
            if baseline is None or row["method"] != "mcsc"
            else 1.0 - baseline / row["median_step_ms"]
        )
    with open(out / "training_step.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"patch {base.data.patch_size}, batch {base.train.batch_size} ({base.train.labeled_batch_size} labelled)"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
