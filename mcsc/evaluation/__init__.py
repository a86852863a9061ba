"""Evaluation: Dice / HD95 / ASD per volume and class, and slice-by-slice volume inference."""

from mcsc.evaluation.inference import evaluate_volumes, predict_volume, save_prediction_figure
from mcsc.evaluation.metrics import binary_metrics, format_table, summarise, volume_metrics

__all__ = [
    "binary_metrics",
    "evaluate_volumes",
    "format_table",
    "predict_volume",
    "save_prediction_figure",
    "summarise",
    "volume_metrics",
]
