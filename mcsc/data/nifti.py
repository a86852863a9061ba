"""Any NIfTI folder in the Medical Segmentation Decathlon layout, with or without unlabelled images.

Layout::

    ROOT/imagesTr/<case>.nii.gz          (or <case>_0000.nii.gz, one file per channel, nnU-Net v2)
    ROOT/labelsTr/<case>.nii.gz          integer label maps, same shape as the image
    ROOT/imagesUnlabelled/<case>.nii.gz  optional: more images that have no label
    ROOT/dataset.json                    optional: "labels" gives the class names (and their
                                         number); file lists, below

The unlabelled cases are the images of ``imagesTr`` that have no label in ``labelsTr``, every
image of ``imagesUnlabelled``, and the images that ``dataset.json`` lists without a label: its
"training" entries without a "label", and its "test" and "unlabelled" lists (the Decathlon
lists its unlabelled test images, ``imagesTs/``, under "test"). Paths in ``dataset.json`` are
relative to ROOT. A label without its image, a folder of labels without images, or a listed
file that does not exist is an error naming it.

The nnU-Net v2 channel suffix is recognised when every image name ends in ``_`` and four digits
and no label carries such a full name; the file of channel ``data.channel`` is then the image.
A 4D image (X, Y, Z, channels) uses channel ``data.channel`` likewise.

The cases with labels are split into train/val/test by a seeded permutation (validation and
test are scored, so they need labels); the unlabelled cases all train, as ``split["unlabelled"]``.
The split is saved in the run's ``config.yaml`` (and ``split.json``) and reused by ``evaluate``.
Volumes are read with nibabel, transposed from (X, Y, Z) to (Z, X, Y) so that training sees
axial (X, Y) slices, and normalised per volume (0.5-99.5 percentile clip, then zero mean and
unit variance). Spacing comes from the header, so distances are in mm. All volumes are loaded
(and checked) at start-up.
"""

from __future__ import annotations

import gzip
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
    image_array,
    label_array,
    seeded_split,
)
from mcsc.data.transforms import normalise_like

_NII = re.compile(r"\.nii(\.gz)?$")
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")
UNLABELLED_FOLDER = "imagesUnlabelled"
DEFAULT_LABELLED_SHARE = 0.1  # of the cases with labels, when no image lacks a label


def case_name(path: Path) -> str:
    """File name without ``.nii``/``.nii.gz``."""
    return _NII.sub("", path.name)


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI files of a folder, sorted, skipping hidden files (the Decathlon's ``._*``);
    an absent folder has none."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and _NII.search(p.name) and not p.name.startswith(".")
    )


def read_nifti(path: Path) -> nib.Nifti1Image:
    """The NIfTI-1 or NIfTI-2 image of a ``.nii`` or ``.nii.gz`` file, read whole.

    A ``.gz`` file is decompressed to its end, which checks its length and checksum: nibabel
    alone stops after the bytes the header asks for, so a file cut in its last bytes would load
    without a word. Any failure raises :class:`DataError` naming the file.
    """
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        header_sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
        kind = nib.Nifti2Image if 540 in header_sizes else nib.Nifti1Image
        return kind.from_bytes(raw)
    except Exception as error:  # OSError, EOFError, zlib.error, nibabel's HeaderDataError
        raise DataError(f"{path}: cannot read NIfTI file ({error})") from error


