"""Every data format on tiny generated fixtures, the sampler, the augmentation, bad-data errors."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from mcsc.data import DataError, SliceDataset, TwoStreamBatchSampler, build_data, infer_dataset
from mcsc.data.acdc import build_acdc, prepare_acdc
from mcsc.data.nifti import build_nifti
from mcsc.data.synapse import CLASS_NAMES as SYNAPSE_CLASSES
from mcsc.data.synapse import build_synapse
from mcsc.data.synthetic import build_synthetic, make_case
from mcsc.data.transforms import augment, normalise_volume
from mcsc.training.config import preset

from mcsc_fixtures import (
    make_acdc,
    make_nifti,
    make_raw_acdc,
    make_synapse,
    tiny_config,
    write_nifti,
)


def test_synthetic_is_deterministic_imbalanced_and_split():
    image, label = make_case(7, size=32, depth=6)
    again, label_again = make_case(7, size=32, depth=6)
    assert image.shape == label.shape == (6, 32, 32) and image.dtype == np.float32
    assert np.array_equal(image, again) and np.array_equal(label, label_again)
    fractions = [(label == c).mean() for c in range(4)]
    assert fractions[1] > 5 * fractions[3] > 0  # large organ vs small lesion
    bundle = build_synthetic(labelled=2, num_cases=10, size=32, depth=4)
    split = bundle.split
    assert sorted(split["train"] + split["val"] + split["test"]) == [f"synth_{i:03d}" for i in range(10)]
    assert len(bundle.train) == 4 * len(split["train"])
    assert bundle.labelled_cases == split["train"][:2]
    assert len(bundle.labelled_indices()) == 8
    volume = bundle.test[0].load()
    assert volume.spacing == (2.5, 1.5, 1.5) and volume.label.max() <= 3


def test_two_stream_sampler_composition_and_resume():
    sampler = TwoStreamBatchSampler([0, 1, 2], [10, 11, 12, 13, 14], 2, 3, iterations=7, seed=5)
    batches = list(sampler)
    assert len(batches) == 7
    for batch in batches:
        assert all(i in (0, 1, 2) for i, _ in batch[:2])
        assert all(10 <= i <= 14 for i, _ in batch[2:])
    # every labelled index is seen once per epoch of that stream
    first_epoch = [i for batch in batches[:3] for i, _ in batch[:2]][:3]
    assert sorted(first_epoch) == [0, 1, 2]
    resumed = TwoStreamBatchSampler([0, 1, 2], [10, 11, 12, 13, 14], 2, 3, iterations=7, seed=0)
    resumed.load_state_dict({"seed": 5, "start": 4})
    assert list(resumed) == batches[4:]
    other = TwoStreamBatchSampler([0, 1, 2], [10, 11, 12, 13, 14], 2, 3, iterations=7, seed=6)
    assert list(other) != batches
    with pytest.raises(ValueError, match="unlabelled"):
        TwoStreamBatchSampler([0], [], 1, 1, iterations=1, seed=0)


def test_slice_dataset_shapes_and_seeded_augmentation():
    bundle = build_synthetic(labelled=1, num_cases=5, size=32, depth=3)
    labelled = set(bundle.labelled_indices())
    dataset = SliceDataset(bundle.train, labelled, patch_size=24, augment=True)
    lab = next(iter(labelled))
    unl = bundle.unlabelled_indices()[0]
    a, b = dataset[(lab, 3)], dataset[(lab, 3)]
    assert a["image"].shape == (1, 24, 24) and a["label"].shape == (24, 24)
    assert a["labelled"] and not dataset[(unl, 3)]["labelled"]
    assert int(dataset[(unl, 3)]["label"].abs().sum()) == 0  # unlabelled labels never exposed
    assert (a["image"] == b["image"]).all() and (a["label"] == b["label"]).all()
    different = [dataset[(lab, s)]["image"] for s in range(8)]
    assert any(not (d == different[0]).all() for d in different[1:])


def test_augment_keeps_image_and_label_aligned():
    image = np.zeros((16, 16), np.float32)
    label = np.zeros((16, 16), np.int64)
    image[2:6, 3:9] = 1.0
    label[2:6, 3:9] = 1
    for seed in range(10):
        aug_image, aug_label = augment(image, label, np.random.default_rng(seed))
        assert aug_image.shape == aug_label.shape == (16, 16)
        inside = aug_image[aug_label == 1]
        assert inside.size and inside.mean() > 0.5


def test_normalise_volume():
    volume = np.random.default_rng(0).normal(100, 20, (4, 8, 8))
    out = normalise_volume(volume)
    assert out.dtype == np.float32 and abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-3
    assert np.all(normalise_volume(np.full((2, 2, 2), 5.0)) == 0)


def test_acdc_layout(tmp_path):
    root = make_acdc(tmp_path / "acdc", patients=5)
    assert infer_dataset(root) == "acdc"
    bundle = build_acdc(root, labelled=2)
    assert len(bundle.train) == 9 and bundle.num_classes == 4
    assert bundle.labelled_cases == ["patient001", "patient002"]
    assert len(bundle.labelled_indices()) == 6
    image, label = bundle.train.get(0)
    assert image.shape == (16, 16) and label.dtype == np.int64
    volume = bundle.test[0].load()
    assert volume.name == "patient005_frame01" and volume.image.shape == (3, 16, 16)
    assert volume.spacing is None  # SSL4MIS files have no spacing: distances in voxels


def test_prepare_acdc_then_train_layout(tmp_path):
    raw = make_raw_acdc(tmp_path / "raw", patients=5)
    counts = prepare_acdc(raw, tmp_path / "out", seed=1)
    assert counts == {"patients": 5, "volumes": 10, "train_slices": 3 * 2 * 3}
    names = (tmp_path / "out" / "test.list").read_text().split()
    assert len(names) == 2  # one patient, two frames
    with h5py.File(tmp_path / "out" / "data" / f"{names[0]}.h5") as f:
        image, spacing = f["image"][()], f["spacing"][()]
    assert image.shape == (3, 16, 16) and 0.0 <= image.min() and image.max() == pytest.approx(1.0)
    assert np.allclose(spacing, [10.0, 1.4, 1.4])
    bundle = build_acdc(tmp_path / "out", labelled=1)
    assert bundle.test[0].load().spacing == pytest.approx((10.0, 1.4, 1.4))


def test_synapse_layout(tmp_path):
    root = make_synapse(tmp_path / "syn", cases=3)
    assert infer_dataset(root) == "synapse"
    bundle = build_synapse(root, labelled=1, num_classes=9, class_names=SYNAPSE_CLASSES)
    assert len(bundle.train) == 9 and bundle.labelled_cases == ["case0000"]
    assert bundle.val == [] and [v.name for v in bundle.test] == ["case0100", "case0101"]
    assert bundle.test[0].load().label.dtype == np.int64


def test_nifti_layout_split_saved_and_reused(tmp_path):
    root = make_nifti(tmp_path / "nii", cases=6)
    assert infer_dataset(root) == "nifti"
    bundle = build_nifti(root, labelled=1, seed=3)
    assert bundle.class_names == ["background", "alpha", "beta", "gamma"]
    split = bundle.split
    assert len(split["val"]) >= 1 and len(split["test"]) >= 1
    assert len(bundle.train) == 4 * len(split["train"])
    volume = bundle.test[0].load()
    assert volume.image.shape == (4, 16, 16)  # (Z, X, Y)
    assert volume.spacing == pytest.approx((3.0, 1.5, 1.5))
    assert abs(float(volume.image.mean())) < 0.2  # normalised per volume
    again = build_nifti(root, labelled=1, seed=99, split=split)
    assert again.split == split


def test_nifti_without_dataset_json_and_four_d(tmp_path):
    root = make_nifti(tmp_path / "nii", cases=4, dataset_json=False, four_d=True)
    bundle = build_nifti(root, labelled=1, seed=0, channel=1)
    assert bundle.num_classes == 4 and bundle.class_names[1] == "class_1"
    config = preset("nifti").data
    config.path, config.labeled = str(root), None
    bundle = build_data(config)
    assert config.labeled == 1 and config.split == bundle.split and config.num_classes == 4


def test_build_data_fills_the_config():
    config = preset("synthetic").data
    config.synthetic_cases, config.synthetic_size, config.synthetic_depth = 6, 32, 3
    bundle = build_data(config)
    assert config.num_classes == 4 and config.class_names == bundle.class_names
    assert config.split == bundle.split


# ------------------------------------------------------------------ images without labels


def write_image(path, depth=4, seed=0):
    """A (16, 16, depth) NIfTI image with no label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).normal(50, 10, (16, 16, depth)).astype(np.float32)
    write_nifti(path, image)


