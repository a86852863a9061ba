"""Common data types: volumes for evaluation, slice tables for training, the dataset bundle.

Conventions: a volume is (D, H, W) with D the slicing axis; 2D training works on its (H, W)
slices. Images are float32, labels int64 with values in [0, num_classes). Spacing is
(z, y, x) in millimetres, or None where the format does not record it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcsc.data.transforms import augment, resize_image, resize_label


class DataError(ValueError):
    """Bad or missing data; the message names the offending file or folder."""


@dataclass
class Volume:
    """One 3D case.

    Attributes:
        name: case name (file stem).
        image: (D, H, W) float32, already normalised the way training saw it.
        label: (D, H, W) int64 or None.
        spacing: (z, y, x) voxel size in mm, or None if unknown.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float] | None = None


@dataclass
class VolumeSource:
    """A lazily loaded volume: ``load()`` reads it (large test sets do not fit in memory)."""

    name: str
    loader: Callable[[], Volume]

    def load(self) -> Volume:
        return self.loader()


class SliceTable:
    """The 2D training slices of a dataset, each tagged with its case (patient/volume) name.

    Subclasses implement ``get(i) -> (image (H, W) float32, label (H, W) int64)``.
    """

    def __init__(self, cases: list[str]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class ArraySlices(SliceTable):
    """Slices held in memory (synthetic data, NIfTI volumes loaded at start-up).

    A label of None marks a slice of an image that has no label; ``get`` returns zeros for it
    (the sampler only draws such slices as unlabelled, so the zeros are never trained on).
    """

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray | None], cases: list[str]):
        super().__init__(cases)
        self.images = images
        self.labels = labels

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.images[index], self.labels[index]
        return image, np.zeros(image.shape, np.int64) if label is None else label


class FileSlices(SliceTable):
    """Slices stored one per file (ACDC ``.h5``, Synapse ``.npz``), read on demand."""

    def __init__(self, paths: list[Path], cases: list[str], reader: Callable):
        super().__init__(cases)
        self.paths = list(paths)
        self.reader = reader

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.paths[index]
        image, label = self.reader(path)
        # check_files checked every slice at start-up: convert only, on the loader's hot path
        return image_array(image, str(path)), label_array(label, str(path))


@dataclass
class DataBundle:
    """Everything the trainer needs from a dataset.

    Attributes:
        kind: "synthetic" | "acdc" | "synapse" | "nifti".
        num_classes: number of classes including background.
        class_names: names of all classes, background first.
        train: all training slices (labelled and unlabelled).
        labelled_cases: names of the cases whose labels training may use.
        val, test: volumes for validation and testing (val may be empty).
        split: case names per split, where the split was drawn here (saved with the run).
    """

    kind: str
    num_classes: int
    class_names: list[str]
    train: SliceTable
    labelled_cases: list[str]
    val: list[VolumeSource]
    test: list[VolumeSource]
    split: dict[str, list[str]] = field(default_factory=dict)

    def labelled_indices(self) -> list[int]:
        """Indices into ``train`` of the slices of labelled cases."""
        chosen = set(self.labelled_cases)
        return [i for i, case in enumerate(self.train.cases) if case in chosen]

    def unlabelled_indices(self) -> list[int]:
        """Indices into ``train`` of the slices of the other cases (labels never used)."""
        chosen = set(self.labelled_cases)
        return [i for i, case in enumerate(self.train.cases) if case not in chosen]

    def describe(self) -> str:
        """One line of case counts: labelled and unlabelled training cases, validation, test.

        Unlabelled training cases are those of the cases with labels beyond the labelled
        subset, plus the images that have no label (``split["unlabelled"]``).
        """
        training = list(dict.fromkeys(self.train.cases))
        without_labels = len(self.split.get("unlabelled", []))
        unlabelled = len(training) - len(self.labelled_cases)
        origin = f" ({without_labels} of them images without labels)" if without_labels else ""
        return (
            f"{self.kind} data: {len(self.labelled_cases)} labelled and {unlabelled} unlabelled "
            f"training cases{origin}, {len(self.val)} validation and {len(self.test)} test cases"
        )


def first_cases(cases_in_order: list[str], count: int | None, what: str) -> list[str]:
    """The first ``count`` distinct case names in order of appearance (the labelled subset).

    ``count`` None keeps them all.
    """
    unique = list(dict.fromkeys(cases_in_order))
    if count is None:
        count = len(unique)
    if count < 1 or count > len(unique):
        raise DataError(
            f"{count} labelled cases asked for: {what} has {len(unique)} training cases with labels"
        )
    return unique[:count]


