"""PASCAL VOC detection AP at IoU 0.5 as the devkit computes it (VOC2007 11-point and VOC2010+ area)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from resnet_tasks.compat import OwnStateSync
from resnet_tasks.evaluation.detection import gather_list_states

VOC_METRIC_NAMES: tuple[str, ...] = ("voc07_map_50", "voc12_map_50")


def voc_ap_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 AP: mean over recall thresholds 0, 0.1, ..., 1 of the best precision at recall >= threshold."""
    total = 0.0
    for threshold in np.linspace(0.0, 1.0, 11):
        above = precision[recall >= threshold]
        total += float(above.max()) if above.size else 0.0
    return total / 11.0


def voc_ap_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: area under the precision envelope (precision made non-increasing in recall)."""
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def box_iou_matrix(detections: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """IoU of every detection (rows) with every ground-truth box (columns), continuous XYXY coordinates."""
    if detections.size == 0 or ground_truth.size == 0:
        return np.zeros((len(detections), len(ground_truth)))
    left = np.maximum(detections[:, None, 0], ground_truth[None, :, 0])
    top = np.maximum(detections[:, None, 1], ground_truth[None, :, 1])
    right = np.minimum(detections[:, None, 2], ground_truth[None, :, 2])
    bottom = np.minimum(detections[:, None, 3], ground_truth[None, :, 3])
    intersection = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area_det = (detections[:, 2] - detections[:, 0]) * (detections[:, 3] - detections[:, 1])
    area_gt = (ground_truth[:, 2] - ground_truth[:, 0]) * (ground_truth[:, 3] - ground_truth[:, 1])
    union = area_det[:, None] + area_gt[None, :] - intersection
    return intersection / np.maximum(union, np.finfo(np.float64).eps)


def match_image_voc(
    boxes: np.ndarray,
    scores: np.ndarray,
    ground_truth: np.ndarray,
    difficult: np.ndarray,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's greedy matching of one image and one class.

    Detections in descending score order take the ground-truth box of highest IoU; IoU >= threshold with an
    unclaimed box is a true positive, with a claimed one a false positive (duplicate), below threshold a false
    positive. A detection whose best box is `difficult` counts as neither. Returns (true_positive, counted)
    flags in the input order. Matching one image at a time gives the devkit's result: its global score order
    restricted to one image is this image's score order.
    """
    count = len(boxes)
    true_positive = np.zeros(count, dtype=bool)
    counted = np.ones(count, dtype=bool)
    if count == 0 or len(ground_truth) == 0:
        return true_positive, counted
    order = np.argsort(-scores, kind="stable")
    overlaps = box_iou_matrix(boxes[order].astype(np.float64), ground_truth.astype(np.float64))
    claimed = np.zeros(len(ground_truth), dtype=bool)
    for rank, index in enumerate(order):
        best = int(np.argmax(overlaps[rank]))
        if overlaps[rank, best] >= iou_threshold:
            if difficult[best]:
                counted[index] = False
            elif not claimed[best]:
                true_positive[index] = True
                claimed[best] = True
    return true_positive, counted


def per_image_arrays(tensors: list[torch.Tensor], dtype: Any) -> list[np.ndarray]:
    """One state's per-image tensors as numpy arrays of `dtype`, read back to the host in one transfer."""
    if not tensors:
        return []
    shape = tuple(tensors[0].shape[1:])
    joined = torch.cat([tensor.reshape(-1) for tensor in tensors]).cpu().numpy().astype(dtype)
    parts = np.split(joined, np.cumsum([tensor.numel() for tensor in tensors])[:-1])
    return [part.reshape(-1, *shape) for part in parts]


