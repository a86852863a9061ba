"""Synapse multi-organ CT in the TransUNet layout.

Layout::

    ROOT/train_npz/<case>_slice<k>.npz   arrays image (H, W) float, label (H, W) int
    ROOT/test_vol_h5/<case>.npy.h5       datasets image (D, H, W), label (D, H, W)
    ROOT/train.txt                       optional: slice names in order (TransUNet's
                                         lists_Synapse/train.txt); else sorted file names

9 classes: background + 8 organs, named :data:`CLASS_NAMES` unless the configuration gives
others (``data.class_names``). The labelled subset is the first k cases in list
order. TransUNet ships no validation split: validation is skipped and the last checkpoint is
the one evaluated. The files record no spacing: distances are in voxels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcsc.data.base import DataBundle, DataError, FileSlices, first_cases
from mcsc.data.files import check_files, check_volumes, volume_source

CLASS_NAMES = [
    "background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
    "spleen", "stomach",
]


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of a TransUNet ``.npz`` slice; errors name the file."""
    try:
        with np.load(path) as data:
            if "image" not in data or "label" not in data:
                raise DataError(f"{path}: expected arrays 'image' and 'label', found {data.files}")
            return data["image"], data["label"]
    except DataError:
        raise
    except Exception as error:  # a corrupt npz raises zipfile, pickle or OS errors
        raise DataError(f"{path}: cannot read npz file ({error})") from error


def case_of(slice_name: str) -> str:
    """``case0005_slice012`` -> ``case0005``."""
    return slice_name.split("_slice")[0]


def build_synapse(
    root: str | Path, labelled: int, num_classes: int, class_names: list[str]
) -> DataBundle:
    """Load the Synapse TransUNet folder ``root``, checking every file at start-up."""
    root = Path(root)
    train_dir, test_dir = root / "train_npz", root / "test_vol_h5"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (expected the TransUNet Synapse layout)")
    listing = root / "train.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        slice_paths = [train_dir / f"{n}.npz" for n in names]
    else:
        slice_paths = sorted(train_dir.glob("*.npz"))
    test_paths = sorted(test_dir.glob("*.h5"))
    if not slice_paths:
        raise DataError(f"{train_dir}: no .npz slices found")
    if not test_paths:
        raise DataError(f"{test_dir}: no .h5 volumes found")
    check_files(slice_paths, num_classes, 2, reader=read_npz)
    test = [volume_source(p, num_classes, p.name.split(".")[0]) for p in test_paths]
    check_volumes(test)
    cases = [case_of(p.stem) for p in slice_paths]
    return DataBundle(
        kind="synapse",
        num_classes=num_classes,
        class_names=list(class_names),
        train=FileSlices(slice_paths, cases, read_npz),
        labelled_cases=first_cases(cases, labelled, f"Synapse at {root}"),
        val=[],
        test=test,
    )
