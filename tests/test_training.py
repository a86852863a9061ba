"""Trainer: every method runs, checkpoints are atomic and weights-only, resume is exact."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mcsc.cli import main
from mcsc.training.checkpoint import load_checkpoint, save_checkpoint
from mcsc.training.config import Config, save_yaml
from mcsc.training.trainer import Trainer

from mcsc_fixtures import tiny_config


class Interrupted(Exception):
    pass


class KilledTrainer(Trainer):
    """Dies right after iteration ``kill_at`` (a checkpoint was written at ``kill_at - 1``)."""

    kill_at = 3

    def on_iteration_end(self, iteration, logs):
        if iteration == self.kill_at:
            raise Interrupted


def assert_same_state(a: dict, b: dict):
    assert a["iteration"] == b["iteration"]
    for name in a["models"]:
        for key, tensor in a["models"][name].items():
            assert torch.equal(tensor, b["models"][name][key]), f"{name}.{key} differs"
    for name in a["optimizers"]:
        for pid, values in a["optimizers"][name]["state"].items():
            for key, tensor in values.items():
                assert torch.equal(torch.as_tensor(tensor),
                                   torch.as_tensor(b["optimizers"][name]["state"][pid][key]))
    assert a["schedulers"] == b["schedulers"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.parametrize("method", ["mcsc", "cross-teaching"])
def test_resume_continues_exactly(tmp_path, method):
    config = tiny_config(method, iterations=5)
    Trainer(config, tmp_path / "straight", progress=False).fit()
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")

    killed = KilledTrainer(tiny_config(method, iterations=5), tmp_path / "killed", progress=False)
    with pytest.raises(Interrupted):
        killed.fit()
    partial = load_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt")
    assert partial["iteration"] == 2  # checkpoint_every = 2; iteration 3 was lost
    resumed_config = Config.from_dict(partial["config"])
    Trainer(resumed_config, tmp_path / "killed", resume=True, progress=False).fit()
    resumed = load_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt")
    assert_same_state(straight, resumed)


def test_a_different_seed_changes_the_weights(tmp_path):
    a = tiny_config("cross-teaching", iterations=2)
    b = tiny_config("cross-teaching", iterations=2)
    b.train.seed = a.train.seed + 1
    Trainer(a, tmp_path / "a", progress=False).fit()
    Trainer(b, tmp_path / "b", progress=False).fit()
    sa = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")["models"]["cnn"]
    sb = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")["models"]["cnn"]
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_supervised_uses_labelled_slices_only(tmp_path):
    seen = []

    class Spy(Trainer):
        def train_step(self, batch, iteration):
            seen.append(batch["labelled"].tolist())
            return super().train_step(batch, iteration)

    config = tiny_config("supervised", iterations=2)
    summary = Spy(config, tmp_path, progress=False).fit()
    assert seen == [[True, True], [True, True]]
    assert 0.0 <= summary["mean_dice"] <= 1.0
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert "heads" not in state["models"]


def test_mcsc_step_reports_every_loss_term(tmp_path):
    logs = []

    class Spy(Trainer):
        def on_iteration_end(self, iteration, values):
            logs.append(values)

    Spy(tiny_config("mcsc", iterations=3), tmp_path, progress=False).fit()
    assert set(logs[0]) == {"sup_cnn", "sup_swin", "ct_cnn", "ct_swin", "contrast", "loss"}
    assert all(torch.isfinite(torch.tensor(list(v.values()))).all() for v in logs)


def test_checkpoint_is_weights_only_and_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "latest.pt"
    state = {"format": 1, "config": {"a": 1}, "rng": {"torch": torch.get_rng_state()},
             "models": {"x": {"w": torch.ones(3)}}, "big": 2**70}
    save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["models"]["x"]["w"], torch.ones(3)) and loaded["big"] == 2**70

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"format": 1, "config": {}}, path)
    assert load_checkpoint(path)["config"] == {"a": 1}  # the old checkpoint is intact
    assert os.listdir(path.parent) == ["latest.pt"]  # no temporary file left


def test_load_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not an mcsc checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_config_round_trip_and_errors(tmp_path):
    config = tiny_config()
    again = Config.from_dict(config.to_dict())
    assert again == config
    config.set("train.lr=0.01")
    config.set("model.unet_channels=[2, 4]")
    assert config.train.lr == 0.01 and config.model.unet_channels == [2, 4]
    with pytest.raises(ValueError, match="unknown key train.learning_rate"):
        config.set("train.learning_rate=1")
    with pytest.raises(ValueError, match="unknown section"):
        Config.from_dict({"optim": {}})
    config.train.method = "magic"
    with pytest.raises(ValueError, match="train.method"):
        config.validate()


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A real ``mcsc train`` process is killed with SIGKILL mid-way and resumed."""
    config = tiny_config("mcsc", iterations=150)
    config.train.checkpoint_every = 1
    config.train.eval_every = 1000
    config_file = tmp_path / "config.yaml"
    save_yaml(config, config_file)
    out = tmp_path / "killed"
    latest = out / "checkpoints" / "latest.pt"
    process = subprocess.Popen(
        [sys.executable, "-m", "mcsc", "train", "--config", str(config_file), "--no-progress",
         "--out", str(out)],
        # Not the repository root: there `-m mcsc` would import the source tree, which may lack
        # the compiled extension that the in-process runs below use.
        cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if latest.exists() and load_checkpoint(latest)["iteration"] >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    killed_at = load_checkpoint(latest)["iteration"]
    assert 3 <= killed_at < 150
    assert main(["train", "--resume", "--no-progress", "--out", str(out)]) == 0
    Trainer(config, tmp_path / "straight", progress=False).fit()
    assert_same_state(load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt"),
                      load_checkpoint(latest))
