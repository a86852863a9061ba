"""Datasets: ACDC (SSL4MIS), Synapse (TransUNet), NIfTI (Decathlon) folders, synthetic phantoms.

:func:`build_data` turns a data configuration (any object with the fields of the trainer's
``DataConfig``: dataset, path, labeled, split, ...) into a :class:`DataBundle`;
:func:`infer_dataset` guesses the format of a folder.
"""

from __future__ import annotations

from pathlib import Path

from mcsc.data.acdc import build_acdc, prepare_acdc
from mcsc.data.base import DataBundle, DataError, SliceDataset, Volume, VolumeSource
from mcsc.data.nifti import build_nifti
from mcsc.data.sampling import TwoStreamBatchSampler
from mcsc.data.synapse import CLASS_NAMES as SYNAPSE_CLASSES
from mcsc.data.synapse import build_synapse
from mcsc.data.synthetic import build_synthetic

__all__ = [
    "DataBundle",
    "DataError",
    "SliceDataset",
    "TwoStreamBatchSampler",
    "Volume",
    "VolumeSource",
    "build_data",
    "infer_dataset",
    "prepare_acdc",
]


def infer_dataset(path: str | Path) -> str:
    """The format of a data folder: ``acdc``, ``synapse`` or ``nifti``.

    Raises :class:`DataError` naming the folder when it is missing or matches none.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: data folder not found")
    if (path / "train_slices.list").is_file():
        return "acdc"
    if (path / "train_npz").is_dir():
        return "synapse"
    if any((path / folder).is_dir() for folder in ("imagesTr", "labelsTr", "imagesUnlabelled")):
        return "nifti"
    raise DataError(
        f"{path}: cannot tell the dataset format (expected train_slices.list for ACDC, "
        f"train_npz/ for Synapse or imagesTr/ + labelsTr/ for NIfTI); name the dataset explicitly"
    )


def build_data(data) -> DataBundle:
    """Load the dataset described by ``data`` (a ``DataConfig``), checking it at start-up.

    Fills in the values the data decides (``num_classes``, ``class_names``, ``split``,
    ``labeled`` when None) so that the saved configuration is fully resolved.
    """
    kind, seed = data.dataset, data.seed
    fractions = tuple(data.split_fractions)
    if kind == "synthetic":
        bundle = build_synthetic(
            data.labeled or 4, data.synthetic_cases, data.synthetic_size,
            data.synthetic_depth, seed=seed, fractions=fractions, split=data.split,
        )
    elif data.path is None:
        raise DataError(f"dataset {kind!r} needs a data folder, and none was given")
    elif kind == "acdc":
        bundle = build_acdc(data.path, data.labeled or 7, data.num_classes or 4)
    elif kind == "synapse":
        names = data.class_names or SYNAPSE_CLASSES
        bundle = build_synapse(data.path, data.labeled or 4, data.num_classes or len(names), names)
    elif kind == "nifti":
        bundle = build_nifti(
            data.path, data.labeled, seed=seed, fractions=fractions, split=data.split,
            num_classes=data.num_classes, class_names=data.class_names, channel=data.channel,
        )
    else:
        raise DataError(f"unknown dataset {kind!r}")
    data.num_classes = bundle.num_classes
    data.class_names = list(bundle.class_names)
    data.labeled = len(bundle.labelled_cases)
    if bundle.split:
        data.split = bundle.split
    return bundle

