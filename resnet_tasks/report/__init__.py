"""Results a person can read: per_class.csv, pictures (PR curves, confusion matrix, per-class bars, gallery,
training curves) and report.html in a run's log directory; `resnet-tasks report RUN_DIR...` for finished runs."""

from __future__ import annotations

from typing import Any

import lightning as L

from resnet_tasks.compat import attached_trainer
from resnet_tasks.evaluation.summary import EvaluationSummary


def publish_evaluation(
    task: L.LightningModule, prefix: str, summary: EvaluationSummary, entries: dict[str, float]
) -> None:
    """End of a validation/test epoch: log the per-class `entries` (metrics.json, not the loggers: a thousand
    classes would swamp them), keep `summary` for the report, and with `log_images` N draw the pictures into
    TensorBoard (validation only, rank 0)."""
    for name, value in entries.items():
        task.log(f"{prefix}/{name}", value, batch_size=1, sync_dist=False, logger=False)
    count = int(getattr(task, "log_images", 0) or 0)
    trainer: Any = attached_trainer(task)
    if count > 0 and prefix == "val" and trainer is not None and not trainer.sanity_checking:
        if trainer.is_global_zero:
            from resnet_tasks.report.tensorboard import log_pictures

            log_pictures(trainer, summary, count, step=trainer.global_step)


__all__ = ["publish_evaluation"]