def _voxels(nii: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxel array of an image read by :func:`read_nifti`, in its stored dtype."""
    try:
        return np.asarray(nii.dataobj)
    except Exception as error:  # a body shorter than the header says
        raise DataError(f"{path}: cannot read NIfTI file ({error})") from error


def read_image(
    path: Path, channel: int = 0, dataset: str = "nifti"
) -> tuple[np.ndarray, tuple[float, float, float], nib.Nifti1Image]:
    """Read a NIfTI image as (D, H, W) float32, normalised as ``dataset``'s training data was
    (see :func:`mcsc.data.transforms.normalise_like`), with (z, y, x) spacing.

    Returns:
        volume (Z, X, Y) float32, spacing (sz, sx, sy) in mm, the nibabel image (for its
        affine and header when writing a prediction back).
    """
    nii = read_nifti(path)
    data = image_array(_voxels(nii, path), str(path))
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
    data = label_array(_voxels(read_nifti(path), path), str(path))
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, got shape {data.shape}")
    return np.transpose(data, (2, 0, 1))


def to_nifti_order(volume: np.ndarray) -> np.ndarray:
    """Inverse of the reading transpose: (Z, X, Y) -> (X, Y, Z)."""
    return np.transpose(volume, (1, 2, 0))


def read_dataset_json(root: Path) -> dict:
    """The contents of ``root/dataset.json``; ``{}`` when there is none."""
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read JSON ({error})") from error
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


def dataset_class_names(document: dict, path: Path) -> list[str] | None:
    """Class names (background first) from a ``dataset.json``'s "labels", or None if absent.

    Accepts the Decathlon form {"0": "background", "1": "liver"} and the nnU-Net v2 form
    {"background": 0, "liver": 1}.
    """
    labels = document.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise DataError(f"{path}: 'labels' must be an object, got {type(labels).__name__}")
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


def dataset_lists(document: dict, root: Path) -> list[tuple[Path, Path | None]]:
    """(image, label or None) for every file a ``dataset.json`` lists, each checked to exist.

    "training" entries are {"image": path, "label": path} (label optional); "test" and
    "unlabelled" (or "unlabeled") entries are paths or {"image": path}.
    """
    path = root / "dataset.json"
    listed = []
    for key in ("training", "test", "unlabelled", "unlabeled"):
        entries = document.get(key, [])
        if not isinstance(entries, list):
            raise DataError(f"{path}: {key!r} must be a list, got {type(entries).__name__}")
        for entry in entries:
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise DataError(f"{path}: {key!r} entry {entry!r} has no image path")
            label = entry.get("label") if key == "training" else None
            if label is not None and not isinstance(label, str):
                raise DataError(f"{path}: {key!r} entry {entry!r}: the label must be a path")
            files = [root / entry["image"]] + ([root / label] if label else [])
            for file in files:
                if not file.is_file():
                    raise DataError(f"{file}: listed in {path} but not found")
            listed.append((files[0], files[1] if label else None))
    return listed


def _by_case(files: list[Path], channel: int, suffixed: bool) -> dict[str, Path]:
    """Case name -> image file; with the channel suffix, the file of ``channel`` per case."""
    if not suffixed:
        return {case_name(p): p for p in files}
    channels: dict[str, dict[int, Path]] = {}
    for path in files:
        match = _CHANNEL_SUFFIX.search(case_name(path))
        channels.setdefault(case_name(path)[: match.start()], {})[int(match.group(1))] = path
    cases = {}
    for name, files_of_case in channels.items():
        if channel not in files_of_case:
            raise DataError(
                f"{next(iter(files_of_case.values()))}: case {name} has no channel {channel} "
                f"file {name}_{channel:04d}.nii.gz"
            )
        cases[name] = files_of_case[channel]
    return cases


def find_cases(
    root: Path, channel: int, document: dict
) -> tuple[dict[str, tuple[Path, Path]], dict[str, Path]]:
    """The cases of a folder: (name -> (image, label) with labels, name -> image without).

    ``document`` is the folder's ``dataset.json`` (``{}`` when absent). Raises
    :class:`DataError` naming the file for a label without its image, a folder of labels
    without images, two different images of one case name, or no label at all.
    """
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    labels = nifti_files(labels_dir)
    training, extra = nifti_files(images_dir), nifti_files(root / UNLABELLED_FOLDER)
    if labels and not training:
        raise DataError(
            f"{images_dir}: no images, but {labels_dir} holds {len(labels)} labels "
            f"({labels[0].name}, ...)"
        )
    names = {case_name(p) for p in training + extra}
    suffixed = (
        bool(names)
        and all(_CHANNEL_SUFFIX.search(n) for n in names)
        and not (names & {case_name(p) for p in labels})
    )
    unpaired = _by_case(training, channel, suffixed)
    labelled: dict[str, tuple[Path, Path]] = {}
    for label in labels:
        name = case_name(label)
        if name not in unpaired:
            raise DataError(f"{label}: a label without its image ({name}.nii.gz in {images_dir})")
        labelled[name] = (unpaired.pop(name), label)
    unlabelled: dict[str, Path] = {}
    for name, image in list(unpaired.items()) + list(_by_case(extra, channel, suffixed).items()):
        _check_new_case(name, image, labelled, unlabelled)
        unlabelled[name] = image
    labelled_images = {pair[0].resolve() for pair in labelled.values()}
    unlabelled_images = {path.resolve(): name for name, path in unlabelled.items()}
    for image, label in dataset_lists(document, root):
        resolved = image.resolve()
        if resolved in labelled_images or (label is None and resolved in unlabelled_images):
            continue  # found in the folders already
        name = unlabelled_images.pop(resolved, None)
        if name is None:
            name = case_name(image)
            _check_new_case(name, image, labelled, unlabelled)
        else:  # an image of the folders without a label there, whose label the list gives
            del unlabelled[name]
        if label is None:
            unlabelled[name], unlabelled_images[resolved] = image, name
        else:
            labelled[name] = (image, label)
            labelled_images.add(resolved)
    if not labelled:
        raise DataError(
            f"{labels_dir}: no NIfTI label files found (training needs at least one labelled case)"
        )
    return labelled, unlabelled


def _check_new_case(name: str, image: Path, labelled: dict, unlabelled: dict) -> None:
    """Raise :class:`DataError` if another file already has the case name ``name``."""
    other = unlabelled.get(name) or (labelled[name][0] if name in labelled else None)
    if other is not None:
        raise DataError(f"{image}: case name {name} is also the name of {other}")


def build_nifti(
    root: str | Path,
    labelled: int | None,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    split: dict[str, list[str]] | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    channel: int = 0,
) -> DataBundle:
    """Load and check every case of a Decathlon-style folder; split seeded by ``seed``.

    Args:
        labelled: how many training cases with labels training may use the labels of (the
            first in split order). None: all of them when the folder has images without
            labels, else 10 % (at least one), the usual semi-supervised benchmark setting.
        split: a saved split (train/val/test, and unlabelled) to reuse instead of drawing one.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: NIfTI folder not found")
    document = read_dataset_json(root)
    labelled_files, unlabelled_files = find_cases(root, channel, document)
    class_names = class_names or dataset_class_names(document, root / "dataset.json")
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    volumes = {}
    for name, (image_path, label_path) in labelled_files.items():
        image, spacing, _ = read_image(image_path, channel)
        image, label = check_pair(
            image, read_label(label_path), num_classes, f"{label_path} (with {image_path})"
        )
        volumes[name] = Volume(name, image, label, spacing)
    if num_classes is None:
        num_classes = int(max(v.label.max() for v in volumes.values())) + 1
    if class_names is None:
        class_names = ["background"] + [f"class_{c}" for c in range(1, num_classes)]
    if len(class_names) != num_classes:
        raise DataError(f"{root}: {len(class_names)} class names for {num_classes} classes")
    split = _resolve_split(root, split, volumes, unlabelled_files, fractions, seed)
    images_without_labels = {
        name: read_image(unlabelled_files[name], channel)[0] for name in split["unlabelled"]
    }

    images, labels, slice_cases = [], [], []
    for name in split["train"]:
        volume = volumes[name]
        images.extend(volume.image)
        labels.extend(volume.label)
        slice_cases.extend([name] * len(volume.image))
    for name, image in images_without_labels.items():
        images.extend(image)
        labels.extend([None] * len(image))
        slice_cases.extend([name] * len(image))
    if labelled is None and not images_without_labels:  # else all cases with labels
        labelled = max(1, round(DEFAULT_LABELLED_SHARE * len(split["train"])))

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


def _resolve_split(
    root: Path,
    split: dict[str, list[str]] | None,
    volumes: dict,
    unlabelled: dict,
    fractions: tuple[float, float, float],
    seed: int,
) -> dict[str, list[str]]:
    """A new seeded split of the cases with labels, or the saved ``split`` checked against the
    folder; "unlabelled" lists the images without labels (all of them, for a new split)."""
    if split is None:
        split = seeded_split(list(volumes), fractions, seed)
        split["unlabelled"] = sorted(unlabelled)
        return split
    split = {part: list(names) for part, names in split.items()}
    split.setdefault("unlabelled", sorted(unlabelled))  # a split saved before unlabelled images
    for part in ("train", "val", "test"):
        for name in split.get(part, []):
            if name not in volumes:
                why = "has no label" if name in unlabelled else "not found"
                raise DataError(f"{root}: case {name} of the saved {part} split {why}")
    missing = [name for name in split["unlabelled"] if name not in unlabelled]
    if missing:
        raise DataError(f"{root}: unlabelled images of the saved split not found: {missing[:5]}")
    return split
