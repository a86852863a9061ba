"""Trainer: every method runs, checkpoints are atomic and weights-only, resume is exact,
recipes, the schedule, and what a NaN loss does."""

import math
import os

import pytest
import torch
from mcsc_fixtures import tiny_config

from mcsc.losses import cross_teaching_loss, supervised_loss
from mcsc.training.checkpoint import load_checkpoint, save_checkpoint
from mcsc.training.config import DATASETS, RECIPES, Config, preset
from mcsc.training.trainer import (
    NonFiniteLossError,
    RunTimeEstimate,
    Trainer,
    method_losses,
    warmup_poly,
)


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
                assert torch.equal(
                    torch.as_tensor(tensor),
                    torch.as_tensor(b["optimizers"][name]["state"][pid][key]),
                )
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
    state = {
        "format": 1,
        "config": {"a": 1},
        "rng": {"torch": torch.get_rng_state()},
        "models": {"x": {"w": torch.ones(3)}},
        "big": 2**70,
    }
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


# ------------------------------------------------------------ recipes and schedule
def test_recipes_are_independent_of_the_dataset():
    small_acdc, paper_synthetic = preset("acdc", "small"), preset("synthetic", "paper")
    assert small_acdc.recipe == "small" and paper_synthetic.recipe == "paper"
    assert small_acdc.data.patch_size == 64 and small_acdc.train.iterations == 600
    assert small_acdc.model.swin_embed_dim == 24 and small_acdc.data.num_classes == 4
    assert paper_synthetic.data.patch_size == 224 and paper_synthetic.train.iterations == 40000
    assert (
        paper_synthetic.model.swin_embed_dim == 96 and paper_synthetic.model.swin_drop_path == 0.2
    )
    # the dataset decides only what belongs to the data
    for recipe in RECIPES:
        configs = [preset(dataset, recipe) for dataset in DATASETS]
        for config in configs[1:]:
            assert config.model == configs[0].model and config.loss == configs[0].loss
            assert config.train == configs[0].train
            assert config.data.patch_size == configs[0].data.patch_size
    assert preset("synthetic").recipe == "small" and preset("nifti").recipe == "paper"
    with pytest.raises(ValueError, match="unknown recipe 'huge'"):
        preset("acdc", "huge")
    config = preset("acdc")
    config.recipe = "huge"
    with pytest.raises(ValueError, match="recipe must be one of"):
        config.validate()


def test_published_weights_of_the_method():
    config = preset("acdc", "paper")
    # the public code adds 0.001 x (sum of scales) to both networks' losses and sums them
    assert config.loss.contrastive_weight == pytest.approx(0.002)
    assert config.train.warmup_fraction == pytest.approx(0.05)


def test_swin_warm_up_is_five_percent_of_the_run_then_poly(tmp_path):
    assert warmup_poly(0, 1000, 50) == pytest.approx(1e-3)
    assert warmup_poly(25, 1000, 50) == pytest.approx(1e-3 * 0.5 + 0.5)
    assert warmup_poly(50, 1000, 50) == pytest.approx(1.0)
    assert warmup_poly(525, 1000, 50) == pytest.approx(0.5**0.9)
    assert warmup_poly(1000, 1000, 50) == 0.0 and warmup_poly(0, 1000, 0) == 1.0
    config = tiny_config("mcsc", iterations=200)
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.setup()
    swin, cnn = trainer.schedulers["swin"].lr_lambdas[0], trainer.schedulers["cnn"].lr_lambdas[0]
    assert swin(0) == pytest.approx(1e-3) and swin(10) == pytest.approx(1.0)  # 5 % of 200
    assert cnn(0) == 1.0 and cnn(100) == pytest.approx(0.5**0.9)


def test_method_losses_compose_the_terms():
    generator = torch.Generator().manual_seed(0)
    cnn_logits, swin_logits = torch.randn(2, 4, 4, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (2, 8, 8), generator=generator)
    contrastive = torch.tensor(0.7)
    terms = method_losses(
        cnn_logits,
        swin_logits,
        labels,
        2,
        4,
        cross_teaching_weight=0.3,
        contrastive=contrastive,
        contrastive_weight=0.5,
    )
    expected = (
        supervised_loss(cnn_logits[:2], labels, 4)
        + supervised_loss(swin_logits[:2], labels, 4)
        + 0.3
        * (
            cross_teaching_loss(cnn_logits[2:], swin_logits[2:])
            + cross_teaching_loss(swin_logits[2:], cnn_logits[2:])
        )
        + 0.5 * 0.7
    )
    torch.testing.assert_close(terms["loss"], expected)
    supervised = method_losses(cnn_logits, swin_logits, labels, 2, 4, cross_teaching_weight=None)
    assert set(supervised) == {"sup_cnn", "sup_swin", "loss"}
    torch.testing.assert_close(supervised["loss"], supervised["sup_cnn"] + supervised["sup_swin"])


