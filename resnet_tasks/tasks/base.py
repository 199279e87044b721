"""The LightningModule base of the three tasks: label space, backbone and weights, the guarded training step."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from resnet_tasks.backbones import (
    BackboneConfig,
    compare_state_dict,
    is_torchvision_weights_name,
    label_space_of,
    layout_hint,
    load_backbone_weights,
    load_state_dict_into,
    load_weights_spec,
    strip_wrapper_prefixes,
)
from resnet_tasks.callbacks import RNGState, SkipReport
from resnet_tasks.config import as_config
from resnet_tasks.errors import UserError
from resnet_tasks.evaluation.gallery import GALLERY_SIZE, GalleryKeeper
from resnet_tasks.evaluation.summary import EvaluationSummary
from resnet_tasks.labels import LabelSpace, upgrade_hyperparameters
from resnet_tasks.report import publish_evaluation
from resnet_tasks.tasks.guard import StepGuard, all_reduce_max, prepare_momentum, supports_found_inf
from resnet_tasks.tasks.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
    lr_scale,
    parameter_groups,
)
from resnet_tasks.writers import PredictionWriter

# Our entry in every checkpoint: which task wrote it (the label space is in the hyper-parameters).
CHECKPOINT_KEY = "resnet_tasks"


def no_weights(spec: str | None) -> bool:
    """True for an unset weights spec (jsonargparse may hand `null` on the command line over as "None")."""
    return spec is None or str(spec).strip().lower() in ("", "none", "null")


# `--model.tta`: none, horizontal flip, or flip at several scales (where the task supports scales).
TTA_MODES = ("none", "flip", "flip_scales")


class TaskBase(L.LightningModule):
    """What every task shares: the label space, backbone settings, weights, the training step and optimisation.

    A subclass states its `task_name`, `main_metric`, the classifier key its whole-model weights carry
    (`head_key`), whether its label space always has a background class (`background`), its prediction
    writer (`writer_class`, a Lightning callback), and builds its network in `__init__`.
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
        weights: str | None = None,
        batch_size: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        tta: str = "none",
        log_images: int = 0,
    ) -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise UserError(f"--model.tta {tta!r} is not one of {', '.join(TTA_MODES)}.")
        # Test-time augmentation for validate/test (never training): logits averaged over flips (and scales).
        self.tta = tta
        # Validation pictures (gallery, PR curve, confusion matrix) logged to TensorBoard each epoch: N images.
        self.log_images = int(log_images)
        # Evaluation images kept for the report's gallery (rank 0), and what the last evaluation hands the report.
        self.gallery = GalleryKeeper(max(GALLERY_SIZE, self.log_images))
        self.evaluation_summary: EvaluationSummary | None = None
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
        self.weights = None if no_weights(weights) else str(weights)
        self.label_space: LabelSpace = self.resolve_label_space(num_classes, LabelSpace.coerce(label_space))
        self.num_classes = self.label_space.num_classes
        # Set by the CLI when a run resumes from --ckpt_path: the checkpoint supersedes pretrained weights.
        self.skip_pretrained_weights = False
        self._pretrained_loaded = False
        self._restored_from_checkpoint = False
        self.step_guard = StepGuard(self.max_consecutive_bad_steps)

    # ----------------------------------------------------------------- label space
    def label_space_for_count(self, count: int) -> LabelSpace:
        """The label space of whole-model weights that only tell their output count (a `.pth`)."""
        return LabelSpace.anonymous(count, background=self.background)

    def resolve_label_space(self, num_classes: int | None, data: LabelSpace | None) -> LabelSpace:
        """The model's label space: whole-model weights fix it; else the data's (the CLI link); else `num_classes`."""
        if data is not None and self.background and not data.background:
            raise UserError(f"The {self.task_name} task needs a label space with a background class at 0.")
        found = self._label_space_of_weights(known=data is not None or num_classes is not None)
        if isinstance(found, int):
            found = data if data is not None and data.num_classes == found else self.label_space_for_count(found)
        if found is not None:
            count = data.num_classes if data is not None else num_classes
            if count is not None and count != found.num_classes:
                message = f"--model.weights {self.weights} predict {found.num_classes} classes but the data has "
                message += f"{count}."
                if not self.evaluates_across_label_spaces:
                    raise UserError(
                        f"{message} To fine-tune on these classes, reuse only its backbone: --model.backbone.weights "
                        f"{self.weights} (and leave --model.weights unset)."
                    )
                rank_zero_warn(
                    f"{message} The model keeps the weights' label space: its predictions carry the weights' "
                    "category ids, and evaluation compares them with the data's."
                )
            return found
        if data is not None:
            if num_classes is not None and num_classes != data.num_classes:
                shown = ", ".join(data.class_names[:5]) + (", ..." if data.num_classes > 5 else "")
                raise UserError(
                    f"The model is set up for {num_classes} classes (--model.num_classes, or the hyper-parameters of "
                    f"the checkpoint given to --ckpt_path) but the data has {data.num_classes} ({shown}). Use a "
                    "checkpoint trained on these classes (or reuse only its backbone with --model.backbone.weights), "
                    "or leave --model.num_classes unset: it follows the data."
                )
            return data
        if num_classes is not None:
            return LabelSpace.anonymous(num_classes, background=self.background)
        raise UserError(
            f"{type(self).__name__} needs its classes: they follow the data (--data.root), come from whole-model "
            "weights (--model.weights file.ckpt|file.pth|a torchvision weights name), or --model.num_classes N "
            "(the number of classes, background included where the task has one)."
        )

    def _label_space_of_weights(self, known: bool) -> LabelSpace | int | None:
        if self.weights is None:
            return None
        if known and not is_torchvision_weights_name(self.weights) and not Path(self.weights).expanduser().exists():
            # Restored from hyper-parameters whose weights file is gone: the classes are known, and a missing file
            # is still reported when the weights are actually needed (load_pretrained).
            return None
        return label_space_of(self.weights, self.head_key, self.task_name)

    # ----------------------------------------------------------------- hyper-parameters
    def save_task_hyperparameters(self) -> None:
        """Save the init arguments with the config groups and the resolved label space as plain dicts.

        Plain types keep checkpoints loadable with `torch.load(weights_only=True)`; the resolved label space
        lets `load_from_checkpoint` rebuild the same heads without the weights file or the data.
        """
        self.save_hyperparameters()
        betas = list(self.optimizer_config.betas)
        resolved = {
            "num_classes": self.num_classes,
            "label_space": self.label_space.to_dict(),
            "backbone": dataclasses.asdict(self.backbone_config),
            "optimizer": {**dataclasses.asdict(self.optimizer_config), "betas": betas},
            "scheduler": dataclasses.asdict(self.scheduler_config),
        }
        for store in (self.hparams, self._hparams_initial):
            store.update(resolved)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's `load_from_checkpoint`, also for checkpoints written before the label space existed."""
        try:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception:  # not a local file Lightning can read either: its own loading reports what is wrong
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        hparams = checkpoint.get("hyper_parameters") or {}
        upgraded = upgrade_hyperparameters(cls.task_name, hparams, checkpoint.get(CHECKPOINT_KEY) or {})
        if upgraded == hparams:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        # Hand Lightning the upgraded checkpoint (retired keys such as segmentation's ignore_index removed).
        checkpoint["hyper_parameters"] = upgraded
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, *args, **kwargs)

    # ----------------------------------------------------------------- backbone and weights
    def backbone_module(self) -> nn.Module:
        """The backbone inside this task (for the LR multiplier and backbone-only weights)."""
        raise NotImplementedError(f"{type(self).__name__} must implement backbone_module()")

    def model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole-model weights in any layout we read (torchvision's, our .ckpt) with this module's key names."""
        raise NotImplementedError(f"{type(self).__name__} must implement model_state_dict()")

    def load_pretrained(self) -> None:
        """Load `weights` (whole model) or else `backbone.weights` (backbone only), once."""
        if self._pretrained_loaded or self.skip_pretrained_weights or self._restored_from_checkpoint:
            return
        self._pretrained_loaded = True
        if self.weights:
            state_dict, _ = load_weights_spec(self.weights)
            own_keys = self.model_state_dict(strip_wrapper_prefixes(state_dict))
            load_state_dict_into(
                self, own_keys, source=self.weights, what=f"{self.task_name} model", explain=layout_hint
            )
        elif self.backbone_config.weights:
            load_backbone_weights(self.backbone_module(), self.backbone_config.weights)

    def setup(self, stage: str) -> None:
        self.load_pretrained()
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

    def publish_summary(self, prefix: str, entries: dict[str, float], **summary: Any) -> None:
        """End of a validation/test epoch: the report's `EvaluationSummary` (the `summary` fields plus this epoch's
        gallery, which is then emptied) and the per-class `entries` for metrics.json."""
        result = EvaluationSummary(
            task=self.task_name, gallery=list(self.gallery.first), gallery_worst=self.gallery.worst(), **summary
        )
        self.gallery.reset()
        publish_evaluation(self, prefix, result, entries)

    def configure_callbacks(self) -> list[L.Callback]:
        """RNG streams in checkpoints (exact resume) and the per-epoch report of skipped images."""
        return [RNGState(), SkipReport()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"task": self.task_name}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        task = (checkpoint.get(CHECKPOINT_KEY) or {}).get("task")
        if task and task != self.task_name:
            raise UserError(
                f"This checkpoint was written by the {task} task; load it with its own task class, or use it "
                f"as backbone weights (--model.backbone.weights) for {self.task_name}."
            )
        report, _ = compare_state_dict(self, checkpoint.get("state_dict") or {}, source="checkpoint")
        if not report.ok or report.unexpected:
            hparams = checkpoint.get("hyper_parameters") or {}
            trained = (hparams.get("backbone") or {}).get("name")
            counts = report.counts()
            parts = [f"{counts['matched']}/{len(self.state_dict())} model keys match"]
            if report.missing:
                parts.append(f"{counts['missing']} missing (e.g. {', '.join(report.missing[:3])})")
            if report.unexpected:
                parts.append(f"{counts['unexpected']} unexpected (e.g. {', '.join(report.unexpected[:3])})")
            if report.shape_mismatched:
                shown = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in report.shape_mismatched[:2]]
                parts.append(f"{counts['shape_mismatched']} with other shapes (e.g. {'; '.join(shown)})")
            raise UserError(
                f"The checkpoint does not fit this {self.task_name} model: {'; '.join(parts)}. It was trained with "
                f"--model.backbone.name {trained} and num_classes {hparams.get('num_classes')}; use the same values "
                "(num_classes follows the data), or reuse only its backbone with --model.backbone.weights."
            )
        self._restored_from_checkpoint = True

    # ----------------------------------------------------------------- training step plumbing
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
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.step_guard.steps_since_check >= self.max_consecutive_bad_steps:
            self.step_guard.check(self.global_step)

    def on_train_epoch_end(self) -> None:
        self.step_guard.check(self.global_step)

    def on_train_end(self) -> None:
        self.step_guard.check(self.global_step)

    def _reduce_over_ranks(self) -> Any:
        """A max over ranks of the guard's flags: a plain all-reduce (Lightning's `reduce` adds a barrier, which
        blocks the host under NCCL)."""
        if self._trainer is None or self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return None
        return all_reduce_max

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, except that a step the guard skips leaves weights and optimizer state as they are.

        The closure (forward + backward) runs inside `optimizer.step` for some precision plugins and before it for
        others, so the decision is taken in the innermost `step` call, after the closure (and DDP's gradient
        all-reduce) has run. Fused optimizers skip on the device through GradScaler's `found_inf`; any other
        optimizer reads the decision on the host (one sync per step).
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        original_step = inner.step

        def step_unless_skipped(closure: Any = None, **kwargs: Any) -> Any:
            result = closure() if closure is not None else None
            skip = self.step_guard.decide(self._reduce_over_ranks())
            if not supports_found_inf(inner):
                return result if bool(skip) else original_step(**kwargs)
            prepare_momentum(inner)
            scaler_found_inf = getattr(inner, "found_inf", None)  # set by GradScaler under 16-mixed
            inner.found_inf = skip if scaler_found_inf is None else torch.maximum(scaler_found_inf, skip.float())
            try:
                original_step(**kwargs)
            finally:
                if scaler_found_inf is None:
                    del inner.found_inf
                else:
                    inner.found_inf = scaler_found_inf
            return result

        patched_by_someone = "step" in vars(inner)  # e.g. an LR scheduler's step counter
        inner.step = step_unless_skipped
        try:
            optimizer.step(closure=optimizer_closure)
        finally:
            if patched_by_someone:
                inner.step = original_step
            else:
                del inner.step

    # ----------------------------------------------------------------- optimisation
    def global_batch_size(self) -> int | None:
        """Images per optimizer step over all devices and nodes, gradient accumulation included."""
        if self.batch_size is None or self._trainer is None:
            return None
        return self.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

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
        optimizer = build_optimizer(groups, config, lr_scale(config, self.global_batch_size()))
        total_steps = int(self.trainer.estimated_stepping_batches)  # also sets up the train dataloader
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        batches = self.trainer.num_training_batches
        if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
            steps_per_epoch = max(1.0, batches / self.trainer.accumulate_grad_batches)
        else:
            steps_per_epoch = total_steps / max_epochs
        schedule = self.scheduler_config
        scheduler = build_scheduler(optimizer, schedule, config.lr, total_steps, steps_per_epoch, max_epochs)
        self.print_optimisation(groups, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def print_optimisation(self, groups: list[dict[str, Any]], total_steps: int) -> None:
        """One line at the start of fit (rank 0): global batch, the LR of each group, warmup and total steps."""
        config, schedule = self.optimizer_config, self.scheduler_config
        batch = self.global_batch_size()
        if batch is None:
            shown = "global batch unknown (no per-device batch size)"
        else:
            shown = (
                f"global batch {batch} ({self.batch_size} per device x {self.trainer.world_size} device(s) x "
                f"{self.trainer.accumulate_grad_batches} accumulation)"
            )
        if config.scale_lr and config.base_batch_size is not None:
            rule = f"lr {config.lr:g} at {config.base_batch_size}, {config.lr_scaling} scaling"
        else:
            rule = "lr as configured, not scaled"
        # The peak LR of each group (the scheduler's warmup has already lowered `lr` itself).
        lrs = ", ".join(f"{group['name']} {group.get('initial_lr', group['lr']):.4g}" for group in groups)
        unit = "steps" if schedule.interval == "step" else "epochs"
        if self.trainer.is_global_zero:
            print(
                f"optimisation: {shown}; effective lr: {lrs} ({rule}); warmup {schedule.warmup_steps} {unit}; "
                f"{total_steps} total steps",
                flush=True,
            )
