"""Metrics against hand-computed cases: Dice, HD95, ASD, empty masks, anisotropic spacing."""

import math

import numpy as np
import pytest

from mcsc.evaluation.metrics import binary_metrics, format_table, summarise, volume_metrics


def square(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_identical_masks():
    gt = square((10, 10), (2, 6), (3, 7))
    m = binary_metrics(gt, gt, (2.0, 0.5))
    assert m == {"dice": 1.0, "hd95": 0.0, "asd": 0.0}


def test_shifted_square_with_anisotropic_spacing():
    # 3x3 squares, the prediction shifted by two columns; columns are 0.5 mm apart.
    # Surfaces: the 8 border voxels of each square. From the prediction's surface: column 2
    # (3 voxels) is on the ground truth's surface (0), column 3 (2 surface voxels) is one
    # column away (0.5 mm), column 4 (3 voxels) two columns (1.0 mm). Same the other way.
    gt = square((10, 10), (0, 3), (0, 3))
    pred = square((10, 10), (0, 3), (2, 5))
    m = binary_metrics(pred, gt, spacing=(1.0, 0.5))
    assert m["dice"] == pytest.approx(2 * 3 / 18)
    assert m["asd"] == pytest.approx((0 * 3 + 0.5 * 2 + 1.0 * 3) / 8)
    assert m["hd95"] == pytest.approx(1.0)
    # the same masks with isotropic spacing: distances in voxels double
    m_vox = binary_metrics(pred, gt)
    assert m_vox["asd"] == pytest.approx(2 * m["asd"])


def test_single_voxels_along_the_slow_axis():
    gt = np.zeros((5, 4, 4), bool)
    pred = np.zeros((5, 4, 4), bool)
    gt[0, 1, 1] = True
    pred[2, 1, 2] = True
    m = binary_metrics(pred, gt, spacing=(3.0, 1.0, 1.0))
    expected = math.sqrt(6.0**2 + 1.0**2)
    assert m["dice"] == 0.0
    assert m["hd95"] == pytest.approx(expected)
    assert m["asd"] == pytest.approx(expected)


def test_asd_is_directed_from_prediction_to_ground_truth():
    # gt: one voxel; pred: that voxel plus one 4 voxels away. d(P->G) = [0, 4] -> ASD 2;
    # d(G->P) = [0]; HD95 over [0, 4, 0] = 95th percentile = 3.6.
    gt = np.zeros((1, 10), bool)
    pred = np.zeros((1, 10), bool)
    gt[0, 0] = True
    pred[0, 0] = pred[0, 4] = True
    m = binary_metrics(pred, gt)
    assert m["asd"] == pytest.approx(2.0)
    assert m["hd95"] == pytest.approx(np.percentile([0, 4, 0], 95))
    assert m["dice"] == pytest.approx(2 / 3)


def test_empty_masks_rule():
    empty = np.zeros((4, 6, 8), bool)
    full = square((6, 8), (1, 3), (1, 3))[None].repeat(4, 0)
    both = binary_metrics(empty, empty, (2.0, 1.0, 1.0))
    assert all(math.isnan(v) for v in both.values())
    diagonal = math.sqrt((4 * 2.0) ** 2 + 6**2 + 8**2)
    for pred, gt in ((empty, full), (full, empty)):
        m = binary_metrics(pred, gt, (2.0, 1.0, 1.0))
        assert m["dice"] == 0.0
        assert m["hd95"] == pytest.approx(diagonal)
        assert m["asd"] == pytest.approx(diagonal)


def test_mask_touching_the_border_is_not_cropped_wrongly():
    gt = square((6, 6), (0, 6), (0, 2))
    pred = square((6, 6), (0, 6), (0, 3))
    m = binary_metrics(pred, gt)
    # prediction surface: column 0 and 2 (all rows) and rows 0/5 of column 1; only column 2
    # (6 voxels) is off the gt surface (column 1), by one voxel.
    assert m["asd"] == pytest.approx(6 / 14)


def test_mean_over_volumes_then_classes_skips_absent_classes():
    names = ["background", "a", "b"]
    gt1 = np.zeros((1, 8, 8), np.int64)
    gt1[0, :4, :4] = 1
    gt1[0, 5:, 5:] = 2
    gt2 = np.zeros((1, 8, 8), np.int64)
    gt2[0, :4, :4] = 1  # class b absent and not predicted: left out
    pred1 = gt1.copy()
    pred1[0, 5:, 5:] = 0  # class b missed: Dice 0
    per_volume = {"v1": volume_metrics(pred1, gt1, 3), "v2": volume_metrics(gt2, gt2, 3)}
    assert math.isnan(per_volume["v2"][2]["dice"])
    summary = summarise(per_volume, names)
    assert summary["per_class"]["a"]["dice"] == 1.0
    assert summary["per_class"]["b"]["dice"] == 0.0
    assert summary["mean_dice"] == pytest.approx(0.5)
    table = format_table(summary, "voxels")
    assert "HD95 (voxels)" in table and table.splitlines()[-1].startswith("mean")


def test_shape_and_spacing_errors():
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.zeros((2, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(np.ones((2, 2)), np.ones((2, 2)), spacing=(1.0, 1.0, 1.0))
