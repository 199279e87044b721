"""Prediction writers: the callback that drives them and the per-task writer registry."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from resnet_tasks.errors import UserError

# task name -> "module:Class" of its writer (imported on use, so one task's writer needs no other's deps).
WRITERS: dict[str, str] = {
    "classification": "resnet_tasks.writers.classification:ClassificationWriter",
    "detection": "resnet_tasks.writers.detection:DetectionWriter",
    "segmentation": "resnet_tasks.writers.segmentation:SegmentationWriter",
}


def writer_class(task_name: str) -> type:
    """The writer class registered for `task_name`."""
    if task_name not in WRITERS:
        raise UserError(f"No prediction writer for task {task_name!r}; known: {sorted(WRITERS)}.")
    module_name, class_name = WRITERS[task_name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def gather_objects(trainer: L.Trainer, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list outside DDP)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


class PredictionWriter(BasePredictionWriter):
    """Streams each predict batch to the task's writer; files land in the run's log directory."""

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.writer: Any = None
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = writer_class(pl_module.task_name)(out_dir, pl_module, trainer.datamodule)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.writer.write_batch(prediction, batch)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = self.writer.finish(trainer)
        if trainer.is_global_zero:
            for path in self.written:
                print(f"predictions written: {path}")