def slices_of(bundle, case):
    return [i for i, name in enumerate(bundle.train.cases) if name == case]


def test_images_without_labels_are_unlabelled_training_cases(tmp_path):
    nii = make_nifti(tmp_path / "nii", cases=6)
    (nii / "labelsTr" / "case_005.nii.gz").unlink()
    write_image(nii / "imagesUnlabelled" / "extra_000.nii.gz", depth=3)
    bundle = build_nifti(nii, labelled=2, seed=0)
    split = bundle.split
    assert split["unlabelled"] == ["case_005", "extra_000"]
    scored = split["train"] + split["val"] + split["test"]
    assert sorted(scored) == [f"case_{c:03d}" for c in range(5)]  # validation and test: labelled
    assert bundle.labelled_cases == split["train"][:2]  # the labelled count applies to labels
    unlabelled = set(bundle.unlabelled_indices())
    for case, depth in (("case_005", 4), ("extra_000", 3)):
        indices = slices_of(bundle, case)
        assert len(indices) == depth and set(indices) <= unlabelled
        image, label = bundle.train.get(indices[0])
        assert image.shape == (16, 16) and not label.any()
    assert len(bundle.train) == 4 * len(split["train"]) + 4 + 3
    assert bundle.describe() == (
        f"nifti data: 2 labelled and {len(split['train'])} unlabelled training cases (2 of them "
        f"images without labels), {len(split['val'])} validation and {len(split['test'])} test "
        f"cases"
    )
    # unset labelled count: with real unlabelled images every case with a label is labelled
    assert build_nifti(nii, labelled=None, seed=0).labelled_cases == split["train"]
    with pytest.raises(DataError, match=f"{len(split['train']) + 1} labelled cases asked for"):
        build_nifti(nii, labelled=len(split["train"]) + 1, seed=0)


