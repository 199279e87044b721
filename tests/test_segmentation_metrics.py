"""Segmentation metrics: confusion-matrix mIoU / pixel accuracy against a numpy reference, 255 ignored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_tasks.evaluation.segmentation import SegmentationMetrics, class_map, confusion_counts


def numpy_reference(preds: np.ndarray, target: np.ndarray, num_classes: int) -> dict[str, object]:
    """Textbook definitions, written independently of the implementation under test."""
    keep = target != 255
    p, t = preds[keep], target[keep]
    ious = {}
    for c in range(num_classes):
        intersection = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        if union > 0:
            ious[c] = intersection / union
    return {"miou": np.mean(list(ious.values())), "pixel_acc": np.mean(p == t), "iou": ious}


def random_batch(seed: int, num_classes: int, shape=(3, 17, 23)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Class num_classes-1 never occurs in either: its IoU is undefined and must not enter the mean.
    target = torch.randint(0, num_classes - 1, shape, generator=generator)
    preds = torch.where(torch.rand(shape, generator=generator) < 0.6, target, torch.randint(0, num_classes - 1, shape))
    target[torch.rand(shape, generator=generator) < 0.2] = 255
    # Predictions under ignored pixels are deliberately wrong: they must not count.
    preds[target == 255] = 0
    return preds, target


def test_matches_numpy_reference_with_ignore_and_absent_classes() -> None:
    names = ["background", "a", "b", "c", "never"]
    metric = SegmentationMetrics(5, class_names=names)
    all_preds, all_targets = [], []
    for seed in range(3):
        preds, target = random_batch(seed, 5)
        metric.update(preds, target.to(torch.uint8))
        all_preds.append(preds.numpy().ravel())
        all_targets.append(target.numpy().ravel())
    result = metric.compute()
    reference = numpy_reference(np.concatenate(all_preds), np.concatenate(all_targets), 5)
    assert result["miou"].item() == pytest.approx(reference["miou"], abs=1e-6)
    assert result["pixel_acc"].item() == pytest.approx(reference["pixel_acc"], abs=1e-6)
    for c, iou in reference["iou"].items():
        assert result[f"iou/{names[c]}"].item() == pytest.approx(iou, abs=1e-6)
    assert "iou/never" not in result


def test_ignored_pixels_change_nothing() -> None:
    preds, target = random_batch(7, 4)
    first = SegmentationMetrics(4)
    first.update(preds, target)
    scrambled = preds.clone()
    scrambled[target == 255] = torch.randint(0, 4, (int((target == 255).sum()),))
    second = SegmentationMetrics(4)
    second.update(scrambled, target)
    assert torch.equal(first.confusion, second.confusion)
    assert int(first.confusion.sum()) == int((target != 255).sum())


def test_known_values() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    metric = SegmentationMetrics(3)
    metric.update(preds, target)
    result = metric.compute()
    # class 0: tp 1, union 3 ; class 1: tp 2, union 3 ; class 2: tp 1, union 2
    assert result["miou"].item() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["pixel_acc"].item() == pytest.approx(4 / 6)


def test_deterministic_mode_gives_the_same_counts() -> None:
    preds, target = random_batch(3, 21, shape=(2, 64, 64))
    plain = confusion_counts(preds, target, 21)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = confusion_counts(preds, target, 21)
        metric = SegmentationMetrics(21)
        metric.update(preds, target)
        from_metric = metric.confusion.clone()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(plain, deterministic)
    assert torch.equal(plain, from_metric)


def test_accelerator_counting_equals_bincount() -> None:
    """Off the CPU the counts come from a scatter-add (bincount would read the input's range back to the host)."""
    from resnet_tasks.evaluation.confusion import scattered_counts

    index = torch.randint(0, 442, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(scattered_counts(index, 442), torch.bincount(index, minlength=442))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(scattered_counts(index, 442), torch.bincount(index, minlength=442))
    finally:
        torch.use_deterministic_algorithms(previous)


def test_sharded_updates_sum_to_the_whole() -> None:
    # What DDP's sum-reduction does: per-rank matrices add up to the single-process matrix exactly.
    preds, target = random_batch(11, 6, shape=(4, 20, 20))
    whole = SegmentationMetrics(6)
    whole.update(preds, target)
    parts = [SegmentationMetrics(6) for _ in range(2)]
    for rank, part in enumerate(parts):
        part.update(preds[rank::2], target[rank::2])
    assert torch.equal(parts[0].confusion + parts[1].confusion, whole.confusion)
    assert whole.confusion.dtype == torch.int64


def test_class_map_equals_argmax_including_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    # Few distinct values: many pixels have tied maxima, where the first maximal class must win (as argmax).
    logits = torch.randint(0, 3, (2, 5, 17, 23), generator=generator).float()
    assert torch.equal(class_map(logits), logits.argmax(1))
    assert class_map(logits).dtype == torch.int64
    assert torch.equal(class_map(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 2, 2, dtype=torch.int64))
