"""Per-class metrics from the headline metrics' own states: COCO AP per category equals pycocotools, the per-class
numbers agree with the totals, confusion matrices count every (non-ignored) sample once; the gallery stays bounded."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from resnet_tasks.evaluation.confusion import DetectionConfusionMatrix
from resnet_tasks.evaluation.detection import coco_backend, coco_map_metric, per_class_ap
from resnet_tasks.evaluation.gallery import GalleryItem, GalleryKeeper
from resnet_tasks.evaluation.segmentation import SegmentationMetrics
from resnet_tasks.evaluation.summary import confusion_table
from tests.conftest import random_detection_case

CATEGORIES = (1, 3, 5, 8)


def _pycocotools_precision(preds: list[dict], targets: list[dict]) -> np.ndarray:
    """pycocotools' eval['precision'] (T, R, K, A, M) on the same data, K = CATEGORIES in order."""
    images, annotations, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(preds, targets)):
        images.append({"id": image_id, "width": 300, "height": 300})
        for (x1, y1, x2, y2), label, crowd, area in zip(
            target["boxes"].tolist(), target["labels"].tolist(), target["iscrowd"].tolist(), target["area"].tolist()
        ):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": crowd})  # fmt: skip
        for (x1, y1, x2, y2), label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(),
                                                  pred["scores"].tolist()):  # fmt: skip
            results.append({"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": str(i)} for i in CATEGORIES],
        }
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"]


def _category_means(precision: np.ndarray) -> np.ndarray:
    """Mean of the defined (> -1) entries per category at area "all", 100 detections: COCO's per-class AP."""
    values = precision[:, :, :, 0, -1]
    return np.array([values[:, :, k][values[:, :, k] > -1].mean() if (values[:, :, k] > -1).any() else np.nan
                     for k in range(values.shape[2])])  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_ap_equals_pycocotools_per_category(seed: int) -> None:
    preds, targets = random_detection_case(seed)
    metric = coco_map_metric()
    metric.update(preds, targets)
    results = metric.compute()
    ours = per_class_ap(results, metric.iou_thresholds)
    reference = _pycocotools_precision(preds, targets)
    expected_ap = dict(zip(CATEGORIES, _category_means(reference)))
    expected_ap50 = dict(zip(CATEGORIES, _category_means(reference[:1])))
    assert ours.category_ids == list(CATEGORIES)  # 5 is only predicted: present, without ground truth
    for k, category in enumerate(ours.category_ids):
        if np.isnan(expected_ap[category]):
            assert np.isnan(ours.ap[k]) and np.isnan(ours.ap50[k])
        else:
            assert ours.ap[k] == pytest.approx(expected_ap[category], abs=1e-4)
            assert ours.ap50[k] == pytest.approx(expected_ap50[category], abs=1e-4)
    # The totals are the means over the classes with ground truth (a class without any is left out).
    assert np.nanmean(ours.ap) == pytest.approx(float(results["map"]), abs=1e-6)
    assert np.nanmean(ours.ap50) == pytest.approx(float(results["map_50"]), abs=1e-6)
    assert np.nanmean(ours.ap75) == pytest.approx(float(results["map_75"]), abs=1e-6)
    assert coco_backend() == "faster_coco_eval"  # a default dependency now; pycocotools stays the oracle


def test_per_class_ap_of_data_with_one_class() -> None:
    """torchmetrics reports the classes of one-class data as a 0-d tensor (a common case on one's own data)."""
    metric = coco_map_metric()
    box = [[10.0, 10.0, 50.0, 50.0]]
    metric.update([_detection(box, [1], [0.9])], [_truth(box, [1], [0])])
    results = metric.compute()
    ours = per_class_ap(results, metric.iou_thresholds)
    assert ours.category_ids == [1] and ours.ap[0] == pytest.approx(float(results["map"]), abs=1e-6) == 1.0


def _detection(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}  # fmt: skip


def _truth(boxes: list[list[float]], labels: list[int], crowd: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "iscrowd": torch.tensor(crowd)}  # fmt: skip


def test_detection_confusion_matrix_counts_like_ultralytics() -> None:
    # Classes: category ids 3 and 7 (rows/columns 0, 1), background last.
    truth = _truth([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70], [80, 80, 99, 99]],
                   [3, 7, 3, 7, 3], [0, 0, 0, 0, 1])  # fmt: skip
    prediction = _detection(
        [[0, 0, 10, 10],  # right class: (3, 3)
         [0, 0, 10, 9],  # duplicate of the same object: a false detection (background, 3)
         [20, 20, 30, 30],  # wrong class: (7, 3)
         [60, 60, 70, 70],  # below the score threshold: not counted; object 7 at 60 is missed
         [80, 80, 99, 99],  # on a crowd region only: counted nowhere
         [100, 100, 110, 110]],  # nothing there: false (background, 7)
        [3, 3, 3, 7, 7, 7], [0.9, 0.8, 0.7, 0.1, 0.9, 0.6])  # fmt: skip
    metric = DetectionConfusionMatrix([3, 7])
    metric.update([prediction], [truth])
    expected = torch.tensor([[1, 0, 1],  # true 3: one right, object at 40 missed
                             [1, 0, 1],  # true 7: one called 3, one missed
                             [1, 1, 0]])  # fmt: skip
    assert torch.equal(metric.compute(), expected)
    # Every non-ignored object once, plus every counted false detection.
    assert int(metric.compute().sum()) == 4 + 2
    assert metric.last_image_errors.tolist() == [pytest.approx(5 / 6)]  # 2 missed + 2 false + 1 wrong class of 4 + 2
    # Summing per-rank states (DDP's reduction) equals one pass over all images.
    halves = [DetectionConfusionMatrix([3, 7]), DetectionConfusionMatrix([3, 7])]
    halves[0].update([prediction], [truth])
    halves[1].update([prediction], [truth])
    both = DetectionConfusionMatrix([3, 7])
    both.update([prediction, prediction], [truth, truth])
    assert torch.equal(halves[0].compute() + halves[1].compute(), both.compute())


