"""Prediction writers: Lightning callbacks that stream `predict` outputs to files in the run's log directory.

Each task names its writer (`TaskBase.writer_class`); the CLI adds it to `predict`. A writer takes file names and
image ids from the predictions, and class names and category ids from the task's label space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from resnet_tasks.labels import LabelSpace


def gather_objects(trainer: L.Trainer, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list outside DDP)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


class PredictionWriter(BasePredictionWriter):
    """Base of the per-task writers: `start` a run, `write_batch` each predict batch, `finish` the files.

    `output_dir` None writes into the run's log directory (`lightning_logs/version_N/`).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.out_dir = Path(output_dir or ".")
        self.label_space: LabelSpace | None = None
        self.written: list[Path] = []

    def start(self, out_dir: Path, label_space: LabelSpace) -> None:
        """Begin writing a prediction run into `out_dir` for a model with `label_space`."""
        self.out_dir = Path(out_dir)
        self.label_space = label_space

    def write_batch(self, outputs: Any, batch: Any) -> None:
        """Take one predict batch's outputs (the task's `predict_step` result, which names each image it predicts) and
        its input batch (only for pixels to draw on)."""
        raise NotImplementedError(f"{type(self).__name__} must implement write_batch()")

    def finish(self, trainer: L.Trainer) -> list[Path]:
        """Complete the files (rank 0 gathers what other ranks hold); the paths written, on rank 0."""
        raise NotImplementedError(f"{type(self).__name__} must implement finish()")

    def class_name(self, index: int) -> str:
        """The name of output `index` in the model's label space."""
        return self.label_space.name(index) if self.label_space is not None else str(index)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.start(out_dir, pl_module.label_space)

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
        self.write_batch(prediction, batch)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = self.finish(trainer)
        if trainer.is_global_zero:
            for path in self.written:
                print(f"predictions written: {path}")
