"""Semantic segmentation metrics from one confusion matrix: mean IoU, pixel accuracy and per-class IoU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from resnet_tasks.labels import IGNORE_INDEX


def confusion_counts(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(C, C) int64 confusion matrix of one batch: rows = target class, columns = predicted class.

    Pixels whose target is `ignore_index` (or any id outside 0..C-1) do not count.

    `torch.bincount` is used directly on every device. It is exact and allowed in deterministic mode
    (PyTorch only refuses the CUDA kernel when `weights=` is given), whereas torchmetrics' `_bincount`
    switches to an (N x C^2) comparison matrix whenever deterministic algorithms are enabled (~3 s and
    hundreds of MB for 200k pixels of 21 classes; 2.6 GB for four 500x375 VOC masks), against tens of
    milliseconds here.
    """
    # int32 indices (C^2 + 1 bins fit easily): half the memory traffic of int64, ~5x faster on CPU.
    target = target.reshape(-1).to(torch.int32)
    preds = preds.reshape(-1).to(torch.int32)
    valid = (target >= 0) & (target < num_classes)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        valid &= target != ignore_index
    # Ignored pixels go to one extra bin that is dropped: cheaper than boolean-mask selection.
    square = num_classes * num_classes
    index = torch.where(valid, target * num_classes + preds.clamp(0, num_classes - 1), square)
    counts = torch.bincount(index, minlength=square + 1)[:square]
    return counts.reshape(num_classes, num_classes)


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


class SegmentationMetrics(Metric):
    """Confusion-matrix metric: `compute()` -> {"miou", "pixel_acc", "iou/<class name>"}.

    The state is a (C, C) int64 matrix summed across DDP ranks, so the result is exact under any
    sharding (integer counts; no averaging of per-rank means). `iou/<name>` is left out for classes
    with an empty union (they have no defined IoU).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.add_state(
            "confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )
        self.last_confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `preds` and `target` are integer class maps of the same shape (IGNORE_INDEX = ignore)."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        self.confusion += confusion_counts(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, torch.Tensor]:
        # Kept for the report (confusion matrix, per-class accuracy): the matrix summed over all ranks.
        self.last_confusion = self.confusion.detach().cpu().clone()
        scores = scores_from_confusion(self.confusion)
        result = {"miou": scores["miou"].float(), "pixel_acc": scores["pixel_acc"].float()}
        for name, value in zip(self.class_names, scores["iou"]):
            if not torch.isnan(value):
                result[f"iou/{name}"] = value.float()
        return result
