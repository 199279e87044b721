"""The LightningModule base of the three tasks: label space, weights and speed options, the guarded training step,
and the evaluation loop each task fills in (update the metrics per batch; compute, log and publish per epoch)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from resnet_tasks.backbones import BackboneConfig
from resnet_tasks.compat import attached_trainer, update_saved_hyperparameters
from resnet_tasks.config import as_config, global_batch_size
from resnet_tasks.errors import UserError
from resnet_tasks.evaluation.gallery import GALLERY_SIZE, GalleryItem, GalleryKeeper
from resnet_tasks.evaluation.summary import EvaluationResult
from resnet_tasks.labels import LabelSpace
from resnet_tasks.tasks.finetune import FinetuneConfig, Finetuner, param_group_table
from resnet_tasks.tasks.guard import StepGuard, all_reduce_max, guarded_step
from resnet_tasks.tasks.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimization,
    lr_scale,
    optimisation_line,
    parameter_groups,
)
from resnet_tasks.tasks.summary import LatestSummary, TensorBoardPictures, publish_summary
from resnet_tasks.tasks.weights import (
    CHECKPOINT_KEY,
    check_checkpoint_fits,
    load_task_weights,
    no_weights,
    resolve_label_space,
    upgraded_checkpoint,
)
from resnet_tasks.writers import PredictionWriter

__all__ = ["CHECKPOINT_KEY", "TTA_MODES", "TaskBase", "no_weights"]

# `--model.tta`: none, horizontal flip, or flip at several scales (where the task supports scales).
TTA_MODES = ("none", "flip", "flip_scales")


class TaskBase(L.LightningModule):
    """What every task shares: the label space, backbone settings, weights, the training step, optimisation and
    the evaluation loop.

    A subclass states its `task_name`, `main_metric`, the classifier key its whole-model weights carry
    (`head_key`), whether its label space always has a background class (`background`), its prediction
    writer (`writer_class`, a Lightning callback), builds its network in `__init__`, and fills in the training
    hooks (`training_losses`, `batch_size_of`) and the evaluation hooks (`evaluation_outputs`, `evaluation_update`,
    `gallery_item`, `evaluation_compute`).
    """

    task_name: ClassVar[str] = ""
    main_metric: ClassVar[str] = ""
    head_key: ClassVar[str] = ""
    background: ClassVar[bool] = False
    # Whole-model weights for another label space: a task that maps outputs to the dataset's category ids
    # (detection) can still be evaluated; the others stop with an error.
    evaluates_across_label_spaces: ClassVar[bool] = False
    writer_class: ClassVar[type[PredictionWriter]] = PredictionWriter
    # Consecutive optimizer steps with a non-finite loss tolerated before training stops.
    max_consecutive_bad_steps: ClassVar[int] = 10

    def __init__(
        self,
        num_classes: int | None = None,
        label_space: LabelSpace | None = None,
        backbone: BackboneConfig = BackboneConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        scheduler: SchedulerConfig = SchedulerConfig(),
        finetune: FinetuneConfig = FinetuneConfig(),
        weights: str | None = None,
        batch_size: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        tta: str = "none",
        log_images: int = 0,
        gallery_readback_batches: int = 8,
    ) -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise UserError(f"--model.tta {tta!r} is not one of {', '.join(TTA_MODES)}.")
        # Test-time augmentation for validate/test (never training): logits averaged over flips (and scales).
        self.tta = tta
        # Validation pictures (gallery, PR curve, confusion matrix) logged to TensorBoard each epoch: N images.
        self.log_images = int(log_images)
        # Evaluation images kept for the report's gallery (rank 0). Their error scores stay on the device and are
        # read back every `gallery_readback_batches` batches (0: once per epoch; the batches wait in memory).
        self.gallery = GalleryKeeper(max(GALLERY_SIZE, self.log_images), readback_every=gallery_readback_batches)
        # Speed options (no effect on results beyond float rounding; export ignores them): NHWC memory format,
        # and torch.compile of the backbone in place (nn.Module.compile keeps state-dict keys unchanged).
        self.channels_last = channels_last
        self.compile_options = {"mode": compile_mode, "backend": compile_backend} if compile else None
        self._speed_options_applied = False
        # Training images per device and step (linked from the data): the global batch scales the LR.
        self.batch_size = batch_size
        self.backbone_config: BackboneConfig = as_config(backbone, BackboneConfig)
        if no_weights(self.backbone_config.weights):
            self.backbone_config.weights = None
        self.optimizer_config: OptimizerConfig = as_config(optimizer, OptimizerConfig)
        self.scheduler_config: SchedulerConfig = as_config(scheduler, SchedulerConfig)
        # What of the backbone trains when (freeze, unfreeze by epoch, layer-wise LR decay): set up at fit's setup.
        self.finetune_config: FinetuneConfig = as_config(finetune, FinetuneConfig)
        self.finetuner: Finetuner | None = None
        self.weights = None if no_weights(weights) else str(weights)
        self.label_space: LabelSpace = resolve_label_space(self, num_classes, LabelSpace.coerce(label_space))
        self.num_classes = self.label_space.num_classes
        # Set by the CLI when a run resumes from --ckpt_path: the checkpoint supersedes pretrained weights.
        self.skip_pretrained_weights = False
        self._pretrained_loaded = False
        self._restored_from_checkpoint = False
        self.step_guard = StepGuard(self.max_consecutive_bad_steps)

    def label_space_for_count(self, count: int) -> LabelSpace:
        """The label space of whole-model weights that only tell their output count (a `.pth`)."""
        return LabelSpace.anonymous(count, background=self.background)

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this task, or None (a task used on its own)."""
        return attached_trainer(self)

    def is_global_zero(self) -> bool:
        """True on the process that writes results (also for a task used without a Trainer)."""
        trainer = self.attached_trainer()
        return trainer is None or trainer.is_global_zero

    # ----------------------------------------------------------------- hyper-parameters and checkpoints
    def save_task_hyperparameters(self) -> None:
        """Save the init arguments with the config groups and the resolved label space as plain dicts.

        Plain types keep checkpoints loadable with `torch.load(weights_only=True)`; the resolved label space
        lets `load_from_checkpoint` rebuild the same heads without the weights file or the data.
        """
        self.save_hyperparameters()
        resolved = {
            "num_classes": self.num_classes,
            "label_space": self.label_space.to_dict(),
            "backbone": dataclasses.asdict(self.backbone_config),
            "optimizer": {**dataclasses.asdict(self.optimizer_config), "betas": list(self.optimizer_config.betas)},
            "scheduler": dataclasses.asdict(self.scheduler_config),
            "finetune": dataclasses.asdict(self.finetune_config),
        }
        update_saved_hyperparameters(self, resolved)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's `load_from_checkpoint`, also for checkpoints written before the label space existed."""
        upgraded = upgraded_checkpoint(checkpoint_path, cls.task_name)
        return super().load_from_checkpoint(upgraded or checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})["task"] = self.task_name  # beside what callbacks put there

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint)
        self._restored_from_checkpoint = True

    def configure_callbacks(self) -> list[L.Callback]:
        """Where evaluation summaries go: the run's report and, with `log_images`, TensorBoard. (RNG streams in
        checkpoints and the skip report are the command line's callbacks: `lightning_cli`.)"""
        callbacks: list[L.Callback] = [LatestSummary()]
        if self.log_images > 0:
            callbacks.append(TensorBoardPictures(self.log_images))
        return callbacks

    # ----------------------------------------------------------------- backbone, weights, speed options
    def backbone_module(self) -> nn.Module:
        """The backbone inside this task (for the LR multiplier and backbone-only weights)."""
        raise NotImplementedError(f"{type(self).__name__} must implement backbone_module()")

    def model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole-model weights in any layout we read (torchvision's, our .ckpt) with this module's key names."""
        raise NotImplementedError(f"{type(self).__name__} must implement model_state_dict()")

    def load_pretrained(self, fit: bool = False) -> None:
        """Load `weights` (whole model) or else `backbone.weights` (backbone only), once. `fit`: whole-model weights
        made for another class count load all but the class layers (which start anew for the data's classes)."""
        if self._pretrained_loaded or self.skip_pretrained_weights or self._restored_from_checkpoint:
            return
        self._pretrained_loaded = True
        load_task_weights(self, fit=fit)

    def setup(self, stage: str) -> None:
        self.load_pretrained(fit=stage == "fit")
        if stage == "fit":
            trainer = self.attached_trainer()
            # A smoke test (`fast_dev_run`: one batch, max_epochs 1) runs whatever the schedule's epochs.
            smoke_test = trainer is None or bool(trainer.fast_dev_run)
            self.finetune_config.check_epochs(None if smoke_test else trainer.max_epochs)
            if self.finetuner is None:  # before DDP wraps the model: it registers what may ever unfreeze
                self.finetuner = Finetuner(self.backbone_module(), self.finetune_config)
        self.apply_speed_options()

    def compile_targets(self) -> list[nn.Module]:
        """The modules `compile` compiles: the backbone (torchvision's detection heads have data-dependent shapes)."""
        return [self.backbone_module()]

    def apply_speed_options(self) -> None:
        """channels_last memory format and torch.compile, once, after the weights are in place."""
        if self._speed_options_applied:
            return
        self._speed_options_applied = True
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_options is not None:
            for module in self.compile_targets():
                module.compile(**self.compile_options)

    def in_memory_format(self, images: torch.Tensor) -> torch.Tensor:
        """A batch (N, C, H, W) in the model's memory format (NHWC with `channels_last`)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    # ----------------------------------------------------------------- training
    def training_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """The named loss terms for one training batch (summed into the optimised loss)."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses()")

    def batch_size_of(self, batch: Any) -> int:
        """Number of images in `batch` (for logging averages)."""
        raise NotImplementedError(f"{type(self).__name__} must implement batch_size_of()")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.training_losses(batch) if batch is not None else None
        # No host sync here: the guard keeps the finite check on the device; the optimizer step consumes it.
        loss = self.step_guard.flag(losses, self.device)
        if loss is None:
            # An empty batch (every image skipped): a zero loss that touches every trainable parameter, so backward
            # and DDP's gradient sync still run; the guard skips this rank's update (and every rank's, after the
            # flags are reduced).
            zero = torch.zeros((), device=self.device)
            return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), zero)
        size = self.batch_size_of(batch)
        if len(losses) > 1:
            for name, value in losses.items():
                self.log(f"train/{name}", value.detach(), batch_size=size)
        # A skipped step logs its (non-finite) loss as it was.
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        # Under DDP, a zero term ties the frozen parts' parameters to the loss (each gets its gradient reduced).
        return loss if self.finetuner is None else self.finetuner.tie(loss)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The fine-tuning schedule at this step: frozen parts in eval mode and without autograd; a change is logged."""
        if self.finetuner is not None and self.finetuner.active:
            message = self.finetuner.apply(self.lr_schedulers().last_epoch)
            if message and self.is_global_zero():
                print(message, flush=True)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Frozen parts' (zero) gradients go before clipping and the step: momentum and weight decay never move them."""
        if self.finetuner is not None:
            self.finetuner.drop_frozen_grads()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.step_guard.steps_since_check >= self.max_consecutive_bad_steps:
            self.step_guard.check(self.global_step)

    def on_train_epoch_end(self) -> None:
        self.step_guard.check(self.global_step)

    def on_train_end(self) -> None:
        if self.finetuner is not None:
            self.finetuner.release()
        self.step_guard.check(self.global_step)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, except that a step the guard skips leaves weights and optimizer state as they are."""
        trainer = self.attached_trainer()
        # A max over ranks of the guard's flags: a plain all-reduce (Lightning's `reduce` adds a barrier, which
        # blocks the host under NCCL).
        several = trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized()
        guarded_step(optimizer, optimizer_closure, self.step_guard, all_reduce_max if several else None)

    # ----------------------------------------------------------------- optimisation
    def global_batch_size(self) -> int | None:
        """Images per optimizer step over all devices and nodes, gradient accumulation included."""
        trainer = self.attached_trainer()
        if self.batch_size is None or trainer is None:
            return None
        return global_batch_size(self.batch_size, trainer.world_size, trainer.accumulate_grad_batches)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone/other x decay/no-decay groups, each with its LR (scaled to the global batch) and weight decay."""
        scale = lr_scale(self.optimizer_config, self.global_batch_size())
        return parameter_groups(self, self.backbone_module(), self.optimizer_config, scale)

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        if config.scale_lr and config.base_batch_size is not None and self.batch_size is None:
            raise UserError(
                "--model.optimizer.base_batch_size needs the per-device batch size to scale the LR: the CLI links "
                "it from --data.batch_size; in Python pass the task batch_size=..., or set scale_lr False."
            )
        groups = self.parameter_groups()
        scale = lr_scale(config, self.global_batch_size())
        finetuner = self.finetuner or Finetuner(self.backbone_module(), self.finetune_config)
        self.finetuner = finetuner
        # Fine-tuning splits the backbone's groups per part, each with its LR factor (unfreeze gate, warmup, decay).
        split = finetuner.param_groups(groups)
        optimizer, scheduler, total_steps = build_optimization(
            split, config, self.scheduler_config, self.trainer, scale, functools.partial(finetuner.lr_lambdas, split)
        )
        if self.trainer.is_global_zero:
            line = optimisation_line(groups, config, self.scheduler_config, self.batch_size, self.trainer, total_steps)
            print(line, flush=True)
            if finetuner.active:
                print(finetuner.describe(split), flush=True)
                print(param_group_table(optimizer.param_groups), flush=True)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ----------------------------------------------------------------- evaluation
    def evaluation_outputs(self, batch: Any) -> Any:
        """The model's predictions for a validation/test batch (with `--model.tta`), as the other hooks take them."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluation_outputs()")

    def evaluation_update(self, stage: str, batch: Any, outputs: Any) -> torch.Tensor | None:
        """Update the `stage` metrics with one batch without reading anything back to the host; return each image's
        error score (a device tensor) for the gallery, or None when the batch cannot show in the gallery."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluation_update()")

    def gallery_item(self, batch: Any, outputs: Any, index: int) -> GalleryItem:
        """Image `index` of an evaluated batch as the gallery shows it (called only for the images it keeps)."""
        raise NotImplementedError(f"{type(self).__name__} must implement gallery_item()")

    def evaluation_compute(self, stage: str) -> EvaluationResult:
        """The `stage` epoch's numbers (from the metric states of every rank) and the report's summary; leaves the
        metrics empty for the next evaluation."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluation_compute()")

    def evaluation_step(self, stage: str, batch: Any) -> None:
        """One validation/test batch: predictions, metric updates, and the error scores the gallery keeper queues."""
        outputs = self.evaluation_outputs(batch)
        errors = self.evaluation_update(stage, batch, outputs)
        if errors is not None and self.is_global_zero():
            self.gallery.offer_batch(errors, functools.partial(self.gallery_item, batch, outputs))

    def evaluation_epoch_end(self, stage: str) -> None:
        """Log the epoch's metrics (per-class values to metrics.json only: a thousand classes would swamp the
        loggers) and hand its summary, with the gallery, to the trainer's summary callbacks."""
        result = self.evaluation_compute(stage)
        main = self.main_metric.split("/", 1)[-1]
        for name, value in result.metrics.items():
            self.log(f"{stage}/{name}", value, batch_size=1, sync_dist=False, prog_bar=name == main)
        for name, value in result.entries.items():
            self.log(f"{stage}/{name}", value, batch_size=1, sync_dist=False, logger=False)
        self.gallery.flush()
        gallery = {"gallery": list(self.gallery.first), "gallery_worst": self.gallery.worst()}
        summary = dataclasses.replace(result.summary, **gallery)
        self.gallery.reset()
        trainer = self.attached_trainer()
        if trainer is not None:
            publish_summary(trainer, self, stage, summary)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluation_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self.evaluation_epoch_end("test")
