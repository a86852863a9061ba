"""Long runs: which checkpoint a run resumes from, polite stops on signals, faults that name a rank.

* :func:`choose_checkpoint` picks the checkpoint a run continues from (``latest.pt``, or
  ``previous.pt`` when ``latest.pt`` is unreadable or missing) and, for ``resume = "auto"``,
  checks that it belongs to this run (:func:`config_differences`, :func:`data_fingerprint`).
  Under ``torchrun`` rank 0 decides and broadcasts the decision, so every rank does the same.
* :class:`StopSignals` turns SIGTERM, SIGUSR1 and SIGINT (``train.stop_signals``) into a
  request that the training loop honours after the current step: all ranks agree on the step,
  rank 0 writes the checkpoint, and :class:`TrainingStopped` ends the run with
  :data:`EXIT_STOPPED` (75, sysexits' EX_TEMPFAIL: run the same command again) or
  :data:`EXIT_INTERRUPTED` (130, for Ctrl-C).
* :func:`fault_report` turns the error of a failed collective (a rank that died, hung or lost
  its node) into a :class:`TrainingFault` naming the rank, using the rendezvous store, which
  outlives the process group; a data loader worker that died becomes one too
  (:func:`loader_worker_error`). Exit status :data:`EXIT_FAULT` (4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mcsc.training.checkpoint import CheckpointError, load_checkpoint

EXIT_FAULT = 4  # a lost rank, a collective timeout or a dead data loader worker
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGUSR1 after writing the checkpoint (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT), likewise; 128 + SIGINT as shells report

# Settings that say how a run is executed, not what it computes: they may differ between a
# checkpoint and the run that continues it (the data folder may move; its content may not).
RUN_CONTROL_KEYS = {
    "data.path",
    "data.num_workers",
    "train.device",
    "train.threads",
    "train.resume",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.stop_signals",
    "train.collective_timeout_minutes",
    "train.log_every",
    "train.long_run_hours",
}


class TrainingStopped(Exception):
    """The run stopped on a signal after writing its checkpoint; ``status`` is the exit status."""

    def __init__(self, message: str, signum: int, iteration: int):
        super().__init__(message)
        self.signum, self.iteration = signum, iteration
        self.status = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_STOPPED


class TrainingFault(RuntimeError):
    """A process of the run was lost (a rank, a data loader worker) or a collective timed out."""


# --------------------------------------------------------------------------- resume decision
def checkpoint_files(folder: Path) -> tuple[Path, Path]:
    """(latest.pt, previous.pt) of a run's checkpoint folder."""
    return folder / "latest.pt", folder / "previous.pt"


def has_checkpoint(folder: Path) -> bool:
    return any(path.exists() for path in checkpoint_files(folder))


def load_newest(folder: Path, map_location="cpu") -> tuple[Path | None, dict | None, list[str]]:
    """The newest loadable checkpoint of a folder: ``(path, state, notes)``.

    ``latest.pt`` when it loads; else ``previous.pt`` (the one it replaced), with a note saying
    why. ``(None, None, notes)`` when neither loads; notes then hold the reasons (empty when
    there is no checkpoint at all).
    """
    latest, previous = checkpoint_files(folder)
    notes = []
    for path in (latest, previous):
        if not path.exists():
            if path == latest and previous.exists():
                notes.append(f"{latest} is missing (a write was cut between two renames)")
            continue
        try:
            return path, load_checkpoint(path, map_location), notes
        except (CheckpointError, OSError, EOFError, RuntimeError) as error:
            notes.append(f"{path} is unreadable ({error})")
    return None, None, notes


