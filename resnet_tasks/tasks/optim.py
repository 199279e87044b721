"""Optimisation for every task: the `optimizer` and `scheduler` config groups, the LR scaled to the global batch,
parameter groups, and the optimizer with its LR schedule as `configure_optimizers` returns them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from resnet_tasks.compat import batch_norm_base, instance_norm_base
from resnet_tasks.config import global_batch_size


@dataclass
class OptimizerConfig:
    """The `optimizer` config group: SGD or AdamW, weight decay rules, the backbone LR multiplier, LR scaling.

    `lr` is the LR at a global batch of `base_batch_size` images (the batch the recipe was tuned for). With
    `scale_lr`, the LR used follows the actual global batch (per-device batch x devices x nodes x gradient
    accumulation): linearly (Goyal et al. 2017), or by the square root (`lr_scaling: sqrt`, e.g. for AdamW).
    `base_batch_size` None leaves the LR as given. `min_lr` scales with it; group multipliers apply on top.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = 0.0
    backbone_lr_mult: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    base_batch_size: int | None = None
    scale_lr: bool = True
    lr_scaling: Literal["linear", "sqrt"] = "linear"


def lr_scale(config: OptimizerConfig, global_batch: int | None) -> float:
    """The factor between the LR used at `global_batch` and the configured `lr` (1 when scaling is off)."""
    if not config.scale_lr or config.base_batch_size is None or global_batch is None:
        return 1.0
    ratio = global_batch / config.base_batch_size
    return math.sqrt(ratio) if config.lr_scaling == "sqrt" else ratio


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


def is_no_decay(module: nn.Module, param_name: str) -> bool:
    """Normalisation parameters and biases: the ones the references exclude from weight decay."""
    norm_types = (batch_norm_base(), nn.GroupNorm, nn.LayerNorm, instance_norm_base())
    return isinstance(module, norm_types) or param_name == "bias"


def parameter_groups(
    model: nn.Module, backbone: nn.Module, config: OptimizerConfig, scale: float = 1.0
) -> list[dict[str, Any]]:
    """Backbone/other x decay/no-decay groups of `model`'s trainable parameters, each with its LR and decay.

    `scale` multiplies every group's LR (the global-batch scaling, see `lr_scale`).
    """
    backbone_ids = {id(p) for p in backbone.parameters()}
    norm_wd = config.weight_decay if config.norm_weight_decay is None else config.norm_weight_decay
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            key = (id(param) in backbone_ids, is_no_decay(module, name))
            groups.setdefault(key, []).append(param)
    result = []
    for (in_backbone, no_decay), params in sorted(groups.items()):
        result.append(
            {
                "params": params,
                "lr": config.lr * scale * (config.backbone_lr_mult if in_backbone else 1.0),
                "weight_decay": norm_wd if no_decay else config.weight_decay,
                "name": f"{'backbone' if in_backbone else 'head'}{'/no_decay' if no_decay else ''}",
            }
        )
    return result


# Devices with fused SGD/AdamW kernels in every torch we support (others use the default implementation).
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(groups: list[dict[str, Any]], config: OptimizerConfig, scale: float = 1.0) -> torch.optim.Optimizer:
    """SGD or AdamW over `groups` as the config says (`scale`: the global-batch LR factor of the default LR).

    The fused implementation where the parameters' device has one: one kernel per step, and it can skip a step on
    the device (GradScaler's `found_inf`), which the non-finite guard uses instead of a host sync.
    """
    lr = config.lr * scale
    if config.name == "sgd":
        kind: Any = torch.optim.SGD
        options: dict[str, Any] = {"momentum": config.momentum, "nesterov": config.nesterov}
    else:
        kind, options = torch.optim.AdamW, {"betas": tuple(config.betas)}
    params = [param for group in groups for param in group["params"]]
    fused = all(param.device.type in FUSED_DEVICES and param.is_floating_point() for param in params)
    return kind(groups, lr=lr, weight_decay=config.weight_decay, fused=fused or None, **options)


# Per-group LR factors from the run's schedule and the scheduler updates per epoch (the fine-tuning gates).
GroupFactors = Callable[[Callable[[int], float], int], list[Callable[[int], float]]]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: SchedulerConfig,
    base_lr: float,
    total_steps: int,
    steps_per_epoch: int,
    max_epochs: int,
    group_factors: GroupFactors | None = None,
) -> dict[str, Any]:
    """Lightning's `lr_scheduler` entry: warmup + decay as a LambdaLR, stepped per step or per epoch.

    `group_factors(schedule, updates_per_epoch)`: one LambdaLR factor per param group built on the run's schedule
    (None: the schedule for every group).
    """
    if config.interval == "epoch":
        total, per_epoch = max_epochs, 1
    else:
        total, per_epoch = total_steps, steps_per_epoch
    schedule = ScheduleFactor(config, total, per_epoch, base_lr)
    factors: Any = schedule if group_factors is None else group_factors(schedule, per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return {"scheduler": scheduler, "interval": config.interval}


def steps_per_epoch(trainer: Any, total_steps: int, max_epochs: int) -> int:
    """Optimizer steps in one training epoch, exactly: ceil(batches / accumulation), as Lightning steps (its last
    step of an epoch takes the remainder batches)."""
    batches = trainer.num_training_batches
    if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
        return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))
    return max(1, math.ceil(total_steps / max_epochs))


def build_optimization(
    groups: list[dict[str, Any]],
    config: OptimizerConfig,
    schedule: SchedulerConfig,
    trainer: Any,
    scale: float,
    group_factors: GroupFactors | None = None,
) -> tuple[torch.optim.Optimizer, dict[str, Any], int]:
    """The optimizer over `groups`, its `lr_scheduler` entry for Lightning and the run's total optimizer steps
    (`group_factors`: see `build_scheduler`)."""
    optimizer = build_optimizer(groups, config, scale)
    total_steps = int(trainer.estimated_stepping_batches)  # also sets up the train dataloader
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    per_epoch = steps_per_epoch(trainer, total_steps, max_epochs)
    scheduler = build_scheduler(optimizer, schedule, config.lr, total_steps, per_epoch, max_epochs, group_factors)
    return optimizer, scheduler, total_steps


def optimisation_line(
    groups: list[dict[str, Any]],
    config: OptimizerConfig,
    schedule: SchedulerConfig,
    per_device: int | None,
    trainer: Any,
    total_steps: int,
) -> str:
    """What `fit` prints at its start: the global batch, the peak LR of each group, warmup and total steps."""
    if per_device is None:
        shown = "global batch unknown (no per-device batch size)"
    else:
        batch = global_batch_size(per_device, trainer.world_size, trainer.accumulate_grad_batches)
        shown = (
            f"global batch {batch} ({per_device} per device x {trainer.world_size} device(s) x "
            f"{trainer.accumulate_grad_batches} accumulation)"
        )
    if config.scale_lr and config.base_batch_size is not None:
        rule = f"lr {config.lr:g} at {config.base_batch_size}, {config.lr_scaling} scaling"
    else:
        rule = "lr as configured, not scaled"
    # The peak LR of each group (the scheduler's warmup has already lowered `lr` itself).
    lrs = ", ".join(f"{group['name']} {group.get('initial_lr', group['lr']):.4g}" for group in groups)
    unit = "steps" if schedule.interval == "step" else "epochs"
    return (
        f"optimisation: {shown}; effective lr: {lrs} ({rule}); warmup {schedule.warmup_steps} {unit}; "
        f"{total_steps} total steps"
    )
