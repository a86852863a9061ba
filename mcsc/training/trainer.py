"""The training loop: a U-Net and a Swin-UNet trained together (MCSC, cross teaching, supervised).

One readable loop with hooks to override (nnU-Net style)::

    class MyTrainer(Trainer):
        def build_networks(self): ...          # {"cnn", "swin"[, "heads"]}
        def build_losses(self): ...            # {"contrastive": ...}
        def build_optimizers(self): ...        # ({name: optimiser}, {name: scheduler})
        def train_step(self, batch, iteration): ...   # -> {loss name: float}
        def validate(self, iteration): ...     # -> metrics summary
        def on_iteration_end(self, iteration, logs): ...

``Trainer(config, out_dir).fit()`` trains, keeps ``checkpoints/latest.pt`` (every
``checkpoint_every`` iterations) and ``checkpoints/best.pt`` (best validation mean Dice), then
evaluates the best checkpoint on the test split and writes ``metrics.json``, ``metrics.txt``
and ``predictions.png``.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mcsc.data import SliceDataset, build_data
from mcsc.data.distributed_sampling import ShardedTwoStreamBatchSampler
from mcsc.evaluation.inference import evaluate_volumes, save_prediction_figure
from mcsc.losses import (
    MultiScaleContrastiveLoss,
    cross_teaching_loss,
    sigmoid_rampup,
    supervised_loss,
)
from mcsc.models import SwinUNet, UNet, build_projection_heads, feature_index
from mcsc.training.checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mcsc.training.config import Config, save_yaml
from mcsc.training.distributed import (
    DistributedContrastiveLoss,
    all_reduce_mean,
    batch_layout,
    gather_batch,
    init_distributed,
    wrap_models,
)


def build_models(config: Config, num_classes: int) -> dict[str, torch.nn.Module]:
    """The U-Net and the Swin-UNet (and, for ``mcsc``, the projection heads) of a config."""
    m = config.model
    cnn = UNet(in_channels=1, num_classes=num_classes, channels=tuple(m.unet_channels),
               dropout=tuple(m.unet_dropout))
    swin = SwinUNet(
        img_size=config.data.patch_size, in_channels=1, num_classes=num_classes,
        embed_dim=m.swin_embed_dim, depths=tuple(m.swin_depths), num_heads=tuple(m.swin_heads),
        window_size=m.swin_window, pretrained=m.swin_pretrained,
    )
    models = {"cnn": cnn, "swin": swin}
    if config.train.method == "mcsc":
        strides = config.loss.contrastive_strides
        models["heads"] = build_projection_heads(
            [cnn.feature_channels[feature_index(cnn, s)] for s in strides],
            [swin.feature_channels[feature_index(swin, s)] for s in strides],
            hidden=m.projection_hidden, out=m.projection_out,
        )
    return models


def evaluation_models(models: dict, network: str) -> list[torch.nn.Module]:
    """The networks whose (averaged) softmax is evaluated: cnn, swin or both (ensemble)."""
    return {"cnn": [models["cnn"]], "swin": [models["swin"]],
            "ensemble": [models["cnn"], models["swin"]]}[network]


class Trainer:
    """Trains, validates, checkpoints and tests one run described by a :class:`Config`.

    Args:
        config: the run configuration (completed in place by the data: classes, split).
        out_dir: the run folder.
        resume: continue from ``out_dir/checkpoints/latest.pt`` exactly where it stopped.
        progress: show a tqdm progress bar.
    """

    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False,
                 progress: bool = True):
        config.validate()
        self.config = config
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        # one process, or one rank of a torchrun job: starts the process group (NCCL on CUDA,
        # gloo on CPU) and picks cuda:LOCAL_RANK; see mcsc.training.distributed
        self.dist = init_distributed(config.train.device)
        self.device = self.dist.device
        self.amp = config.train.amp and self.device.type == "cuda"
        self.iteration = 0
        self.best = {"metric": -math.inf, "iteration": -1}

    # ----------------------------------------------------------------- hooks
    def build_networks(self) -> dict[str, torch.nn.Module]:
        """{"cnn": U-Net, "swin": Swin-UNet[, "heads": projection heads]} on the device."""
        models = build_models(self.config, self.data.num_classes)
        return {name: model.to(self.device) for name, model in models.items()}

    def build_losses(self) -> dict:
        """{"contrastive": MultiScaleContrastiveLoss} for ``mcsc``, else {}."""
        if self.config.train.method != "mcsc":
            return {}
        loss = self.config.loss
        return {"contrastive": MultiScaleContrastiveLoss(
            sampler=loss.contrastive_sampler, temperature=loss.temperature,
            block_sizes=tuple(loss.contrastive_block_sizes),
            pixels_per_class=loss.contrastive_pixels_per_class, seed=self.config.train.seed,
        )}

    def build_optimizers(self) -> tuple[dict, dict]:
        """AdamW per network (Swin at ``lr * swin_lr_ratio``); poly decay, Swin warm-up."""
        t = self.config.train
        total = t.iterations

        def poly(it: int) -> float:
            return max(0.0, 1.0 - it / total) ** 0.9

        def warm_poly(it: int) -> float:
            return min(1.0, (it + 1) / t.warmup) * poly(it) if t.warmup > 0 else poly(it)

        optimizers, schedulers = {}, {}
        for name, model in self.models.items():
            lr = t.lr * (t.swin_lr_ratio if name == "swin" else 1.0)
            optimizers[name] = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=t.weight_decay)
            schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                optimizers[name], warm_poly if name == "swin" else poly
            )
        return optimizers, schedulers

    def train_step(self, batch: dict, iteration: int) -> dict[str, float]:
        """One optimisation step on a two-stream batch; returns the loss terms as floats.

        ``batch["image"]`` (B, 1, P, P) float32, ``batch["label"]`` (B, P, P) int64 of which the
        first ``labeled_batch_size`` are labelled.
        """
        cfg = self.config
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        lab = cfg.train.labeled_batch_size // self.dist.world_size  # this rank's share
        num_classes = self.data.num_classes
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            cnn_out = self.forward_models["cnn"](images)
            swin_out = self.forward_models["swin"](images)
            cnn_logits, swin_logits = cnn_out.logits.float(), swin_out.logits.float()
            layout = None
            if self.dist.enabled:  # every rank computes the loss of the global batch
                layout = batch_layout(images.shape[0], lab, self.device)
                cnn_logits, swin_logits = gather_batch(cnn_logits, layout), gather_batch(swin_logits, layout)
                labels, lab = gather_batch(labels, layout), layout.total_labelled
            logs = {
                "sup_cnn": supervised_loss(cnn_logits[:lab], labels[:lab], num_classes),
                "sup_swin": supervised_loss(swin_logits[:lab], labels[:lab], num_classes),
            }
            total = logs["sup_cnn"] + logs["sup_swin"]
            if cfg.train.method != "supervised":
                weight = cfg.loss.consistency * sigmoid_rampup(iteration, cfg.loss.consistency_rampup)
                logs["ct_cnn"] = cross_teaching_loss(cnn_logits[lab:], swin_logits[lab:])
                logs["ct_swin"] = cross_teaching_loss(swin_logits[lab:], cnn_logits[lab:])
                total = total + weight * (logs["ct_cnn"] + logs["ct_swin"])
            if cfg.train.method == "mcsc":
                logs["contrast"] = self.contrastive_loss(cnn_out, swin_out, labels[:lab], cnn_logits, swin_logits,
                                                         iteration, layout)
                total = total + cfg.loss.contrastive_weight * logs["contrast"]
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        for optimizer in self.optimizers.values():
            optimizer.step()
        for scheduler in self.schedulers.values():
            scheduler.step()
        logs["loss"] = total
        return {name: float(value.detach()) for name, value in logs.items()}

    def contrastive_loss(self, cnn_out, swin_out, labels: torch.Tensor, cnn_logits: torch.Tensor,
                         swin_logits: torch.Tensor, iteration: int, layout=None) -> torch.Tensor:
        """Multi-scale cross contrastive loss (sum over scales) on the projected features.

        ``cnn_out``/``swin_out`` are this rank's network outputs; ``labels`` (labelled images),
        ``cnn_logits`` and ``swin_logits`` are those of the global batch (gathered under
        several processes, with the step's ``layout``).
        """
        cfg = self.config
        cnn, swin = self.models["cnn"], self.models["swin"]
        strides = cfg.loss.contrastive_strides
        cnn_features = [cnn_out.features[feature_index(cnn, s)].float() for s in strides]
        swin_features = [swin_out.features[feature_index(swin, s)].float() for s in strides]
        cnn_emb, swin_emb = self.forward_models["heads"](cnn_features, swin_features)
        return self.losses["contrastive"](
            cnn_emb, swin_emb, labels, cnn_logits, swin_logits, labelled_count=labels.shape[0],
            use_unlabelled=iteration >= cfg.loss.labelled_only_until, layout=layout,
        )

    def validate(self, iteration: int) -> dict:
        """Evaluate the selected network on the validation volumes (mean Dice drives ``best``)."""
        summary, _ = evaluate_volumes(
            evaluation_models(self.models, self.config.train.eval_network), self.data.val,
            self.data.num_classes, self.data.class_names, self.config.data.patch_size,
            self.device, self.amp,
        )
        for model in self.models.values():
            model.train()
        return summary

    def on_iteration_end(self, iteration: int, logs: dict[str, float]) -> None:
        """Called after every iteration (``iteration`` = number of completed iterations)."""

    # ------------------------------------------------------------ machinery
    def setup(self) -> None:
        """Seed, load data, build networks/losses/optimisers, restore a checkpoint on resume."""
        cfg = self.config
        seed = cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        if self.dist.is_main:  # only rank 0 writes
            self.out.mkdir(parents=True, exist_ok=True)
        self.data = build_data(cfg.data)
        if self.dist.is_main:
            save_yaml(cfg, self.out / "config.yaml")
            if self.data.split:
                (self.out / "split.json").write_text(json.dumps(self.data.split, indent=1))
        self.models = self.build_networks()
        # DDP wrappers run the training forward; self.models keep the weights (save, evaluate)
        self.forward_models = wrap_models(self.models, self.dist, sync_batchnorm=cfg.train.sync_batchnorm)
        self.losses = self.build_losses()
        if "contrastive" in self.losses:  # the global batch's loss (the plain loss for one process)
            self.losses["contrastive"] = DistributedContrastiveLoss(self.losses["contrastive"])
        self.optimizers, self.schedulers = self.build_optimizers()
        lab = cfg.train.labeled_batch_size
        unlab = 0 if cfg.train.method == "supervised" else cfg.train.batch_size - lab
        self.sampler = ShardedTwoStreamBatchSampler(  # this rank's share of every global batch
            self.data.labelled_indices(), self.data.unlabelled_indices(), lab, unlab,
            cfg.train.iterations, seed, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        if self.resume:
            self.load_state(load_checkpoint(self.checkpoint_path("latest"), self.device))

    def checkpoint_path(self, which: str) -> Path:
        return self.out / "checkpoints" / f"{which}.pt"

    def state(self) -> dict:
        """The whole training state as one weights-only-loadable dict."""
        state = {
            "format": FORMAT,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sch.state_dict() for name, sch in self.schedulers.items()},
            "sampler": {"seed": self.sampler.seed, "start": self.iteration},
            "rng": rng_state(),
            "best": dict(self.best),
        }
        if "contrastive" in self.losses:
            state["rng"]["contrastive"] = self.losses["contrastive"].generator.get_state()
        return state

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` saved."""
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.sampler.load_state_dict(state["sampler"])
        self.iteration = int(state["iteration"])
        self.best = {"metric": float(state["best"]["metric"]),
                     "iteration": int(state["best"]["iteration"])}
        set_rng_state(state["rng"])
        if "contrastive" in self.losses and "contrastive" in state["rng"]:
            self.losses["contrastive"].generator.set_state(state["rng"]["contrastive"].cpu())

    def fit(self) -> dict:
        """Train to ``train.iterations``, then test; returns the test metrics summary.

        ``train.threads`` applies for the duration of the call only.
        """
        threads = torch.get_num_threads()
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)

    def _fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.setup()
        cfg = self.config.train
        dataset = SliceDataset(self.data.train, set(self.data.labelled_indices()),
                               self.config.data.patch_size, augment=True)
        loader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=self.config.data.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),
            persistent_workers=False,
        )
        writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.iteration or None) \
            if self.dist.is_main else NullWriter()
        for model in self.models.values():
            model.train()
        running: dict[str, float] = {}
        started = time.time()
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not self.progress or not self.dist.is_main,
                   desc=f"{cfg.method}", dynamic_ncols=True, mininterval=1.0)
        for batch in loader:
            if self.dist.enabled:  # own dropout masks per rank, the same again on resume
                torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank + self.iteration)
            logs = all_reduce_mean(self.train_step(batch, self.iteration), self.device)
            self.iteration += 1
            for name, value in logs.items():
                running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
            if self.iteration % cfg.log_every == 0 or self.iteration == cfg.iterations:
                for name, value in logs.items():
                    writer.add_scalar(f"train/{name}", value, self.iteration)
                writer.add_scalar("train/lr", self.optimizers["cnn"].param_groups[0]["lr"], self.iteration)
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
            bar.update(1)
            if self.dist.is_main and self.data.val and (  # rank 0 validates alone
                    self.iteration % cfg.eval_every == 0 or self.iteration == cfg.iterations):
                summary = self.validate(self.iteration)
                writer.add_scalar("val/mean_dice", summary["mean_dice"], self.iteration)
                writer.add_scalar("val/mean_hd95", summary["mean_hd95"], self.iteration)
                if summary["mean_dice"] > self.best["metric"]:
                    self.best = {"metric": summary["mean_dice"], "iteration": self.iteration}
                    save_checkpoint(self.state(), self.checkpoint_path("best"))
                bar.write(f"iteration {self.iteration}: val mean Dice {summary['mean_dice']:.4f} "
                          f"(best {self.best['metric']:.4f} at {self.best['iteration']})")
            if self.dist.is_main and (self.iteration % cfg.checkpoint_every == 0
                                      or self.iteration == cfg.iterations):
                save_checkpoint(self.state(), self.checkpoint_path("latest"))
            self.on_iteration_end(self.iteration, logs)
        bar.close()
        train_time = time.time() - started
        if not self.dist.is_main:  # rank 0 alone keeps the best checkpoint and tests it
            return {}
        if not self.data.val:
            self.best = {"metric": math.nan, "iteration": self.iteration}
        if not self.data.val or not self.checkpoint_path("best").exists():
            # no validation split, or no finite validation Dice: the last state is tested
            save_checkpoint(self.state(), self.checkpoint_path("best"))
        summary = self.test(writer, train_time)
        writer.close()
        return summary

    def test(self, writer=None, train_time: float | None = None) -> dict:
        """Evaluate the best checkpoint on the test split; write metrics.json/.txt and the PNG."""
        state = load_checkpoint(self.checkpoint_path("best"), self.device)
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        summary, kept = evaluate_volumes(
            evaluation_models(self.models, self.config.train.eval_network), self.data.test,
            self.data.num_classes, self.data.class_names, self.config.data.patch_size,
            self.device, self.amp, keep_predictions=4,
        )
        summary.update({
            "split": "test",
            "method": self.config.train.method,
            "network": self.config.train.eval_network,
            "checkpoint_iteration": int(state["iteration"]),
            "best_val_mean_dice": self.best["metric"],
            "train_seconds": train_time,
            "seed": self.config.train.seed,
        })
        write_metrics(summary, self.out)
        save_prediction_figure(self.out / "predictions.png", kept, self.data.num_classes)
        if writer is not None:
            writer.add_scalar("test/mean_dice", summary["mean_dice"], self.iteration)
        print(f"test split ({len(self.data.test)} volumes, {self.config.train.eval_network}, "
              f"checkpoint of iteration {state['iteration']}, distances in {summary['unit']}):")
        print(summary["table"])
        return summary


class NullWriter:
    """Stands in for the TensorBoard ``SummaryWriter`` on ranks > 0 (only rank 0 writes)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def write_metrics(summary: dict, out: Path) -> None:
    """``metrics.json`` (NaN and infinities written as null) and ``metrics.txt`` (the per-class table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_nan_to_none(summary), indent=1))
    (out / "metrics.txt").write_text(summary["table"] + f"\n(distances in {summary['unit']})\n")


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