def flat_config(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``section.key: <saved> in the checkpoint, <current> here`` for every setting that differs,
    run-control settings (:data:`RUN_CONTROL_KEYS`) aside. Both are ``Config.to_dict()`` dicts;
    keys missing from an older checkpoint count as their defaults."""
    from mcsc.training.config import Config

    saved = flat_config(Config.from_dict(saved, "the checkpoint's configuration").to_dict())
    current = flat_config(current)
    return [
        f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} here"
        for key in sorted(set(saved) | set(current))
        if key not in RUN_CONTROL_KEYS and saved.get(key) != current.get(key)
    ]


def data_fingerprint(bundle) -> str:
    """A digest of the training data a run sees (a ``DataBundle``).

    Covers the classes, the labelled cases, the validation and test case names and the training
    slices: their content for data held in memory (synthetic, NIfTI), their file names and sizes
    for slices read from files on demand (ACDC, Synapse), so it survives copying the data
    folder elsewhere.
    """
    from mcsc.data.base import ArraySlices, FileSlices

    digest = hashlib.blake2b(digest_size=16)

    def feed(value) -> None:
        digest.update(repr(value).encode())
        digest.update(b"\0")

    feed(bundle.kind)
    feed((bundle.num_classes, list(bundle.class_names), sorted(bundle.labelled_cases)))
    feed(([volume.name for volume in bundle.val], [volume.name for volume in bundle.test]))
    table = bundle.train
    feed(list(table.cases))
    if isinstance(table, ArraySlices):
        for image, label in zip(table.images, table.labels):
            for array in (image, label):
                if array is None:
                    feed(None)
                    continue
                array = np.ascontiguousarray(array)
                feed((array.dtype.str, array.shape))
                digest.update(memoryview(array).cast("B"))
    elif isinstance(table, FileSlices):
        for path in table.paths:
            feed((Path(path).name, os.path.getsize(path)))
    return digest.hexdigest()


@dataclasses.dataclass
class ResumeDecision:
    """What a run does at start: resume from ``path`` (``iteration``) or start fresh (``path``
    None); ``error``: refuse to start; ``notes``: what to tell the user."""

    path: str | None = None
    iteration: int = 0
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    unreadable: list[str] = dataclasses.field(default_factory=list)  # set aside by rank 0


def choose_checkpoint(
    folder: Path, mode: str, config: dict, fingerprint: str
) -> tuple[ResumeDecision, dict | None]:
    """Decide how a run with resume ``mode`` (``"required"`` or ``"auto"``) starts.

    ``required`` (``--resume``): the newest loadable checkpoint, whatever its configuration (the
    command line took its configuration from it); a changed data fingerprint is a note.
    ``auto``: that checkpoint when its configuration (run-control settings aside) and data
    fingerprint equal this run's, a refusal naming what differs when they do not, a fresh start
    when the folder has no checkpoint. A folder whose checkpoints all fail to load is an error
    in both modes (never silently restarted). Returns the decision and the loaded state.
    """
    path, state, notes = load_newest(folder)
    decision = ResumeDecision(notes=list(notes))
    if path is None:
        if notes:
            decision.error = (
                "no loadable checkpoint to resume from: "
                + "; ".join(notes)
                + ". Move the checkpoints folder away to start the run again."
            )
        elif mode == "required":
            decision.error = f"{folder / 'latest.pt'}: checkpoint not found (nothing to resume)"
        return decision, None
    decision.path, decision.iteration = str(path), int(state["iteration"])
    if path.name != "latest.pt":
        decision.notes.append(f"resuming from {path} (iteration {decision.iteration}) instead")
        latest = folder / "latest.pt"
        if latest.exists():
            decision.unreadable.append(str(latest))
    saved_fingerprint = state.get("data_fingerprint")
    data_changed = saved_fingerprint is not None and saved_fingerprint != fingerprint
    if mode == "auto":
        differences = config_differences(state["config"], config)
        if data_changed:
            differences.append(
                f"data fingerprint: {saved_fingerprint} in the checkpoint, {fingerprint} here "
                f"(the training data changed)"
            )
        if differences:
            decision.error = (
                f"{path} belongs to another run, so --resume auto does not continue it: "
                + "; ".join(differences)
                + ". Use another --out, or --resume to continue that run with its own "
                "configuration."
            )
            return decision, None
    elif data_changed:
        decision.notes.append(
            f"the training data differs from the checkpoint's (fingerprint {fingerprint}, "
            f"{saved_fingerprint} in {path})"
        )
    return decision, state


# ------------------------------------------------------------------------------ stop signals
class Interrupted(Exception):
    """Raised by :class:`StopSignals` inside :meth:`StopSignals.interruptible` sections."""


class StopSignals:
    """Signal handlers that ask the run to stop after the current step.

    The first stop signal only records itself (``requested``); the loop checks it after every
    step. Inside :meth:`interruptible` (validation, the final test) it raises
    :class:`Interrupted` at once. A second signal changes nothing while a checkpoint is written
    (:meth:`saving`); a second SIGINT outside a save raises ``KeyboardInterrupt`` (stop without
    a checkpoint). Handlers are installed only in the main thread and restored on exit.
    """

    def __init__(self, names: list[str]):
        self.signals = [getattr(signal, name) for name in names]
        self.requested: int | None = None
        self.repeated = 0
        self._saving = 0
        self._interruptible = 0
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
            if self._interruptible and not self._saving:
                raise Interrupted
            return
        self.repeated += 1
        if signum == signal.SIGINT and not self._saving:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section that a stop signal ends at once (raising :class:`Interrupted`)."""
        if self.requested is not None:
            raise Interrupted
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A section that no signal interrupts (a checkpoint write)."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def request(self, signum: int) -> None:
        """Ask for a stop as if ``signum`` arrived (the loop honours it after the step)."""
        if self.requested is None:
            self.requested = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def ignore_signals(signums: tuple[int, ...], worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a stop signal sent to the whole job (SLURM signals every
    process) must not kill the loader workers while the training process finishes its step."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)


# ------------------------------------------------------------------------------------ faults
_COLLECTIVE_MARKS = (
    "gloo",
    "nccl",
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout",
    "socket",
    "peer",
)


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_collective_error(error: BaseException) -> bool:
    """Whether an error looks like a failed collective (gloo/NCCL, a lost connection, a timeout)
    rather than a failure of this rank's own work."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(mark in text for mark in _COLLECTIVE_MARKS)


class LoaderWorkerLost(RuntimeError):
    """The connection to a data loader worker broke: the worker died while sending a batch."""


def loader_batches(loader) -> Iterator:
    """The batches of ``loader``; a broken connection to one of its worker processes (a worker
    killed while it sends a batch) raises :class:`LoaderWorkerLost`. Errors of the data itself
    pass unchanged."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (ConnectionError, EOFError) as error:
            if not loader.num_workers:
                raise
            raise LoaderWorkerLost(f"its connection broke: {first_line(error)}") from error
        yield batch


def loader_worker_error(error: BaseException) -> bool:
    """Whether an error is the report of a data loader worker that died."""
    return isinstance(error, LoaderWorkerLost) or (
        isinstance(error, RuntimeError) and "DataLoader worker" in str(error)
    )


def _fault_store():
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 (a private API; without it the report names no rank)
        return None


def fault_report(
    error: BaseException, rank: int, world_size: int, wait_seconds: float, give_up=None
) -> tuple[bool, list[int], dict[int, str]]:
    """Tell the other ranks through the rendezvous store that this rank failed, and learn which
    of them did too.

    A rank whose own work failed (``not is_collective_error(error)``) posts its error and
    returns at once: its exit is what frees the others from their collective. A rank whose
    collective failed posts that and waits up to ``wait_seconds`` for every other rank's post
    (less when ``give_up()`` turns true: torchrun's SIGTERM, say).

    Returns ``(store_reachable, silent_ranks, posts)``: the ranks that posted nothing in time
    (dead, hung or unreachable) and every rank's post (``"error: ..."`` or ``"collective: ..."``).
    """
    store = _fault_store()
    if store is None:
        return False, [], {}
    generation = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    keys = [f"mcsc/fault/{generation}/{r}" for r in range(world_size)]
    collective = is_collective_error(error)
    try:
        store.set(keys[rank], f"{'collective' if collective else 'error'}: {first_line(error)}")
        if not collective:
            return True, [], {}
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline and not store.check(keys):
            if give_up is not None and give_up():
                break
            time.sleep(0.1)
        posts = {r: store.get(key).decode() for r, key in enumerate(keys) if store.check([key])}
    except Exception:  # noqa: BLE001 (the store's host is gone too)
        return False, [], {}
    silent = [r for r in range(world_size) if r not in posts]
    return True, silent, posts
