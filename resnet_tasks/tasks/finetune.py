"""Fine-tuning schedules (freeze, freeze-then-unfreeze, milestones, layer-wise LR decay), exact under DDP.

The backbone is cut into parts (the stem and each stage). Every part a strategy may ever unfreeze keeps
`requires_grad=True` from the start, so DDP registers it when it wraps the model, and has its own param groups
whose LambdaLR factor is the run's schedule x the part's unfreeze gate x its warmup. While a part is frozen it runs
in eval mode without autograd, the zero `tie` term hands DDP a (zero) gradient for each of its parameters, and
`drop_frozen_grads` clears those before the optimizer step. Which parts are frozen is a function of the scheduler's
step alone, so a resumed run is the uninterrupted one. Parts that `frozen_stages` / `trainable_backbone_layers`
froze stay frozen; parts no strategy will unfreeze get `requires_grad=False` and leave DDP's reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from resnet_tasks.errors import UserError

STRATEGIES = ("none", "freeze", "freeze_then_unfreeze", "milestones")
KEY = "--model.finetune"


@dataclass
class FinetuneConfig:
    """The `finetune` config group: what of the backbone trains when, and layer-wise LR decay.

    `freeze`: the backbone never trains. `freeze_then_unfreeze`: the head alone until epoch `unfreeze_at`, then
    the whole backbone. `milestones`: each epoch of `unfreeze_milestones` unfreezes the next part from the top
    (last stage first, stem last). A part that unfreezes has its LR warmed up linearly from zero over
    `warmup_epochs`. `layer_decay` F: the k-th part below the head trains at F^k x the backbone's LR.
    """

    strategy: Literal["none", "freeze", "freeze_then_unfreeze", "milestones"] = "none"
    unfreeze_at: int = 1
    unfreeze_milestones: list[int] = field(default_factory=list)
    warmup_epochs: int = 1
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"{KEY}.strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}.")
        epochs = list(self.unfreeze_milestones)
        if self.unfreeze_at < 0 or self.warmup_epochs < 0 or any(epoch < 0 for epoch in epochs):
            raise UserError(f"{KEY}.unfreeze_at, .unfreeze_milestones and .warmup_epochs must be >= 0 epochs.")
        if any(later <= earlier for earlier, later in zip(epochs, epochs[1:])):
            raise UserError(f"{KEY}.unfreeze_milestones {epochs} must be strictly increasing epochs.")
        if self.strategy == "milestones" and not epochs:
            raise UserError(f"{KEY}.strategy milestones needs {KEY}.unfreeze_milestones [EPOCH, ...].")
        if epochs and self.strategy != "milestones":
            raise UserError(f"{KEY}.unfreeze_milestones needs {KEY}.strategy milestones (it is {self.strategy}).")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"{KEY}.layer_decay must be in (0, 1], got {self.layer_decay}.")

    def unfreeze_epochs(self, parts: int) -> list[int | None]:
        """The epoch each part (bottom-up: stem first) starts training; None: never (0: from the start)."""
        if self.strategy == "none":
            return [0] * parts
        if self.strategy == "freeze":
            return [None] * parts
        if self.strategy == "freeze_then_unfreeze":
            return [self.unfreeze_at] * parts
        top_down = list(self.unfreeze_milestones) + [None] * (parts - len(self.unfreeze_milestones))
        return top_down[:parts][::-1]

    def check_epochs(self, max_epochs: int | None) -> None:
        """At the start of fit: one line when an unfreeze epoch lies past the run's last epoch."""
        epochs = {"freeze_then_unfreeze": [self.unfreeze_at], "milestones": self.unfreeze_milestones}
        late = [
            e for e in epochs.get(self.strategy, []) if max_epochs is not None and max_epochs > 0 and e > max_epochs
        ]
        if late:
            key = "unfreeze_at" if self.strategy == "freeze_then_unfreeze" else "unfreeze_milestones"
            raise UserError(f"{KEY}.{key} epoch {late[0]} is past --trainer.max_epochs {max_epochs}; lower it.")


