"""Segmentation metric: SegmentationMetrics.update vs a numpy bincount reference, with and without deterministic mode.

Run in the suite: `python benchmarks/run.py --only segmentation_metric [--quick] [--device cuda]`
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timing import Sizes, alternate, median, synchronize


def bench_segmentation_metric(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Our SegmentationMetrics.update (argmax of the logits + confusion counts) vs a numpy bincount reference,
    with and without torch.use_deterministic_algorithms(True)."""
    from resnet_tasks.evaluation.segmentation import SegmentationMetrics, class_map

    batch, classes, height, width = sizes.seg_shape
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, height, width, generator=generator).to(device)
    target = torch.randint(0, classes, (batch, height, width), generator=generator, dtype=torch.uint8)
    target[torch.rand(batch, height, width, generator=generator) < 0.05] = 255  # ignore pixels
    target = target.to(device)
    logits_np, target_np = logits.cpu().numpy(), target.cpu().numpy()

    def reference() -> np.ndarray:
        predicted = logits_np.argmax(1)
        valid = target_np != 255
        index = target_np[valid].astype(np.int64) * classes + predicted[valid]
        return np.bincount(index, minlength=classes * classes).reshape(classes, classes)

    metric = SegmentationMetrics(classes).to(device)

    def ours() -> None:
        metric.update(class_map(logits), target)
        synchronize(device)

    expected = reference()
    metric.reset()
    ours()
    if not np.array_equal(metric.confusion.cpu().numpy(), expected):
        raise AssertionError("SegmentationMetrics confusion differs from the numpy bincount reference")
    result: dict[str, Any] = {"shape": list(sizes.seg_shape), "confusion_equal": True}
    for mode in ("normal", "deterministic"):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(mode == "deterministic")
        try:
            times = alternate({"ours": ours, "numpy": reference}, repeats=sizes.seg_repeats, warmup=1)
        finally:
            torch.use_deterministic_algorithms(previous)
        result[mode] = {
            "seconds_ours": median(times["ours"]),
            "seconds_numpy": median(times["numpy"]),
            "speedup_over_numpy": median(times["numpy"]) / median(times["ours"]),
        }
    return result