def test_detection_confusion_ties_go_to_the_first_object_and_detection() -> None:
    # Two detections of class 3 overlap object 0 equally; object 1 (class 7) overlaps the second one as much.
    truth = _truth([[0, 0, 10, 10], [10, 0, 20, 10]], [3, 7], [0, 0])
    prediction = _detection([[5, 0, 15, 10], [5, 0, 15, 10]], [3, 3], [0.9, 0.9])
    metric = DetectionConfusionMatrix([3, 7], iou_threshold=0.3)
    metric.update([prediction], [truth])
    # Each detection picks its best object, the first on ties: both pick object 0, which keeps detection 0 (the
    # first). Object 1 is missed and detection 1 is a false detection, as in Ultralytics' matching.
    assert metric.compute().tolist() == [[1, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert metric.last_image_errors.tolist() == [pytest.approx(2 / 3)]


def test_weighted_mean_equals_torchmetrics_mean_and_leaves_out_nan() -> None:
    from torchmetrics import MeanMetric

    from resnet_tasks.evaluation.mean import WeightedMean

    values = torch.rand(7, generator=torch.Generator().manual_seed(0))
    ours, theirs = WeightedMean(), MeanMetric()
    for index, value in enumerate(values):
        ours.update(value, weight=index + 1)
        theirs.update(value, weight=index + 1)
    assert torch.equal(ours.compute(), theirs.compute())
    ours.update(torch.tensor(float("nan")), weight=5)
    assert torch.equal(ours.compute(), theirs.compute())


def test_classification_confusion_sums_to_samples_and_per_class_agrees_with_top1() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    logits[labels == 2, 2] += 2.0  # one class the model gets mostly right
    confusion = MulticlassConfusionMatrix(4)
    confusion.update(logits.argmax(dim=1), labels)
    matrix = confusion.compute()
    assert int(matrix.sum()) == 50
    table = confusion_table(matrix)
    top1 = MulticlassAccuracy(4, average="micro")(logits, labels)
    # acc/<class> is the per-class recall; weighted by each class's samples it gives top-1.
    weighted = np.nansum(table["recall"] * table["support"]) / table["support"].sum()
    assert weighted == pytest.approx(float(top1), abs=1e-6)
    assert table["support"].tolist() == torch.bincount(labels, minlength=4).tolist()


def test_segmentation_confusion_sums_to_labelled_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 16, 16), generator=generator)
    target[:, :2] = 255  # ignored pixels
    prediction = torch.randint(0, 3, (2, 16, 16), generator=generator)
    metric = SegmentationMetrics(3, class_names=["background", "a", "b"])
    metric.update(prediction, target)
    result = metric.compute()
    assert int(metric.last_confusion.sum()) == int((target != 255).sum())
    table = confusion_table(metric.last_confusion)
    for index, name in enumerate(["background", "a", "b"]):
        assert float(result[f"iou/{name}"]) == pytest.approx(table["iou"][index], abs=1e-6)
    assert np.nanmean(table["iou"]) == pytest.approx(float(result["miou"]), abs=1e-6)


def test_gallery_keeper_keeps_first_and_worst_and_copies_only_what_it_keeps() -> None:
    keeper = GalleryKeeper(3)
    built = []

    def item(index: int) -> GalleryItem:
        built.append(index)
        return GalleryItem(title=str(index), image=np.zeros((2, 2, 3), np.uint8))

    errors = [0.5, 0.1, 0.9, 0.2, 0.3, 0.95, 0.0, 0.7, 0.05, 0.6]
    for index, error in enumerate(errors):
        keeper.offer(error, lambda index=index: item(index))
    assert [it.title for it in keeper.first] == ["0", "1", "2"]
    assert [it.title for it in keeper.worst()] == ["5", "2", "7"]
    assert [it.error for it in keeper.worst()] == [0.95, 0.9, 0.7]
    # Images 6, 8 and 9 were neither among the first nor worse than the kept ones at their turn: never copied.
    assert built == [0, 1, 2, 3, 4, 5, 7]
    keeper.reset()
    assert keeper.first == [] and keeper.worst() == []


def test_voc_per_class_ap_is_what_the_voc_means_average() -> None:
    from resnet_tasks.evaluation.voc import VOCDetectionAP

    preds, targets = random_detection_case(0)
    metric = VOCDetectionAP()
    metric.update(preds, [dict(t, difficult=t["iscrowd"].to(torch.uint8)) for t in targets])
    result = metric.compute()
    per_class = metric.last_per_class  # kept by compute() from the synchronised states
    assert sorted(per_class) == [1, 3, 8]  # classes with (non-difficult) ground truth
    assert np.mean([ap07 for ap07, _ in per_class.values()]) == pytest.approx(float(result["voc07_map_50"]), abs=1e-6)
    assert np.mean([ap12 for _, ap12 in per_class.values()]) == pytest.approx(float(result["voc12_map_50"]), abs=1e-6)
