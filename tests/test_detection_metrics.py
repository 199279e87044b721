"""Detection metrics: COCO mAP equals pycocotools COCOeval; the VOC devkit AP on a hand-computed example."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from resnet_tasks.compat import metric_state_names
from resnet_tasks.evaluation.detection import COCO_METRIC_NAMES, coco_map_metric
from resnet_tasks.evaluation.voc import VOCDetectionAP, box_iou_matrix, voc_ap_11_point
from tests.conftest import random_detection_case

# COCOeval.stats order -> our names
STATS_NAMES = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def _cocoeval(preds: list[dict], targets: list[dict]) -> dict[str, float]:
    """Reference numbers: pycocotools COCOeval on the same ground truth and detections (XYWH)."""
    images, annotations, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(preds, targets)):
        images.append({"id": image_id, "width": 300, "height": 300})
        for box, label, crowd, area in zip(target["boxes"].tolist(), target["labels"].tolist(),
                                           target["iscrowd"].tolist(), target["area"].tolist()):  # fmt: skip
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": crowd})  # fmt: skip
        for box, label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})  # fmt: skip
    categories = [{"id": i, "name": str(i)} for i in (1, 3, 5, 8)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = dict(zip(("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10",
                      "mar_100"), evaluator.stats[:9].tolist()))  # fmt: skip
    return stats


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_map_equals_pycocotools(seed: int) -> None:
    preds, targets = random_detection_case(seed)
    assert any(t["iscrowd"].any() for t in targets) and any(len(t["labels"]) == 0 for t in targets)
    assert any(len(p["labels"]) == 0 for p in preds)
    metric = coco_map_metric()
    # Two updates: the metric accumulates across batches as in validation.
    metric.update(preds[:10], targets[:10])
    metric.update(preds[10:], targets[10:])
    ours = metric.compute()
    reference = _cocoeval(preds, targets)
    assert set(STATS_NAMES) <= set(COCO_METRIC_NAMES)
    for name in STATS_NAMES:
        assert abs(float(ours[name]) - reference[name]) <= 1e-6, (name, float(ours[name]), reference[name])
    assert 0.1 < reference["map_50"] < 1.0  # a case that is neither trivial nor empty
    assert min(reference[k] for k in ("map_small", "map_medium", "map_large")) >= 0  # every bucket populated


def test_voc07_11_point_ap_hand_computed() -> None:
    # class 1: three required boxes (two in image A, one in B) and a difficult one in B;
    # class 2: one box, found; class 3: a detection but no ground truth (left out of the mean).
    box = {"g1": [0, 0, 10, 10], "g2": [20, 20, 30, 30], "g3": [40, 40, 50, 50], "g4": [0, 0, 8, 8]}
    targets = [
        {"boxes": torch.tensor([box["g1"], box["g2"]], dtype=torch.float32), "labels": torch.tensor([1, 1]),
         "difficult": torch.tensor([0, 0], dtype=torch.uint8)},
        {"boxes": torch.tensor([box["g3"], box["g4"], [60, 60, 70, 70]], dtype=torch.float32),
         "labels": torch.tensor([1, 1, 2]), "difficult": torch.tensor([0, 1, 0], dtype=torch.uint8)},
    ]  # fmt: skip
    preds = [
        # d1 0.9 -> g1 (TP), d2 0.8 -> g1 again (duplicate: FP)
        {"boxes": torch.tensor([[0, 0, 10, 10], [1, 0, 10, 10]], dtype=torch.float32),
         "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])},
        # d3 0.7 -> difficult g4 (ignored), d4 0.6 -> g3 (TP), d5 0.5 nothing (FP), class 2 TP, class 3 FP
        {"boxes": torch.tensor([[0, 0, 8, 8], [41, 40, 50, 50], [80, 80, 90, 90], [60, 60, 70, 70],
                                [0, 0, 5, 5]], dtype=torch.float32),
         "scores": torch.tensor([0.7, 0.6, 0.5, 0.3, 0.9]), "labels": torch.tensor([1, 1, 1, 2, 3])},
    ]  # fmt: skip
    # class 1 in score order: TP FP TP FP -> recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2
    # 11-point: thresholds 0..0.3 -> 1, 0.4..0.6 -> 2/3, 0.7..1 -> 0: (4 + 3 * 2/3) / 11 = 6/11
    # area: 1/3 * 1 + 1/3 * 2/3 = 5/9
    metric = VOCDetectionAP()
    metric.update(preds[:1], targets[:1])
    metric.update(preds[1:], targets[1:])
    per_class = metric.per_class()
    assert set(per_class) == {1, 2}
    assert per_class[1][0] == pytest.approx(6 / 11) and per_class[1][1] == pytest.approx(5 / 9)
    assert per_class[2] == pytest.approx((1.0, 1.0))
    result = metric.compute()
    assert float(result["voc07_map_50"]) == pytest.approx((6 / 11 + 1) / 2, abs=1e-6)
    assert float(result["voc12_map_50"]) == pytest.approx((5 / 9 + 1) / 2, abs=1e-6)
    # Direct check of the interpolation helper against the devkit's definition.
    recall, precision = np.array([1 / 3, 1 / 3, 2 / 3, 2 / 3]), np.array([1, 0.5, 2 / 3, 0.5])
    assert voc_ap_11_point(recall, precision) == pytest.approx(6 / 11)


def test_voc_iou_on_converted_boxes_equals_devkit_plus_one_iou() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = np.sort(rng.integers(1, 60, size=(2, 2, 2)), axis=1)  # 1-based inclusive x/y ranges
        a_box = np.array([a[0, 0], a[0, 1], a[1, 0], a[1, 1]], dtype=float)[[0, 2, 1, 3]]  # xmin ymin xmax ymax
        b_box = np.array([b[0, 0], b[0, 1], b[1, 0], b[1, 1]], dtype=float)[[0, 2, 1, 3]]
        # the devkit (VOCevaldet.m): +1 on widths, heights and the intersection
        iw = min(a_box[2], b_box[2]) - max(a_box[0], b_box[0]) + 1
        ih = min(a_box[3], b_box[3]) - max(a_box[1], b_box[1]) + 1
        area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
        devkit = iw * ih / (area(a_box) + area(b_box) - iw * ih) if iw > 0 and ih > 0 else 0.0
        convert = lambda r: r - np.array([1, 1, 0, 0])  # noqa: E731 - what the VOC loader does
        ours = box_iou_matrix(convert(a_box)[None], convert(b_box)[None])[0, 0]
        assert ours == pytest.approx(devkit)


def test_voc_metric_states_concatenate_like_ddp_ranks() -> None:
    """Two 'ranks' each seeing half of the images, merged, give the single-process answer."""
    preds, targets = random_detection_case(3)
    for target in targets:
        target["difficult"] = target.pop("iscrowd").to(torch.uint8)
    whole = VOCDetectionAP()
    whole.update(preds, targets)
    rank0, rank1 = VOCDetectionAP(), VOCDetectionAP()
    rank0.update(preds[0::2], targets[0::2])
    rank1.update(preds[1::2], targets[1::2])
    # What the DDP sync does to the list states (one tensor per image): rank 0's images, then rank 1's.
    for name in metric_state_names(rank0):
        setattr(rank0, name, getattr(rank0, name) + getattr(rank1, name))
    merged, expected = rank0.compute(), whole.compute()
    assert 0 < float(expected["voc07_map_50"]) < 1
    for name in expected:
        assert float(merged[name]) == pytest.approx(float(expected[name]), abs=1e-9)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One gloo rank: rank 0 evaluates images 0..16, rank 1 images 17..23 (COCO) and none at all (VOC)."""
    import torch.distributed as dist

    # A forked child cannot use the OpenMP pool its parent started (e.g. converting COCO's precision array): one
    # thread, or the first parallel op hangs.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        preds, targets = random_detection_case(0)
        voc_targets = [dict(t, difficult=t["iscrowd"].to(torch.uint8)) for t in targets]
        shard = slice(0, 17) if rank == 0 else slice(17, None)
        coco, voc = coco_map_metric(), VOCDetectionAP()
        coco.update(preds[shard], targets[shard])
        if rank == 0:
            voc.update(preds, voc_targets)
        result = {name: float(v) for name, v in coco.compute().items() if v.numel() == 1}
        result.update({name: float(v) for name, v in voc.compute().items()})
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_ranks_with_unequal_image_counts(tmp_path) -> None:
    """Our EvalShardSampler gives ranks different image counts (no padding): the sync must still agree."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp.pt"
    # fork: the children reuse this process's imports (spawn would re-import torch & co. for ~10 s each)
    mp.start_processes(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True, start_method="fork")
    gathered = torch.load(out)
    preds, targets = random_detection_case(0)
    coco, voc = coco_map_metric(), VOCDetectionAP()
    coco.update(preds, targets)
    voc.update(preds, [dict(t, difficult=t["iscrowd"].to(torch.uint8)) for t in targets])
    expected = {name: float(v) for name, v in coco.compute().items() if v.numel() == 1}
    expected.update({name: float(v) for name, v in voc.compute().items()})
    assert gathered == pytest.approx(expected, abs=1e-9)
