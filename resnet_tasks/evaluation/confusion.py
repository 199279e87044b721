"""Confusion matrices as metrics: of class maps (classification labels, segmentation pixels) and of detections
matched to objects (Ultralytics' detection confusion matrix).

Updates stay on the device their inputs are on (nothing is read back to the host per batch); the counts are summed
across DDP ranks, so they are exact under any sharding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from resnet_tasks.labels import IGNORE_INDEX


def bin_counts(index: torch.Tensor, size: int) -> torch.Tensor:
    """How often each value 0..size-1 occurs in the integer tensor `index` (int64, values known to be in range).

    `torch.bincount` on the CPU, where it is fastest; elsewhere a scatter-add into `size` bins, because an
    accelerator's bincount reads the input's minimum and maximum back to the host (a sync per call). Both are exact,
    and both are allowed in deterministic mode.
    """
    if index.device.type == "cpu":
        return torch.bincount(index.reshape(-1), minlength=size)
    return scattered_counts(index, size)


def scattered_counts(index: torch.Tensor, size: int) -> torch.Tensor:
    """`bin_counts` by a scatter-add into `size` int64 bins: no value read back, on any device."""
    index = index.reshape(-1).long()
    counts = torch.zeros(size, dtype=torch.int64, device=index.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


def confusion_counts(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> torch.Tensor:
    """(C, C) int64 confusion matrix of one batch: rows = target class, columns = predicted class.

    Pixels (or samples) whose target is `ignore_index` (or any id outside 0..C-1) do not count.

    torchmetrics' `_bincount` switches to an (N x C^2) comparison matrix whenever deterministic algorithms are enabled
    (~3 s and hundreds of MB for 200k pixels of 21 classes; 2.6 GB for four 500x375 VOC masks); `bin_counts` takes
    tens of milliseconds.
    """
    # int32 indices (C^2 + 1 bins fit easily): half the memory traffic of int64, ~5x faster on CPU.
    target = target.reshape(-1).to(torch.int32)
    preds = preds.reshape(-1).to(torch.int32)
    valid = (target >= 0) & (target < num_classes)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        valid &= target != ignore_index
    # Ignored pixels go to one extra bin that is dropped: cheaper than boolean-mask selection (which syncs).
    square = num_classes * num_classes
    index = torch.where(valid, target * num_classes + preds.clamp(0, num_classes - 1), square)
    return bin_counts(index, square + 1)[:square].reshape(num_classes, num_classes)


class ConfusionMatrix(Metric):
    """(C, C) int64 counts of integer class maps, rows = truth, columns = prediction; `ignore_index` targets (and
    ids outside 0..C-1) do not count. `compute()` returns the matrix summed over every rank."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `preds` and `target` are integer class maps of the same shape."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        self.confusion += confusion_counts(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> Any:
        return self.confusion.clone()


class CategoryIndex:
    """Category ids -> row/column index of a confusion matrix (-1 for an id that is not one of its classes),
    computed on the ids' device (a copy of the table per device, made once)."""

    def __init__(self, category_ids: Sequence[int]) -> None:
        self.category_ids = [int(i) for i in category_ids]
        self._tables: dict[torch.device, torch.Tensor] = {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1)
        if not self.category_ids:
            return torch.full_like(ids, -1, dtype=torch.int64)
        table = self._tables.get(ids.device)
        if table is None:
            table = self._tables[ids.device] = torch.tensor(self.category_ids, dtype=torch.int64, device=ids.device)
        match = ids.long()[:, None] == table[None, :]
        return torch.where(match.any(dim=1), match.to(torch.uint8).argmax(dim=1), -1)


class DetectionConfusionMatrix(Metric):
    """Ultralytics-style detection confusion matrix: (K + 1) x (K + 1) counts, rows = truth, columns = prediction.

    Per image, detections scoring at least `score_threshold` are matched one-to-one to ground-truth boxes of any
    class with IoU above `iou_threshold`, highest IoU first. A matched pair counts at (true class, predicted
    class); an unmatched object counts in the last column ("background": missed); an unmatched detection in the
    last row (false detection). Ignored ground truth (crowd, difficult) is left out, and a detection that only
    overlaps such a region counts nowhere. Classes are the `category_ids` given (the model's object classes);
    boxes of other ids are left out. The state is summed across DDP ranks, so the counts are exact.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(
        self,
        category_ids: Sequence[int],
        iou_threshold: float = 0.45,
        score_threshold: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.category_ids = [int(i) for i in category_ids]
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = float(score_threshold)
        size = len(self.category_ids) + 1
        self.add_state("confusion", default=torch.zeros(size, size, dtype=torch.int64), dist_reduce_fx="sum")
        self.classes = CategoryIndex(self.category_ids)
        # Each image's error share from the last update, on the device (float64).
        self.last_image_errors = torch.zeros(0, dtype=torch.float64)

    def update(self, preds: Sequence[dict[str, torch.Tensor]], target: Sequence[dict[str, torch.Tensor]]) -> None:
        """Add images (boxes XYXY, labels = category ids, scores; targets may flag `iscrowd`). Each image's error
        share, (missed + false + wrongly classified) / (objects + false detections), is left in
        `last_image_errors`, a device tensor (torchmetrics' `update` returns nothing)."""
        size = len(self.category_ids) + 1
        indices, weights, errors = [], [], []
        for prediction, truth in zip(preds, target):
            index, weight, error = self._match(prediction, truth)
            indices.append(index)
            weights.append(weight)
            errors.append(error)
        if not errors:
            self.last_image_errors = torch.zeros(0, dtype=torch.float64, device=self.confusion.device)
            return
        counts = torch.zeros(size * size, dtype=torch.int64, device=self.confusion.device)
        counts.scatter_add_(0, torch.cat(indices).to(counts.device), torch.cat(weights).to(counts.device))
        self.confusion += counts.reshape(size, size)
        self.last_image_errors = torch.stack(errors)

    def _match(
        self, prediction: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image: (flat matrix indices, their counts 0/1, the error share) with masks in place of selections,
        so that nothing waits on the device."""
        from torchvision.ops import box_iou

        background = len(self.category_ids)
        size = background + 1
        det_classes = self.classes(prediction["labels"].detach())
        detected = (prediction["scores"].detach().reshape(-1) >= self.score_threshold) & (det_classes >= 0)
        det_boxes = prediction["boxes"].detach().double().reshape(-1, 4)
        gt_classes = self.classes(truth["labels"].detach())
        ignored = gt_classes < 0
        crowd = truth.get("iscrowd")
        if crowd is not None:
            ignored = ignored | crowd.detach().reshape(-1).bool()
        real = ~ignored
        gt_boxes = truth["boxes"].detach().double().reshape(-1, 4)
        objects, detections = len(gt_classes), len(det_classes)
        device = det_boxes.device
        if objects and detections:
            ious = box_iou(gt_boxes, det_boxes)
            above = ious > self.iou_threshold
            pairs = torch.where(real[:, None] & detected[None, :] & above, ious, -1.0)
            # One object per detection: its highest-IoU object (the first on ties), then one detection per object:
            # its highest-IoU detection among those pairs (the first on ties).
            best_object = pairs.max(dim=0).indices
            rows = torch.arange(objects, device=device)
            pairs = torch.where(rows[:, None] == best_object[None, :], pairs, -1.0)
            best_iou, best_detection = pairs.max(dim=1)
            matched_gt = best_iou > -1.0
            columns = torch.arange(detections, device=device)
            matched_det = (matched_gt[:, None] & (best_detection[:, None] == columns[None, :])).any(dim=0)
            # A detection that only overlaps ignored ground truth counts nowhere.
            on_ignored = (ignored[:, None] & above).any(dim=0)
            pair_classes = det_classes[best_detection]
        else:
            matched_gt = torch.zeros(objects, dtype=torch.bool, device=device)
            matched_det = torch.zeros(detections, dtype=torch.bool, device=device)
            on_ignored = torch.zeros(detections, dtype=torch.bool, device=device)
            pair_classes = torch.zeros(objects, dtype=torch.int64, device=device)
        false = detected & ~matched_det & ~on_ignored
        missed = real & ~matched_gt
        wrong = matched_gt & (gt_classes != pair_classes)
        truth_rows = gt_classes.clamp(min=0) * size
        index = torch.cat(
            [
                truth_rows + pair_classes.clamp(min=0),  # matched pairs
                truth_rows + background,  # missed objects
                background * size + det_classes.clamp(min=0),  # false detections
            ]
        )
        weight = torch.cat([matched_gt, missed, false]).to(torch.int64)
        counted = missed.sum() + false.sum() + wrong.sum()
        error = counted.double() / (real.sum() + false.sum()).clamp(min=1).double()
        return index, weight, error

    def compute(self) -> Any:
        return self.confusion.clone()
