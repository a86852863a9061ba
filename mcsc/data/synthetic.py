"""The built-in synthetic dataset: procedurally drawn 3D phantoms, trained on as 2D slices.

Each case is a (depth, size, size) volume with anisotropic spacing (2.5, 1.5, 1.5) mm holding a
body and three structures of very different sizes, so that class imbalance matters:

* class 1 ``large_organ``: an ellipsoid covering about a fifth of a slice, most slices;
* class 2 ``medium_organ``: a bright ellipsoid about 1/25 of a slice, in a few slices, placed
  beside the large organ;
* class 3 ``small_lesion``: a small sphere *inside* the large organ, as bright as the medium
  organ, in three to five slices (well under 1% of the voxels). Telling it from the medium
  organ needs context (it sits inside the large one), not intensity.

Gaussian noise, a smooth multiplicative bias field and blur are added, then the volume is
normalised like any NIfTI volume. Everything is drawn from ``numpy.random.default_rng(seed)``
per case: the same seed gives the same data on every machine, nothing is written to disk.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mcsc.data.base import ArraySlices, DataBundle, Volume, VolumeSource, first_cases, seeded_split
from mcsc.data.transforms import normalise_volume

CLASS_NAMES = ["background", "large_organ", "medium_organ", "small_lesion"]
SPACING = (2.5, 1.5, 1.5)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid; centre and radii in voxels, (z, y, x)."""
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((zz - centre[0]) / radii[0]) ** 2
        + ((yy - centre[1]) / radii[1]) ** 2
        + ((xx - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def make_case(seed: int, size: int = 64, depth: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom.

    Returns:
        image (depth, size, size) float32 normalised; label (depth, size, size) int64 in 0..3.
    """
    rng = np.random.default_rng(seed)
    shape = (depth, size, size)
    s = size / 64.0
    label = np.zeros(shape, np.int64)
    image = np.zeros(shape, np.float32)

    body = _ellipsoid(shape, (depth / 2, size / 2, size / 2), (depth * 4, 28 * s, 30 * s))
    image[body] = 0.32

    side = rng.choice([-1.0, 1.0])
    big_c = (
        depth / 2 + rng.uniform(-1, 1),
        size / 2 + rng.uniform(-4, 4) * s,
        size / 2 + side * rng.uniform(5, 8) * s,
    )
    big_r = (depth * rng.uniform(0.45, 0.6), rng.uniform(13, 17) * s, rng.uniform(12, 15) * s)
    big = _ellipsoid(shape, big_c, big_r)
    label[big] = 1
    image[big] = 0.45

    med_c = (
        depth / 2 + rng.uniform(-2, 2),
        size / 2 + rng.uniform(-8, 8) * s,
        size / 2 - side * rng.uniform(17, 20) * s,
    )
    med_r = (rng.uniform(2.0, 3.0), rng.uniform(5.5, 7.5) * s, rng.uniform(4.5, 6.0) * s)
    medium = _ellipsoid(shape, med_c, med_r) & body & ~big
    label[medium] = 2
    image[medium] = 0.85

    lesion_r = rng.uniform(3.5, 5.0) * s
    offset = (big_r[1] - lesion_r - 2 * s) * 0.6
    les_c = (
        big_c[0] + rng.uniform(-1, 1),
        big_c[1] + rng.uniform(-offset, offset),
        big_c[2] + rng.uniform(-offset, offset),
    )
    lesion = _ellipsoid(shape, les_c, (rng.uniform(1.5, 2.2), lesion_r, lesion_r)) & big
    label[lesion] = 3
    image[lesion] = 0.85

    zz, yy, xx = np.meshgrid(
        np.linspace(-1, 1, depth),
        np.linspace(-1, 1, size),
        np.linspace(-1, 1, size),
        indexing="ij",
    )
    bias = 1.0 + rng.uniform(-0.2, 0.2) * yy + rng.uniform(-0.2, 0.2) * xx + 0.05 * zz
    image = ndimage.gaussian_filter(image * bias, sigma=(0, 0.7, 0.7))
    image = image + rng.normal(0.0, 0.12, shape).astype(np.float32)
    return normalise_volume(image), label


def build_synthetic(
    labelled: int,
    num_cases: int = 40,
    size: int = 64,
    depth: int = 12,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    split: dict[str, list[str]] | None = None,
) -> DataBundle:
    """The synthetic dataset split into train/val/test cases by ``seed``.

    Args:
        labelled: number of labelled training cases (the first ones in sorted order).
        num_cases, size, depth: how many phantoms and their shape (depth, size, size).
        seed: data seed (the phantoms and the split depend only on it).
        split: an existing split (from a saved config) to reuse instead of drawing one.
    """
    names = [f"synth_{i:03d}" for i in range(num_cases)]
    split = split or seeded_split(names, fractions, seed)
    cases = {name: make_case(seed * 100_003 + i, size, depth) for i, name in enumerate(names)}

    images, labels, slice_cases = [], [], []
    for name in split["train"]:
        image, label = cases[name]
        for z in range(depth):
            images.append(image[z])
            labels.append(label[z])
            slice_cases.append(name)

    def source(name: str) -> VolumeSource:
        image, label = cases[name]
        return VolumeSource(name, lambda: Volume(name, image, label, SPACING))

    return DataBundle(
        kind="synthetic",
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        train=ArraySlices(images, labels, slice_cases),
        labelled_cases=first_cases(split["train"], labelled, "the synthetic dataset"),
        val=[source(n) for n in split["val"]],
        test=[source(n) for n in split["test"]],
        split=split,
    )
