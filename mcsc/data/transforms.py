"""Intensity normalisation, resizing and the training augmentation.

All functions work on numpy arrays: images float32, labels integer. 2D slices are (H, W),
volumes (D, H, W). Randomness always comes from an explicit ``numpy.random.Generator`` so that
the same seed gives the same sample in any worker process (needed for exact ``--resume``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def normalise_volume(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Per-volume intensity normalisation: clip to percentiles, then zero mean / unit variance.

    Args:
        volume: (D, H, W) (or any shape) array of raw intensities.
        low, high: percentiles (0-100) used to clip outliers before standardising.

    Returns:
        float32 array of the same shape. A constant volume becomes all zeros.
    """
    volume = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(volume, [low, high])
    clipped = np.clip(volume, lo, hi)
    std = float(clipped.std())
    if std < 1e-8:
        return np.zeros_like(clipped)
    return ((clipped - clipped.mean()) / std).astype(np.float32)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2D float image (H, W) to ``size`` with linear interpolation (float32)."""
    return _zoom_to(image.astype(np.float32, copy=False), size, order=1)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2D integer label map (H, W) to ``size`` with nearest-neighbour (int64)."""
    return _zoom_to(label.astype(np.int64, copy=False), size, order=0)


def _zoom_to(array: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Spline-zoom a 2D array to exactly ``size`` (no copy when it already has that size)."""
    if tuple(array.shape) == tuple(size):
        return array
    factors = (size[0] / array.shape[0], size[1] / array.shape[1])
    return _fit(ndimage.zoom(array, factors, order=order), size)


def _fit(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop or edge-pad ``array`` to exactly ``size`` (zoom can be off by one pixel)."""
    array = array[: size[0], : size[1]]
    pad = [(0, size[0] - array.shape[0]), (0, size[1] - array.shape[1])]
    if any(p[1] for p in pad):
        array = np.pad(array, pad, mode="edge")
    return array


def augment(
    image: np.ndarray,
    label: np.ndarray | None,
    rng: np.random.Generator,
    max_rotation: float = 20.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The SSL4MIS augmentation: a random rot90 + flip, or a small random rotation.

    With probability 0.5 the slice is rotated by k * 90 degrees and flipped along a random
    axis; otherwise, with probability 0.5, it is rotated by an angle in
    [-max_rotation, max_rotation] degrees (image linear, label nearest, zero/background fill).

    Args:
        image: (H, W) float32. label: (H, W) integer or None (unlabelled slice).
        rng: the generator that draws every random choice.

    Returns:
        The augmented (image, label), same shapes and dtypes.
    """
    if rng.random() < 0.5:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        image = np.flip(np.rot90(image, k), axis=axis)
        if label is not None:
            label = np.flip(np.rot90(label, k), axis=axis)
    elif rng.random() < 0.5:
        angle = float(rng.uniform(-max_rotation, max_rotation))
        image = ndimage.rotate(image, angle, order=1, reshape=False, mode="nearest")
        if label is not None:
            label = ndimage.rotate(label, angle, order=0, reshape=False, mode="constant", cval=0)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if label is not None:
        label = np.ascontiguousarray(label)
    return image, label


def normalise_like(volume: np.ndarray, dataset: str) -> np.ndarray:
    """Normalise a raw volume the way the training data of ``dataset`` was normalised.

    * ``acdc``: min-max to [0, 1] per volume (SSL4MIS; ``mcsc prepare acdc`` does the same);
    * ``synapse``: CT clipped to [-125, 275] HU and scaled to [0, 1] (TransUNet);
    * ``nifti``, ``synthetic``: :func:`normalise_volume`.

    Returns float32, same shape.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if dataset == "acdc":
        lo, hi = float(volume.min()), float(volume.max())
        return (volume - lo) / (hi - lo) if hi > lo else np.zeros_like(volume)
    if dataset == "synapse":
        return (np.clip(volume, -125.0, 275.0) + 125.0) / 400.0
    return normalise_volume(volume)
