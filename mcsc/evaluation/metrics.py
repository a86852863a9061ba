"""Segmentation metrics per volume and class: Dice, HD95 and ASD, in mm when spacing is known.

Definitions (those of MedPy, which SSL4MIS and the MCSC paper use):

* surface of a mask: its voxels that are not in its erosion by the face-connected
  (6-neighbour in 3D) structuring element; voxels on the image border count as surface;
* ``d(A -> B)``: for each surface voxel of A, the Euclidean distance (scaled by the voxel
  spacing) to the nearest surface voxel of B;
* Dice = 2 |P & G| / (|P| + |G|);
* HD95 = 95th percentile of ``d(P -> G)`` and ``d(G -> P)`` taken together;
* ASD = mean of ``d(P -> G)`` (MedPy's ``asd``; from the prediction to the ground truth).

Rule for empty masks (per volume and class):

* prediction and ground truth both empty: the class is absent and correctly predicted absent;
  Dice, HD95 and ASD are NaN and the case is left out of that class's mean;
* exactly one of them empty: Dice = 0 and HD95 = ASD = the diagonal of the volume
  (``sqrt(sum((shape * spacing)^2))``), the largest distance possible inside it.

Means: over volumes per class (NaN left out), then over the foreground classes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

METRICS = ("dice", "hd95", "asd")


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances from each surface voxel of mask ``a`` to the surface of mask ``b``.

    Args:
        a, b: boolean masks of the same shape, both non-empty.
        spacing: voxel size per axis (same length as ``a.ndim``).

    Returns:
        1-D float64 array, one distance per surface voxel of ``a``.
    """
    b_surface = _surface(b)
    distance = ndimage.distance_transform_edt(~b_surface, sampling=spacing)
    return distance[_surface(a)]


def _crop(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel (distances unchanged:
    every surface voxel of both masks stays inside, and no mask touches a new border)."""
    coords = np.argwhere(pred | gt)
    low = np.maximum(coords.min(0) - 1, 0)
    high = np.minimum(coords.max(0) + 2, pred.shape)
    box = tuple(slice(start, stop) for start, stop in zip(low, high))
    return pred[box], gt[box]


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing=None) -> dict[str, float]:
    """Dice, HD95 and ASD of one binary prediction against one binary ground truth.

    Args:
        pred, gt: boolean (or 0/1) arrays of the same shape (2D or 3D).
        spacing: voxel size per axis; None means 1 (distances in voxels).

    Returns:
        {"dice", "hd95", "asd"} floats, following the empty-mask rule of this module.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    spacing = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, np.float64)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match {pred.ndim}D masks")
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return {"dice": math.nan, "hd95": math.nan, "asd": math.nan}
    if not p_any or not g_any:
        diagonal = float(np.sqrt(np.sum((np.asarray(pred.shape) * spacing) ** 2)))
        return {"dice": 0.0, "hd95": diagonal, "asd": diagonal}
    dice = 2.0 * np.logical_and(pred, gt).sum() / (pred.sum() + gt.sum())
    pred_c, gt_c = _crop(pred, gt)
    d_pg = surface_distances(pred_c, gt_c, spacing)
    d_gp = surface_distances(gt_c, pred_c, spacing)
    return {
        "dice": float(dice),
        "hd95": float(np.percentile(np.concatenate([d_pg, d_gp]), 95)),
        "asd": float(d_pg.mean()),
    }


def volume_metrics(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing=None
) -> dict[int, dict[str, float]]:
    """Per foreground class metrics of one labelled volume.

    Args:
        pred, gt: integer label maps (D, H, W) (or (H, W)) of the same shape.
        num_classes: classes including background; classes 1..num_classes-1 are scored.
        spacing: voxel size per axis in mm, or None for voxels.

    Returns:
        {class index: {"dice", "hd95", "asd"}}.
    """
    return {c: binary_metrics(pred == c, gt == c, spacing) for c in range(1, num_classes)}


def summarise(per_volume: dict[str, dict[int, dict[str, float]]], class_names: list[str]) -> dict:
    """Mean over volumes per class (NaN left out), then over classes.

    Args:
        per_volume: {volume name: output of :func:`volume_metrics`}.
        class_names: all class names, background first.

    Returns:
        {"mean_dice", "mean_hd95", "mean_asd", "per_class": {name: {metric: mean}}}; a class
        absent from every volume has NaN means (written as null in JSON) and is left out of
        the overall means.
    """
    per_class = {}
    for c in range(1, len(class_names)):
        values = {m: [v[c][m] for v in per_volume.values()] for m in METRICS}
        per_class[class_names[c]] = {m: _nanmean(values[m]) for m in METRICS}
    result = {f"mean_{m}": _nanmean([pc[m] for pc in per_class.values()]) for m in METRICS}
    result["per_class"] = per_class
    return result


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def format_table(summary: dict, unit: str) -> str:
    """The per-class table as text: one row per class, then the mean row."""
    lines = [f"{'class':<20}{'Dice':>8}{'HD95 (' + unit + ')':>18}{'ASD (' + unit + ')':>18}"]
    rows = list(summary["per_class"].items()) + [
        ("mean", {m: summary[f"mean_{m}"] for m in METRICS})
    ]
    for name, values in rows:
        lines.append(
            f"{name:<20}{values['dice']:>8.4f}{values['hd95']:>18.3f}{values['asd']:>18.3f}"
        )
    return "\n".join(lines)
