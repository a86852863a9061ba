"""The run configuration: dataclasses, recipes, dataset presets, YAML files and overrides.

Two independent choices make the defaults of a run (:func:`preset`):

* the **recipe** (``paper`` or ``small``): networks, patch size, schedule, losses, loader;
  the paper's recipe is the dataclass defaults, ``small`` the CPU demo's;
* the **dataset**: only what belongs to the data (labelled cases, classes and their names).

Resolution order (later wins): that preset, the ``--config`` YAML file, the command-line flags
(``--recipe``, ``--labeled``, ``--method``, ``--iterations``, ``--device``, ``--set
section.key=value``). The fully resolved configuration is written to ``OUT/config.yaml`` and
stored in every checkpoint, so ``evaluate`` and ``predict`` rebuild exactly the trained networks.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mcsc.data.synapse import CLASS_NAMES as SYNAPSE_CLASSES

DATASETS = ("synthetic", "acdc", "synapse", "nifti")
METHODS = ("mcsc", "cross-teaching", "supervised")
RECIPES = ("paper", "small")
NON_FINITE_POLICIES = ("stop", "skip")


@dataclass
class DataConfig:
    """Where the data is and how it is cut into training samples."""

    dataset: str = "synthetic"
    path: str | None = None
    labeled: int | None = 4  # labelled training cases; None: every case with labels when the
    # folder also has images without labels, else 10 % of them (at least one)
    patch_size: int = 224
    num_classes: int | None = None  # None: from the dataset (dataset.json or the labels)
    class_names: list[str] | None = None
    split: dict[str, list[str]] | None = None  # drawn and saved for synthetic/NIfTI data
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    seed: int = 0  # data seed: the synthetic phantoms and the train/val/test split
    channel: int = 0  # NIfTI: which channel of a multi-channel image
    num_workers: int = 4  # DataLoader worker processes
    synthetic_cases: int = 40
    synthetic_size: int = 64
    synthetic_depth: int = 12


@dataclass
class ModelConfig:
    """The two networks and the projection heads."""

    unet_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    unet_dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    swin_embed_dim: int = 96
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    swin_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    swin_window: int = 7
    swin_drop_path: float = 0.2  # stochastic depth of the Swin-UNet (the public configuration)
    swin_pretrained: str | None = None
    projection_hidden: int = 256
    projection_out: int = 128


@dataclass
class LossConfig:
    """Weights and schedule of the three loss terms."""

    consistency: float = 0.1  # cross-teaching weight (times the sigmoid ramp-up)
    consistency_rampup: int = 30000  # iterations to reach the full weight
    # per scale, in the total loss: the public code adds 0.001 x (sum over scales) to each of
    # the two networks' losses and sums them, 0.002 in all
    contrastive_weight: float = 0.002
    contrastive_strides: list[int] = field(default_factory=lambda: [1, 8])  # feature scales
    contrastive_sampler: str = "blocks"
    contrastive_block_sizes: list[int] = field(default_factory=lambda: [19, 14])  # per scale
    contrastive_pixels_per_class: int = 256  # per image and network ("balanced" sampler)
    # pixel memory: Q sampled pixels kept per class and scale across steps (0: off, as in the
    # paper); needs the "balanced" or "all" sampler. Costs S*C*Q*D floats and an op call
    # against n + C*Q rows per scale instead of n (see PixelContrastiveLoss)
    contrastive_memory_per_class: int = 0
    temperature: float = 0.1
    labelled_only_until: int = 3000  # before this iteration only labelled pixels contrast


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and bookkeeping."""

    method: str = "mcsc"
    iterations: int = 40000
    batch_size: int = 8  # global: torchrun splits it evenly over the processes
    labeled_batch_size: int = 4  # global, likewise
    lr: float = 5e-4
    swin_lr_ratio: float = 0.2  # Swin-UNet learning rate = lr * ratio
    warmup_fraction: float = 0.05  # Swin-UNet linear warm-up, as a share of the iterations
    weight_decay: float = 5e-4
    seed: int = 1337
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int | None = None  # torch CPU threads (None: torch's default)
    sync_batchnorm: bool = True  # torchrun: BatchNorm statistics over all ranks (SyncBatchNorm)
    amp: bool = True  # bfloat16 autocast (CUDA only)
    tf32: bool = True  # TF32 matmuls and convolutions (CUDA only)
    non_finite: str = (
        "stop"  # a NaN/inf loss term: "stop" (keep the last checkpoint) or "skip" the step
    )
    long_run_hours: float = 8.0  # warn at the start when the estimated training time is longer
    eval_every: int = 1000  # validation pass every K iterations (keeps the best checkpoint)
    checkpoint_every: int = 1000  # checkpoints/latest.pt every K iterations ...
    checkpoint_minutes: float = 15.0  # ... or every M minutes of wall clock, whichever is first
    # long runs: "auto" continues from checkpoints/latest.pt when it exists and matches the run
    # (also MCSC_RESUME=auto or `mcsc train --resume auto`); "no" starts a new run
    resume: str = "no"
    # stop politely on these: finish the step, checkpoint, exit (75; 130 for SIGINT)
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    collective_timeout_minutes: float = 15.0  # torchrun: a rank waits this long for the others
    log_every: int = 20
    eval_network: str = "cnn"  # cnn | swin | ensemble: which network is evaluated


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "paper"  # which recipe the defaults came from (a record; see preset)

    def to_dict(self) -> dict:
        """Plain nested dict of primitives (YAML- and ``torch.load(weights_only=True)``-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "configuration") -> Config:
        """Build from a nested dict; unknown sections or keys raise ``ValueError`` naming them."""
        config = cls()
        config.update(values, where)
        return config

    def update(self, values: dict, where: str = "configuration") -> None:
        """Overwrite fields from a nested dict {section: {key: value}} (plus ``recipe: name``).

        ``recipe`` is recorded only: the recipe's defaults are applied by :func:`preset`.
        """
        if not isinstance(values, dict):
            raise ValueError(
                f"{where}: expected a mapping of sections, got {type(values).__name__}"
            )
        for section, entries in values.items():
            if section == "recipe":
                self.recipe = entries
                continue
            if section not in _SECTIONS:
                raise ValueError(f"{where}: unknown section {section!r} (known: {list(_SECTIONS)})")
            target = getattr(self, section)
            if not isinstance(entries, dict):
                raise ValueError(f"{where}: section {section!r} must be a mapping")
            known = {f.name for f in dataclasses.fields(target)}
            for key, value in entries.items():
                if key not in known:
                    raise ValueError(f"{where}: unknown key {section}.{key}")
                setattr(target, key, copy.deepcopy(value))

    def set(self, assignment: str) -> None:
        """Apply one ``section.key=value`` override (value parsed as YAML)."""
        if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
            raise ValueError(f"--set {assignment!r}: expected section.key=value")
        key, value = assignment.split("=", 1)
        section, name = key.split(".", 1)
        self.update({section: {name: yaml.safe_load(value)}}, f"--set {assignment}")

    def validate(self) -> None:
        """Raise ``ValueError`` for values that cannot work together."""
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.data.dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {self.data.dataset!r}")
        if self.train.method not in METHODS:
            raise ValueError(f"train.method must be one of {METHODS}, got {self.train.method!r}")
        if self.train.eval_network not in ("cnn", "swin", "ensemble"):
            raise ValueError("train.eval_network must be cnn, swin or ensemble")
        if not 0 < self.train.labeled_batch_size <= self.train.batch_size:
            raise ValueError("train.labeled_batch_size must be in 1..train.batch_size")
        if self.train.iterations < 1:
            raise ValueError("train.iterations must be >= 1")
        if len(self.loss.contrastive_block_sizes) != len(self.loss.contrastive_strides):
            raise ValueError("loss.contrastive_block_sizes needs one entry per contrastive stride")
        memory = self.loss.contrastive_memory_per_class
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
            raise ValueError(
                f"loss.contrastive_memory_per_class must be an int >= 0, got {memory!r}"
            )
        if memory > 0 and self.loss.contrastive_sampler == "blocks":
            raise ValueError(
                "loss.contrastive_memory_per_class needs loss.contrastive_sampler 'balanced' or "
                "'all' (the 'blocks' sampler's groups each have their own contrasts)"
            )
        if not 0.0 <= self.train.warmup_fraction < 1.0:
            raise ValueError(
                f"train.warmup_fraction must be in [0, 1), got {self.train.warmup_fraction}"
            )
        if not 0.0 <= self.model.swin_drop_path < 1.0:
            raise ValueError(
                f"model.swin_drop_path must be in [0, 1), got {self.model.swin_drop_path}"
            )
        _validate_run_control(self.train)
        if self.train.non_finite not in NON_FINITE_POLICIES:
            raise ValueError(
                f"train.non_finite must be one of {NON_FINITE_POLICIES}, "
                f"got {self.train.non_finite!r}"
            )


RESUME_MODES = ("no", "auto")


def _validate_run_control(train: TrainConfig) -> None:
    """The checkpoint cadence, resume mode, stop signals and collective timeout."""
    import signal

    if train.checkpoint_every < 1:
        raise ValueError(f"train.checkpoint_every must be >= 1, got {train.checkpoint_every}")
    if not train.checkpoint_minutes > 0:
        raise ValueError(f"train.checkpoint_minutes must be > 0, got {train.checkpoint_minutes}")
    if train.resume not in RESUME_MODES:
        raise ValueError(f"train.resume must be one of {RESUME_MODES}, got {train.resume!r}")
    if not train.collective_timeout_minutes > 0:
        raise ValueError(
            f"train.collective_timeout_minutes must be > 0, got {train.collective_timeout_minutes}"
        )
    for name in train.stop_signals:
        name = str(name)
        known = name.startswith("SIG") and not name.startswith("SIG_") and hasattr(signal, name)
        if not known or name in ("SIGKILL", "SIGSTOP", "SIGCHLD"):
            raise ValueError(
                f"train.stop_signals: {name!r} is not a signal that can be caught "
                f"(e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT)"
            )


_SECTIONS = {f.name for f in dataclasses.fields(Config) if f.name != "recipe"}


def default_recipe(dataset: str) -> str:
    """``small`` for the built-in synthetic data (the CPU demo), ``paper`` for a dataset folder."""
    return "small" if dataset == "synthetic" else "paper"


def preset(dataset: str, recipe: str | None = None) -> Config:
    """The defaults of a run: a recipe, and what the dataset decides about its data.

    Recipes (any dataset takes either):

    * ``paper``: the public code's recipe for a GPU: 224x224 patches, U-Net (16 ... 256) and
      Swin-UNet "Swin-T lite" (embed 96, depths 2-2-2-2, window 7, drop path 0.2), batch 8 with 4
      labelled, 40 000 iterations, the 19x19 / 14x14 block sampler, 4 loader workers.
    * ``small``: the CPU demo: 64x64 patches, a half-width U-Net, a small 3-stage Swin-UNet
      (embed 24, window 4), the "balanced" contrastive sampler (32 pixels per class, image and
      network), 600 iterations, one torch thread (small convolutions gain little from a second
      thread, and a busy machine makes two much slower).

    Datasets: ``synthetic`` 4 labelled cases; ``acdc`` 7 labelled patients and 4 classes;
    ``synapse`` 4 labelled cases and its 9 classes with their names; ``nifti`` every case with labels
    when the folder has images without labels, else 10 % of them, classes from ``dataset.json`` or the labels.

    Args:
        dataset: one of :data:`DATASETS`.
        recipe: one of :data:`RECIPES`; ``None``: :func:`default_recipe` of the dataset.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (known: {DATASETS})")
    recipe = default_recipe(dataset) if recipe is None else recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (known: {RECIPES})")
    config = Config()
    config.recipe = recipe
    if recipe == "small":
        _apply_small_recipe(config)
    config.data.dataset = dataset
    if dataset == "synthetic":
        config.data.labeled = 4
    elif dataset == "acdc":
        config.data.labeled = 7
        config.data.num_classes = 4
    elif dataset == "synapse":
        config.data.labeled = 4
        config.data.num_classes = 9
        config.data.class_names = list(SYNAPSE_CLASSES)
    else:
        config.data.labeled = None
    return config


def _apply_small_recipe(config: Config) -> None:
    config.data.patch_size = 64
    config.data.num_workers = 0
    config.model.unet_channels = [8, 16, 32, 64, 128]
    config.model.swin_embed_dim = 24
    config.model.swin_depths = [2, 2, 2]
    config.model.swin_heads = [1, 2, 4]
    config.model.swin_window = 4
    config.model.swin_drop_path = 0.1  # 6 blocks to the paper recipe's 8
    config.model.projection_hidden = 64
    config.model.projection_out = 32
    config.loss.contrastive_sampler = "balanced"
    config.loss.contrastive_pixels_per_class = 32
    config.loss.consistency_rampup = 300
    config.loss.labelled_only_until = 150
    config.train.iterations = 600
    config.train.threads = 1
    config.train.lr = 2e-3
    config.train.eval_every = 100
    config.train.checkpoint_every = 20  # a few MB each: cheap, and little work lost to a kill
    config.train.log_every = 10


def load_yaml(path: str | Path) -> dict:
    """Read a YAML configuration file; errors name the file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read configuration ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    return values


def save_yaml(config: Config, path: str | Path) -> None:
    """Write the resolved configuration."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
