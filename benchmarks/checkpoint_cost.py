"""What a checkpoint of a training run costs: bytes on disk, time to write and to read it.

Builds the trainer of a recipe (``paper`` by default: U-Net 16..256, Swin-UNet embed 96 with
depths 2-2-2-2 at 224x224 and the projection heads, AdamW for each) on the synthetic data,
fills every optimiser state as one step would (zero gradients: the sizes are what matter),
then times ``Trainer.save_latest`` (what every periodic or stop checkpoint runs: the RNG
states, the finiteness check, serialisation, the write, fsync and the rotation of
``latest.pt`` into ``previous.pt``) and ``load_checkpoint`` (the checksum check and
``torch.load(weights_only=True)``), ``--repeat`` times each; prints the medians::

    python benchmarks/checkpoint_cost.py --recipe paper --out /tmp/checkpoint_cost

The folder of ``--out`` decides the disk that is measured: use the run folder's file system.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mcsc.training.checkpoint import load_checkpoint
from mcsc.training.config import load_yaml, preset
from mcsc.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="paper", choices=("paper", "small"))
    parser.add_argument("--config", help="YAML file overriding the recipe (as mcsc train's)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", required=True, help="run folder (its disk is measured)")
    args = parser.parse_args()

    config = preset("synthetic", args.recipe)
    if args.config:
        config.update(load_yaml(args.config), args.config)
    config.train.device = "cpu"
    config.data.num_workers = 0
    trainer = Trainer(config, args.out, progress=False)
    trainer.setup()
    for model in trainer.models.values():
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
    for optimizer in trainer.optimizers.values():
        optimizer.step()  # AdamW's exp_avg and exp_avg_sq for every parameter
    path = trainer.checkpoint_path("latest")

    writes, reads = [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        trainer.last_saved = -1
        trainer.save_latest()
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        load_checkpoint(path)
        reads.append(time.perf_counter() - started)

    def count(module_dicts) -> int:
        return sum(
            tensor.numel() * tensor.element_size()
            for values in module_dicts
            for tensor in _tensors(values)
        )

    state = load_checkpoint(path)
    parameters = sum(p.numel() for m in trainer.models.values() for p in m.parameters())
    print(f"recipe {args.recipe}: {parameters / 1e6:.2f} M parameters")
    print(f"checkpoint {path}: {path.stat().st_size / 2**20:.1f} MiB on disk")
    print(f"  models {count(state['models'].values()) / 2**20:.1f} MiB of tensors")
    print(f"  optimisers {count(state['optimizers'].values()) / 2**20:.1f} MiB of tensors")
    print(
        f"write (save_latest) median {statistics.median(writes):.2f} s, "
        f"read (load_checkpoint) median {statistics.median(reads):.2f} s "
        f"over {args.repeat} ({', '.join(f'{w:.2f}' for w in writes)} / "
        f"{', '.join(f'{r:.2f}' for r in reads)})"
    )


def _tensors(values):
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, dict):
        for value in values.values():
            yield from _tensors(value)
    elif isinstance(values, (list, tuple)):
        for value in values:
            yield from _tensors(value)


if __name__ == "__main__":
    main()
