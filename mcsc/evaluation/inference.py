"""Volume inference slice by slice, evaluation over a list of volumes, and predictions.png."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mcsc.data.base import VolumeSource
from mcsc.evaluation.metrics import format_table, summarise, volume_metrics


@torch.no_grad()
def predict_volume(
    models: Sequence[torch.nn.Module],
    image: np.ndarray,
    patch_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    amp: bool = False,
) -> np.ndarray:
    """Segment a volume slice by slice at the training patch size.

    Each (H, W) slice is resized (bilinear) to (patch_size, patch_size), passed through every
    model, the softmax probabilities are averaged over the models, resized back to (H, W)
    (bilinear) and the argmax taken.

    Args:
        models: one or more networks returning ``SegmentationOutput`` (or logits first).
        image: (D, H, W) float32 normalised volume.
        patch_size: the training input size.
        amp: run the forward pass in float16/bfloat16 autocast (CUDA only).

    Returns:
        (D, H, W) int64 label map.
    """
    device = torch.device(device)
    for model in models:
        model.eval()
    depth, height, width = image.shape
    out = np.zeros((depth, height, width), np.int64)
    for start in range(0, depth, batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(image[start : start + batch_size]))
        x = chunk[:, None].to(device=device, dtype=torch.float32)
        if (height, width) != (patch_size, patch_size):
            x = F.interpolate(
                x, size=(patch_size, patch_size), mode="bilinear", align_corners=False
            )
        probabilities = 0
        for model in models:
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                logits = model(x)[0]
            probabilities = probabilities + torch.softmax(logits.float(), dim=1)
        if (height, width) != (patch_size, patch_size):
            probabilities = F.interpolate(
                probabilities, size=(height, width), mode="bilinear", align_corners=False
            )
        out[start : start + batch_size] = probabilities.argmax(1).cpu().numpy()
    return out


def evaluate_volumes(
    models: Sequence[torch.nn.Module],
    volumes: Sequence[VolumeSource],
    num_classes: int,
    class_names: list[str],
    patch_size: int,
    device: torch.device | str = "cpu",
    amp: bool = False,
    keep_predictions: int = 0,
) -> tuple[dict, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]:
    """Predict and score every volume.

    Returns:
        summary: output of :func:`mcsc.evaluation.metrics.summarise` plus ``unit`` ("mm" when
        every volume has a spacing, else "voxels"), ``per_volume`` ({name: {class name:
        metrics}}) and ``table`` (the per-class table as text);
        kept: (name, image, label, prediction) of the first ``keep_predictions`` volumes.
    """
    per_volume, kept = {}, []
    spacings_known = True
    for source in volumes:
        volume = source.load()
        prediction = predict_volume(models, volume.image, patch_size, device, amp=amp)
        spacings_known &= volume.spacing is not None
        per_volume[volume.name] = volume_metrics(
            prediction, volume.label, num_classes, volume.spacing
        )
        if len(kept) < keep_predictions:
            kept.append((volume.name, volume.image, volume.label, prediction))
    summary = summarise(per_volume, class_names)
    summary["unit"] = "mm" if spacings_known and per_volume else "voxels"
    summary["per_volume"] = {
        name: {class_names[c]: values for c, values in classes.items()}
        for name, classes in per_volume.items()
    }
    summary["table"] = format_table(summary, summary["unit"])
    return summary, kept


def save_prediction_figure(
    path,
    kept: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    rows: int = 4,
) -> None:
    """Write a PNG: for a few slices, the image, the ground truth overlay, the prediction overlay.

    Slices are the ones with the most foreground in the ground truth, from different volumes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for name, image, label, prediction in kept:
        z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1)))
        picks.append((f"{name} z={z}", image[z], label[z], prediction[z]))
    picks = picks[:rows] or [("empty", np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8)))]
    figure, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    for row, (title, image, label, prediction) in enumerate(picks):
        for col, (overlay, what) in enumerate(
            [(None, "image"), (label, "ground truth"), (prediction, "prediction")]
        ):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray")
            if overlay is not None:
                masked = np.ma.masked_where(overlay == 0, overlay)
                ax.imshow(
                    masked,
                    cmap=cmap,
                    vmin=0,
                    vmax=max(num_classes - 1, 1),
                    alpha=0.5,
                    interpolation="nearest",
                )
            ax.set_title(f"{title}: {what}", fontsize=8)
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
