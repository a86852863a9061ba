"""Readers for the formats that store one image/label pair per HDF5 file, and the start-up check.

ACDC keeps its slices and volumes this way, Synapse its test volumes (its training slices are
``.npz`` files, read by :func:`mcsc.data.synapse.read_npz`). Every error names the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from mcsc.data.base import DataError, Volume, VolumeSource, check_pair


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) arrays of an SSL4MIS/TransUNet ``.h5`` file, as stored (any dtype).

    A truncated or corrupt file, or one without the two datasets, raises :class:`DataError`.
    """
    try:
        with h5py.File(path, "r") as f:
            for key in ("image", "label"):
                if not isinstance(f.get(key), h5py.Dataset):
                    raise DataError(
                        f"{path}: expected datasets 'image' and 'label', found {list(f)}"
                    )
            return f["image"][()], f["label"][()]
    except DataError:
        raise
    except Exception as error:  # h5py raises OSError, and TypeError/ValueError on odd types
        raise DataError(f"{path}: cannot read HDF5 file ({error})") from error


def read_h5_spacing(path: Path) -> tuple[float, float, float] | None:
    """The (z, y, x) spacing in mm stored in a volume file, or None when it has none.

    A spacing that is not three positive finite numbers raises :class:`DataError`.
    """
    try:
        with h5py.File(path, "r") as f:
            if "spacing" not in f:
                return None
            values = np.asarray(f["spacing"][()])
    except Exception as error:
        raise DataError(f"{path}: cannot read HDF5 file ({error})") from error
    if values.shape != (3,) or values.dtype.kind not in "iuf":
        raise DataError(f"{path}: spacing must be 3 numbers, got {values!r}")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise DataError(f"{path}: spacing must be positive and finite, got {values.tolist()}")
    return tuple(float(v) for v in values)


def volume_source(path: Path, num_classes: int, name: str | None = None) -> VolumeSource:
    """A lazily read ``.h5`` volume (image float32, label int64), checked when loaded."""
    name = name or path.name.split(".")[0]

    def load() -> Volume:
        image, label = check_pair(*read_h5(path), num_classes, str(path), ndim=3)
        return Volume(name, image, label, read_h5_spacing(path))

    return VolumeSource(name, load)


def check_files(
    paths: list[Path], num_classes: int, ndim: int, reader: Callable = read_h5
) -> None:
    """Read every file once and raise :class:`DataError` naming the first bad one.

    Args:
        paths: the files; ``reader(path)`` returns their (image, label) arrays.
        ndim: 2 for slices, 3 for volumes.
    """
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        check_pair(*reader(path), num_classes, str(path), ndim=ndim)


def check_volumes(sources: list[VolumeSource]) -> None:
    """Load every volume once (arrays and spacing), so that a bad file stops the run at start-up
    rather than at the first validation pass."""
    for source in sources:
        source.load()
