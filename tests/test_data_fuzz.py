"""Property-based tests of the data readers: every randomly corrupted file is an error naming it.

Each format's file is written valid, then corrupted in one way drawn by hypothesis: truncated
at any length, arrays of a wrong shape (mismatched, wrong number of dimensions, empty), of a
wrong dtype (complex, text, objects, non-integer or NaN labels), NaN or infinite pixels, label
values out of range. The reader the dataset builder uses must raise :class:`DataError` with the
file's path in the message, never return data.
"""

import gzip
import shutil
import tempfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcsc.data.base import DataError
from mcsc.data.files import check_files, check_volumes, volume_source
from mcsc.data.nifti import build_nifti
from mcsc.data.synapse import read_npz

from mcsc_fixtures import make_nifti, write_nifti

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUM_CLASSES = 4


def valid_pair(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, shape).astype(np.float32)
    label = rng.integers(0, NUM_CLASSES, shape).astype(np.uint8)
    return image, label


def array_corruptions(shape: tuple[int, ...], formats: str, labels: bool = True):
    """(image, label) pairs that are wrong in one way.

    ``formats`` limits the corruptions to what the file format can store and the reader must
    refuse: "h5" (also text and complex labels), "npz" (also objects), "nifti" (numbers only;
    a 4D image is channels, so a wrong number of dimensions is 1 or 5). ``labels=False`` draws
    only corruptions of the image, for images that have no label.
    """
    image, label = valid_pair(shape)
    size = int(np.prod(shape))
    bad_pixel = st.tuples(st.integers(0, size - 1), st.sampled_from([np.nan, np.inf, -np.inf]))

    def with_pixel(drawn):
        position, value = drawn
        corrupted = image.copy()
        corrupted.flat[position] = value
        return corrupted, label

    def reshaped(new_shape):
        return np.resize(image, new_shape), np.resize(label, new_shape)

    axis = st.integers(0, len(shape) - 1)
    ndims = [(size,), shape + (1, 1, 2)] if formats == "nifti" else [(size,), shape + (1,)]
    choices = [
        bad_pixel.map(with_pixel),
        st.sampled_from(ndims).map(reshaped),
        axis.map(lambda a: reshaped(shape[:a] + (0,) + shape[a + 1 :])),
        st.just(((image + 1j * image).astype(np.complex64), label)),
    ]
    if labels:
        choices += [
            axis.map(lambda a: (image, np.take(label, range(shape[a] - 1), axis=a))),
            st.sampled_from([0.5, np.nan, 2.25]).map(
                lambda value: (image, np.where(label == 1, value, label.astype(np.float32)))
            ),
            st.sampled_from([-1, NUM_CLASSES, 255]).map(
                lambda value: (image, np.where(label == 1, value, label).astype(np.int16))
            ),
        ]
    if formats in ("h5", "npz"):
        choices.append(st.just((image.astype("S8"), label)))
        choices.append(st.just((image, (label + 0.5j).astype(np.complex64))))
    if formats == "npz":
        choices.append(st.just((image.astype(object), label)))
    return st.one_of(choices)


def truncations():
    """How much of a file to keep: a fraction of it, or all but its last few bytes (a .gz cut
    there loses only its checksum, which nibabel alone never reads)."""
    return st.one_of(st.floats(0.0, 0.999), st.integers(1, 12).map(lambda cut: -cut))


def truncate(path: Path, keep) -> None:
    raw = path.read_bytes()
    length = len(raw) + keep if isinstance(keep, int) else int(len(raw) * keep)
    path.write_bytes(raw[:max(length, 0)])


def assert_named(path: Path, read) -> None:
    with pytest.raises(DataError) as caught:
        read()
    assert str(path) in str(caught.value)


def write_h5(path: Path, image, label) -> None:
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


@FUZZ
@given(volume=st.booleans(), corruption=st.data())
def test_corrupt_h5_files_are_named(volume, corruption):
    """ACDC slices and volumes, Synapse test volumes (float labels, as TransUNet stores them)."""
    shape = (3, 6, 5) if volume else (6, 5)
    kind = corruption.draw(st.sampled_from(["arrays", "truncated"]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.h5"
        if kind == "arrays":
            write_h5(path, *corruption.draw(array_corruptions(shape, "h5")))
        else:
            image, label = valid_pair(shape)
            write_h5(path, image, label.astype(np.float32))
            truncate(path, corruption.draw(truncations()))
        if volume:
            assert_named(path, lambda: check_volumes([volume_source(path, NUM_CLASSES)]))
        else:
            assert_named(path, lambda: check_files([path], NUM_CLASSES, 2))


@FUZZ
@given(corruption=st.data())
def test_corrupt_npz_slices_are_named(corruption):
    """Synapse training slices."""
    kind = corruption.draw(st.sampled_from(["arrays", "truncated"]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case0000_slice000.npz"
        if kind == "arrays":
            image, label = corruption.draw(array_corruptions((6, 5), "npz"))
            np.savez(path, image=image, label=label)
        else:
            image, label = valid_pair((6, 5))
            np.savez(path, image=image, label=label)
            truncate(path, corruption.draw(truncations()))
        assert_named(path, lambda: check_files([path], NUM_CLASSES, 2, reader=read_npz))


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory):
    """Three labelled cases and one image without a label, with dataset.json (4 classes)."""
    root = make_nifti(tmp_path_factory.mktemp("fuzz") / "nii", cases=3, shape=(16, 16, 4))
    image = np.random.default_rng(1).normal(50, 10, (16, 16, 4)).astype(np.float32)
    (root / "imagesUnlabelled").mkdir()
    write_nifti(root / "imagesUnlabelled" / "extra.nii.gz", image)
    build_nifti(root, labelled=1, seed=0)  # valid as written
    return root


@FUZZ
@given(corruption=st.data())
def test_corrupt_nifti_files_are_named(nifti_folder, corruption):
    """A case (image and label) or an image without a label of a Decathlon folder, stored as
    .nii.gz or .nii."""
    unlabelled = corruption.draw(st.booleans())
    suffix = corruption.draw(st.sampled_from([".nii.gz", ".nii"]))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "nii"
        shutil.copytree(nifti_folder, root)
        if unlabelled:
            paths = [root / "imagesUnlabelled" / "extra.nii.gz"]
        else:
            paths = [root / "imagesTr" / "case_001.nii.gz", root / "labelsTr" / "case_001.nii.gz"]
        if suffix == ".nii":
            for index, path in enumerate(paths):
                paths[index] = path.with_name(path.name.removesuffix(".gz"))
                paths[index].write_bytes(gzip.decompress(path.read_bytes()))
                path.unlink()
        if corruption.draw(st.booleans()):  # arrays, else truncated
            pair = corruption.draw(array_corruptions((16, 16, 4), "nifti", labels=not unlabelled))
            for path, array in zip(paths, pair):
                nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
            named = paths
        else:
            named = [corruption.draw(st.sampled_from(paths))]
            truncate(named[0], corruption.draw(truncations()))
        with pytest.raises(DataError) as caught:
            build_nifti(root, labelled=1, seed=0)
        assert any(str(path) in str(caught.value) for path in named)
