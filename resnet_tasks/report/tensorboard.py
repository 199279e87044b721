"""`--model.log_images N`: the gallery, the confusion matrix and the PR curves as TensorBoard images, once per
validation epoch."""

from __future__ import annotations

import numpy as np
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from resnet_tasks.evaluation.summary import EvaluationSummary


def log_pictures(trainer: Trainer, summary: EvaluationSummary, count: int, step: int) -> list[str]:
    """Add the pictures of `summary` (gallery of `count` images) to every TensorBoard logger; the tags written."""
    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if not loggers:
        return []
    from resnet_tasks.report.gallery import gallery_picture
    from resnet_tasks.report.pictures import confusion_figure, pr_figure

    tags = []
    gallery = gallery_picture(summary.gallery[:count])
    for logger in loggers:
        experiment = logger.experiment
        if gallery is not None:
            experiment.add_image("val/gallery", np.asarray(gallery), step, dataformats="HWC")
            tags.append("val/gallery")
        if summary.confusion is not None and np.asarray(summary.confusion).size:
            figure = confusion_figure(np.asarray(summary.confusion), summary.confusion_names)
            experiment.add_figure("val/confusion_matrix", figure, step, close=True)
            tags.append("val/confusion_matrix")
        if summary.precision is not None and np.asarray(summary.precision).size:
            experiment.add_figure("val/pr_curve", pr_figure(summary), step, close=True)
            tags.append("val/pr_curve")
        experiment.flush()
    return tags
