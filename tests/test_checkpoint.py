"""Checkpoint files: corrupt, truncated or foreign files are refused by name, failed writes keep
the previous checkpoint."""

import errno
import io
import os
import pickle
import traceback
import zipfile

import numpy as np
import pytest
import torch

from mcsc.training import checkpoint
from mcsc.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def small_state(value: float = 1.0) -> dict:
    return {
        "format": 1,
        "iteration": 3,
        "config": {"data": {"dataset": "synthetic"}},
        "models": {"cnn": {"weight": torch.full((64, 64), value)}},
    }


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "checkpoints" / "latest.pt"
    save_checkpoint(small_state(), path)
    return path


def assert_refused(path, reason: str):
    """The load fails naming the file and ``reason``, and nothing suggests unsafe loading."""
    with pytest.raises(CheckpointError, match=reason) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(f"{path}: not a")
    shown = "".join(traceback.format_exception(caught.value))  # with any chained exception
    assert "weights_only" not in shown and "arbitrary code" not in shown
    assert isinstance(caught.value, ValueError)  # the command line reports it as bad input


def test_a_sound_checkpoint_loads(saved):
    state = load_checkpoint(saved)
    assert state["iteration"] == 3 and torch.equal(
        state["models"]["cnn"]["weight"], torch.ones(64, 64)
    )


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, "all but 1", "all but 22"])
def test_truncated_checkpoint(saved, keep):
    raw = saved.read_bytes()
    length = len(raw) - int(keep.split()[-1]) if isinstance(keep, str) else int(len(raw) * keep)
    saved.write_bytes(raw[:length])
    assert_refused(saved, "the file is empty" if length == 0 else "truncated or corrupt")


def test_corrupt_checkpoint_bytes_are_found(saved):
    """A flipped byte inside a tensor record loads silently with torch.load alone."""
    raw = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    offset = record.header_offset + 30 + len(record.filename) + len(record.extra) + 100
    raw[offset] ^= 0x01
    saved.write_bytes(bytes(raw))
    assert torch.load(saved, weights_only=True)["format"] == 1  # the silent wrong answer
    assert_refused(saved, "corrupt .record .*data/0 fails its checksum")


def test_foreign_files(tmp_path):
    text = tmp_path / "config.yaml"
    text.write_text("data:\n  dataset: acdc\n")
    assert_refused(text, "another kind of file .not a zip archive")
    pickled = tmp_path / "plain.pkl"
    pickled.write_bytes(pickle.dumps({"format": 1, "config": {}}))
    assert_refused(pickled, "another kind of file .not a zip archive")
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as f:
        f.writestr("notes.txt", "hello")
    assert_refused(archive, "another kind of file .a zip archive that torch cannot read")
    with_objects = tmp_path / "objects.pt"
    torch.save({"format": 1, "config": {}, "array": np.arange(3)}, with_objects)
    assert_refused(with_objects, "holds Python objects other than tensors")
    other_dict = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, other_dict)
    assert_refused(other_dict, "not an mcsc checkpoint .a PyTorch file without")
    newer = tmp_path / "newer.pt"
    torch.save({"format": 2, "config": {}}, newer)
    assert_refused(newer, "not an mcsc checkpoint of format 1 .format 2")


class FailingFile(io.RawIOBase):
    """A file that takes ``budget`` bytes, then fails like a full disk."""

    def __init__(self, real, budget: int):
        self.real, self.budget = real, budget

    def writable(self):
        return True

    def write(self, data):
        taken = bytes(data[: self.budget])
        self.real.write(taken)
        self.budget -= len(taken)
        if len(taken) < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(taken)

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        super().close()


@pytest.mark.parametrize("budget", [0, 1000, 9000])
def test_a_write_failing_midway_keeps_the_previous_checkpoint(saved, monkeypatch, budget):
    real_fdopen = os.fdopen
    written = []

    def failing_fdopen(handle, mode="r", *args, **kwargs):
        written.append(handle)
        return FailingFile(real_fdopen(handle, mode, *args, **kwargs), budget)

    monkeypatch.setattr(checkpoint.os, "fdopen", failing_fdopen)
    reason = f"{saved}: cannot write the checkpoint .No space left"
    with pytest.raises(OSError, match=reason) as caught:
        save_checkpoint(small_state(2.0), saved)
    assert caught.value.errno == errno.ENOSPC and written  # the failing writer was used
    monkeypatch.undo()
    assert os.listdir(saved.parent) == ["latest.pt"]  # no temporary file left
    state = load_checkpoint(saved)
    assert torch.equal(state["models"]["cnn"]["weight"], torch.ones(64, 64))


def test_an_unwritable_folder_keeps_the_previous_checkpoint(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    with pytest.raises(OSError, match="latest.pt: cannot write the checkpoint .Permission denied"):
        save_checkpoint(small_state(2.0), saved)
    monkeypatch.undo()
    assert os.listdir(saved.parent) == ["latest.pt"]
    assert load_checkpoint(saved)["iteration"] == 3


def test_a_second_save_replaces_the_first(saved):
    save_checkpoint(small_state(5.0), saved)
    assert torch.equal(load_checkpoint(saved)["models"]["cnn"]["weight"], torch.full((64, 64), 5.0))
    assert os.listdir(saved.parent) == ["latest.pt"]


def test_the_replaced_checkpoint_is_kept_as_previous_and_a_failed_write_keeps_both(
    saved, monkeypatch
):
    previous = saved.parent / "previous.pt"
    save_checkpoint(small_state(5.0), saved, previous)
    assert load_checkpoint(previous)["models"]["cnn"]["weight"][0, 0] == 1.0
    assert load_checkpoint(saved)["models"]["cnn"]["weight"][0, 0] == 5.0

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", disk_full)
    with pytest.raises(OSError, match=f"{saved}: cannot write the checkpoint .No space left"):
        save_checkpoint(small_state(7.0), saved, previous)
    monkeypatch.undo()
    assert sorted(os.listdir(saved.parent)) == ["latest.pt", "previous.pt"]
    assert load_checkpoint(saved)["models"]["cnn"]["weight"][0, 0] == 5.0
    assert load_checkpoint(previous)["models"]["cnn"]["weight"][0, 0] == 1.0


def test_stale_temporaries_are_removed(saved):
    stale = saved.parent / ".latest.pt.abc123.tmp"
    stale.write_bytes(b"cut short")
    assert checkpoint.remove_stale_temporaries(saved.parent) == [stale]
    assert os.listdir(saved.parent) == ["latest.pt"]
    assert checkpoint.remove_stale_temporaries(saved.parent / "absent") == []


def test_every_global_generator_round_trips_through_a_checkpoint(tmp_path):
    import random

    np.random.seed(3)
    random.seed(4)
    torch.manual_seed(5)
    state = dict(small_state(), rng=checkpoint.rng_state(everything=True))
    expected = (np.random.rand(3), random.random(), torch.rand(3))
    np.random.rand(7), random.random(), torch.rand(9)  # the generators move on
    save_checkpoint(state, tmp_path / "rng.pt")
    checkpoint.set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (np.random.rand(3), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], again[0]) and expected[1] == again[1]
    assert torch.equal(expected[2], again[2])
