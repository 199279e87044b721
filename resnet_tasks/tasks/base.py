"""The LightningModule base all three tasks share: backbone from config, pretrained weights, optimisation."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from resnet_tasks.backbones import build_backbone, load_state_dict_into, load_weights_spec
from resnet_tasks.errors import UserError

CHECKPOINT_KEY = "resnet_tasks"
RNG_KEY = "resnet_tasks_rng"


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state in types `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]))


def _as_tuple(value: Any) -> Any:
    """Python's random state comes back from a checkpoint with lists where tuples were."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class BackboneConfig:
    """The `backbone` config group, the same for every task (`--model.backbone.name resnet18`)."""

    name: str = "resnet50"
    weights: str | None = None
    frozen_stages: int = 0
    norm: Literal["bn", "frozen_bn", "sync_bn", "gn"] = "bn"
    output_stride: int | None = None
    shortcut: bool | None = None
    zero_init_residual: bool = False


@dataclass
class OptimizerConfig:
    """The `optimizer` config group: SGD or AdamW, weight decay rules and the backbone LR multiplier."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = 0.0
    backbone_lr_mult: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedulerConfig:
    """The `scheduler` config group: linear warmup, then constant / cosine / multistep / poly decay.

    `interval: step` updates the LR every optimizer step (milestones stay in epochs); `warmup_steps`
    counts scheduler updates (steps or epochs, following `interval`).
    """

    name: Literal["constant", "cosine", "multistep", "poly"] = "cosine"
    interval: Literal["step", "epoch"] = "step"
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    power: float = 0.9
    min_lr: float = 0.0


def _no_weights(spec: str | None) -> bool:
    """True for an unset weights spec (jsonargparse may hand `null` on the command line over as "None")."""
    return spec is None or str(spec).strip().lower() in ("", "none", "null")


def _as_config(value: Any, cls: type) -> Any:
    """Accept a dataclass instance, a dict (from a checkpoint's hyper-parameters) or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"Unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(known)}.")
        return cls(**value)
    if dataclasses.is_dataclass(value):
        return cls(**dataclasses.asdict(value))
    raise UserError(f"Expected a mapping for {cls.__name__}, got {value!r}.")


class ScheduleFactor:
    """LR multiplier as a function of the scheduler step: linear warmup, then the main decay.

    A callable object (not a closure) so LambdaLR can save and restore it in checkpoints.
    """

    def __init__(self, config: SchedulerConfig, total_steps: int, steps_per_epoch: float, base_lr: float) -> None:
        self.name = config.name
        self.warmup_steps = config.warmup_steps
        self.warmup_factor = config.warmup_factor
        self.milestones = [round(m * steps_per_epoch) for m in config.milestones]
        self.gamma = config.gamma
        self.power = config.power
        self.min_factor = config.min_lr / base_lr if base_lr > 0 else 0.0
        self.total_steps = max(1, total_steps)

    def __call__(self, step: int) -> float:
        factor = 1.0
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor = self.warmup_factor * (1 - alpha) + alpha
        progress = min(1.0, step / self.total_steps)
        if self.name == "cosine":
            decay = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.name == "poly":
            decay = self.min_factor + (1 - self.min_factor) * (1 - progress) ** self.power
        elif self.name == "multistep":
            decay = self.gamma ** sum(step >= m for m in self.milestones)
        else:
            decay = 1.0
        return factor * decay


def _is_no_decay(module: nn.Module, param_name: str) -> bool:
    """Normalisation parameters and biases: the ones the references exclude from weight decay."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    return isinstance(module, norm_types) or param_name == "bias"


class TaskBase(L.LightningModule):
    """Backbone construction, pretrained weights, class names, optimiser and schedule for every task."""

    task_name: ClassVar[str] = ""
    main_metric: ClassVar[str] = ""
    default_backbone_options: ClassVar[dict[str, Any]] = {}
    # Consecutive optimizer steps with a non-finite loss tolerated before training stops.
    max_consecutive_bad_steps: ClassVar[int] = 10

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone_config: BackboneConfig = _as_config(backbone, BackboneConfig)
        if _no_weights(self.backbone_config.weights):
            self.backbone_config.weights = None
        weights = None if _no_weights(weights) else weights
        self.optimizer_config: OptimizerConfig = _as_config(optimizer, OptimizerConfig)
        self.scheduler_config: SchedulerConfig = _as_config(scheduler, SchedulerConfig)
        self.weights = weights
        self.num_classes = num_classes
        self.class_names: list[str] = []
        self.label_to_category_id: list[int] | None = None
        # Set by the CLI when a run resumes from --ckpt_path: the checkpoint supersedes pretrained weights.
        self.skip_pretrained_weights = False
        self._pretrained_loaded = False
        self._restored_from_checkpoint = False
        self._bad_steps = 0
        self._skip_optimizer_step = False

    # ----------------------------------------------------------------- hyper-parameters
    def save_task_hyperparameters(self, **extra_ignore: Any) -> None:
        """Save the subclass's init arguments, with the config groups stored as plain dicts.

        Plain dicts keep checkpoints loadable with `torch.load(weights_only=True)`.
        """
        self.save_hyperparameters(ignore=list(extra_ignore))
        for key, config in (
            ("backbone", self.backbone_config),
            ("optimizer", self.optimizer_config),
            ("scheduler", self.scheduler_config),
        ):
            self.hparams[key] = dataclasses.asdict(config)
            self._hparams_initial[key] = dataclasses.asdict(config)
        self.hparams["optimizer"]["betas"] = list(self.optimizer_config.betas)
        self._hparams_initial["optimizer"]["betas"] = list(self.optimizer_config.betas)

    # ----------------------------------------------------------------- backbone and weights
    def build_backbone(self, **task_defaults: Any) -> nn.Module:
        """The shared backbone from the `backbone` group; the task's defaults fill unset options.

        Backbone weights are loaded later, in `setup`, unless a checkpoint supersedes them.
        """
        cfg = self.backbone_config
        options: dict[str, Any] = dict(task_defaults)
        options.update(frozen_stages=cfg.frozen_stages, norm=cfg.norm, zero_init_residual=cfg.zero_init_residual)
        if cfg.output_stride is not None:
            options["output_stride"] = cfg.output_stride
        if cfg.shortcut is not None:
            options["shortcut"] = cfg.shortcut
        return build_backbone(cfg.name, None, **options)

    def backbone_module(self) -> nn.Module:
        """The backbone inside this task (for the LR multiplier and backbone-only weights)."""
        raise NotImplementedError(f"{type(self).__name__} must implement backbone_module()")

    def load_model_weights(self, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
        """Load whole-model weights (backbone + neck + head); each task maps its own key layout."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_model_weights()")

    def load_pretrained(self) -> None:
        """Load `weights` (whole model) or else `backbone.weights` (backbone only), once."""
        if self._pretrained_loaded or self.skip_pretrained_weights or self._restored_from_checkpoint:
            return
        self._pretrained_loaded = True
        if self.weights:
            state_dict, meta = load_weights_spec(self.weights)
            self.load_model_weights(state_dict, meta, self.weights)
        elif self.backbone_config.weights:
            from resnet_tasks.backbones import extract_backbone_state_dict

            state_dict, _ = load_weights_spec(self.backbone_config.weights)
            backbone = self.backbone_module()
            part = extract_backbone_state_dict(state_dict, backbone)
            load_state_dict_into(backbone, part, source=self.backbone_config.weights, what="backbone")

    def setup(self, stage: str) -> None:
        self.load_pretrained()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and not self.class_names:
            self.class_names = list(getattr(datamodule, "class_names", []) or [])
            mapping = getattr(datamodule, "label_to_category_id", None)
            self.label_to_category_id = list(mapping) if mapping is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "task": self.task_name,
            "class_names": list(self.class_names),
            "label_to_category_id": self.label_to_category_id,
        }
        # Global RNG streams (dropout, mixup/cutmix draws) so a resumed run continues them exactly.
        checkpoint[RNG_KEY] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_rng_state(),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get(CHECKPOINT_KEY, {})
        task = info.get("task")
        if task and task != self.task_name:
            raise UserError(
                f"This checkpoint was written by the {task} task; load it with its own task class, or use it "
                f"as backbone weights (--model.backbone.weights) for {self.task_name}."
            )
        self._check_checkpoint_fits(checkpoint)
        self.class_names = list(info.get("class_names") or [])
        self.label_to_category_id = info.get("label_to_category_id")
        self._restored_from_checkpoint = True
        rng = checkpoint.get(RNG_KEY)
        if rng and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(rng["torch"])
            _set_numpy_rng_state(rng["numpy"])
            random.setstate(_as_tuple(rng["python"]))

    def _check_checkpoint_fits(self, checkpoint: dict[str, Any]) -> None:
        """UserError with a key-match summary when a checkpoint's weights do not fit this model."""
        saved = checkpoint.get("state_dict") or {}
        own = self.state_dict()
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        mismatched = [
            f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(own[k].shape)
        ]
        if not (missing or unexpected or mismatched):
            return
        hparams = checkpoint.get("hyper_parameters") or {}
        trained = (hparams.get("backbone") or {}).get("name")
        parts = [f"{len(own) - len(missing) - len(mismatched)}/{len(own)} model keys match"]
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:2])})")
        hint = (
            f"It was trained with --model.backbone.name {trained} and num_classes {hparams.get('num_classes')}; "
            "use the same values (num_classes follows the data), or reuse only its backbone with "
            "--model.backbone.weights."
        )
        raise UserError(f"The checkpoint does not fit this {self.task_name} model: {'; '.join(parts)}. {hint}")

    # ----------------------------------------------------------------- training step plumbing
    def training_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """The named loss terms for one training batch (summed into the optimised loss)."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses()")

    def batch_size_of(self, batch: Any) -> int:
        """Number of images in `batch` (for logging averages)."""
        raise NotImplementedError(f"{type(self).__name__} must implement batch_size_of()")

    def on_train_epoch_start(self) -> None:
        self._seen_in_epoch = 0

    def on_train_epoch_end(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "take_skip_report"):
            report = datamodule.take_skip_report(getattr(self, "_seen_in_epoch", 0))
            if report:
                self.print(report)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.training_losses(batch) if batch is not None else {}
        bad = [name for name, value in losses.items() if not torch.isfinite(value.detach()).all()]
        # Every rank must take the same decision: a rank that skipped alone would leave DDP's gradient
        # all-reduce waiting. One collective carries both flags.
        flags = torch.tensor([float(bool(bad)), float(batch is None)], device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        any_bad, any_empty = bool(flags[0]), bool(flags[1])
        if any_bad or any_empty:
            self._skip_optimizer_step = True
            if any_bad:
                self._count_bad_step(bad or ["(on another rank)"])
            # A zero loss that touches every trainable parameter: backward (and DDP's sync) still run, the
            # gradients are zero, and optimizer_step below leaves the weights and optimizer state untouched.
            zero = torch.zeros((), device=self.device)
            return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), zero)
        self._bad_steps = 0
        size = self.batch_size_of(batch)
        self._seen_in_epoch = getattr(self, "_seen_in_epoch", 0) + size
        loss = sum(losses.values())
        if len(losses) > 1:
            for name, value in losses.items():
                self.log(f"train/{name}", value.detach(), batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        return loss

    def _count_bad_step(self, bad: list[str]) -> None:
        self._bad_steps += 1
        if self._bad_steps >= self.max_consecutive_bad_steps:
            raise UserError(
                f"Training diverged: loss term(s) {bad} were non-finite for {self._bad_steps} consecutive "
                "steps. Lower --model.optimizer.lr, add warmup (--model.scheduler.warmup_steps), or use "
                "bf16-mixed instead of 16-mixed precision."
            )
        self.print(
            f"Non-finite loss term(s) {bad} at step {self.global_step} ({self._bad_steps} consecutive); "
            "skipping this step."
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, except that a step flagged by `training_step` leaves weights and state as they are.

        The closure (forward + backward) runs inside `optimizer.step` for some precision plugins and before
        it for others, so the decision is taken in the innermost `step` call, after the closure has run.
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        original_step = inner.step

        def step_unless_skipped(closure: Any = None, **kwargs: Any) -> Any:
            result = closure() if closure is not None else None
            if self._skip_optimizer_step:
                self._skip_optimizer_step = False
                return result
            return original_step(**kwargs)

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
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Backbone/other x decay/no-decay groups, each with its LR and weight decay."""
        opt = self.optimizer_config
        backbone_ids = {id(p) for p in self.backbone_module().parameters()}
        norm_wd = opt.weight_decay if opt.norm_weight_decay is None else opt.norm_weight_decay
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        seen: set[int] = set()
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                key = (id(param) in backbone_ids, _is_no_decay(module, name))
                groups.setdefault(key, []).append(param)
        result = []
        for (in_backbone, no_decay), params in sorted(groups.items()):
            result.append(
                {
                    "params": params,
                    "lr": opt.lr * (opt.backbone_lr_mult if in_backbone else 1.0),
                    "weight_decay": norm_wd if no_decay else opt.weight_decay,
                    "name": f"{'backbone' if in_backbone else 'head'}{'/no_decay' if no_decay else ''}",
                }
            )
        return result

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.optimizer_config
        groups = self.parameter_groups()
        if opt.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        sched = self.scheduler_config
        total_steps = int(self.trainer.estimated_stepping_batches)  # also sets up the train dataloader
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        batches = self.trainer.num_training_batches
        if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
            steps_per_epoch = max(1.0, batches / self.trainer.accumulate_grad_batches)
        else:
            steps_per_epoch = total_steps / max_epochs
        if sched.interval == "epoch":
            total, per_epoch = max_epochs, 1.0
        else:
            total, per_epoch = total_steps, steps_per_epoch
        factor = ScheduleFactor(sched, total, per_epoch, opt.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": sched.interval}}
