"""The non-finite step guard: a step whose loss is not finite on any rank is skipped on every rank, decided on the
device (no host sync per step); its counts are read, reported and checked against the abort limit every few steps.
`guarded_step` is the optimizer step that honours the decision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from resnet_tasks.compat import mark_momentum_prepared, momentum_prepared, optimizer_honours_found_inf
from resnet_tasks.errors import UserError


class StepGuard:
    """Device-side flags and counters of skipped optimizer steps.

    `flag` records a micro-batch's loss terms (or an empty batch); `decide`, called after backward (DDP's gradient
    all-reduce has run), reduces the flags over ranks and returns the skip decision as a device tensor, which the
    optimizer consumes as GradScaler's `found_inf`; `check` reads the counters (one host sync) and reports them.
    """

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.terms: list[str] = []
        self._pending_terms: torch.Tensor | None = None  # per loss term: non-finite in this optimizer step
        self._pending_empty: torch.Tensor | None = None  # a micro-batch with no images (all skipped by the data)
        self._counts: dict[str, torch.Tensor] = {}
        self._indices: dict[tuple[str, ...], torch.Tensor] = {}  # loss names -> their rows (built once per device)
        self.steps_since_check = 0

    def _zeros(self, size: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(size, device=device)

    def _ensure(self, names: list[str], device: torch.device) -> None:
        for name in names:
            if name not in self.terms:
                self.terms.append(name)
        size = len(self.terms)
        if self._pending_terms is None or self._pending_terms.device != device:
            self._pending_terms = self._zeros(size, device)
            self._pending_empty = self._zeros(1, device)
        elif self._pending_terms.numel() < size:
            grown = self._zeros(size, device)
            grown[: self._pending_terms.numel()] = self._pending_terms
            self._pending_terms = grown
        if not self._counts or self._counts["consecutive"].device != device:
            self._counts = {key: self._zeros(1, device) for key in ("consecutive", "longest", "bad")}
            self._indices = {}
            self._counts["terms"] = self._zeros(size, device)
        elif self._counts["terms"].numel() < size:
            grown = self._zeros(size, device)
            grown[: self._counts["terms"].numel()] = self._counts["terms"]
            self._counts["terms"] = grown

    def flag(self, losses: dict[str, torch.Tensor] | None, device: torch.device) -> torch.Tensor | None:
        """Record one micro-batch; returns its summed loss (None for an empty batch). No host sync."""
        self._ensure(list(losses or {}), device)
        assert self._pending_terms is not None and self._pending_empty is not None
        if not losses:
            self._pending_empty.fill_(1.0)
            return None
        bad = torch.stack([(~torch.isfinite(value.detach())).any() for value in losses.values()]).float()
        names = tuple(losses)
        index = self._indices.get(names)
        if index is None:
            index = self._indices[names] = torch.tensor([self.terms.index(name) for name in names], device=device)
        self._pending_terms[index] = torch.maximum(self._pending_terms[index], bad)
        return sum(losses.values())

    def decide(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """After backward: 1.0 when this optimizer step must be skipped on every rank (`reduce`: a max over ranks)."""
        if self._pending_terms is None or self._pending_empty is None:
            raise RuntimeError("StepGuard.decide() called before flag()")
        flags = torch.cat([self._pending_terms, self._pending_empty])
        if reduce is not None:
            flags = reduce(flags)
        terms, empty = flags[:-1], flags[-1:]
        bad = terms.amax(dim=0, keepdim=True) if terms.numel() else torch.zeros_like(empty)
        counts = self._counts
        counts["consecutive"].add_(1.0).mul_(bad)
        torch.maximum(counts["longest"], counts["consecutive"], out=counts["longest"])
        counts["bad"].add_(bad)
        counts["terms"][: terms.numel()].add_(terms)
        self._pending_terms.zero_()
        self._pending_empty.zero_()
        self.steps_since_check += 1
        return torch.maximum(bad, empty).squeeze(0)

    def check(self, step: int) -> None:
        """Read the counters (one host sync): report skipped steps since the last check; abort after a long run."""
        if self.steps_since_check == 0 or not self._counts:
            return
        counts = {key: value.tolist() for key, value in self._counts.items()}
        steps = self.steps_since_check
        self.steps_since_check = 0
        for key in ("longest", "bad", "terms"):
            self._counts[key].zero_()
        bad = int(counts["bad"][0])
        terms = [name for name, count in zip(self.terms, counts["terms"]) if count > 0]
        if int(counts["longest"][0]) >= self.max_consecutive:
            raise UserError(
                f"Training diverged: loss term(s) {terms} were non-finite for {int(counts['longest'][0])} consecutive "
                f"steps (up to step {step}). Lower --model.optimizer.lr, add warmup (--model.scheduler.warmup_steps), "
                "or use bf16-mixed instead of 16-mixed precision."
            )
        if bad:
            per_term = ", ".join(f"{name} x{int(count)}" for name, count in zip(self.terms, counts["terms"]) if count)
            print(
                f"Non-finite loss term(s) {terms} in {bad} of the {steps} steps up to step {step} ({per_term}); "
                "those steps were skipped: weights and optimizer state untouched.",
                flush=True,
            )


def all_reduce_max(flags: torch.Tensor) -> torch.Tensor:
    """The element-wise max of `flags` over all ranks, in place (enqueued on the device; no host wait)."""
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags


def supports_found_inf(optimizer: Any) -> bool:
    """True for an optimizer whose step honours GradScaler's `found_inf` tensor (the fused implementations)."""
    defaults = getattr(optimizer, "defaults", {})
    return bool(optimizer_honours_found_inf(optimizer) and defaults.get("fused"))


def prepare_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Fused SGD's first step writes uninitialised momentum buffers when skipped: start them at zero instead.

    With dampening 0 (ours), a zero buffer gives exactly the first step's `buf = grad`.
    """
    if not isinstance(optimizer, torch.optim.SGD) or momentum_prepared(optimizer):
        return
    mark_momentum_prepared(optimizer)
    for group in optimizer.param_groups:
        if not group.get("momentum") or group.get("dampening"):
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def guarded_step(
    optimizer: Any,
    closure: Any,
    guard: StepGuard,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> None:
    """Lightning's optimizer step, except that a step the guard skips leaves weights and optimizer state as they are.

    The closure (forward + backward) runs inside `optimizer.step` for some precision plugins and before it for
    others, so the decision is taken in the innermost `step` call, after the closure (and DDP's gradient
    all-reduce) has run. Fused optimizers skip on the device through GradScaler's `found_inf`; any other
    optimizer reads the decision on the host (one sync per step). `reduce` is the max over ranks (None: one rank).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    original_step = inner.step

    def step_unless_skipped(closure: Any = None, **kwargs: Any) -> Any:
        result = closure() if closure is not None else None
        skip = guard.decide(reduce)
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
        optimizer.step(closure=closure)
    finally:
        if patched_by_someone:
            inner.step = original_step
        else:
            del inner.step