class VOCDetectionAP(OwnStateSync, Metric):
    """PASCAL VOC detection AP at IoU 0.5: `voc07_map_50` (11-point, VOC2007 test) and `voc12_map_50` (area).

    Follows the devkit (VOCevaldet.m): `difficult` ground truth is neither required nor penalised, duplicates
    are false positives, classes without (non-difficult) ground truth are left out of the mean.

    Pixel convention: the devkit adds 1 to widths and heights because its coordinates are 1-based inclusive
    pixel indices. Our VOC loader converts them once to continuous 0-based XYXY (xmin - 1, ymin - 1, xmax,
    ymax), on which the plain IoU computed here equals the devkit's "+1" IoU on the file's coordinates.

    `update` only keeps each image's detections and ground truth (list states, one tensor per image, on the device);
    the per-image matching runs in `compute`, on the host, over the images of every DDP rank in rank order.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = iou_threshold
        for name in ("detection_boxes", "detection_scores", "detection_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        for name in ("groundtruth_boxes", "groundtruth_labels", "groundtruth_difficult"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.last_per_class: dict[int, tuple[float, float]] = {}

    def sync_states(self, process_group: Any) -> None:
        # One object gather: also right when a rank saw no image, or ranks saw different numbers of images.
        gather_list_states(self, process_group)

    def update(self, preds: Sequence[dict[str, torch.Tensor]], target: Sequence[dict[str, torch.Tensor]]) -> None:
        """preds: boxes (XYXY), scores, labels; target: boxes, labels and optional `difficult` flags."""
        for prediction, truth in zip(preds, target):
            self.detection_boxes.append(prediction["boxes"].detach().reshape(-1, 4))
            self.detection_scores.append(prediction["scores"].detach().reshape(-1))
            self.detection_labels.append(prediction["labels"].detach().reshape(-1))
            labels = truth["labels"].detach().reshape(-1)
            difficult = truth.get("difficult")
            self.groundtruth_boxes.append(truth["boxes"].detach().reshape(-1, 4))
            self.groundtruth_labels.append(labels)
            self.groundtruth_difficult.append(
                difficult.detach().reshape(-1).bool() if difficult is not None else torch.zeros_like(labels, dtype=bool)
            )

    def _matched(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every counted detection's (score, label, true positive) in image order, and the non-difficult labels."""
        scores, labels, hits, positives = [], [], [], []
        images = zip(
            per_image_arrays(self.detection_boxes, np.float64),
            per_image_arrays(self.detection_scores, np.float64),
            per_image_arrays(self.detection_labels, np.int64),
            per_image_arrays(self.groundtruth_boxes, np.float64),
            per_image_arrays(self.groundtruth_labels, np.int64),
            per_image_arrays(self.groundtruth_difficult, bool),
        )
        for boxes, score, label, truth, truth_labels, difficult in images:
            true_positive = np.zeros(len(label), dtype=bool)
            counted = np.ones(len(label), dtype=bool)
            for value in np.unique(label):
                mine, theirs = label == value, truth_labels == value
                flags, keep = match_image_voc(
                    boxes[mine], score[mine], truth[theirs], difficult[theirs], self.iou_threshold
                )
                true_positive[mine] = flags
                counted[mine] = keep
            scores.append(score[counted])
            labels.append(label[counted])
            hits.append(true_positive[counted])
            positives.append(truth_labels[~difficult])

        def joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return (joined(scores, np.float64), joined(labels, np.int64), joined(hits, bool), joined(positives, np.int64))

    def per_class(self) -> dict[int, tuple[float, float]]:
        """{label: (11-point AP, area AP)} for every class with non-difficult ground truth."""
        scores, labels, true_positive, gt_labels = self._matched()
        results: dict[int, tuple[float, float]] = {}
        for label in np.unique(gt_labels):
            positives = int((gt_labels == label).sum())
            mine = labels == label
            order = np.argsort(-scores[mine], kind="stable")
            hits = true_positive[mine][order]
            tp = np.cumsum(hits)
            fp = np.cumsum(~hits)
            recall = tp / positives
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            results[int(label)] = (voc_ap_11_point(recall, precision), voc_ap_area(recall, precision))
        return results

    def compute(self) -> dict[str, torch.Tensor]:
        per_class = self.per_class()
        # Kept for the per-class table: computed here from the synchronised states (all ranks' detections).
        self.last_per_class = per_class
        if not per_class:
            return {name: torch.tensor(-1.0) for name in VOC_METRIC_NAMES}
        ap07 = np.mean([value[0] for value in per_class.values()])
        ap12 = np.mean([value[1] for value in per_class.values()])
        return {"voc07_map_50": torch.tensor(float(ap07)), "voc12_map_50": torch.tensor(float(ap12))}
