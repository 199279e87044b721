"""Detection metrics: COCO mAP (torchmetrics over pycocotools / faster-coco-eval) and the PASCAL VOC devkit AP.

Both metrics work in the dataset's category-id space and synchronise across DDP ranks (torchmetrics states).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision

# The COCO summary numbers we report (torchmetrics' names); contract names are map, map_50 and map_75.
COCO_METRIC_NAMES: tuple[str, ...] = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
)
VOC_METRIC_NAMES: tuple[str, ...] = ("voc07_map_50", "voc12_map_50")


def gather_list_states(metric: Metric, process_group: Any = None) -> None:
    """Replace each list state of `metric` by the concatenation of every rank's list (rank order), in ONE
    `all_gather_object` call.

    torchmetrics all-gathers a list state element by element (one collective per image for
    MeanAveragePrecision), which deadlocks or mismatches when ranks hold different numbers of images, as they
    do with our unpadded EvalShardSampler. One object gather per metric has the same count on every rank.
    """
    import torch.distributed as dist

    group = process_group if process_group is not None else metric.process_group
    names = [name for name in metric._reductions if isinstance(getattr(metric, name), list)]
    local = {name: [tensor.detach().cpu() for tensor in getattr(metric, name)] for name in names}
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    for name in names:
        setattr(metric, name, [tensor.to(metric.device) for part in parts for tensor in part[name]])


class CocoMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' MeanAveragePrecision with a DDP sync that works for unequal image counts per rank.

    `compute()` also returns COCOeval's `precision` array (IoU thresholds x recall thresholds x classes x areas x
    detection limits) and the category id of each class (`classes`) from the same, single evaluation: the
    per-class APs and PR curves come from it (torchmetrics' `class_metrics` would evaluate once per class).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(extended_summary=True, **kwargs)

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        gather_list_states(self, process_group)

    def compute(self) -> dict[str, Any]:
        results = super().compute()
        for key in ("ious", "recall", "scores"):  # per image/class IoU tables: large, and unused here
            results.pop(key, None)
        return results


@dataclass
class PerClassAP:
    """COCO AP per category from one evaluation: `ap` (IoU 0.50:0.95), `ap50`, `ap75`; NaN without ground truth.

    `precision` is (IoU thresholds, recall thresholds, categories) at all areas and the largest detection
    limit, -1 where undefined (as COCOeval leaves it); `category_ids` orders the last axis.
    """

    category_ids: list[int]
    ap: np.ndarray
    ap50: np.ndarray
    ap75: np.ndarray
    precision: np.ndarray


def per_class_ap(results: dict[str, Any], iou_thresholds: Sequence[float]) -> PerClassAP:
    """Per-category AP from `CocoMeanAveragePrecision.compute()`: means of COCOeval's precision array, as its
    `summarize()` computes the overall numbers (a category's mean over the entries that are defined)."""
    classes = results.get("classes")
    ids = [int(c) for c in (classes.tolist() if isinstance(classes, torch.Tensor) else classes or [])]
    precision = results.get("precision")
    if precision is None or not ids or np.ndim(precision) != 5:
        empty = np.zeros(0)
        return PerClassAP([], empty, empty, empty, np.zeros((len(iou_thresholds), 0, 0)))
    array = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]  # area "all", largest detection limit

    def mean_defined(values: np.ndarray) -> np.ndarray:
        defined = values > -1
        total = np.where(defined, values, 0.0).sum(axis=(0, 1))
        count = defined.sum(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    thresholds = np.asarray(iou_thresholds, dtype=np.float64)

    def at(threshold: float) -> np.ndarray:
        index = np.flatnonzero(np.isclose(thresholds, threshold))
        return mean_defined(array[index]) if index.size else np.full(len(ids), np.nan)

    return PerClassAP(ids, mean_defined(array), at(0.5), at(0.75), array)


def coco_backend() -> str:
    """faster-coco-eval when installed (same numbers, C++ speed), else the reference pycocotools."""
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"


def coco_map_metric() -> CocoMeanAveragePrecision:
    """COCO box mAP with torchmetrics, boxes XYXY; targets may carry `iscrowd` and `area` (COCO's own areas).

    With `iscrowd` the crowd regions are ignore regions as in COCOeval, and with `area` the small/medium/large
    buckets use the annotation's area (a segment area for COCO), so the numbers equal COCOeval's.
    """
    # COCOeval's own float64 thresholds: torchmetrics' defaults come from float32 linspace, and a recall of
    # exactly 0.29 then falls on the other side of the threshold 0.29000002 (numbers off by ~1e-4).
    iou_thresholds = np.linspace(0.5, 0.95, 10).tolist()
    rec_thresholds = np.linspace(0.0, 1.0, 101).tolist()
    metric = CocoMeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend=coco_backend(),
        iou_thresholds=iou_thresholds,
        rec_thresholds=rec_thresholds,
    )
    # Our models return at most box_detections_per_img (100) per image; the warning only fires above that.
    metric.warn_on_many_detections = False
    return metric


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
    if count == 0:
        return true_positive, counted
    if len(ground_truth) == 0:
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


