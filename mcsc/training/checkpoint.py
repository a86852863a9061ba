"""Checkpoints: one dict of tensors and primitive containers, written atomically.

A checkpoint holds::

    {"format": 1, "iteration": int, "config": nested dict (the resolved Config),
     "models": {"cnn": state_dict, "swin": state_dict, "heads": state_dict},
     "optimizers": {name: state_dict}, "schedulers": {name: state_dict},
     "scaler": state_dict, "sampler": {"seed", "start"},
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]},
     "best": {"metric": float, "iteration": int}}

It loads with ``torch.load(path, weights_only=True)``: nothing is pickled beyond tensors, numbers,
strings, lists and dicts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT = 1


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A crash mid-write leaves the previous checkpoint intact, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot load checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT or "config" not in state:
        raise ValueError(f"{path}: not an mcsc checkpoint (format {FORMAT})")
    return state


def rng_state() -> dict:
    """The torch CPU (and CUDA) generator states as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
