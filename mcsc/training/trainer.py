"""The training loop: a U-Net and a Swin-UNet trained together (MCSC, cross teaching, supervised).

One readable loop with hooks to override (nnU-Net style)::

    class MyTrainer(Trainer):
        def build_networks(self): ...          # {"cnn", "swin"[, "heads"]}
        def build_losses(self): ...            # {"contrastive": ...}
        def build_optimizers(self): ...        # ({name: optimiser}, {name: scheduler})
        def train_step(self, batch, iteration): ...   # -> {loss name: float}
        def validate(self, iteration): ...     # -> metrics summary
        def on_non_finite(self, names, values, iteration): ...  # a NaN/inf loss term
        def on_iteration_end(self, iteration, logs): ...

``Trainer(config, out_dir).fit()`` trains, keeps ``checkpoints/latest.pt`` (every
``checkpoint_every`` iterations or ``checkpoint_minutes`` minutes, whichever comes first; the
one it replaces as ``checkpoints/previous.pt``) and ``checkpoints/best.pt`` (best validation
mean Dice), then evaluates the best checkpoint on the test split and writes ``metrics.json``,
``metrics.txt`` and ``predictions.png``. A NaN or infinite loss term stops the run with a
message naming the term and the iteration (``train.non_finite = "skip"`` skips the step
instead); a checkpoint is never overwritten by a non-finite model state.

Long runs (:mod:`mcsc.training.resilience`): ``resume="auto"`` continues from the latest
checkpoint of the same run, or starts fresh; a stop signal (``train.stop_signals``) ends the
run after the current step with a checkpoint (:class:`TrainingStopped`); a lost rank or data
loader worker ends it with a :class:`TrainingFault` naming it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
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
from mcsc.training.checkpoint import (
    FORMAT,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mcsc.training.config import Config, save_yaml
from mcsc.training.distributed import (
    DistributedContext,
    DistributedContrastiveLoss,
    all_reduce_mean,
    batch_layout,
    gather_batch,
    init_distributed,
    wrap_models,
)
from mcsc.training.resilience import (
    Interrupted,
    ResumeDecision,
    StopSignals,
    TrainingFault,
    TrainingStopped,
    choose_checkpoint,
    data_fingerprint,
    fault_report,
    first_line,
    ignore_signals,
    is_collective_error,
    loader_batches,
    loader_worker_error,
    signal_name,
)


def build_models(config: Config, num_classes: int) -> dict[str, torch.nn.Module]:
    """The U-Net and the Swin-UNet (and, for ``mcsc``, the projection heads) of a config."""
    model = config.model
    cnn = UNet(
        in_channels=1,
        num_classes=num_classes,
        channels=tuple(model.unet_channels),
        dropout=tuple(model.unet_dropout),
    )
    swin = SwinUNet(
        img_size=config.data.patch_size,
        in_channels=1,
        num_classes=num_classes,
        embed_dim=model.swin_embed_dim,
        depths=tuple(model.swin_depths),
        num_heads=tuple(model.swin_heads),
        window_size=model.swin_window,
        drop_path_rate=model.swin_drop_path,
        pretrained=model.swin_pretrained,
    )
    models = {"cnn": cnn, "swin": swin}
    if config.train.method == "mcsc":
        strides = config.loss.contrastive_strides
        models["heads"] = build_projection_heads(
            [cnn.feature_channels[feature_index(cnn, stride)] for stride in strides],
            [swin.feature_channels[feature_index(swin, stride)] for stride in strides],
            hidden=model.projection_hidden,
            out=model.projection_out,
            # the public code normalises the coarse Swin features before their head
            swin_layer_norm=[stride > 1 for stride in strides],
        )
    return models


def method_losses(
    cnn_logits: torch.Tensor,
    swin_logits: torch.Tensor,
    labels: torch.Tensor,
    labelled_count: int,
    num_classes: int,
    cross_teaching_weight: float | None,
    contrastive: torch.Tensor | None = None,
    contrastive_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The method's loss terms and their weighted sum, for one (global) batch.

    Supervised (cross-entropy + Dice) for both networks on the labelled images; cross teaching
    on the unlabelled ones when ``cross_teaching_weight`` is given; the contrastive loss (already
    computed) when given.

    Args:
        cnn_logits, swin_logits: (B, C, H, W) float logits of the whole batch, labelled first.
        labels: (B', H, W) int64 with B' >= ``labelled_count``; the first ``labelled_count`` are
            the ground truth of the labelled images (the rest is not read).
        labelled_count: how many of the B images are labelled.
        num_classes: C.
        cross_teaching_weight: weight of the two cross-teaching terms; ``None``: supervised only.
        contrastive: the contrastive loss (scalar), or ``None``.
        contrastive_weight: its weight.

    Returns:
        ``{"sup_cnn", "sup_swin"[, "ct_cnn", "ct_swin"][, "contrast"], "loss"}``: scalar tensors,
        ``loss`` being the weighted sum that is minimised.
    """
    labelled = slice(0, labelled_count)
    unlabelled = slice(labelled_count, None)
    terms = {
        "sup_cnn": supervised_loss(cnn_logits[labelled], labels[labelled], num_classes),
        "sup_swin": supervised_loss(swin_logits[labelled], labels[labelled], num_classes),
    }
    total = terms["sup_cnn"] + terms["sup_swin"]
    if cross_teaching_weight is not None:
        terms["ct_cnn"] = cross_teaching_loss(cnn_logits[unlabelled], swin_logits[unlabelled])
        terms["ct_swin"] = cross_teaching_loss(swin_logits[unlabelled], cnn_logits[unlabelled])
        total = total + cross_teaching_weight * (terms["ct_cnn"] + terms["ct_swin"])
    if contrastive is not None:
        terms["contrast"] = contrastive
        total = total + contrastive_weight * contrastive
    terms["loss"] = total
    return terms


