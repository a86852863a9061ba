"""Any NIfTI folder in the Medical Segmentation Decathlon layout.

Layout::

    ROOT/imagesTr/<case>.nii.gz        (or <case>_0000.nii.gz, one file per channel, nnU-Net v2)
    ROOT/labelsTr/<case>.nii.gz        integer label maps, same shape as the image
    ROOT/dataset.json                  optional: "labels" gives class names (and their number)

A 4D image (X, Y, Z, channels) uses channel ``data.channel``. Cases are split into
train/val/test by a seeded permutation; the split is saved in the run's ``config.yaml`` (and
``split.json``) and reused by ``evaluate``. Volumes are read with nibabel, transposed from
(X, Y, Z) to (Z, X, Y) so that training sees axial (X, Y) slices, and normalised per volume
(0.5-99.5 percentile clip, then zero mean and unit variance). Spacing comes from the header,
so distances are in mm. All volumes are loaded (and checked) at start-up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from mcsc.data.base import (
    ArraySlices,
    DataBundle,
    DataError,
    Volume,
    VolumeSource,
    check_pair,
    first_cases,
    seeded_split,
)
from mcsc.data.transforms import normalise_like

_NII = re.compile(r"\.nii(\.gz)?$")


def case_name(path: Path) -> str:
    """File name without ``.nii``/``.nii.gz``."""
    return _NII.sub("", path.name)


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI files of a folder, sorted, skipping hidden files (the Decathlon's ``._*``)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and _NII.search(p.name) and not p.name.startswith(".")
    )


def read_image(path: Path, channel: int = 0, dataset: str = "nifti"
               ) -> tuple[np.ndarray, tuple[float, float, float], nib.Nifti1Image]:
    """Read a NIfTI image as (D, H, W) float32, normalised as ``dataset``'s training data was
    (see :func:`mcsc.data.transforms.normalise_like`), with (z, y, x) spacing.

    Returns:
        volume (Z, X, Y) float32, spacing (sz, sx, sy) in mm, the nibabel image (for its
        affine and header when writing a prediction back).
    """
    try:
        nii = nib.load(str(path))
        data = np.asarray(nii.dataobj, dtype=np.float32)
    except Exception as error:
        raise DataError(f"{path}: cannot read NIfTI file ({error})") from error
    if data.ndim == 4:
        if channel >= data.shape[3]:
            raise DataError(f"{path}: channel {channel} requested, image has {data.shape[3]}")
        data = data[..., channel]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D (or 4D) image, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    zooms = [float(z) for z in nii.header.get_zooms()[:3]] + [1.0] * 3
    spacing = (zooms[2], zooms[0], zooms[1])
    return normalise_like(np.transpose(data, (2, 0, 1)), dataset), spacing, nii


def read_label(path: Path) -> np.ndarray:
    """Read a NIfTI label map as (Z, X, Y) int64; non-integer values are an error."""
    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as error:
        raise DataError(f"{path}: cannot read NIfTI file ({error})") from error
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, got shape {data.shape}")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise DataError(f"{path}: label map has non-integer values")
    return np.transpose(rounded.astype(np.int64), (2, 0, 1))


def to_nifti_order(volume: np.ndarray) -> np.ndarray:
    """Inverse of the reading transpose: (Z, X, Y) -> (X, Y, Z)."""
    return np.transpose(volume, (1, 2, 0))


def read_dataset_json(root: Path) -> list[str] | None:
    """Class names (background first) from ``dataset.json``'s "labels", or None if absent.

    Accepts the Decathlon form {"0": "background", "1": "liver"} and the nnU-Net v2 form
    {"background": 0, "liver": 1}.
    """
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())["labels"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: cannot read 'labels' ({error})") from error
    pairs = {}
    for key, value in labels.items():
        if str(key).isdigit():
            pairs[int(key)] = str(value)
        elif isinstance(value, int):
            pairs[value] = str(key)
        else:
            raise DataError(f"{path}: cannot interpret label entry {key!r}: {value!r}")
    if sorted(pairs) != list(range(len(pairs))):
        raise DataError(f"{path}: label values must be 0..C-1, found {sorted(pairs)}")
    return [pairs[i] for i in range(len(pairs))]


def find_cases(root: Path, channel: int) -> dict[str, tuple[Path, Path]]:
    """Map case name -> (image path, label path) for every label in ``labelsTr``."""
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (expected the Decathlon layout)")
    labels = nifti_files(labels_dir)
    if not labels:
        raise DataError(f"{labels_dir}: no NIfTI label files found")
    images = {case_name(p): p for p in nifti_files(images_dir)}
    cases = {}
    for label in labels:
        name = case_name(label)
        image = images.get(name) or images.get(f"{name}_{channel:04d}")
        if image is None:
            raise DataError(f"{label}: no matching image {name}.nii.gz in {images_dir}")
        cases[name] = (image, label)
    return cases


def build_nifti(
    root: str | Path,
    labelled: int,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    split: dict[str, list[str]] | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    channel: int = 0,
) -> DataBundle:
    """Load and check every case of a Decathlon-style folder; split seeded by ``seed``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: NIfTI folder not found")
    cases = find_cases(root, channel)
    class_names = class_names or read_dataset_json(root)
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    volumes = {}
    for name, (image_path, label_path) in cases.items():
        image, spacing, _ = read_image(image_path, channel)
        label = read_label(label_path)
        check_pair(image, label, num_classes, f"{label_path} (with {image_path})")
        volumes[name] = Volume(name, image, label, spacing)
    if num_classes is None:
        num_classes = int(max(v.label.max() for v in volumes.values())) + 1
    if class_names is None:
        class_names = ["background"] + [f"class_{c}" for c in range(1, num_classes)]
    if len(class_names) != num_classes:
        raise DataError(f"{root}: {len(class_names)} class names for {num_classes} classes")
    if split is None:
        split = seeded_split(list(volumes), fractions, seed)
    else:
        missing = [n for part in split.values() for n in part if n not in volumes]
        if missing:
            raise DataError(f"{root}: cases of the saved split not found: {missing[:5]}")

    images, labels, slice_cases = [], [], []
    for name in split["train"]:
        volume = volumes[name]
        for z in range(volume.image.shape[0]):
            images.append(volume.image[z])
            labels.append(volume.label[z])
            slice_cases.append(name)

    def source(name: str) -> VolumeSource:
        return VolumeSource(name, lambda: volumes[name])

    return DataBundle(
        kind="nifti",
        num_classes=num_classes,
        class_names=list(class_names),
        train=ArraySlices(images, labels, slice_cases),
        labelled_cases=first_cases(split["train"], labelled, f"the NIfTI folder {root}"),
        val=[source(n) for n in split["val"]],
        test=[source(n) for n in split["test"]],
        split=split,
    )
