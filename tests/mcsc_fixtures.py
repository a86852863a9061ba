"""Tiny generated datasets in every supported layout, and a tiny training configuration."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from mcsc.training.config import Config, preset


def blob_volume(rng: np.random.Generator, shape=(4, 16, 16), classes: int = 4):
    """(image float32, label int64) with one square per foreground class, brighter per class."""
    label = np.zeros(shape, np.int64)
    for c in range(1, classes):
        y, x = rng.integers(0, shape[1] - 4), rng.integers(0, shape[2] - 4)
        label[:, y : y + 4, x : x + 4] = c
    image = (label * 0.3 + rng.normal(0, 0.05, shape)).astype(np.float32)
    return image, label


def make_acdc(root: Path, patients: int = 4, depth: int = 3, size: int = 16) -> Path:
    """SSL4MIS layout: patients 1..patients-2 train, then one val and one test patient."""
    rng = np.random.default_rng(0)
    (root / "data" / "slices").mkdir(parents=True)
    train_slices, val, test = [], [], []
    for p in range(1, patients + 1):
        name = f"patient{p:03d}_frame01"
        image, label = blob_volume(rng, (depth, size, size))
        with h5py.File(root / "data" / f"{name}.h5", "w") as f:
            f["image"], f["label"] = image, label.astype(np.uint8)
        if p <= patients - 2:
            for k in range(depth):
                with h5py.File(root / "data" / "slices" / f"{name}_slice_{k}.h5", "w") as f:
                    f["image"], f["label"] = image[k], label[k].astype(np.uint8)
                train_slices.append(f"{name}_slice_{k}")
        else:
            (val if p == patients - 1 else test).append(name)
    (root / "train_slices.list").write_text("\n".join(train_slices) + "\n")
    (root / "val.list").write_text("\n".join(val) + "\n")
    (root / "test.list").write_text("\n".join(test) + "\n")
    return root


def make_synapse(root: Path, cases: int = 3, depth: int = 3, size: int = 16) -> Path:
    """TransUNet layout with 9 classes: train_npz slices of ``cases`` cases, two test volumes."""
    rng = np.random.default_rng(1)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir(parents=True)
    for c in range(cases):
        image, label = blob_volume(rng, (depth, size, size), classes=9)
        for k in range(depth):
            np.savez(
                root / "train_npz" / f"case{c:04d}_slice{k:03d}.npz", image=image[k], label=label[k]
            )
    for c in range(2):
        image, label = blob_volume(rng, (depth, size, size), classes=9)
        with h5py.File(root / "test_vol_h5" / f"case{100 + c:04d}.npy.h5", "w") as f:
            f["image"], f["label"] = image, label.astype(np.float32)
    return root


def write_nifti(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 3.0)) -> None:
    """Save an (X, Y, Z[, C]) array with the given voxel size."""
    affine = np.diag(list(spacing) + [1.0])
    image = nib.Nifti1Image(array, affine)
    image.header.set_zooms(tuple(spacing) + (1.0,) * (array.ndim - 3))
    nib.save(image, str(path))


def make_nifti(
    root: Path, cases: int = 5, shape=(16, 16, 4), dataset_json: bool = True, four_d: bool = False
) -> Path:
    """Decathlon layout; labels 0..3; optionally 4D (2-channel) images."""
    rng = np.random.default_rng(2)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    for c in range(cases):
        image, label = blob_volume(rng, (shape[2], shape[0], shape[1]))
        image = np.transpose(image, (1, 2, 0)) * 100 + 50
        label = np.transpose(label, (1, 2, 0)).astype(np.uint8)
        if four_d:
            image = np.stack([image, -image], axis=-1)
        write_nifti(root / "imagesTr" / f"case_{c:03d}.nii.gz", image.astype(np.float32))
        write_nifti(root / "labelsTr" / f"case_{c:03d}.nii.gz", label)
    if dataset_json:
        labels = {"0": "background", "1": "alpha", "2": "beta", "3": "gamma"}
        (root / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": labels}))
    return root


def make_raw_acdc(root: Path, patients: int = 5, shape=(16, 16, 3)) -> Path:
    """Raw ACDC challenge layout: patientXXX/patientXXX_frameYY.nii.gz and ..._gt.nii.gz."""
    rng = np.random.default_rng(3)
    for p in range(1, patients + 1):
        folder = root / "training" / f"patient{p:03d}"
        folder.mkdir(parents=True)
        for frame in (1, 12):
            image, label = blob_volume(rng, (shape[2], shape[0], shape[1]))
            name = f"patient{p:03d}_frame{frame:02d}"
            write_nifti(
                folder / f"{name}.nii.gz",
                np.transpose(image, (1, 2, 0)) * 300,
                spacing=(1.4, 1.4, 10.0),
            )
            write_nifti(
                folder / f"{name}_gt.nii.gz",
                np.transpose(label, (1, 2, 0)).astype(np.uint8),
                spacing=(1.4, 1.4, 10.0),
            )
    return root


def tiny_config(method: str = "mcsc", iterations: int = 3) -> Config:
    """A configuration that trains in about a second: 32x32 synthetic slices, tiny networks."""
    config = preset("synthetic")
    config.data.synthetic_cases = 6
    config.data.synthetic_size = 32
    config.data.synthetic_depth = 4
    config.data.labeled = 2
    config.data.patch_size = 32
    config.model.unet_channels = [4, 8, 16, 32]
    config.model.unet_dropout = [0.0, 0.1, 0.2, 0.3]
    config.model.swin_embed_dim = 8
    config.model.swin_depths = [1, 1]
    config.model.swin_heads = [1, 2]
    config.model.projection_hidden = 8
    config.model.projection_out = 8
    config.loss.contrastive_strides = [1, 4]
    config.loss.contrastive_block_sizes = [8, 2]
    config.loss.contrastive_pixels_per_class = 8
    config.loss.labelled_only_until = 2
    config.train.method = method
    config.train.iterations = iterations
    config.train.batch_size = 4
    config.train.labeled_batch_size = 2
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.device = "cpu"
    config.train.threads = 1
    return config