def seeded_split(
    cases: list[str], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[str]]:
    """Split case names into train/val/test by a seeded permutation.

    Each of val and test gets at least one case (when there are at least three cases);
    train gets the rest. The result is sorted within each split.
    """
    cases = sorted(cases)
    if len(cases) < 3:
        raise DataError(f"need at least 3 cases to split into train/val/test, found {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    total = sum(fractions)
    n_test = max(1, round(len(cases) * fractions[2] / total))
    n_val = max(1, round(len(cases) * fractions[1] / total)) if fractions[1] > 0 else 0
    n_test = min(n_test, len(cases) - n_val - 1)
    picked = [cases[i] for i in order]
    return {
        "test": sorted(picked[:n_test]),
        "val": sorted(picked[n_test : n_test + n_val]),
        "train": sorted(picked[n_test + n_val :]),
    }


def image_array(values, where: str) -> np.ndarray:
    """``values`` as a float32 image; an empty array or a dtype that is not real numbers raises
    :class:`DataError` naming ``where`` (a complex image would silently lose its imaginary
    part)."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise DataError(f"{where}: image has dtype {values.dtype}, expected real numbers")
    if values.size == 0:
        raise DataError(f"{where}: empty image of shape {values.shape}")
    return values.astype(np.float32, copy=False)


def label_array(values, where: str) -> np.ndarray:
    """``values`` as an int64 label map; raises :class:`DataError` naming ``where`` for a dtype
    that is not numbers, or for float values that are not whole numbers (NaN included): casting
    1.5 to 1 would train on a class nobody drew."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise DataError(f"{where}: label has dtype {values.dtype}, expected integers")
    if values.dtype.kind == "f":
        if not np.array_equal(np.rint(values), values):
            raise DataError(f"{where}: label map has non-integer values")
        if values.size and np.abs(values).max() >= 2**31:
            raise DataError(f"{where}: label value {float(np.abs(values).max()):g} out of range")
    return values.astype(np.int64, copy=False)


def check_pair(
    image, label, num_classes: int | None, where: str, ndim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """An image and its label map converted and checked; :class:`DataError` names ``where``.

    Args:
        image: array of real numbers; returned as float32, which must be finite.
        label: array of whole numbers; returned as int64, in [0, num_classes) (only >= 0 when
            ``num_classes`` is None).
        ndim: the number of dimensions both must have (None: any).
    """
    image, label = image_array(image, where), label_array(label, where)
    if ndim is not None and image.ndim != ndim:
        raise DataError(f"{where}: expected {ndim}D arrays, got shape {image.shape}")
    if image.shape != label.shape:
        raise DataError(f"{where}: image shape {image.shape} != label shape {label.shape}")
    if label.min() < 0:
        raise DataError(f"{where}: negative label value {int(label.min())}")
    if num_classes is not None and label.max() >= num_classes:
        raise DataError(f"{where}: label value {int(label.max())} >= num_classes {num_classes}")
    if not np.isfinite(image).all():
        raise DataError(f"{where}: image contains NaN or infinite values")
    return image, label


class SliceDataset(torch.utils.data.Dataset):
    """Training samples: an item is ``(slice index, sample seed)`` from the two-stream sampler.

    Returns a dict with ``image`` (1, P, P) float32 and ``label`` (P, P) int64 (zeros for an
    unlabelled slice; the trainer never reads them), ``labelled`` (bool) and ``index``.
    The augmentation draws from ``numpy.random.default_rng(sample seed)``, so a sample does not
    depend on the worker process or on what came before it.
    """

    def __init__(self, table: SliceTable, labelled: set[int], patch_size: int, augment: bool):
        self.table = table
        self.labelled = labelled
        self.size = (patch_size, patch_size)
        self.do_augment = augment

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        image, label = self.table.get(index)
        is_labelled = index in self.labelled
        if self.do_augment:
            image, label = augment(image, label, np.random.default_rng(seed))
        image = resize_image(image, self.size)
        label = resize_label(label, self.size) if is_labelled else np.zeros(self.size, np.int64)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],
            "label": torch.from_numpy(np.ascontiguousarray(label)),
            "labelled": is_labelled,
            "index": index,
        }