@dataclass
class BackbonePart:
    """The stem or one stage of a backbone: its top-level modules and the parameters that could train."""

    name: str
    modules: list[nn.Module]
    params: list[nn.Parameter]  # requires_grad when partitioned (frozen_stages' ones left out)
    total: int  # every parameter's elements, frozen or not

    @property
    def fixed(self) -> bool:
        """Frozen before any strategy (frozen_stages, trainable_backbone_layers, or no parameters)."""
        return not self.params


def backbone_parts(backbone: nn.Module) -> list[BackbonePart]:
    """Stem and stages, bottom-up: children before the first stage are the stem, children after the last stage
    (a pre-activation net's final norm) go with the last stage. Needs the backbone's `stage_names`."""
    stages = list(backbone.stage_names)
    owner, modules = "stem", {name: [] for name in ["stem", *stages]}
    for name, child in backbone.named_children():
        owner = name if name in stages else owner
        modules[owner].append(child)
    parts = []
    for name, children in modules.items():
        params = [p for module in children for p in module.parameters()]
        parts.append(
            BackbonePart(name, children, [p for p in params if p.requires_grad], sum(p.numel() for p in params))
        )
    return parts


class StageFactor:
    """LambdaLR factor of one backbone part: the run's schedule x unfreeze gate x linear warmup from zero.

    Steps count scheduler updates (optimizer steps, or epochs with `interval: epoch`). LambdaLR saves an object's
    `__dict__` in checkpoints: it holds plain values only (the schedule sits in a slot; its own state is saved
    under `schedule_state` and handed back to it after a restore).
    """

    __slots__ = ("__dict__", "schedule")

    def __init__(self, schedule: Callable[[int], float], open_step: int | None, warmup_steps: int) -> None:
        self.schedule = schedule
        self.schedule_state = vars(schedule) if hasattr(schedule, "__dict__") else {}
        self.open_step = open_step  # None: never trains
        self.warmup_steps = warmup_steps

    def is_open(self, step: int) -> bool:
        return self.open_step is not None and step >= self.open_step

    def __call__(self, step: int) -> float:
        if not self.is_open(step):
            return 0.0
        if hasattr(self.schedule, "__dict__") and self.schedule_state is not vars(self.schedule):
            vars(self.schedule).update(self.schedule_state)  # restored from a checkpoint
            self.schedule_state = vars(self.schedule)
        factor = self.schedule(step)
        if self.warmup_steps > 0:
            factor *= min(1.0, (step - self.open_step + 1) / self.warmup_steps)
        return factor


