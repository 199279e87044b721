"""COCO evaluation: our mAP metric (torchmetrics, faster_coco_eval backend when installed) vs pycocotools COCOeval.

Run in the suite: `python benchmarks/run.py --only coco_eval [--quick] [--coco-images 5000]`
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import torch
from timing import Sizes, alternate, median


def synthetic_coco(num_images: int, detections_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A deterministic COCO instances dict (80 non-contiguous category ids, ~1% crowd boxes) and detections
    in COCO results format: half are jittered copies of ground-truth boxes (varied IoU), half random."""
    rng = np.random.default_rng(seed)
    category_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    width, height = 640, 480
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        count = int(rng.integers(1, 15))
        wh = np.exp(rng.uniform(np.log(6), np.log(300), size=(count, 2)))
        xy = rng.uniform(0, 1, size=(count, 2)) * (np.array([width, height]) - wh)
        categories = rng.choice(category_ids, size=count)
        for box_xy, box_wh, category in zip(xy, wh, categories):
            crowd = int(rng.random() < 0.01)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": [round(float(v), 2) for v in (*box_xy, *box_wh)],
                    "area": round(float(box_wh[0] * box_wh[1]), 2),
                    "iscrowd": crowd,
                }
            )
        for index in range(detections_per_image):
            if index % 2 == 0:
                source = int(rng.integers(count))
                noise = rng.normal(0, 0.12, size=4) * np.concatenate([wh[source], wh[source]])
                box = np.concatenate([xy[source], wh[source]]) + noise
                box[2:] = np.maximum(box[2:], 1.0)
                category = categories[source] if rng.random() < 0.8 else rng.choice(category_ids)
            else:
                size = np.exp(rng.uniform(np.log(6), np.log(300), size=2))
                box = np.concatenate([rng.uniform(0, 1, size=2) * (np.array([width, height]) - size), size])
                category = rng.choice(category_ids)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": [round(float(v), 2) for v in box],
                    "score": round(float(rng.random()), 4),
                }
            )
    categories_list = [{"id": i, "name": f"category_{i}"} for i in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories_list}, detections


def _pycocotools_stats(ground_truth: dict, detections: list[dict]) -> np.ndarray:
    """The reference: pycocotools COCO + loadRes + COCOeval evaluate/accumulate/summarize."""
    import io
    from contextlib import redirect_stdout

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        results = coco.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco, results, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def _metric_inputs(ground_truth: dict, detections: list[dict]) -> list[tuple[list[dict], list[dict]]]:
    """The same data as torchmetrics inputs (XYXY tensors), in validation-step-sized chunks of 8 images."""

    def xyxy(boxes: list[list[float]]) -> torch.Tensor:
        array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return torch.from_numpy(np.concatenate([array[:, :2], array[:, :2] + array[:, 2:]], axis=1)).float()

    per_image_gt: dict[int, list[dict]] = {image["id"]: [] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        per_image_gt[annotation["image_id"]].append(annotation)
    per_image_dt: dict[int, list[dict]] = {image_id: [] for image_id in per_image_gt}
    for detection in detections:
        per_image_dt[detection["image_id"]].append(detection)
    preds, targets = [], []
    for image_id in per_image_gt:
        gts, dts = per_image_gt[image_id], per_image_dt[image_id]
        preds.append(
            {
                "boxes": xyxy([d["bbox"] for d in dts]),
                "scores": torch.tensor([d["score"] for d in dts], dtype=torch.float32),
                "labels": torch.tensor([d["category_id"] for d in dts], dtype=torch.int64),
            }
        )
        targets.append(
            {
                "boxes": xyxy([a["bbox"] for a in gts]),
                "labels": torch.tensor([a["category_id"] for a in gts], dtype=torch.int64),
                "iscrowd": torch.tensor([a["iscrowd"] for a in gts], dtype=torch.int64),
                "area": torch.tensor([a["area"] for a in gts], dtype=torch.float32),
            }
        )
    return [(preds[i : i + 8], targets[i : i + 8]) for i in range(0, len(preds), 8)]


def _our_coco_metric(chunks: list[tuple[list[dict], list[dict]]], backend: str | None) -> dict[str, float]:
    """resnet_tasks.evaluation.detection.coco_map_metric: update per validation batch, then compute."""
    import io
    from contextlib import redirect_stdout

    from resnet_tasks.evaluation import detection

    patch = mock.patch.object(detection, "coco_backend", lambda: backend) if backend else contextlib.nullcontext()
    with patch, redirect_stdout(io.StringIO()):
        metric = detection.coco_map_metric()
        for preds, targets in chunks:
            metric.update(preds, targets)
        result = metric.compute()
    return {name: float(result[name]) for name in ("map", "map_50", "map_75")}


def bench_coco_eval(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Our COCO mAP metric (torchmetrics, backend faster_coco_eval when installed) vs pycocotools COCOeval."""
    from resnet_tasks.evaluation.detection import coco_backend

    ground_truth, detections = synthetic_coco(sizes.coco_images, sizes.coco_detections)
    chunks = _metric_inputs(ground_truth, detections)
    auto_backend = coco_backend()
    outputs: dict[str, Any] = {}

    def keep(name: str, run: Callable[[], Any]) -> Callable[[], None]:
        def wrapped() -> None:
            outputs[name] = run()

        return wrapped

    candidates = {
        "pycocotools": keep("pycocotools", lambda: _pycocotools_stats(ground_truth, detections)),
        f"ours[{auto_backend}]": keep("ours", lambda: _our_coco_metric(chunks, None)),
    }
    if auto_backend != "pycocotools":
        candidates["ours[pycocotools]"] = keep("ours_pycocotools", lambda: _our_coco_metric(chunks, "pycocotools"))
    times = alternate(candidates, repeats=sizes.coco_repeats)
    stats = outputs["pycocotools"]
    reference = {"map": float(stats[0]), "map_50": float(stats[1]), "map_75": float(stats[2])}
    t_reference = median(times["pycocotools"])
    result: dict[str, Any] = {
        "images": sizes.coco_images,
        "detections_per_image": sizes.coco_detections,
        "ground_truth_boxes": len(ground_truth["annotations"]),
        "faster_coco_eval_installed": auto_backend == "faster_coco_eval",
        "seconds_pycocotools": t_reference,
        "ap_pycocotools": reference,
    }
    for key, name in (("ours", f"ours[{auto_backend}]"), ("ours_pycocotools", "ours[pycocotools]")):
        if key not in outputs:
            continue
        label = auto_backend if key == "ours" else "pycocotools"
        ours = outputs[key]
        difference = max(abs(ours[k] - reference[k]) for k in reference)
        result[f"backend_{label}"] = {
            "seconds": median(times[name]),
            "speedup_over_pycocotools": t_reference / median(times[name]),
            "ap": ours,
            "max_abs_ap_difference": difference,
            "ap_equal_1e-4": difference <= 1e-4,
        }
    fast = result.get("backend_faster_coco_eval")
    result["goal_speedup"] = 4.0
    result["met"] = bool(fast and fast["speedup_over_pycocotools"] >= 4.0 and fast["ap_equal_1e-4"])
    if not fast:
        result["note"] = "faster-coco-eval not installed: our metric ran on pycocotools (pip install faster-coco-eval)"
    return result
