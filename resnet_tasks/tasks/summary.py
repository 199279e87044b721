"""Where an evaluation's summary goes: to the trainer's `SummaryCallback`s, which the task configures.

At the end of each validation/test epoch the task hands its `EvaluationSummary` (per-class table, confusion matrix,
PR curves, gallery) to every `SummaryCallback` of the trainer: `LatestSummary` keeps the last one for the run's
report (per_class.csv, pictures, report.html), `TensorBoardPictures` draws it into TensorBoard (`--model.log_images`).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from resnet_tasks.evaluation.summary import EvaluationSummary


class SummaryCallback(Callback):
    """A callback that receives the summary of each validation/test epoch (`stage` "val" or "test")."""

    def on_evaluation_summary(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, summary: EvaluationSummary
    ) -> None:
        """Called on every rank at the end of the epoch, after the metrics are logged (the gallery is rank 0's)."""


class LatestSummary(SummaryCallback):
    """Keeps the summary of the latest evaluation (`summary`, None before any) for the run's report."""

    def __init__(self) -> None:
        self.summary: EvaluationSummary | None = None

    def on_evaluation_summary(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, summary: EvaluationSummary
    ) -> None:
        self.summary = summary


class TensorBoardPictures(SummaryCallback):
    """`--model.log_images N`: each validation epoch's gallery (N images), confusion matrix and PR curves as
    TensorBoard images (rank 0, not during the sanity check)."""

    def __init__(self, count: int) -> None:
        self.count = int(count)

    def on_evaluation_summary(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, summary: EvaluationSummary
    ) -> None:
        if self.count <= 0 or stage != "val" or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from resnet_tasks.report.tensorboard import log_pictures

        log_pictures(trainer, summary, self.count, step=trainer.global_step)


def publish_summary(trainer: L.Trainer, pl_module: L.LightningModule, stage: str, summary: EvaluationSummary) -> None:
    """Hand `summary` to every `SummaryCallback` of `trainer`."""
    for callback in trainer.callbacks:
        if isinstance(callback, SummaryCallback):
            callback.on_evaluation_summary(trainer, pl_module, stage, summary)


def latest_summary(trainer: L.Trainer) -> EvaluationSummary | None:
    """The summary of the latest validation/test epoch of `trainer`'s runs (None when none was kept)."""
    for callback in trainer.callbacks:
        if isinstance(callback, LatestSummary):
            return callback.summary
    return None