class _NoGrad:
    """Forward hooks that run a module with autograd off (its output carries no graph back into it)."""

    def __init__(self) -> None:
        self.previous: list[bool] = []

    def before(self, module: nn.Module, args: Any) -> None:
        self.previous.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def after(self, module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(self.previous.pop())


def count(n: int) -> str:
    """A parameter count for people: 2.1M, 45.3K, 120."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


class Finetuner:
    """One task's fine-tuning schedule at run time (see the module docstring for the mechanism).

    Built with the task's network (before DDP wraps it); `param_groups` and `lr_lambdas` in
    `configure_optimizers`; `apply(step)` at each training batch start; `tie(loss)` on the training loss;
    `drop_frozen_grads()` before each optimizer step (after backward, before clipping).
    """

    def __init__(self, backbone: nn.Module, config: FinetuneConfig) -> None:
        self.backbone = backbone
        self.config = config
        self.parts = backbone_parts(backbone)
        self.unfreeze_epochs = config.unfreeze_epochs(len(self.parts))
        self.active = config.strategy != "none" or config.layer_decay != 1.0
        if config.strategy == "milestones":
            movable = [part.name for part in self.parts[::-1] if not part.fixed]
            if len(config.unfreeze_milestones) > len(movable):
                raise UserError(
                    f"{KEY}.unfreeze_milestones lists {len(config.unfreeze_milestones)} epochs but only "
                    f"{len(movable)} parts can unfreeze ({', '.join(movable)}; the others are frozen by "
                    "frozen_stages / trainable_backbone_layers)."
                )
        for part, epoch in zip(self.parts, self.unfreeze_epochs):
            if epoch is None:  # never trains: out of DDP's reduction and the optimizer
                for param in part.params:
                    param.requires_grad_(False)
        self.factors: dict[int, StageFactor] = {}
        self.steps_per_epoch: int | None = None  # set by lr_lambdas
        self.frozen: frozenset[int] | None = None  # the parts now under the no-grad hooks
        self._handles: list[Any] = []
        self._tied: list[nn.Parameter] = []

    def decay(self, index: int) -> float:
        """Layer decay of part `index` (bottom-up): F^1 for the last stage ... F^(stages+1) for the stem."""
        return self.config.layer_decay ** (len(self.parts) - index)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The task's groups with each backbone group split per part (named `backbone.<part>[/no_decay]`, LR x its
        layer decay); head groups first and unchanged, then the parts from the top down. Unchanged when inactive."""
        if not self.active:
            return groups
        part_of = {id(p): i for i, part in enumerate(self.parts) for p in part.params}
        head: list[dict[str, Any]] = []
        per_part: dict[int, list[dict[str, Any]]] = {}
        for group in groups:
            own = [p for p in group["params"] if id(p) not in part_of]
            if own:
                head.append({**group, "params": own})
            split: dict[int, list[nn.Parameter]] = {}
            for param in group["params"]:
                if id(param) in part_of:
                    split.setdefault(part_of[id(param)], []).append(param)
            suffix = group.get("name", "").partition("/")[2]
            for index, params in split.items():
                name = f"backbone.{self.parts[index].name}" + (f"/{suffix}" if suffix else "")
                lr = group["lr"] * self.decay(index)
                per_part.setdefault(index, []).append({**group, "params": params, "lr": lr, "name": name})
        return head + [g for index in sorted(per_part, reverse=True) for g in per_part[index]]

    def lr_lambdas(
        self, groups: list[dict[str, Any]], schedule: Callable[[int], float], steps_per_epoch: int
    ) -> list[Callable[[int], float]]:
        """LambdaLR's factor per group of `param_groups`: `schedule` for the head, a `StageFactor` per part.

        `steps_per_epoch`: scheduler updates per epoch, exactly (ceil(batches / accumulation) with `interval:
        step`, 1 with `interval: epoch`); the unfreeze gates and the frozen parts change at those boundaries.
        """
        part_of = {id(p): i for i, part in enumerate(self.parts) for p in part.params}
        self.steps_per_epoch = steps_per_epoch
        warmup = self.config.warmup_epochs * steps_per_epoch
        for index, epoch in enumerate(self.unfreeze_epochs):
            if epoch is None:
                continue
            open_step = epoch * steps_per_epoch
            self.factors[index] = StageFactor(schedule, open_step, warmup if open_step > 0 else 0)
        lambdas: list[Callable[[int], float]] = []
        for group in groups:
            index = part_of.get(id(group["params"][0])) if group["params"] else None
            lambdas.append(schedule if index is None or not self.active else self.factors[index])
        return lambdas

    # ------------------------------------------------------------------ the training step
    def is_frozen(self, index: int, step: int) -> bool:
        """Part `index` does not train at scheduler step `step` (fixed parts count as not frozen: not ours)."""
        if self.parts[index].fixed:
            return False
        factor = self.factors.get(index)
        return factor is None or not factor.is_open(step)

    def apply(self, step: int) -> str | None:
        """At each training batch start, for scheduler step `step`: frozen parts in eval mode and under the no-grad
        hooks. Returns a line to log when the trainable set changes (and on the first call of a resumed run)."""
        if not self.active:
            return None
        if self.steps_per_epoch is None:
            raise RuntimeError("Finetuner.apply() needs lr_lambdas() first (the unfreeze steps)")
        frozen = frozenset(i for i in range(len(self.parts)) if self.is_frozen(i, step))
        for index in frozen:
            for module in self.parts[index].modules:
                module.train(False)  # whatever trainer.fit did to training mode: BN statistics stay fixed
        if frozen == self.frozen:
            return None
        previous, self.frozen = self.frozen, frozen
        opened = [i for i in sorted(previous or ()) if i not in frozen]
        for index in opened:
            for module in self.parts[index].modules:
                module.train(self.backbone.training)
        self._install(frozen)
        epoch = step // max(1, self.steps_per_epoch)
        if opened:
            names = (
                "backbone" if len(opened) == len(self.parts) else ", ".join(self.parts[i].name for i in opened[::-1])
            )
            warm = f", LR warmed up over {self.config.warmup_epochs} epoch(s)" if self.config.warmup_epochs else ""
            size = count(sum(p.numel() for i in opened for p in self.parts[i].params))
            return f"finetune: epoch {epoch}: {names} unfrozen ({size} params{warm})"
        if previous is None and step > 0 and frozen:
            names = ", ".join(self.parts[i].name for i in sorted(frozen, reverse=True))
            return f"finetune: resumed at epoch {epoch} (step {step}); frozen: {names}"
        return None

    def _install(self, frozen: frozenset[int]) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        switch = _NoGrad()
        for index in sorted(frozen):
            for module in self.parts[index].modules:
                self._handles.append(module.register_forward_pre_hook(switch.before))
                self._handles.append(module.register_forward_hook(switch.after, always_call=True))
        self._tied = [p for i in sorted(frozen) for p in self.parts[i].params if p.requires_grad]

    def tie(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus zero x the frozen parts' registered parameters (under DDP: each gets a zero gradient, so the
        reducer never waits for it and no `find_unused_parameters` is needed). Unchanged without a process group."""
        if not self._tied or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return loss
        return loss + torch.stack([p.sum().float() for p in self._tied]).sum().to(loss.dtype) * 0.0

    def drop_frozen_grads(self) -> None:
        """Before the optimizer step (and gradient clipping): the frozen parts' gradients become None, so momentum
        and weight decay never move them."""
        for param in self._tied:
            param.grad = None

    def release(self) -> None:
        """At the end of fit: remove the no-grad hooks (a later fit calls `apply` again)."""
        self._install(frozenset())
        self.frozen = None

    # ------------------------------------------------------------------ what the user reads
    def describe(self, groups: list[dict[str, Any]]) -> str:
        """The start-of-fit line: what trains now and when that changes."""
        backbone_ids = {id(p) for part in self.parts for p in part.params}
        head = sum(p.numel() for g in groups for p in g["params"] if id(p) not in backbone_ids)
        when: dict[int | None, list[int]] = {}
        for index in range(len(self.parts) - 1, -1, -1):
            if not self.parts[index].fixed:
                when.setdefault(self.unfreeze_epochs[index], []).append(index)
        items = [f"head {count(head)} params"]
        for epoch, indices in sorted(when.items(), key=lambda item: (item[0] is None, item[0] or 0)):
            names = "backbone" if len(indices) == len(self.parts) else ", ".join(self.parts[i].name for i in indices)
            size = count(sum(self.parts[i].total for i in indices))
            if epoch is None:
                items.append(f"{names} ({size}) frozen throughout")
            else:
                items.append(f"{names} ({size}) " + ("from the start" if epoch == 0 else f"at epoch {epoch}"))
        fixed = [part.name for part in self.parts if part.fixed]
        if fixed:
            items.append(f"{', '.join(fixed)} frozen by frozen_stages / trainable_backbone_layers")
        extras = []
        if self.config.warmup_epochs and any(e for e in self.unfreeze_epochs):
            extras.append(f"each unfreeze warms its LR up over {self.config.warmup_epochs} epoch(s)")
        if self.config.layer_decay != 1.0:
            extras.append(f"layer decay {self.config.layer_decay:g}")
        return "trains: " + "; ".join(items) + (f" ({', '.join(extras)})" if extras else "")


def param_group_table(groups: Sequence[Mapping[str, Any]]) -> str:
    """The param groups as printed at fit start: name, parameter count, peak LR, weight decay."""
    rows = [
        (
            str(g.get("name", i)),
            count(sum(p.numel() for p in g["params"])),
            g.get("initial_lr", g["lr"]),
            g["weight_decay"],
        )
        for i, g in enumerate(groups)
    ]
    width = max(len(row[0]) for row in rows) if rows else 4
    lines = [f"  {'group':<{width}}  {'params':>7}  {'lr':>9}  {'weight decay':>12}"]
    lines += [f"  {name:<{width}}  {n:>7}  {lr:>9.4g}  {wd:>12.4g}" for name, n, lr, wd in rows]
    return "param groups:\n" + "\n".join(lines)


__all__ = [
    "BackbonePart",
    "FinetuneConfig",
    "Finetuner",
    "StageFactor",
    "backbone_parts",
    "param_group_table",
]
