"""Training: configuration, checkpoints and the trainer."""

from mcsc.training.checkpoint import load_checkpoint, save_checkpoint
from mcsc.training.config import Config, load_yaml, preset, save_yaml
from mcsc.training.distributed import resolve_device
from mcsc.training.resilience import TrainingFault, TrainingStopped
from mcsc.training.trainer import Trainer, build_models, evaluation_models

__all__ = [
    "Config",
    "Trainer",
    "TrainingFault",
    "TrainingStopped",
    "build_models",
    "evaluation_models",
    "load_checkpoint",
    "load_yaml",
    "preset",
    "resolve_device",
    "save_checkpoint",
    "save_yaml",
]
