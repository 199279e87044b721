"""COCO detection mAP (torchmetrics over pycocotools / faster-coco-eval), its per-class APs, and the one-gather DDP
sync of list states that it shares with the VOC metric (`evaluation.voc`).

The metrics work in the dataset's category-id space; their updates only keep tensors on the device.
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

from resnet_tasks.compat import OwnStateSync, metric_state_names

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


def gather_list_states(metric: Metric, process_group: Any = None) -> None:
    """Replace each list state of `metric` by the concatenation of every rank's list (rank order), in ONE
    `all_gather_object` call.

    torchmetrics all-gathers a list state element by element (one collective per image for
    MeanAveragePrecision), which deadlocks or mismatches when ranks hold different numbers of images, as they
    do with our unpadded EvalShardSampler. One object gather per metric has the same count on every rank.
    """
    import torch.distributed as dist

    group = process_group if process_group is not None else metric.process_group
    names = [name for name in metric_state_names(metric) if isinstance(getattr(metric, name), list)]
    local = {name: [tensor.detach().cpu() for tensor in getattr(metric, name)] for name in names}
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    for name in names:
        setattr(metric, name, [tensor.to(metric.device) for part in parts for tensor in part[name]])


class CocoMeanAveragePrecision(OwnStateSync, MeanAveragePrecision):
    """torchmetrics' MeanAveragePrecision with a DDP sync that works for unequal image counts per rank.

    `compute()` also returns COCOeval's `precision` array (IoU thresholds x recall thresholds x classes x areas x
    detection limits) and the category id of each class (`classes`) from the same, single evaluation: the
    per-class APs and PR curves come from it (torchmetrics' `class_metrics` would evaluate once per class).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(extended_summary=True, **kwargs)

    def sync_states(self, process_group: Any) -> None:
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
    # torchmetrics gives a 0-d tensor when the data hold one class
    ids = [int(c) for c in (torch.atleast_1d(classes).tolist() if isinstance(classes, torch.Tensor) else classes or [])]
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
