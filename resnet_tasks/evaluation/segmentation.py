"""Semantic segmentation metrics from one confusion matrix: mean IoU, pixel accuracy and per-class IoU."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resnet_tasks.evaluation.confusion import ConfusionMatrix, confusion_counts
from resnet_tasks.labels import IGNORE_INDEX

__all__ = ["SegmentationMetrics", "class_map", "confusion_counts", "scores_from_confusion"]


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class index (N, H, W) int64 of (N, C, H, W) scores: the first maximum on ties, as argmax.

    `max(dim=1).indices` instead of `argmax(dim=1)`: the same indices, about 3x faster on CPU, where argmax
    over a non-innermost dimension takes a slow path (130 ms vs 45 ms for 2x21x512x512 on one core).
    """
    return logits.max(dim=1).indices


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel accuracy, per-class IoU (NaN where a class is in neither prediction nor target) and mean IoU.

    The mean is over classes whose union is non-empty, so a class absent from the data and never
    predicted neither helps nor hurts.
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    present = union > 0
    total = confusion.sum()
    miou = iou[present].mean() if bool(present.any()) else torch.tensor(0.0, dtype=torch.float64)
    pixel_acc = true_positive.sum() / total if total > 0 else torch.tensor(0.0, dtype=torch.float64)
    return {"miou": miou, "pixel_acc": pixel_acc, "iou": iou}


class SegmentationMetrics(ConfusionMatrix):
    """Confusion-matrix metric: `compute()` -> {"miou", "pixel_acc", "iou/<class name>"}.

    The state is a (C, C) int64 matrix summed across DDP ranks, so the result is exact under any
    sharding (integer counts; no averaging of per-rank means). `iou/<name>` is left out for classes
    with an empty union (they have no defined IoU).
    """

    higher_is_better = True

    def __init__(
        self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__(num_classes, ignore_index=ignore_index)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.last_confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def compute(self) -> dict[str, torch.Tensor]:
        # Kept for the report (confusion matrix, per-class accuracy): the matrix summed over all ranks.
        self.last_confusion = self.confusion.detach().cpu().clone()
        scores = scores_from_confusion(self.confusion)
        result = {"miou": scores["miou"].float(), "pixel_acc": scores["pixel_acc"].float()}
        for name, value in zip(self.class_names, scores["iou"]):
            if not torch.isnan(value):
                result[f"iou/{name}"] = value.float()
        return result
