"""Checkpoints: one dict of tensors and primitive containers, written atomically, checked on load.

A checkpoint holds::

    {"format": 1, "iteration": int, "config": nested dict (the resolved Config),
     "models": {"cnn": state_dict, "swin": state_dict, "heads": state_dict},
     "optimizers": {name: state_dict}, "schedulers": {name: state_dict},
     "losses": {name: state_dict}, "sampler": {"seed", "start"},
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...],
             "ranks": [{"torch", "cuda", "numpy", "python"} of every rank]},
     "best": {"metric": float, "iteration": int}, "validation_pending": bool,
     "data_fingerprint": str}

(No loss-scaler state: autocast runs in bfloat16, which needs no loss scaling.)

It loads with ``torch.load(path, weights_only=True)``: nothing is pickled beyond tensors, numbers,
strings, lists and dicts. :func:`load_checkpoint` also verifies the checksum of every record of
the file (a zip archive), because ``torch.load`` reads a damaged tensor without a word.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archives are zip files


class CheckpointError(ValueError):
    """A file that is not a valid mcsc checkpoint; the message names it and says why."""


def save_checkpoint(state: dict, path: str | Path, previous: str | Path | None = None) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A crash or a failed write (disk full, no permission) leaves the previous checkpoint at
    ``path`` intact and no temporary file behind (a SIGKILL during the write leaves the
    temporary file, which :func:`remove_stale_temporaries` clears); a failed write raises
    ``OSError`` naming ``path`` with the system's reason. With ``previous``, the checkpoint
    being replaced is kept there (renamed, once the new one is on disk): at every moment
    ``path`` or ``previous`` holds a complete checkpoint.
    """
    path = Path(path)
    # serialised in memory first: torch.save into a file object reports a failed write as a
    # bare position mismatch, while a plain write keeps the system's reason (ENOSPC, EACCES)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
        with os.fdopen(handle, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise OSError(
            error.errno,
            f"{path}: cannot write the checkpoint ({error.strerror or error}); "
            f"the previous checkpoint there, if any, is unchanged",
        ) from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    _sync_folder(path.parent)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that a write killed midway left in ``folder``; returns them.

    Only for a folder that nothing is writing to (the start of a run)."""
    stale = sorted(Path(folder).glob(".*.pt.*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _sync_folder(folder: Path) -> None:
    """Make the rename durable; some file systems refuse to sync a folder, and the rename
    has happened either way."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, never running code from the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError (a ``ValueError``): the file is empty, truncated or corrupt (a record
            whose checksum does not match), another kind of file (not a zip archive, an archive
            that is not a PyTorch file, or one holding Python objects other than tensors and
            plain containers), or a PyTorch file that is not an mcsc checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    _check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises loading without weights_only, which would run whatever the
        # file holds: it is not passed on
        raise CheckpointError(
            f"{path}: not a valid mcsc checkpoint: it holds Python objects other than tensors "
            f"and plain containers (another kind of file; not loaded, as that could run code)"
        ) from None
    except Exception as error:  # noqa: BLE001 (a sound archive that is not a PyTorch file)
        # not chained either: the first line of the reason is all that is shown of torch's text
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{path}: not a valid mcsc checkpoint: another kind of file (a zip archive that "
            f"torch cannot read: {reason})"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "format" not in state:
        raise CheckpointError(
            f"{path}: not an mcsc checkpoint (a PyTorch file without mcsc's format and config)"
        )
    if state["format"] != FORMAT:
        raise CheckpointError(
            f"{path}: not an mcsc checkpoint of format {FORMAT} (format {state['format']!r})"
        )
    return state


def _check_archive(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete zip archive whose records
    all match their checksums."""
    with open(path, "rb") as f:
        magic = f.read(len(_ZIP_MAGIC))
    if not magic:
        raise CheckpointError(f"{path}: not a valid mcsc checkpoint: the file is empty")
    if magic != _ZIP_MAGIC:
        raise CheckpointError(
            f"{path}: not a valid mcsc checkpoint: another kind of file (not a zip archive, "
            f"as torch.save writes)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as error:  # BadZipFile, OSError or EOFError from a cut or damaged file
        raise CheckpointError(
            f"{path}: not a valid mcsc checkpoint: truncated or corrupt ({error})"
        ) from error
    if damaged is not None:
        raise CheckpointError(
            f"{path}: not a valid mcsc checkpoint: corrupt (record {damaged} fails its checksum)"
        )


def rng_state(everything: bool = False) -> dict:
    """The torch CPU (and CUDA) generator states as tensors; with ``everything`` also numpy's
    and Python's global generators (as a tensor and a list of ints: weights-only loadable)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if everything:
        import random

        import numpy as np

        kind, keys, position, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
        version, internal, gauss_next = random.getstate()
        state["python"] = {"version": version, "state": list(internal), "gauss": gauss_next}
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        saved = state["numpy"]
        np.random.set_state(
            (
                saved["kind"],
                saved["keys"].numpy().astype(np.uint32),
                saved["position"],
                saved["has_gauss"],
                saved["gauss"],
            )
        )
    if "python" in state:
        import random

        saved = state["python"]
        random.setstate((saved["version"], tuple(saved["state"]), saved["gauss"]))
