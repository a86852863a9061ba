"""The ``mcsc`` command line end to end on tiny runs."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from mcsc_fixtures import make_acdc, make_nifti, make_raw_acdc, tiny_config, write_nifti

from mcsc.cli import main


def tiny_yaml(tmp_path: Path, iterations: int = 3) -> Path:
    """The tiny configuration as a --config file (only the sections a user would override)."""
    values = tiny_config(iterations=iterations).to_dict()
    values["data"] = {
        k: v
        for k, v in values["data"].items()
        if k.startswith("synthetic") or k in ("labeled", "patch_size", "num_workers")
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny synthetic run through the CLI, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("run")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(tiny_yaml(tmp_path)),
            "--iterations",
            "3",
            "--method",
            "mcsc",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_train_writes_every_output(trained):
    for name in (
        "config.yaml",
        "metrics.json",
        "metrics.txt",
        "predictions.png",
        "split.json",
        "checkpoints/best.pt",
        "checkpoints/latest.pt",
    ):
        assert (trained / name).is_file(), name
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"mean_dice", "mean_hd95", "mean_asd", "per_class", "per_volume", "unit"} <= set(metrics)
    assert set(metrics["per_class"]) == {"large_organ", "medium_organ", "small_lesion"}
    assert metrics["unit"] == "mm" and metrics["split"] == "test"
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["train"]["iterations"] == 3 and config["data"]["num_classes"] == 4
    assert config["data"]["split"] == json.loads((trained / "split.json").read_text())
    state = torch.load(trained / "checkpoints" / "latest.pt", weights_only=True)
    assert state["iteration"] == 3 and set(state["models"]) == {"cnn", "swin", "heads"}


def test_existing_run_needs_resume_and_resume_extends(trained, tmp_path, capsys):
    assert main(["train", "--out", str(trained)]) == 2
    assert "--resume" in capsys.readouterr().err
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "checkpoints").mkdir()
    (copy / "checkpoints" / "latest.pt").write_bytes(
        (trained / "checkpoints" / "latest.pt").read_bytes()
    )
    assert (
        main(["train", "--resume", "--iterations", "4", "--no-progress", "--out", str(copy)]) == 0
    )
    assert torch.load(copy / "checkpoints" / "latest.pt", weights_only=True)["iteration"] == 4


def test_evaluate(trained, tmp_path):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(trained / "checkpoints" / "best.pt"),
                "--split",
                "test",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    trained_metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["mean_dice"] == pytest.approx(trained_metrics["mean_dice"])
    assert (out / "predictions.png").is_file()


def test_predict_nifti_in_nifti_out(trained, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    affine_spacing = (1.2, 0.8, 2.5)
    write_nifti(
        inputs / "a.nii.gz",
        np.random.default_rng(0).normal(size=(20, 24, 3)).astype(np.float32),
        spacing=affine_spacing,
    )
    write_nifti(inputs / "b.nii", np.ones((32, 32, 2), np.float32))
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(trained / "checkpoints" / "best.pt"),
                "--input",
                str(inputs),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    a = nib.load(str(out / "a.nii.gz"))
    assert a.shape == (20, 24, 3) and np.allclose(a.affine, np.diag(list(affine_spacing) + [1]))
    assert set(np.unique(np.asarray(a.dataobj))) <= {0, 1, 2, 3}
    assert nib.load(str(out / "b.nii.gz")).shape == (32, 32, 2)


def test_train_on_nifti_and_acdc_folders(tmp_path):
    nii = make_nifti(tmp_path / "nii", cases=5)
    config = tiny_yaml(tmp_path, iterations=2)
    out = tmp_path / "nii_run"
    assert (
        main(
            [
                "train",
                "--data",
                str(nii),
                "--config",
                str(config),
                "--labeled",
                "1",
                "--method",
                "cross-teaching",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["dataset"] == "nifti" and saved["data"]["labeled"] == 1
    assert saved["data"]["class_names"] == ["background", "alpha", "beta", "gamma"]
    assert json.loads((out / "metrics.json").read_text())["unit"] == "mm"
    acdc = make_acdc(tmp_path / "acdc", patients=4)
    out = tmp_path / "acdc_run"
    assert (
        main(
            [
                "train",
                "--data",
                str(acdc),
                "--config",
                str(config),
                "--labeled",
                "1",
                "--method",
                "supervised",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["unit"] == "voxels"


def test_prepare_acdc(tmp_path, capsys):
    raw = make_raw_acdc(tmp_path / "raw", patients=3)
    assert main(["prepare", "acdc", str(raw), str(tmp_path / "out")]) == 0
    assert "wrote 6 volumes of 3 patients" in capsys.readouterr().out
    assert (tmp_path / "out" / "train_slices.list").read_text().strip()


def test_bad_data_fails_at_start_with_the_file_named(tmp_path, capsys):
    nii = make_nifti(tmp_path / "nii", cases=4)
    (nii / "labelsTr" / "case_003.nii.gz").write_bytes(b"garbage")
    code = main(["train", "--data", str(nii), "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "case_003.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r2")]) == 2
    assert "absent: data folder not found" in capsys.readouterr().err
    assert (
        main(["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r3")]) == 2
    )
    assert "none.yaml" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mcsc", "train", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0
    for flag in (
        "--data",
        "--dataset",
        "--labeled",
        "--method",
        "--iterations",
        "--config",
        "--device",
        "--resume",
        "--out",
    ):
        assert flag in result.stdout


def test_recipe_flag_and_config_key_work_with_any_dataset(tmp_path):
    from mcsc.cli import _parser, resolve_train_config

    def resolve(*flags):
        return resolve_train_config(
            _parser().parse_args(["train", *flags, "--out", str(tmp_path / "run")])
        )

    demo = resolve()
    assert (
        demo.recipe == "small" and demo.data.dataset == "synthetic" and demo.data.patch_size == 64
    )
    paper = resolve("--recipe", "paper")
    assert (
        paper.recipe == "paper"
        and paper.data.dataset == "synthetic"
        and paper.data.patch_size == 224
    )
    root = make_nifti(tmp_path / "nii", cases=5)
    small = resolve("--data", str(root), "--recipe", "small")
    assert (
        small.data.dataset == "nifti"
        and small.train.iterations == 600
        and small.data.labeled is None
    )
    from_file = tmp_path / "paper.yaml"
    from_file.write_text(yaml.safe_dump({"recipe": "paper", "train": {"iterations": 7}}))
    config = resolve("--config", str(from_file))
    assert (
        config.recipe == "paper"
        and config.model.swin_embed_dim == 96
        and config.train.iterations == 7
    )
    config = resolve("--config", str(from_file), "--recipe", "small")  # the flag wins
    assert (
        config.recipe == "small"
        and config.model.swin_embed_dim == 24
        and config.train.iterations == 7
    )
    from_file.write_text(yaml.safe_dump({"recipe": "big"}))
    assert main(["train", "--config", str(from_file), "--out", str(tmp_path / "bad")]) == 2


def test_the_gpu_training_check_runs_on_a_cpu_at_tiny_sizes(tmp_path):
    """.ci/gpu_train_check.sh as the GPU runs it, on the CPU with tiny networks: no typo can
    fail the GPU run."""
    import csv
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        MCSC_TRAIN_CHECK_DEVICE="cpu",
        MCSC_TRAIN_CHECK_ITERATIONS="2",
        MCSC_TRAIN_CHECK_STEPS="1",
        MCSC_TRAIN_CHECK_CONFIG=str(tiny_yaml(tmp_path)),
        OMP_NUM_THREADS="1",
    )
    out = tmp_path / "check"
    result = subprocess.run(
        ["bash", str(root / ".ci" / "gpu_train_check.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for name in ("train", "evaluate", "predict", "step"):
        assert f"{name}: ok" in summary, summary
    assert "iterations/s" in summary and "| blocks-dense |" in summary
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "case_101.nii.gz",
        "case_102.nii.gz",
    ]
    with open(out / "step" / "training_step.csv") as file:
        rows = {row["variant"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"no-contrastive", "blocks", "balanced", "all", "blocks-dense"}
    assert rows["blocks-dense"]["loss"] == "dense" and rows["blocks"]["loss"] == "fused"
    assert all(float(row["median_step_ms"]) > 0 for row in rows.values())
    assert (
        rows["no-contrastive"]["contrastive_share"] == "" and rows["all"]["contrastive_share"] != ""
    )


def test_a_nan_loss_stops_mcsc_train_with_status_3(tmp_path, monkeypatch, capsys):
    import math

    from mcsc.training.trainer import Trainer

    contrastive_loss = Trainer.contrastive_loss

    def nan_from_iteration_1(
        self, cnn_out, swin_out, labels, cnn_logits, swin_logits, iteration, layout=None
    ):
        loss = contrastive_loss(
            self, cnn_out, swin_out, labels, cnn_logits, swin_logits, iteration, layout
        )
        return loss * math.nan if iteration >= 1 else loss

    monkeypatch.setattr(Trainer, "contrastive_loss", nan_from_iteration_1)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(tiny_yaml(tmp_path)),
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 3
    )
    error = capsys.readouterr().err
    assert "mcsc: error: iteration 2: the loss term contrast = nan" in error
    assert (
        "no checkpoint was written yet" in error
        and not (out / "checkpoints" / "latest.pt").exists()
    )


def test_a_checkpoint_that_cannot_be_written_is_an_error_naming_the_file(
    tmp_path, monkeypatch, capsys
):
    import errno

    from mcsc.training import trainer

    def disk_full(state, path, previous=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(trainer, "save_checkpoint", disk_full)
    out = tmp_path / "run"
    arguments = ["train", "--config", str(tiny_yaml(tmp_path)), "--device", "cpu"]
    assert main([*arguments, "--no-progress", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "mcsc: error:" in message and "No space left on device" in message
    assert str(out / "checkpoints") in message
