"""Evaluation keeps what the metrics, the report and the gallery need on the device: no `.tolist()`, `.item()`,
`.cpu()` or `.numpy()` in the tasks' or the metrics' code while a validation batch is evaluated, and a number of
them at the epoch's end that does not grow with the number of batches."""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from resnet_tasks.backbones import BackboneConfig
from resnet_tasks.data.segmentation import collate_eval
from resnet_tasks.labels import LabelSpace
from resnet_tasks.tasks.base import TaskBase
from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.detection import DetectionTask
from resnet_tasks.tasks.segmentation import SegmentationTask
from resnet_tasks.tasks.summary import latest_summary

READBACKS = ("tolist", "item", "cpu", "numpy")
WATCHED = ("resnet_tasks.tasks", "resnet_tasks.evaluation")
# The gallery copies the images it keeps (a bounded number): counted on their own.
GALLERY_BUILDERS = ("gallery_item", "image_array", "shrink_mask")


class Readbacks(L.Callback):
    """Counts tensor readbacks called from the watched packages, by phase of the validation loop."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: Counter[str] = Counter()
        self.where: list[str] = []

    def record(self, frame: Any) -> None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(WATCHED):
            return
        caller = frame
        phase = self.phase
        while caller is not None:
            if caller.f_code.co_name in GALLERY_BUILDERS:
                phase = "gallery"
                break
            caller = caller.f_back
        self.counts[phase] += 1
        if phase == "step":
            self.where.append(f"{module}:{frame.f_lineno}")

    def on_validation_start(self, *args: Any) -> None:
        self.phase = "setup"

    def on_validation_batch_start(self, *args: Any) -> None:
        self.phase = "step"

    def on_validation_batch_end(self, *args: Any) -> None:
        self.phase = "between"

    def on_validation_epoch_end(self, *args: Any) -> None:  # callbacks run before the task's own epoch end
        self.phase = "epoch_end"


@pytest.fixture
def readbacks(monkeypatch: pytest.MonkeyPatch) -> Readbacks:
    recorder = Readbacks()
    for name in READBACKS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            recorder.record(inspect.currentframe().f_back)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return recorder


def classification(batches: int, tmp_path: Path) -> tuple[TaskBase, list[Any]]:
    torch.manual_seed(0)
    task = ClassificationTask(num_classes=3, backbone=BackboneConfig(name="resnet20"))
    generator = torch.Generator().manual_seed(1)
    data = [
        {"image": torch.randn(4, 3, 32, 32, generator=generator), "name": [f"image_{b}_{i}" for i in range(4)],
         "label": torch.randint(0, 3, (4,), generator=generator)}
        for b in range(batches)
    ]  # fmt: skip
    return task, data


def segmentation(batches: int, tmp_path: Path) -> tuple[TaskBase, list[Any]]:
    """Batches as the segmentation data modules make them (`collate_eval`: sizes as host pairs)."""
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=3, backbone=BackboneConfig(name="resnet18"))
    generator = torch.Generator().manual_seed(1)
    data = []
    for b in range(batches):
        items = []
        for i in range(2):
            path = tmp_path / f"image_{b}_{i}.png"
            Image.fromarray(np.full((30, 40, 3), 60 * i, dtype=np.uint8)).save(path)
            mask = torch.randint(0, 3, (30, 40), generator=generator).to(torch.uint8)
            mask[:3] = 255
            items.append({"image": torch.randn(3, 32, 40, generator=generator), "mask": mask, "size": (30, 40),
                          "input_size": (32, 40), "stem": path.stem, "path": str(path)})  # fmt: skip
        data.append(collate_eval(items))
    return task, data


def detection(batches: int, tmp_path: Path) -> tuple[TaskBase, list[Any]]:
    torch.manual_seed(0)
    task = DetectionTask(
        label_space=LabelSpace.with_background(["a", "b"], [5, 9]), backbone=BackboneConfig(name="resnet18"),
        evaluation_style="voc", min_size=64, max_size=96, anchor_sizes=[[8], [16], [32], [64], [128]],
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_score_thresh=0.0, confusion_score=0.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    data = []
    for b in range(batches):
        images, targets = [], []
        for i in range(2):
            images.append(torch.rand(3, 64, 80, generator=generator))
            targets.append({"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [40.0, 10.0, 70.0, 50.0]]),
                            "labels": torch.tensor([1, 2]), "category_ids": torch.tensor([5, 9]),
                            "iscrowd": torch.tensor([0, 0]), "difficult": torch.tensor([0, 1], dtype=torch.uint8),
                            "area": torch.tensor([1000.0, 1200.0]), "index": 2 * b + i, "image_key": 2 * b + i,
                            "file_name": f"image_{b}_{i}.jpg"})  # fmt: skip
        data.append((images, targets))
    return task, data


def validate(make: Callable, batches: int, tmp_path: Path, readbacks: Readbacks) -> tuple[Counter[str], Any]:
    task, data = make(batches, tmp_path)
    readbacks.counts.clear()
    readbacks.where.clear()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[readbacks],
    )  # fmt: skip
    trainer.validate(task, dataloaders=DataLoader(data, batch_size=None, collate_fn=lambda batch: batch))
    return Counter(readbacks.counts), latest_summary(trainer)


@pytest.mark.parametrize("make", [classification, segmentation, detection], ids=lambda make: make.__name__)
def test_evaluation_reads_back_once_per_epoch(make: Callable, tmp_path: Path, readbacks: Readbacks) -> None:
    few, summary = validate(make, 2, tmp_path, readbacks)
    assert readbacks.where == [], "a readback while a batch is evaluated"
    many, _ = validate(make, 4, tmp_path, readbacks)
    assert readbacks.where == [], "a readback while a batch is evaluated"
    assert few["step"] == many["step"] == 0
    assert few["epoch_end"] == many["epoch_end"] > 0  # the metrics' results, once
    # The gallery is built at the epoch's end from what the batches left on the device.
    assert summary is not None and len(summary.gallery) > 0 and few["gallery"] > 0