class VOCDetectionAP(Metric):
    """PASCAL VOC detection AP at IoU 0.5: `voc07_map_50` (11-point, VOC2007 test) and `voc12_map_50` (area).

    Follows the devkit (VOCevaldet.m): `difficult` ground truth is neither required nor penalised, duplicates
    are false positives, classes without (non-difficult) ground truth are left out of the mean.

    Pixel convention: the devkit adds 1 to widths and heights because its coordinates are 1-based inclusive
    pixel indices. Our VOC loader converts them once to continuous 0-based XYXY (xmin - 1, ymin - 1, xmax,
    ymax), on which the plain IoU computed here equals the devkit's "+1" IoU on the file's coordinates.

    Per-image matching happens in `update`; the states are flat per-detection lists (scores, labels, true
    positive flags) and the labels of the non-difficult ground truth, concatenated across DDP ranks.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = iou_threshold
        self.add_state("detection_scores", default=[], dist_reduce_fx="cat")
        self.add_state("detection_labels", default=[], dist_reduce_fx="cat")
        self.add_state("detection_true_positive", default=[], dist_reduce_fx="cat")
        self.add_state("groundtruth_labels", default=[], dist_reduce_fx="cat")
        self.last_per_class: dict[int, tuple[float, float]] = {}

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # One object gather: also right when a rank saw no image (torchmetrics would gather an empty float
        # tensor against other ranks' int64 ones).
        gather_list_states(self, process_group)

    def update(self, preds: Sequence[dict[str, torch.Tensor]], target: Sequence[dict[str, torch.Tensor]]) -> None:
        """preds: boxes (XYXY), scores, labels; target: boxes, labels and optional `difficult` flags."""
        for prediction, truth in zip(preds, target):
            boxes = prediction["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
            scores = prediction["scores"].detach().cpu().double().numpy()
            labels = prediction["labels"].detach().cpu().numpy()
            gt_boxes = truth["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
            gt_labels = truth["labels"].detach().cpu().numpy()
            difficult = truth.get("difficult")
            gt_difficult = (
                difficult.detach().cpu().numpy().astype(bool)
                if difficult is not None
                else np.zeros(len(gt_labels), dtype=bool)
            )
            true_positive = np.zeros(len(labels), dtype=bool)
            counted = np.ones(len(labels), dtype=bool)
            for label in np.unique(labels):
                mine = labels == label
                theirs = gt_labels == label
                flags, keep = match_image_voc(
                    boxes[mine], scores[mine], gt_boxes[theirs], gt_difficult[theirs], self.iou_threshold
                )
                true_positive[mine] = flags
                counted[mine] = keep
            device = self.device
            self.detection_scores.append(torch.as_tensor(scores[counted], dtype=torch.float64, device=device))
            self.detection_labels.append(torch.as_tensor(labels[counted], dtype=torch.int64, device=device))
            self.detection_true_positive.append(
                torch.as_tensor(true_positive[counted], dtype=torch.uint8, device=device)
            )
            self.groundtruth_labels.append(torch.as_tensor(gt_labels[~gt_difficult], dtype=torch.int64, device=device))

    @staticmethod
    def _flat(state: Any, dtype: torch.dtype) -> np.ndarray:
        """A list state (single process) or an already concatenated tensor (after DDP sync) as one array."""
        if isinstance(state, torch.Tensor):
            return state.cpu().numpy()
        if not state:
            return np.zeros(0, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        return torch.cat([s.cpu() for s in state]).numpy()

    def per_class(self) -> dict[int, tuple[float, float]]:
        """{label: (11-point AP, area AP)} for every class with non-difficult ground truth."""
        scores = self._flat(self.detection_scores, torch.float64)
        labels = self._flat(self.detection_labels, torch.int64)
        true_positive = self._flat(self.detection_true_positive, torch.uint8).astype(bool)
        gt_labels = self._flat(self.groundtruth_labels, torch.int64)
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
        self._index = {category_id: i for i, category_id in enumerate(self.category_ids)}
        self.last_image_errors: list[float] = []

    def _classes(self, category_ids: torch.Tensor) -> np.ndarray:
        """Category ids -> row/column index (-1 for an id that is not one of this matrix's classes)."""
        return np.array([self._index.get(int(i), -1) for i in category_ids.tolist()], dtype=np.int64)

    def update(self, preds: Sequence[dict[str, torch.Tensor]], target: Sequence[dict[str, torch.Tensor]]) -> None:
        """Add images (boxes XYXY, labels = category ids, scores; targets may flag `iscrowd`). Each image's error
        share, (missed + false + wrongly classified) / (objects + false detections), is left in
        `last_image_errors` (torchmetrics' `update` returns nothing)."""
        from torchvision.ops import box_iou

        background = len(self.category_ids)
        counts = np.zeros((background + 1, background + 1), dtype=np.int64)
        errors = []
        for prediction, truth in zip(preds, target):
            keep = prediction["scores"].detach().cpu() >= self.score_threshold
            det_boxes = prediction["boxes"].detach().cpu().double()[keep].reshape(-1, 4)
            det_classes = self._classes(prediction["labels"].detach().cpu()[keep])
            gt_boxes = truth["boxes"].detach().cpu().double().reshape(-1, 4)
            gt_classes = self._classes(truth["labels"].detach().cpu())
            crowd = truth.get("iscrowd")
            ignored = crowd.detach().cpu().bool().numpy() if crowd is not None else np.zeros(len(gt_classes), bool)
            ignored = ignored | (gt_classes < 0)
            det_valid = det_classes >= 0
            det_boxes, det_classes = det_boxes[torch.from_numpy(det_valid)], det_classes[det_valid]
            real = ~ignored
            ious = box_iou(gt_boxes[torch.from_numpy(real)], det_boxes).numpy()
            gt_real = gt_classes[real]
            pairs = np.argwhere(ious > self.iou_threshold)
            if len(pairs):
                pairs = pairs[np.argsort(-ious[pairs[:, 0], pairs[:, 1]], kind="stable")]
                pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]  # one object per detection
                pairs = pairs[np.argsort(-ious[pairs[:, 0], pairs[:, 1]], kind="stable")]
                pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]  # one detection per object
            matched_gt = np.zeros(len(gt_real), dtype=bool)
            matched_det = np.zeros(len(det_classes), dtype=bool)
            wrong = 0
            for gt_index, det_index in pairs:
                counts[gt_real[gt_index], det_classes[det_index]] += 1
                matched_gt[gt_index] = matched_det[det_index] = True
                wrong += int(gt_real[gt_index] != det_classes[det_index])
            for gt_index in np.flatnonzero(~matched_gt):
                counts[gt_real[gt_index], background] += 1
            unmatched = np.flatnonzero(~matched_det)
            if ignored.any() and len(unmatched):
                overlap = box_iou(gt_boxes[torch.from_numpy(ignored)], det_boxes[torch.from_numpy(unmatched)])
                unmatched = unmatched[~(overlap > self.iou_threshold).any(dim=0).numpy()]
            for det_index in unmatched:
                counts[background, det_classes[det_index]] += 1
            missed = int((~matched_gt).sum())
            errors.append((missed + len(unmatched) + wrong) / max(1, len(gt_real) + len(unmatched)))
        self.confusion += torch.from_numpy(counts).to(self.confusion.device)
        self.last_image_errors = errors

    def compute(self) -> torch.Tensor:
        return self.confusion.clone()
