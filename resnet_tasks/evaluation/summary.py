"""What one evaluation hands to the report (the per-class table, the confusion matrix, PR curves and gallery
samples) and to the loggers.

Every number here comes from the metric states that give the headline numbers (already summed or gathered
across DDP ranks): nothing is evaluated twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from resnet_tasks.evaluation.gallery import GalleryItem


def confusion_table(confusion: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-class scores of a (C, C) count matrix (rows = truth, columns = prediction).

    `recall` (= per-class accuracy: the share of the class's samples/pixels predicted as it), `precision`,
    `iou` (TP / (TP + FP + FN)) and `support` (the class's samples/pixels). Undefined ratios are NaN.
    """
    counts = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    true_positive = np.diag(counts)
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    union = support + predicted - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "recall": np.where(support > 0, true_positive / support, np.nan),
            "precision": np.where(predicted > 0, true_positive / predicted, np.nan),
            "iou": np.where(union > 0, true_positive / union, np.nan),
            "support": support,
        }


@dataclass
class EvaluationSummary:
    """One validation/test epoch in the form the report draws.

    - `class_names` and `per_class`: the per-class table (column -> one value per class, NaN = undefined);
      `main_column` is the column the bar chart sorts by (`ap`, `iou` or `acc`);
    - `confusion` (counts, rows = truth, columns = prediction) with its axis names `confusion_names`
      (detection adds a last "background" row/column: false detections and missed objects);
    - `precision` (detection): COCO's precision array at all areas and the largest detection limit,
      (IoU thresholds, recall thresholds, classes), -1 where undefined, for `precision_names` at `iou_thresholds`
      and `recall_thresholds`;
    - `gallery`: the first images in evaluation order; `gallery_worst`: the images with the highest error score.
    """

    task: str
    class_names: list[str]
    per_class: dict[str, list[float]]
    main_column: str
    confusion: np.ndarray | None
    confusion_names: list[str]
    precision: np.ndarray | None = None
    precision_names: list[str] = field(default_factory=list)
    iou_thresholds: list[float] = field(default_factory=list)
    recall_thresholds: list[float] = field(default_factory=list)
    gallery: list[GalleryItem] = field(default_factory=list)
    gallery_worst: list[GalleryItem] = field(default_factory=list)

    def rows(self) -> list[dict[str, str | float]]:
        """The per-class table as rows `{"class": name, column: value, ...}` (per_class.csv)."""
        return [
            {"class": name, **{column: float(values[i]) for column, values in self.per_class.items()}}
            for i, name in enumerate(self.class_names)
        ]


@dataclass
class EvaluationResult:
    """What a task computes at the end of a validation/test epoch.

    `metrics` are logged as `<stage>/<name>` (loggers, progress bar, metrics.json); `entries` (per-class values)
    go to metrics.json only; `summary` is the report's, without its gallery (the task's evaluation loop adds it).
    """

    metrics: dict[str, torch.Tensor | float]
    entries: dict[str, float]
    summary: EvaluationSummary


def confusion_summary(
    task: str, names: Sequence[str], confusion: torch.Tensor, columns: dict[str, str]
) -> EvaluationSummary:
    """The summary of a class-map evaluation (classification, segmentation): the confusion matrix and the per-class
    table with `columns` (table column -> `confusion_table` score; the first is the main column)."""
    counts = confusion.cpu()
    table = confusion_table(counts)
    return EvaluationSummary(
        task=task,
        class_names=list(names),
        per_class={column: table[score].tolist() for column, score in columns.items()},
        main_column=next(iter(columns)),
        confusion=counts.numpy(),
        confusion_names=list(names),
    )


def per_class_entries(names: Sequence[str], columns: dict[str, Sequence[float]]) -> dict[str, float]:
    """`{"<column>/<class>": value}` for metrics.json: every defined (finite) value of the given columns."""
    entries: dict[str, float] = {}
    for column, values in columns.items():
        for name, value in zip(names, values):
            if value is not None and math.isfinite(float(value)):
                entries[f"{column}/{name}"] = float(value)
    return entries
