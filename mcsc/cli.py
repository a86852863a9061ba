"""The ``mcsc`` command line: ``train``, ``evaluate``, ``predict`` and ``prepare``.

Run ``mcsc <command> --help`` for the options. ``mcsc train --out runs/demo`` with nothing else
trains the CPU demo on the built-in synthetic dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DESCRIPTION = "Semi-supervised medical image segmentation with MCSC (U-Net + Swin-UNet)."


def _parser() -> argparse.ArgumentParser:
    from mcsc.training.config import DATASETS, METHODS, RECIPES

    parser = argparse.ArgumentParser(prog="mcsc", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a U-Net and a Swin-UNet together, then test",
        description="Train (without --data: the built-in synthetic dataset and the small recipe "
        "of the CPU demo), then evaluate the best checkpoint on the test split.",
        epilog="SIGTERM, SIGUSR1 and SIGINT (train.stop_signals) finish the current step, write "
        "OUT/checkpoints/latest.pt and stop. Exit status: 0 done; 2 bad input or a file that "
        "cannot be written; 3 a NaN/inf loss; 4 a lost rank or data loader worker, or a "
        "collective timeout; 75 stopped by SIGTERM/SIGUSR1 (checkpoint written: run the same "
        "command with --resume auto); 130 stopped by Ctrl-C (likewise).",
    )
    train.add_argument("--data", help="dataset folder (ACDC, Synapse or NIfTI layout)")
    train.add_argument(
        "--dataset",
        choices=DATASETS,
        help="dataset format (inferred from the folder where possible)",
    )
    train.add_argument(
        "--recipe",
        choices=RECIPES,
        help="networks and schedule: paper (224x224, 40k iterations, for a GPU) or "
        "small (the CPU demo's); default paper for a dataset folder, small "
        "for the synthetic data",
    )
    train.add_argument("--labeled", type=int, help="number of labelled cases (patients/volumes)")
    train.add_argument("--method", choices=METHODS, help="training method (default mcsc)")
    train.add_argument("--iterations", type=int, help="training iterations")
    train.add_argument("--config", help="YAML file overriding the recipe and dataset defaults")
    train.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    train.add_argument("--seed", type=int, help="training seed")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any configuration value (repeatable), e.g. train.lr=1e-3",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="required",
        choices=("auto", "required"),  # bare --resume is "required"
        metavar="auto",
        help="--resume: continue from OUT/checkpoints/latest.pt exactly where it stopped, with "
        "its configuration; --resume auto: continue when that checkpoint exists and belongs to "
        "this run (same configuration and data), else start fresh (the same command works for "
        "every restart; also MCSC_RESUME=auto or train.resume: auto)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--out", required=True, help="run folder")

    evaluate = commands.add_parser(
        "evaluate",
        help="score a checkpoint on a split",
        description="Dice, HD95 and ASD per class on the test (or val) split of the data the "
        "checkpoint was trained on (or of --data, in the same layout).",
    )
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", help="dataset folder (default: the one in the checkpoint)")
    evaluate.add_argument("--split", default="test", choices=("test", "val"))
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--out", required=True)

    predict = commands.add_parser(
        "predict",
        help="segment NIfTI volumes",
        description="Segment a NIfTI file or every NIfTI file of a folder; writes label maps "
        "OUT/<name>.nii.gz with the input's affine.",
    )
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("--input", required=True, help="a .nii/.nii.gz file or a folder of them")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--out", required=True)

    prepare = commands.add_parser("prepare", help="convert raw data to a training layout")
    prepare.add_argument("dataset", choices=("acdc",))
    prepare.add_argument("raw_dir", help="raw ACDC folder (patientXXX/patientXXX_frameYY.nii.gz)")
    prepare.add_argument("out_dir", help="output folder in the SSL4MIS layout")
    prepare.add_argument("--seed", type=int, default=1337, help="seed of the patient split")
    return parser


def resolve_train_config(args: argparse.Namespace):
    """The resolved :class:`Config` of ``mcsc train`` (recipe and dataset, then --config, then flags)."""
    from mcsc.data import infer_dataset
    from mcsc.training.checkpoint import load_checkpoint
    from mcsc.training.config import Config, load_yaml, preset
    from mcsc.training.resilience import load_newest

    if args.resume == "required":
        folder = Path(args.out) / "checkpoints"
        path, state, notes = load_newest(folder)
        if path is None:  # the reason: unreadable files, or none at all
            load_checkpoint(folder / "latest.pt")
            raise ValueError("; ".join(notes))
        config = Config.from_dict(state["config"], str(path))
        if args.iterations is not None:
            config.train.iterations = args.iterations
        if args.device is not None:
            config.train.device = args.device
        return config
    file_values = load_yaml(args.config) if args.config else {}
    dataset = (
        args.dataset
        or file_values.get("data", {}).get("dataset")
        or (infer_dataset(args.data) if args.data else "synthetic")
    )
    config = preset(dataset, args.recipe or file_values.get("recipe"))
    file_values = {key: value for key, value in file_values.items() if key != "recipe"}
    config.update(file_values, args.config or "configuration")
    config.data.dataset = dataset
    if args.data is not None:
        config.data.path = str(Path(args.data).resolve())
    for flag, section, key in (
        ("labeled", "data", "labeled"),
        ("method", "train", "method"),
        ("iterations", "train", "iterations"),
        ("device", "train", "device"),
        ("seed", "train", "seed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(config, section), key, value)
    if os.environ.get("MCSC_RESUME"):  # the environment, then the command line
        config.set(f"train.resume={os.environ['MCSC_RESUME']}")  # checked like the file's value
    for assignment in args.set:
        config.set(assignment)
    if args.resume == "auto":
        config.train.resume = "auto"
    config.validate()
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from mcsc.training.distributed import destroy_distributed, init_distributed
    from mcsc.training.resilience import EXIT_FAULT, TrainingFault, TrainingStopped, has_checkpoint
    from mcsc.training.trainer import NonFiniteLossError, Trainer

    config = resolve_train_config(args)
    resume = "required" if args.resume == "required" else config.train.resume
    folder = Path(args.out) / "checkpoints"
    if resume == "no" and has_checkpoint(folder):
        raise ValueError(
            f"{folder / 'latest.pt'} exists: pass --resume (or --resume auto) to continue, or "
            f"use another --out"
        )
    # this command owns the process group of a torchrun job: it starts and ends it
    context = init_distributed(
        config.train.device, timeout_minutes=config.train.collective_timeout_minutes
    )
    try:
        summary = Trainer(
            config, args.out, resume=resume, progress=not args.no_progress, context=context
        ).fit()
    except NonFiniteLossError as error:  # the run diverged: not a usage error (status 2)
        print(f"mcsc: error: {error}", file=sys.stderr)
        return 3
    except TrainingStopped as stop:  # a polite stop: the checkpoint is written
        if context.is_main:
            print(f"mcsc: {stop}", file=sys.stderr, flush=True)
        return stop.status
    except TrainingFault as error:
        print(f"mcsc: error: {error}", file=sys.stderr, flush=True)
        return EXIT_FAULT
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint
        print("mcsc: interrupted twice: stopped without a checkpoint", file=sys.stderr)
        return 130
    finally:
        destroy_distributed()
    if not summary:  # a rank > 0 of a torchrun job: rank 0 reports
        return 0
    print(
        f"mean Dice {summary['mean_dice']:.4f}, mean HD95 {summary['mean_hd95']:.3f} "
        f"{summary['unit']}; outputs in {args.out}"
    )
    return 0


def _load_trained(checkpoint: str, device_name: str):
    """(config, models on device, device) rebuilt from a checkpoint."""
    from mcsc.training.checkpoint import load_checkpoint
    from mcsc.training.config import Config
    from mcsc.training.distributed import resolve_device
    from mcsc.training.trainer import build_models

    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"], checkpoint)
    device = resolve_device(device_name)
    models = build_models(config, config.data.num_classes)
    for name, model in models.items():
        model.load_state_dict(state["models"][name])
        model.to(device).eval()
    return config, models, device, state


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mcsc.data import build_data
    from mcsc.evaluation.inference import evaluate_volumes, save_prediction_figure
    from mcsc.training.trainer import evaluation_models, write_metrics

    config, models, device, state = _load_trained(args.checkpoint, args.device)
    if args.data is not None:
        config.data.path = str(Path(args.data).resolve())
    data = build_data(config.data)
    volumes = data.test if args.split == "test" else data.val
    if not volumes:
        raise ValueError(f"the {config.data.dataset} data has no {args.split} split")
    amp = config.train.amp and device.type == "cuda"
    summary, kept = evaluate_volumes(
        evaluation_models(models, config.train.eval_network),
        volumes,
        data.num_classes,
        data.class_names,
        config.data.patch_size,
        device,
        amp,
        keep_predictions=4,
    )
    summary.update(
        {
            "split": args.split,
            "method": config.train.method,
            "network": config.train.eval_network,
            "checkpoint": str(args.checkpoint),
            "checkpoint_iteration": int(state["iteration"]),
        }
    )
    out = Path(args.out)
    write_metrics(summary, out)
    save_prediction_figure(out / "predictions.png", kept, data.num_classes)
    print(f"{args.split} split ({len(volumes)} volumes, distances in {summary['unit']}):")
    print(summary["table"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from mcsc.data.base import DataError
    from mcsc.data.nifti import case_name, nifti_files, read_image, to_nifti_order
    from mcsc.evaluation.inference import predict_volume
    from mcsc.training.trainer import evaluation_models

    config, models, device, _ = _load_trained(args.checkpoint, args.device)
    source = Path(args.input)
    if source.is_dir():
        files = nifti_files(source)
        if not files:
            raise DataError(f"{source}: no NIfTI files found")
    elif source.is_file():
        files = [source]
    else:
        raise DataError(f"{source}: input not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = evaluation_models(models, config.train.eval_network)
    amp = config.train.amp and device.type == "cuda"
    for path in files:
        image, _, nii = read_image(path, config.data.channel, config.data.dataset)
        prediction = predict_volume(chosen, image, config.data.patch_size, device, amp=amp)
        labels = to_nifti_order(prediction).astype(
            np.uint8 if config.data.num_classes < 256 else np.int16
        )
        result = nib.Nifti1Image(labels, nii.affine)
        result.set_qform(*nii.get_qform(coded=True))
        result.set_sform(*nii.get_sform(coded=True))
        target = out / f"{case_name(path)}.nii.gz"
        nib.save(result, str(target))
        print(f"{path} -> {target}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mcsc.data import prepare_acdc

    counts = prepare_acdc(args.raw_dir, args.out_dir, seed=args.seed)
    print(
        f"wrote {counts['volumes']} volumes of {counts['patients']} patients "
        f"({counts['train_slices']} training slices) to {args.out_dir}"
    )
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "prepare": cmd_prepare,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mcsc`` and ``python -m mcsc``; returns the exit status.

    Bad data, configuration or paths, and a file that cannot be written (disk full, no
    permission), print ``mcsc: error: <message naming the file>`` and return 2. ``train``
    also returns 3 (a NaN/inf loss), 4 (a lost rank or data loader worker, a collective
    timeout), 75 (stopped by SIGTERM/SIGUSR1 after writing its checkpoint) and 130 (Ctrl-C).
    """
    from mcsc.dependencies import training_packages_problem

    problem = training_packages_problem()
    if problem:
        print(f"mcsc: error: {problem}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as error:
        print(f"mcsc: error: {error}", file=sys.stderr)
        return 2