def test_dataset_json_lists_unlabelled_images(tmp_path):
    nii = make_nifti(tmp_path / "nii", cases=5)
    (nii / "labelsTr" / "case_004.nii.gz").unlink()
    write_image(nii / "imagesTs" / "test_000.nii.gz")
    write_image(nii / "other" / "more_000.nii.gz")
    document = json.loads((nii / "dataset.json").read_text())
    document["training"] = [
        {"image": f"./imagesTr/case_{c:03d}.nii.gz", "label": f"./labelsTr/case_{c:03d}.nii.gz"}
        for c in range(4)
    ] + [{"image": "./imagesTr/case_004.nii.gz"}]
    document["test"] = ["./imagesTs/test_000.nii.gz"]  # the Decathlon's images without labels
    document["unlabelled"] = [{"image": "other/more_000.nii.gz"}]
    (nii / "dataset.json").write_text(json.dumps(document))
    bundle = build_nifti(nii, labelled=1, seed=0)
    assert bundle.split["unlabelled"] == ["case_004", "more_000", "test_000"]
    assert bundle.class_names == ["background", "alpha", "beta", "gamma"]
    document["test"].append("./imagesTs/test_001.nii.gz")
    (nii / "dataset.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"imagesTs/test_001\.nii\.gz: listed in .*dataset\.json"):
        build_nifti(nii, labelled=1, seed=0)


def test_dataset_json_label_elsewhere_pairs_an_image(tmp_path):
    nii = make_nifti(tmp_path / "nii", cases=4)
    (nii / "labelsTr" / "case_003.nii.gz").rename(nii / "case_003_label.nii.gz")
    document = json.loads((nii / "dataset.json").read_text())
    document["training"] = [{"image": "imagesTr/case_003.nii.gz", "label": "case_003_label.nii.gz"}]
    (nii / "dataset.json").write_text(json.dumps(document))
    bundle = build_nifti(nii, labelled=1, seed=0)
    assert bundle.split["unlabelled"] == []
    assert any("case_003" in names for names in bundle.split.values())
    document["training"][0]["label"] = "absent.nii.gz"
    (nii / "dataset.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match="absent.nii.gz: listed in"):
        build_nifti(nii, labelled=1, seed=0)


def test_channel_suffixed_files_with_and_without_labels(tmp_path):
    nii = make_nifti(tmp_path / "nii", cases=4, dataset_json=False)
    for path in sorted((nii / "imagesTr").iterdir()):
        image = nib.load(str(path)).get_fdata().astype(np.float32)
        stem = path.name.removesuffix(".nii.gz")
        write_nifti(path.with_name(f"{stem}_0000.nii.gz"), image)
        write_nifti(path.with_name(f"{stem}_0001.nii.gz"), -image)
        path.unlink()
    write_image(nii / "imagesUnlabelled" / "scan_000_0001.nii.gz")
    write_image(nii / "imagesUnlabelled" / "scan_000_0000.nii.gz", seed=1)
    bundle = build_nifti(nii, labelled=1, seed=0, channel=1)
    assert bundle.split["unlabelled"] == ["scan_000"] and bundle.num_classes == 4
    (nii / "imagesUnlabelled" / "scan_000_0001.nii.gz").unlink()
    with pytest.raises(DataError, match="scan_000_0000.nii.gz: case scan_000 has no channel 1"):
        build_nifti(nii, labelled=1, seed=0, channel=1)


def test_labels_without_images_and_clashing_names_are_named(tmp_path):
    nii = make_nifti(tmp_path / "nii", cases=3)
    for path in (nii / "imagesTr").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="imagesTr: no images, but .*labelsTr holds 3 labels"):
        build_nifti(nii, labelled=1, seed=0)
    only_images = tmp_path / "only_images"
    write_image(only_images / "imagesUnlabelled" / "a.nii.gz")
    assert infer_dataset(only_images) == "nifti"
    with pytest.raises(DataError, match="labelsTr: no NIfTI label files found"):
        build_nifti(only_images, labelled=None, seed=0)
    nii = make_nifti(tmp_path / "clash", cases=4)
    write_image(nii / "imagesUnlabelled" / "case_001.nii.gz")
    with pytest.raises(DataError, match=r"imagesUnlabelled/case_001.nii.gz: case name case_001 is "
                                        r"also the name of .*imagesTr/case_001.nii.gz"):
        build_nifti(nii, labelled=1, seed=0)


def test_saved_split_keeps_its_unlabelled_cases(tmp_path):
    nii = make_nifti(tmp_path / "nii", cases=5)
    write_image(nii / "imagesUnlabelled" / "extra_000.nii.gz")
    split = build_nifti(nii, labelled=1, seed=0).split
    write_image(nii / "imagesUnlabelled" / "extra_001.nii.gz")  # added after the run started
    again = build_nifti(nii, labelled=1, seed=0, split=split)
    assert again.split == split and "extra_001" not in again.train.cases
    old = {part: names for part, names in split.items() if part != "unlabelled"}
    assert build_nifti(nii, labelled=1, seed=0, split=old).split["unlabelled"] == [
        "extra_000", "extra_001"
    ]
    (nii / "labelsTr" / f"{split['test'][0]}.nii.gz").unlink()
    case = split["test"][0]
    with pytest.raises(DataError, match=f"case {case} of the saved test split has no label"):
        build_nifti(nii, labelled=1, seed=0, split=split)


def test_training_start_prints_the_counts_and_saves_the_unlabelled_cases(tmp_path, capsys):
    from mcsc.training.trainer import Trainer

    nii = make_nifti(tmp_path / "nii", cases=5)
    write_image(nii / "imagesUnlabelled" / "extra_000.nii.gz")
    config = tiny_config()
    config.data.dataset, config.data.path, config.data.labeled = "nifti", str(nii), 1
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    assert "nifti data: 1 labelled and 3 unlabelled training cases (1 of them images without " \
           "labels), 1 validation and 1 test cases" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["unlabelled"] == ["extra_000"] and config.data.split == saved
    extra = set(slices_of(trainer.data, "extra_000"))
    drawn = {index for batch in trainer.sampler for index, _ in batch}
    assert extra & drawn  # the sampler draws the slices of the image without a label


# ------------------------------------------------------------------ bad data


def test_missing_slice_file_is_named(tmp_path):
    root = make_acdc(tmp_path / "acdc")
    missing = root / "data" / "slices" / "patient002_frame01_slice_1.h5"
    missing.unlink()
    with pytest.raises(DataError, match="patient002_frame01_slice_1.h5"):
        build_acdc(root, labelled=1)


def test_corrupt_files_are_named(tmp_path):
    root = make_acdc(tmp_path / "acdc")
    (root / "data" / "patient004_frame01.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="patient004_frame01.h5"):
        build_acdc(root, labelled=1)
    syn = make_synapse(tmp_path / "syn")
    (syn / "train_npz" / "case0001_slice002.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="case0001_slice002.npz"):
        build_synapse(syn, 1, 9, SYNAPSE_CLASSES)
    nii = make_nifti(tmp_path / "nii")
    (nii / "imagesTr" / "case_002.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="case_002.nii.gz"):
        build_nifti(nii, labelled=1, seed=0)


def test_shape_mismatch_is_named(tmp_path):
    root = make_acdc(tmp_path / "acdc")
    path = root / "data" / "slices" / "patient001_frame01_slice_0.h5"
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = np.zeros((16, 16)), np.zeros((16, 15), np.uint8)
    with pytest.raises(DataError, match="patient001_frame01_slice_0.h5.*shape"):
        build_acdc(root, labelled=1)


def test_bad_spacing_is_named(tmp_path):
    root = make_acdc(tmp_path / "acdc")
    path = root / "data" / "patient004_frame01.h5"
    for spacing in ([1.0, 2.0], [1.0, -1.0, 1.0], [np.nan, 1.0, 1.0]):
        with h5py.File(path, "a") as f:
            if "spacing" in f:
                del f["spacing"]
            f["spacing"] = np.array(spacing)
        with pytest.raises(DataError, match="patient004_frame01.h5: spacing must be"):
            build_acdc(root, labelled=1)


def test_label_above_num_classes_is_named(tmp_path):
    root = make_acdc(tmp_path / "acdc")
    path = root / "data" / "patient003_frame01.h5"
    with h5py.File(path, "r+") as f:
        label = f["label"][()]
        label[0, 0, 0] = 7
        f["label"][...] = label
    with pytest.raises(DataError, match="patient003_frame01.h5.*7 >= num_classes 4"):
        build_acdc(root, labelled=1)
    nii = make_nifti(tmp_path / "nii")
    data = json.loads((nii / "dataset.json").read_text())
    data["labels"] = {"0": "background", "1": "alpha"}
    (nii / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"labelsTr/case_000\.nii\.gz.*num_classes 2"):
        build_nifti(nii, labelled=1, seed=0)


def test_empty_or_unknown_folders(tmp_path):
    (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
    (tmp_path / "empty" / "labelsTr").mkdir(parents=True)
    with pytest.raises(DataError, match="labelsTr: no NIfTI label files"):
        build_nifti(tmp_path / "empty", labelled=1, seed=0)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing: cannot tell the dataset format"):
        infer_dataset(tmp_path / "nothing")
    with pytest.raises(DataError, match="not found"):
        infer_dataset(tmp_path / "absent")
    (tmp_path / "syn" / "train_npz").mkdir(parents=True)
    (tmp_path / "syn" / "test_vol_h5").mkdir(parents=True)
    with pytest.raises(DataError, match="train_npz: no .npz slices"):
        build_synapse(tmp_path / "syn", 1, 9, SYNAPSE_CLASSES)


def test_missing_image_for_label_and_too_many_labelled(tmp_path):
    nii = make_nifti(tmp_path / "nii")
    (nii / "imagesTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DataError, match="case_001.nii.gz: a label without its image"):
        build_nifti(nii, labelled=1, seed=0)
    root = make_acdc(tmp_path / "acdc")
    with pytest.raises(DataError, match="9 labelled cases asked for: ACDC .* has 2 training cases"):
        build_acdc(root, labelled=9)