def test_the_trainer_never_starts_a_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="no process group is running"):
        Trainer(tiny_config(), tmp_path, progress=False)
    assert not torch.distributed.is_initialized()


def test_a_long_run_is_announced_at_the_start(tmp_path, capsys):
    config = tiny_config("supervised", iterations=5)
    config.recipe = "paper"
    config.train.long_run_hours = 0.0
    Trainer(config, tmp_path / "paper", progress=False).fit()
    announced = [
        line for line in capsys.readouterr().out.splitlines() if "estimated training time" in line
    ]
    assert (
        len(announced) == 1
        and "--recipe small" in announced[0]
        and "1 iterations to go" in announced[0]
    )
    estimate = RunTimeEstimate(start=0, total=100)
    assert not estimate.update(1) and not estimate.update(3) and estimate.update(4)
    assert estimate.remaining == 96 and estimate.seconds_per_iteration >= 0
    estimate.seconds_per_iteration = 1.0
    assert estimate.warning(1.0, "paper", torch.device("cpu")) is None  # 96 s < 1 h
    assert "fewer --iterations" in estimate.warning(0.01, "small", torch.device("cpu"))


# ------------------------------------------------------------------ non-finite training
class NaNContrast(Trainer):
    """The contrastive term becomes NaN (with its gradient) in iteration index ``nan_at``."""

    nan_at = 3

    def contrastive_loss(
        self, cnn_out, swin_out, labels, cnn_logits, swin_logits, iteration, layout=None
    ):
        loss = super().contrastive_loss(
            cnn_out, swin_out, labels, cnn_logits, swin_logits, iteration, layout
        )
        return loss * math.nan if iteration == self.nan_at else loss


def test_a_nan_loss_term_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config("mcsc", iterations=6)
    with pytest.raises(
        NonFiniteLossError, match=r"iteration 4: the loss term contrast = nan"
    ) as error:
        NaNContrast(config, tmp_path, progress=False).fit()
    assert "latest.pt (iteration 2) is kept" in str(error.value) and "train.non_finite=skip" in str(
        error.value
    )
    kept = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert kept["iteration"] == 2
    assert all(
        torch.isfinite(t).all()
        for w in kept["models"].values()
        for t in w.values()
        if t.is_floating_point()
    )


def test_a_nan_loss_term_can_skip_the_step(tmp_path, capsys):
    weights = {}

    class Watched(NaNContrast):
        def on_iteration_end(self, iteration, logs):
            weights[iteration] = [p.detach().clone() for p in self.models["cnn"].parameters()]

    config = tiny_config("mcsc", iterations=6)
    config.train.non_finite = "skip"
    Watched(config, tmp_path, progress=False).fit()
    assert (
        "iteration 4: the loss term contrast = nan; step skipped (1 so far)"
        in capsys.readouterr().out
    )
    assert all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))  # no update
    assert not all(torch.equal(a, b) for a, b in zip(weights[4], weights[5]))  # training goes on
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert state["iteration"] == 6
    assert all(
        torch.isfinite(t).all()
        for w in state["models"].values()
        for t in w.values()
        if t.is_floating_point()
    )


def test_a_non_finite_model_is_never_checkpointed(tmp_path):
    class Poisoned(Trainer):
        """BatchNorm statistics turn NaN (as a NaN image would make them) after iteration 3;
        the training loss, computed with batch statistics, stays finite."""

        def on_iteration_end(self, iteration, logs):
            if iteration == 3:
                batchnorm = next(
                    m for m in self.models["cnn"].modules() if isinstance(m, torch.nn.BatchNorm2d)
                )
                batchnorm.running_mean.fill_(math.nan)

    with pytest.raises(
        NonFiniteLossError, match=r"iteration 4: cnn\..*running_mean is no longer finite"
    ):
        Poisoned(tiny_config("cross-teaching", iterations=6), tmp_path, progress=False).fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["iteration"] == 2