def warmup_poly(iteration: int, total: int, warmup: int, start_factor: float = 1e-3) -> float:
    """Learning-rate factor of the public code's Swin-UNet schedule.

    Linear from ``start_factor`` to 1 over the first ``warmup`` iterations, then poly decay
    ``(1 - progress) ** 0.9`` over the remaining ones; ``warmup = 0`` is plain poly decay.
    """
    if iteration < warmup:
        progress = iteration / warmup
        return start_factor * (1.0 - progress) + progress
    return max(0.0, 1.0 - (iteration - warmup) / max(1, total - warmup)) ** 0.9


class NonFiniteLossError(RuntimeError):
    """A loss term or the model state became NaN or infinite (``train.non_finite = "stop"``)."""


def running_context(device: str) -> DistributedContext:
    """The context of the process group the caller started, or of one process.

    Never starts a group: under ``torchrun`` whoever starts it also ends it (``mcsc train``).
    """
    if (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        raise ValueError(
            "WORLD_SIZE > 1 (torchrun) but no process group is running: start it with "
            "mcsc.training.distributed.init_distributed(device) and pass its context to Trainer"
        )
    # with a running group, or for one process, this only reads where the process sits
    return init_distributed(device)


class RunTimeEstimate:
    """Times the first iterations of a run to estimate how long the remaining ones take.

    The first iteration is not timed: it pays for one-off work (allocations, cuDNN autotuning).
    """

    untimed, timed = 1, 3

    def __init__(self, start: int, total: int):
        self.start, self.total = start, total
        self.since: float | None = None
        self.seconds_per_iteration = math.nan
        self.remaining = 0

    def update(self, iteration: int) -> bool:
        """Call after each iteration (``iteration`` completed); True once the estimate is ready."""
        if iteration == self.start + self.untimed:
            self.since = time.perf_counter()
        elif self.since is not None and iteration == self.start + self.untimed + self.timed:
            self.seconds_per_iteration = (time.perf_counter() - self.since) / self.timed
            self.remaining = self.total - iteration
            return True
        return False

    def warning(self, limit_hours: float, recipe: str, device: torch.device) -> str | None:
        """A message when the remaining iterations take longer than ``limit_hours``, else None."""
        seconds = self.remaining * self.seconds_per_iteration
        if not seconds > limit_hours * 3600:
            return None
        faster = (
            "--recipe small trains the demo's small networks, far faster"
            if recipe == "paper"
            else "fewer --iterations or a GPU make it shorter"
        )
        return (
            f"estimated training time {seconds / 3600:.1f} h on {device} "
            f"({self.seconds_per_iteration:.2f} s per iteration, {self.remaining} iterations to "
            f"go, validation not counted): long for this machine; {faster}"
        )


def evaluation_models(models: dict, network: str) -> list[torch.nn.Module]:
    """The networks whose (averaged) softmax is evaluated: cnn, swin or both (ensemble)."""
    return {
        "cnn": [models["cnn"]],
        "swin": [models["swin"]],
        "ensemble": [models["cnn"], models["swin"]],
    }[network]


class Trainer:
    """Trains, validates, checkpoints and tests one run described by a :class:`Config`.

    Args:
        config: the run configuration (completed in place by the data: classes, split).
        out_dir: the run folder.
        resume: ``True`` (or ``"required"``): continue from ``out_dir/checkpoints/latest.pt``
            (``previous.pt`` when that is unreadable) exactly where it stopped; ``"auto"``: the
            same when a checkpoint exists and belongs to this run (same configuration and data;
            else ``ValueError`` naming what differs), a fresh start when none exists;
            ``False``/``"no"``: a fresh start; ``None``: ``config.train.resume``.
        progress: show a tqdm progress bar.
        context: where this process sits in a ``torchrun`` job. The caller owns the process
            group (``mcsc train`` starts it with :func:`~mcsc.training.distributed.init_distributed`
            and ends it); ``None``: the group the caller started, or one process.
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        resume: bool | str | None = None,
        progress: bool = True,
        context: DistributedContext | None = None,
    ):
        config.validate()
        self.config = config
        self.out = Path(out_dir)
        if resume is None:
            resume = config.train.resume
        modes = {False: "no", "no": "no", True: "required", "required": "required"}
        if resume != "auto" and resume not in modes:
            raise ValueError(f"resume must be True, False, 'auto' or 'no', got {resume!r}")
        self.resume = "auto" if resume == "auto" else modes[resume]
        self.progress = progress
        self.signals = StopSignals([])  # fit() installs the configured handlers
        self.validation_pending = False  # a validation was due at this iteration, not yet run
        self.last_saved = -1  # the iteration of checkpoints/latest.pt (-1: none written)
        self.rank_rng_states: list[dict] | None = None
        self.dist = running_context(config.train.device) if context is None else context
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
        return {
            "contrastive": MultiScaleContrastiveLoss(
                sampler=loss.contrastive_sampler,
                temperature=loss.temperature,
                block_sizes=tuple(loss.contrastive_block_sizes),
                pixels_per_class=loss.contrastive_pixels_per_class,
                memory_per_class=loss.contrastive_memory_per_class,
                seed=self.config.train.seed,
            )
        }

    def build_optimizers(self) -> tuple[dict, dict]:
        """AdamW per network (Swin at ``lr * swin_lr_ratio``); poly decay, Swin warm-up first."""
        train = self.config.train
        total = train.iterations
        warmup = int(train.warmup_fraction * total)
        optimizers, schedulers = {}, {}
        for name, model in self.models.items():
            lr = train.lr * (train.swin_lr_ratio if name == "swin" else 1.0)
            optimizers[name] = torch.optim.AdamW(
                model.parameters(), lr=lr, weight_decay=train.weight_decay
            )
            steps = warmup if name == "swin" else 0
            schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                optimizers[name],
                lambda iteration, steps=steps: warmup_poly(iteration, total, steps),
            )
        return optimizers, schedulers

    def train_step(self, batch: dict, iteration: int) -> dict[str, float]:
        """One optimisation step on a two-stream batch; returns the loss terms as floats.

        ``batch["image"]`` (B, 1, P, P) float32, ``batch["label"]`` (B, P, P) int64 of which the
        first ``labeled_batch_size`` (this process's share of it under ``torchrun``) are
        labelled. Under ``torchrun`` the returned values are the means over the processes.
        A non-finite term stops the run or skips the step (``train.non_finite``).
        """
        config = self.config
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        labelled_count = (
            config.train.labeled_batch_size // self.dist.world_size
        )  # this rank's share
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            cnn_out = self.forward_models["cnn"](images)
            swin_out = self.forward_models["swin"](images)
            cnn_logits, swin_logits = cnn_out.logits.float(), swin_out.logits.float()
            global_labels, global_labelled_count = labels, labelled_count
            layout = None
            if self.dist.enabled:  # every rank computes the loss of the global batch
                layout = batch_layout(images.shape[0], labelled_count, self.device)
                cnn_logits, swin_logits = (
                    gather_batch(cnn_logits, layout),
                    gather_batch(swin_logits, layout),
                )
                global_labels, global_labelled_count = (
                    gather_batch(labels, layout),
                    layout.total_labelled,
                )
            cross_teaching_weight = None
            if config.train.method != "supervised":
                cross_teaching_weight = config.loss.consistency * sigmoid_rampup(
                    iteration, config.loss.consistency_rampup
                )
            contrastive = None
            if config.train.method == "mcsc":
                contrastive = self.contrastive_loss(
                    cnn_out,
                    swin_out,
                    global_labels[:global_labelled_count],
                    cnn_logits,
                    swin_logits,
                    iteration,
                    layout,
                )
            terms = method_losses(
                cnn_logits,
                swin_logits,
                global_labels,
                global_labelled_count,
                self.data.num_classes,
                cross_teaching_weight,
                contrastive,
                config.loss.contrastive_weight,
            )
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        # one device sync, once the backward is queued; the check comes before any update
        values = dict(
            zip(terms, torch.stack([term.detach().float() for term in terms.values()]).tolist())
        )
        if self.dist.enabled:  # every rank sees a non-finite term of any rank and acts alike
            values = all_reduce_mean(values, self.device)
        non_finite = [
            name for name, value in values.items() if name != "loss" and not math.isfinite(value)
        ]
        if not non_finite and not math.isfinite(values["loss"]):
            non_finite = ["loss"]
        if non_finite:
            self.on_non_finite(non_finite, values, iteration)
        else:
            for optimizer in self.optimizers.values():
                optimizer.step()
        for scheduler in self.schedulers.values():  # the schedule follows the iteration count
            scheduler.step()
        return values

    def on_non_finite(self, names: list[str], values: dict[str, float], iteration: int) -> None:
        """A loss term is NaN or infinite (after the backward, before any update): raise
        :class:`NonFiniteLossError`, or (``skip``) report it and let :meth:`train_step` skip the
        update. Every process of a ``torchrun`` job gets here in the same iteration."""
        found = ", ".join(f"{name} = {values[name]}" for name in names)
        where = f"iteration {iteration + 1}: the loss term {found}"
        if self.config.train.non_finite == "skip":
            self.skipped_steps += 1
            if self.dist.is_main:
                print(f"{where}; step skipped ({self.skipped_steps} so far)", flush=True)
            return
        latest = self.checkpoint_path("latest")
        kept = (
            f"{latest} (iteration {load_checkpoint(latest, 'cpu')['iteration']}) is kept"
            if latest.exists()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"{where}; training stopped, the last checkpoint {kept}. Set "
            "train.non_finite=skip to skip such steps instead."
        )

    def contrastive_loss(
        self,
        cnn_out,
        swin_out,
        labels: torch.Tensor,
        cnn_logits: torch.Tensor,
        swin_logits: torch.Tensor,
        iteration: int,
        layout=None,
    ) -> torch.Tensor:
        """Multi-scale cross contrastive loss (sum over scales) on the projected features.

        ``cnn_out``/``swin_out`` are this rank's network outputs; ``labels`` (labelled images),
        ``cnn_logits`` and ``swin_logits`` are those of the global batch (gathered under
        several processes, with the step's ``layout``).
        """
        config = self.config
        cnn, swin = self.models["cnn"], self.models["swin"]
        strides = config.loss.contrastive_strides
        cnn_features = [cnn_out.features[feature_index(cnn, stride)].float() for stride in strides]
        swin_features = [
            swin_out.features[feature_index(swin, stride)].float() for stride in strides
        ]
        cnn_embeddings, swin_embeddings = self.forward_models["heads"](cnn_features, swin_features)
        return self.losses["contrastive"](
            cnn_embeddings,
            swin_embeddings,
            labels,
            cnn_logits,
            swin_logits,
            labelled_count=labels.shape[0],
            use_unlabelled=iteration >= config.loss.labelled_only_until,
            layout=layout,
        )

    def validate(self, iteration: int) -> dict:
        """Evaluate the selected network on the validation volumes (mean Dice drives ``best``)."""
        summary, _ = evaluate_volumes(
            evaluation_models(self.models, self.config.train.eval_network),
            self.data.val,
            self.data.num_classes,
            self.data.class_names,
            self.config.data.patch_size,
            self.device,
            self.amp,
        )
        for model in self.models.values():
            model.train()
        return summary

    def on_iteration_end(self, iteration: int, logs: dict[str, float]) -> None:
        """Called after every iteration (``iteration`` = number of completed iterations)."""

    # ------------------------------------------------------------ machinery
    def setup(self) -> None:
        """Seed, load data, build networks/losses/optimisers, restore a checkpoint on resume."""
        config = self.config
        seed = config.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = config.train.tf32
            torch.backends.cudnn.allow_tf32 = config.train.tf32
            torch.backends.cudnn.benchmark = True
        if self.dist.is_main:  # only rank 0 writes
            self.out.mkdir(parents=True, exist_ok=True)
        self.data = build_data(config.data)
        self.fingerprint = data_fingerprint(self.data)
        decision, state = self.decide_resume()
        if self.dist.is_main:
            print(self.data.describe())
            for note in decision.notes:
                print(f"mcsc: {note}", flush=True)
            save_yaml(config, self.out / "config.yaml")
            if self.data.split:
                (self.out / "split.json").write_text(json.dumps(self.data.split, indent=1))
        self.models = self.build_networks()
        # DDP wrappers run the training forward; self.models keep the weights (save, evaluate)
        self.forward_models = wrap_models(
            self.models, self.dist, sync_batchnorm=config.train.sync_batchnorm
        )
        self.losses = self.build_losses()
        if "contrastive" in self.losses:  # the global batch's loss (the plain loss for one process)
            self.losses["contrastive"] = DistributedContrastiveLoss(self.losses["contrastive"])
        self.optimizers, self.schedulers = self.build_optimizers()
        labelled = config.train.labeled_batch_size
        unlabelled = (
            0 if config.train.method == "supervised" else config.train.batch_size - labelled
        )
        self.sampler = ShardedTwoStreamBatchSampler(  # this rank's share of every global batch
            self.data.labelled_indices(),
            self.data.unlabelled_indices(),
            labelled,
            unlabelled,
            config.train.iterations,
            seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.skipped_steps = 0
        if state is not None:
            self.load_state(state)
            self.last_saved = self.iteration if decision.path.endswith("latest.pt") else -1
            if self.dist.is_main:
                print(
                    f"mcsc: resuming from {decision.path} at iteration {self.iteration} of "
                    f"{config.train.iterations}",
                    flush=True,
                )

    def decide_resume(self) -> tuple[ResumeDecision, dict | None]:
        """How this run starts (``self.resume``): rank 0 picks the checkpoint (or a fresh start,
        or a refusal) and broadcasts the decision, so every rank of a torchrun job does the same;
        returns it with the loaded state (None for a fresh start)."""
        if self.resume == "no":
            return ResumeDecision(), None
        folder = self.checkpoint_path("latest").parent
        decision, state = ResumeDecision(), None
        if self.dist.is_main:
            decision, state = choose_checkpoint(
                folder, self.resume, self.config.to_dict(), self.fingerprint
            )
            if decision.error is None:
                for path in decision.unreadable:  # set aside, never rotated into previous.pt
                    os.replace(path, f"{path}.unreadable")
                    decision.notes.append(f"{path} renamed {Path(path).name}.unreadable")
                for stale in remove_stale_temporaries(folder):
                    decision.notes.append(f"removed {stale}, left by a write that was cut short")
        if self.dist.enabled:
            shared = [decision]
            torch.distributed.broadcast_object_list(shared, src=0)
            decision = shared[0]
        if decision.error is not None:
            raise ValueError(decision.error)
        if decision.path is not None and state is None:  # ranks > 0 read what rank 0 chose
            state = load_checkpoint(decision.path, "cpu")
            if int(state["iteration"]) != decision.iteration:
                raise ValueError(
                    f"{decision.path}: rank {self.dist.rank} reads iteration {state['iteration']}, "
                    f"rank 0 iteration {decision.iteration}: every node must see the same run "
                    f"folder (shared storage)"
                )
        return decision, state

    def train_loader(self) -> DataLoader:
        """The augmented two-stream batches of the run, from the current iteration on (after
        :meth:`setup`)."""
        dataset = SliceDataset(
            self.data.train,
            set(self.data.labelled_indices()),
            self.config.data.patch_size,
            augment=True,
        )
        return DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=self.config.data.num_workers,
            # a stop signal sent to every process of the job leaves the workers running
            worker_init_fn=functools.partial(ignore_signals, tuple(self.signals.signals)),
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.config.train.seed),
            persistent_workers=False,
        )

    def checkpoint_path(self, which: str) -> Path:
        return self.out / "checkpoints" / f"{which}.pt"

    def save(self, which: str) -> None:
        """Write ``checkpoints/<which>.pt``, unless the model state is no longer finite: then the
        previous file stays and :class:`NonFiniteLossError` stops the run. ``latest.pt`` keeps
        the one it replaces as ``previous.pt``; no signal interrupts the write."""
        state = self.state()
        tensors = [
            (f"{name}.{key}", tensor)
            for name, weights in state["models"].items()
            for key, tensor in weights.items()
            if tensor.is_floating_point()
        ]
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in tensors]).tolist()
        for (name, _), is_finite in zip(tensors, finite):  # one device sync for all tensors
            if not is_finite:
                raise NonFiniteLossError(
                    f"iteration {self.iteration}: {name} is no longer finite; training "
                    f"stopped and {self.checkpoint_path(which)} left as it was"
                )
        previous = self.checkpoint_path("previous") if which == "latest" else None
        with self.signals.saving():
            save_checkpoint(state, self.checkpoint_path(which), previous)

    def save_latest(self) -> None:
        """Write ``checkpoints/latest.pt`` of this iteration; under torchrun every rank calls it:
        the RNG states of all ranks are gathered, rank 0 writes, and its success or error
        reaches every rank (a full disk stops all of them with the same message)."""
        local = rng_state(everything=True)
        if self.dist.enabled:
            states = [None] * self.dist.world_size
            torch.distributed.all_gather_object(states, local)
            self.rank_rng_states = states
        else:
            self.rank_rng_states = [local]
        failure = None
        if self.dist.is_main:
            try:
                self.save("latest")
            except (OSError, NonFiniteLossError) as error:
                failure = error
        if self.dist.enabled:
            shared = [None]
            if failure is not None:
                text = getattr(failure, "strerror", None) or str(failure)
                shared = [(type(failure).__name__, getattr(failure, "errno", None), text)]
            torch.distributed.broadcast_object_list(shared, src=0)
            if failure is None and shared[0] is not None:
                kind, errno, text = shared[0]
                failure = (
                    NonFiniteLossError(text)
                    if kind == "NonFiniteLossError"
                    else OSError(errno, f"{text} (rank 0 writes the checkpoints)")
                )
        if failure is not None:
            raise failure
        self.last_saved = self.iteration
        self.last_save_time = time.monotonic()

    def state(self) -> dict:
        """The whole training state as one weights-only-loadable dict."""
        state = {
            "format": FORMAT,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "optimizers": {
                name: optimizer.state_dict() for name, optimizer in self.optimizers.items()
            },
            "schedulers": {
                name: scheduler.state_dict() for name, scheduler in self.schedulers.items()
            },
            "losses": {
                name: loss.state_dict()
                for name, loss in self.losses.items()
                if isinstance(loss, torch.nn.Module)
            },
            "sampler": {"seed": self.sampler.seed, "start": self.iteration},
            "rng": rng_state(),
            "best": dict(self.best),
            "validation_pending": self.validation_pending,
            "data_fingerprint": self.fingerprint,
        }
        state["rng"]["ranks"] = self.rank_rng_states or [rng_state(everything=True)]
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
        self.best = {
            "metric": float(state["best"]["metric"]),
            "iteration": int(state["best"]["iteration"]),
        }
        for name, loss in self.losses.items():
            if isinstance(loss, torch.nn.Module) and name in state.get("losses", {}):
                loss.load_state_dict(state["losses"][name])
        self.validation_pending = bool(state.get("validation_pending", False))
        ranks = state["rng"].get("ranks")
        # every rank its own generators when the number of processes is the same (under
        # torchrun each step reseeds them anyway, from the seed, the rank and the iteration)
        set_rng_state(
            ranks[self.dist.rank] if ranks and len(ranks) == self.dist.world_size else state["rng"]
        )
        if "contrastive" in self.losses and "contrastive" in state["rng"]:
            self.losses["contrastive"].generator.set_state(state["rng"]["contrastive"].cpu())

    def fit(self) -> dict:
        """Train to ``train.iterations``, then test; returns the test metrics summary.

        ``train.threads`` applies for the duration of the call only. The stop signals
        (``train.stop_signals``) are handled for its duration: after the current step every
        rank stops, rank 0 writes ``latest.pt`` and :class:`TrainingStopped` is raised.

        Raises:
            TrainingStopped: a stop signal ended the run (its checkpoint is written).
            TrainingFault: a rank, or a data loader worker, was lost (the message names it).
            NonFiniteLossError: a NaN or infinite loss term (``train.non_finite = "stop"``).
        """
        threads = torch.get_num_threads()
        try:
            with StopSignals(self.config.train.stop_signals) as self.signals:
                return self._fit()
        finally:
            self.signals = StopSignals([])
            torch.set_num_threads(threads)

    def _fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.setup()
        train = self.config.train
        loader = self.train_loader()
        writer = (
            SummaryWriter(str(self.out / "tensorboard"), purge_step=self.iteration or None)
            if self.dist.is_main
            else NullWriter()
        )
        bar = tqdm(
            total=train.iterations,
            initial=self.iteration,
            disable=not self.progress or not self.dist.is_main,
            desc=f"{train.method}",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        try:
            train_time = self._train(loader, writer, bar)
        except (TrainingStopped, NonFiniteLossError):
            writer.close()
            raise
        except Exception as error:  # noqa: BLE001 (a lost rank or loader worker is reported)
            writer.close()
            fault = self.fault(error)
            if fault is error:
                raise
            raise fault from error
        finally:
            bar.close()
        if not self.dist.is_main:  # rank 0 alone keeps the best checkpoint and tests it
            return {}
        if not self.data.val:
            self.best = {"metric": math.nan, "iteration": self.iteration}
        if not self.data.val or not self.checkpoint_path("best").exists():
            # no validation split, or no finite validation Dice: the last state is tested
            self.save("best")
        try:
            with self.signals.interruptible():  # latest.pt holds the end: a resume only tests
                summary = self.test(writer, train_time)
        except Interrupted:
            raise self.stopped(self.signals.requested) from None
        finally:
            writer.close()
        return summary

    def _train(self, loader, writer, bar) -> float:
        """The training loop; returns its wall-clock seconds."""
        train = self.config.train
        for model in self.models.values():
            model.train()
        running: dict[str, float] = {}
        started = time.time()
        self.last_save_time = time.monotonic()
        estimate = RunTimeEstimate(self.iteration, train.iterations)
        if self.validation_pending and self.dist.is_main:  # stopped before this validation
            self.validate_and_keep_best(writer, bar)
        for batch in loader_batches(loader):
            if self.dist.enabled:  # own dropout masks per rank, the same again on resume
                torch.manual_seed(train.seed + 1_000_003 * self.dist.rank + self.iteration)
            logs = self.train_step(batch, self.iteration)
            self.iteration += 1
            if estimate.update(self.iteration) and self.dist.is_main:
                warning = estimate.warning(train.long_run_hours, self.config.recipe, self.device)
                if warning:
                    bar.write(warning)
            for name, value in logs.items():
                running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
            if self.iteration % train.log_every == 0 or self.iteration == train.iterations:
                for name, value in logs.items():
                    writer.add_scalar(f"train/{name}", value, self.iteration)
                writer.add_scalar(
                    "train/lr", self.optimizers["cnn"].param_groups[0]["lr"], self.iteration
                )
                bar.set_postfix(
                    {name: f"{value:.3f}" for name, value in running.items()}, refresh=False
                )
            bar.update(1)
            if (
                self.dist.is_main
                and self.data.val
                and (  # rank 0 validates alone
                    self.iteration % train.eval_every == 0 or self.iteration == train.iterations
                )
            ):
                self.validation_pending = True
                self.validate_and_keep_best(writer, bar)
            stop, save = self.checkpoint_decision()
            if save:
                self.save_latest()
            self.on_iteration_end(self.iteration, logs)
            if stop:
                raise self.stopped(stop)
        return time.time() - started

    def validate_and_keep_best(self, writer, bar) -> None:
        """Validate (rank 0), keep ``best.pt``; a stop signal cuts the validation short and
        leaves it pending (the checkpoint records it, a resume runs it first)."""
        try:
            with self.signals.interruptible():
                summary = self.validate(self.iteration)
        except Interrupted:
            for model in self.models.values():
                model.train()
            return
        self.validation_pending = False
        writer.add_scalar("val/mean_dice", summary["mean_dice"], self.iteration)
        writer.add_scalar("val/mean_hd95", summary["mean_hd95"], self.iteration)
        if summary["mean_dice"] > self.best["metric"]:
            self.best = {"metric": summary["mean_dice"], "iteration": self.iteration}
            self.save("best")
        bar.write(
            f"iteration {self.iteration}: val mean Dice {summary['mean_dice']:.4f} "
            f"(best {self.best['metric']:.4f} at {self.best['iteration']})"
        )

    def checkpoint_decision(self) -> tuple[int, bool]:
        """After a step: ``(stop signal number or 0, whether to write latest.pt now)``.

        Under torchrun one all-reduce (max) makes every rank decide the same: a stop signal that
        reached any rank stops all of them after this step, and rank 0's clock decides the
        wall-clock checkpoint (``train.checkpoint_minutes``)."""
        train = self.config.train
        signum = int(self.signals.requested or 0)
        late = self.dist.is_main and (
            time.monotonic() - self.last_save_time >= 60.0 * train.checkpoint_minutes
        )
        if self.dist.enabled:
            flags = torch.tensor([signum, int(late)], dtype=torch.long, device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signum, late = (int(value) for value in flags.tolist())
            if signum:
                self.signals.request(signum)
        due = (
            signum
            or late
            or self.iteration % train.checkpoint_every == 0
            or self.iteration == train.iterations
        )
        return signum, bool(due) and self.iteration != self.last_saved

    def kept(self) -> str:
        """What the run keeps: 'the last checkpoint <path> (iteration N) is kept' or ..."""
        if self.last_saved < 0:
            return "no checkpoint of this run was written yet"
        return f"the last checkpoint {self.checkpoint_path('latest')} (iteration {self.last_saved}) is kept"

    def stopped(self, signum: int) -> TrainingStopped:
        how = (
            "interrupted (Ctrl-C)"
            if signum == signal.SIGINT
            else f"stopped by {signal_name(signum)}"
        )
        return TrainingStopped(
            f"{how} after iteration {self.iteration} of {self.config.train.iterations}: "
            f"checkpoint {self.checkpoint_path('latest')} written; run the same command with "
            f"--resume auto to continue",
            signum,
            self.iteration,
        )

    def fault(self, error: Exception) -> Exception:
        """The error to raise for ``error`` from the training loop: a :class:`TrainingFault` naming
        the lost data loader worker or rank, or ``error`` itself."""
        rank = f"rank {self.dist.rank}: " if self.dist.enabled else ""
        again = "rerun with --resume auto (torchrun --max-restarts=N does so by itself)"
        if loader_worker_error(error):
            fault = TrainingFault(
                f"{rank}a data loader worker process died ({first_line(error)}; the "
                f"out-of-memory killer, or a signal?) in iteration {self.iteration + 1}; training "
                f"stopped, {self.kept()}: {again}. data.num_workers=0 loads the data in the "
                f"training process"
            )
            if self.dist.enabled:
                fault_report(fault, self.dist.rank, self.dist.world_size, 0.0)
            return fault
        if not self.dist.enabled:
            return error
        timeout = self.config.train.collective_timeout_minutes
        wait = min(5.0, 60.0 * timeout)
        reachable, silent, posts = fault_report(
            error,
            self.dist.rank,
            self.dist.world_size,
            wait,
            give_up=lambda: self.signals.requested is not None,
        )
        stopping = self.signals.requested is not None
        if not is_collective_error(error):
            return error
        others = {r: post for r, post in posts.items() if r != self.dist.rank}
        failed = [
            f"rank {r} failed ({post.removeprefix('error: ')})"
            for r, post in sorted(others.items())
            if post.startswith("error:")
        ]
        if failed:
            cause = "; ".join(failed)
        elif silent:
            names = ", ".join(str(r) for r in silent)
            when = (
                f"before {signal_name(self.signals.requested)} arrived (torchrun stops every "
                f"worker when one fails)"
                if stopping
                else f"within {wait:g} s"
            )
            cause = (
                f"rank{'s' if len(silent) > 1 else ''} {names} stopped responding: dead (killed, "
                f"out of memory?), hung, or on a lost node; no word from "
                f"{'them' if len(silent) > 1 else 'it'} {when}"
            )
        elif not reachable:
            cause = "the rendezvous store is gone as well (rank 0's node, or the torchrun agent)"
        else:
            cause = "every rank's collective failed"
        return TrainingFault(
            f"{rank}a collective failed in iteration {self.iteration + 1} "
            f"({first_line(error)}): {cause}. Training stopped, {self.kept()}: {again}. A rank "
            f"waits at most train.collective_timeout_minutes = {timeout:g} for the others"
        )

    def test(self, writer=None, train_time: float | None = None) -> dict:
        """Evaluate the best checkpoint on the test split; write metrics.json/.txt and the PNG."""
        state = load_checkpoint(self.checkpoint_path("best"), self.device)
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        summary, kept = evaluate_volumes(
            evaluation_models(self.models, self.config.train.eval_network),
            self.data.test,
            self.data.num_classes,
            self.data.class_names,
            self.config.data.patch_size,
            self.device,
            self.amp,
            keep_predictions=4,
        )
        summary.update(
            {
                "split": "test",
                "method": self.config.train.method,
                "network": self.config.train.eval_network,
                "checkpoint_iteration": int(state["iteration"]),
                "best_val_mean_dice": self.best["metric"],
                "train_seconds": train_time,
                "seed": self.config.train.seed,
            }
        )
        write_metrics(summary, self.out)
        save_prediction_figure(self.out / "predictions.png", kept, self.data.num_classes)
        if writer is not None:
            writer.add_scalar("test/mean_dice", summary["mean_dice"], self.iteration)
        print(
            f"test split ({len(self.data.test)} volumes, {self.config.train.eval_network}, "
            f"checkpoint of iteration {state['iteration']}, distances in {summary['unit']}):"
        )
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
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value
