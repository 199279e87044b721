"""Shared timing and report helpers of the benchmarks: alternating timer, medians, thread pinning, the suite's sizes.

Not a benchmark itself; imported by the files next to it (`python benchmarks/run.py` runs the suite).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass
class Sizes:
    """Problem sizes of every benchmark; `full` (default), `quick` and `tiny` (smoke test) presets."""

    rounds: int = 3  # Lightning: alternating (Trainer, loop) rounds
    warmup_steps: int = 1  # untimed steps at the start of every round
    timed_steps: int = 5
    classification: tuple[int, int] = (16, 112)  # batch size, image size
    detection: tuple[int, int] = (1, 192)
    segmentation: tuple[int, int] = (2, 160)
    data_images: int = 64
    data_size: tuple[int, int] = (500, 375)
    data_passes: int = 5
    coco_images: int = 2000  # 5000 (COCO val) with --coco-images 5000: ~3x longer
    coco_detections: int = 100
    coco_repeats: int = 2
    memory_images: int = 30_000  # --memory-images 100000 for COCO train's size: ~3x longer
    memory_workers: int = 4
    memory_batch_size: int = 32
    memory_counterfactual: bool = True
    seg_shape: tuple[int, int, int, int] = (2, 21, 512, 512)
    seg_repeats: int = 7
    backbone: tuple[str, int, int, int] = ("resnet50", 4, 160, 6)  # name, batch, size, steps


FULL = Sizes()
QUICK = Sizes(
    rounds=2, warmup_steps=1, timed_steps=4, classification=(8, 96), detection=(2, 192), segmentation=(2, 128),
    data_images=24, data_passes=3, coco_images=200, coco_repeats=2, memory_images=5000,
    memory_counterfactual=True, seg_repeats=5, backbone=("resnet18", 4, 128, 4),
)  # fmt: skip
TINY = Sizes(
    rounds=2, warmup_steps=1, timed_steps=2, classification=(2, 32), detection=(1, 64), segmentation=(1, 32),
    data_images=4, data_size=(64, 48), data_passes=2, coco_images=20, coco_detections=10, coco_repeats=2,
    memory_images=400, memory_workers=2, memory_batch_size=16, memory_counterfactual=True,
    seg_shape=(1, 21, 32, 32), seg_repeats=2, backbone=("resnet18", 2, 32, 2),
)  # fmt: skip


def alternate(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 0,
    collect: bool = True,
    device: torch.device | None = None,
) -> dict[str, list[float]]:
    """Seconds of each candidate over `repeats` alternating rounds (A, B, A, B, ...), after `warmup` rounds.

    `collect`: run the garbage collector before each (untimed). `device`: synchronize it before the clock starts
    and before it stops, so that queued GPU work is counted (a no-op on CPU).
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for index in range(warmup + repeats):
        for name, run in candidates.items():
            if collect:
                gc.collect()
            if device is not None:
                synchronize(device)
            start = time.perf_counter()
            run()
            if device is not None:
                synchronize(device)
            seconds = time.perf_counter() - start
            if index >= warmup:
                times[name].append(seconds)
    return times


def median(values: list[float]) -> float:
    """The median as a float; NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


@contextlib.contextmanager
def thread_count(get: Callable[[], int], set_: Callable[[int], None], count: int) -> Iterator[None]:
    """A library's thread count (read by `get`, set by `set_`) at `count` for the block, restored after it."""
    previous = get()
    set_(count)
    try:
        yield
    finally:
        set_(previous)


def torch_threads(count: int) -> contextlib.AbstractContextManager[None]:
    """torch's intra-op thread count for the block."""
    return thread_count(torch.get_num_threads, torch.set_num_threads, count)


def opencv_threads(count: int) -> contextlib.AbstractContextManager[None]:
    """OpenCV's thread count for the block (0: its functions run on the calling thread only)."""
    import cv2

    return thread_count(cv2.getNumThreads, cv2.setNumThreads, count)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_report(path: Path | None, report: dict[str, Any]) -> dict[str, Any]:
    """Write a benchmark's results as indented JSON (numpy/torch scalars as floats) when `path` is given, say where,
    and return them."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {path}")
    return report
