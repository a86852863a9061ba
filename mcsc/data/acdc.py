"""ACDC in the SSL4MIS layout, and ``mcsc prepare acdc`` that produces it from the raw challenge.

Layout (as distributed by SSL4MIS, or as written by :func:`prepare_acdc`)::

    ROOT/train_slices.list      one slice name a line: patient001_frame01_slice_0
    ROOT/val.list, test.list    one volume name a line: patient081_frame01
    ROOT/data/slices/<slice>.h5 datasets image (H, W) float, label (H, W) int
    ROOT/data/<volume>.h5       datasets image (D, H, W), label (D, H, W); optional spacing (3,)

Labels: 0 background, 1 RV, 2 Myo, 3 LV. The labelled subset is the first k patients in the
order of ``train_slices.list`` (3 patients = 68 slices, 7 = 136, ... as in SSL4MIS).
Spacing is only known where the volume file has a ``spacing`` dataset (``prepare`` writes it);
otherwise distances are reported in voxels.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from mcsc.data.base import (
    DataBundle,
    DataError,
    FileSlices,
    check_pair,
    first_cases,
    seeded_split,
)
from mcsc.data.files import check_files, check_volumes, read_h5, volume_source
from mcsc.data.transforms import normalise_like

CLASS_NAMES = ["background", "RV", "Myo", "LV"]


def read_list(path: Path) -> list[str]:
    """Names in an SSL4MIS list file (one a line, optional .h5 suffix removed)."""
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    names = [line.strip().removesuffix(".h5") for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: list file is empty")
    return names


def patient_of(slice_name: str) -> str:
    """``patient001_frame01_slice_3`` -> ``patient001``."""
    return slice_name.split("_")[0]


def build_acdc(root: str | Path, labelled: int, num_classes: int = 4) -> DataBundle:
    """Load the ACDC SSL4MIS folder ``root``, checking every file at start-up."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ACDC folder not found")
    slice_names = read_list(root / "train_slices.list")
    slice_paths = [root / "data" / "slices" / f"{n}.h5" for n in slice_names]
    val_paths = [root / "data" / f"{n}.h5" for n in read_list(root / "val.list")]
    test_paths = [root / "data" / f"{n}.h5" for n in read_list(root / "test.list")]
    check_files(slice_paths, num_classes, 2)
    val = [volume_source(p, num_classes) for p in val_paths]
    test = [volume_source(p, num_classes) for p in test_paths]
    check_volumes(val + test)
    cases = [patient_of(n) for n in slice_names]
    return DataBundle(
        kind="acdc",
        num_classes=num_classes,
        class_names=list(CLASS_NAMES),
        train=FileSlices(slice_paths, cases, read_h5),
        labelled_cases=first_cases(cases, labelled, f"ACDC at {root}"),
        val=val,
        test=test,
    )


def prepare_acdc(raw_dir: str | Path, out_dir: str | Path, seed: int = 1337) -> dict[str, int]:
    """Convert the raw ACDC challenge data to the SSL4MIS layout.

    ``raw_dir`` holds ``patientXXX/patientXXX_frameYY.nii.gz`` with ``..._gt.nii.gz`` (directly
    or under ``training/`` / ``testing/``). Each labelled frame becomes a volume
    ``data/patientXXX_frameYY.h5`` (image min-max normalised to [0, 1] per volume, as SSL4MIS;
    arrays (D, H, W); ``spacing`` (z, y, x) in mm) and one ``data/slices/..._slice_k.h5`` per
    slice. Patients are split 70/10/20 % into train/val/test by a seeded permutation (SSL4MIS
    uses fixed lists; copy theirs over ours to reproduce its split exactly), written as
    ``train_slices.list``, ``train.list``, ``val.list``, ``test.list``.

    Returns:
        counts: number of patients, volumes and training slices written.
    """
    import nibabel as nib

    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    frames = sorted(
        p for p in raw_dir.rglob("patient*_frame[0-9][0-9].nii*") if p.is_file()
    )
    if not frames:
        raise DataError(f"{raw_dir}: no patientXXX/patientXXX_frameYY.nii.gz files found")
    (out_dir / "data" / "slices").mkdir(parents=True, exist_ok=True)
    volumes: dict[str, list[str]] = {}
    slices: dict[str, list[str]] = {}
    for frame in frames:
        name = re.sub(r"\.nii(\.gz)?$", "", frame.name)
        gt = frame.with_name(frame.name.replace(name, f"{name}_gt"))
        if not gt.is_file():
            raise DataError(f"{gt}: ground truth for {frame} not found")
        try:
            image_nii, label_nii = nib.load(str(frame)), nib.load(str(gt))
            image = np.asarray(image_nii.dataobj, dtype=np.float32)
            label = np.rint(np.asarray(label_nii.dataobj)).astype(np.uint8)
        except Exception as error:
            raise DataError(f"{frame}: cannot read NIfTI ({error})") from error
        check_pair(image, label, 4, str(gt))
        image = np.transpose(image, (2, 0, 1))
        label = np.transpose(label, (2, 0, 1))
        zooms = image_nii.header.get_zooms()[:3]
        spacing = np.array([zooms[2], zooms[0], zooms[1]], np.float32)
        image = normalise_like(image, "acdc")
        with h5py.File(out_dir / "data" / f"{name}.h5", "w") as f:
            f.create_dataset("image", data=image, compression="gzip")
            f.create_dataset("label", data=label, compression="gzip")
            f.create_dataset("spacing", data=spacing)
        patient = patient_of(name)
        volumes.setdefault(patient, []).append(name)
        for k in range(image.shape[0]):
            slice_name = f"{name}_slice_{k}"
            with h5py.File(out_dir / "data" / "slices" / f"{slice_name}.h5", "w") as f:
                f.create_dataset("image", data=image[k], compression="gzip")
                f.create_dataset("label", data=label[k], compression="gzip")
            slices.setdefault(patient, []).append(slice_name)
    split = seeded_split(sorted(volumes), (0.7, 0.1, 0.2), seed)
    lines = {
        "train_slices.list": [s for p in split["train"] for s in slices[p]],
        "train.list": [v for p in split["train"] for v in volumes[p]],
        "val.list": [v for p in split["val"] for v in volumes[p]],
        "test.list": [v for p in split["test"] for v in volumes[p]],
    }
    for file_name, names in lines.items():
        (out_dir / file_name).write_text("".join(f"{n}\n" for n in names))
    return {
        "patients": len(volumes),
        "volumes": sum(len(v) for v in volumes.values()),
        "train_slices": len(lines["train_slices.list"]),
    }
