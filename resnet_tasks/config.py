"""Config groups (dataclasses) built from what YAML, the command line or a checkpoint's hyper-parameters hold, and the
run-level facts every layer shares: where a run writes, how large its global batch is."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from resnet_tasks.errors import UserError

QUICKSTART_HINT = (
    "start from a config in configs/quickstart/ (classification.yaml, detection.yaml, segmentation.yaml), e.g. "
    "resnet-tasks fit --config configs/quickstart/detection.yaml"
)


def run_dir(trainer: Any) -> Path:
    """The run directory: where a run writes its checkpoints, metrics.json, report and predictions
    (`<default_root_dir>/lightning_logs/version_N` with the default loggers, else `default_root_dir`).

    Under DDP `trainer.log_dir` is a collective (a broadcast): every rank must ask.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def global_batch_size(per_device: int, world_size: int, accumulate_grad_batches: int) -> int:
    """Images per optimizer step over all devices: the per-device batch x devices (all nodes) x accumulation."""
    return int(per_device) * int(world_size) * int(accumulate_grad_batches)


def as_config(value: Any, cls: type) -> Any:
    """A config group (dataclass `cls`) from an instance, a dict (a checkpoint's hyper-parameters) or None."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return dataclasses.replace(value)  # a copy: defaults shared between instances are never mutated
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"Unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(known)}.")
        return cls(**value)
    if dataclasses.is_dataclass(value):
        return cls(**dataclasses.asdict(value))
    raise UserError(f"Expected a mapping for {cls.__name__}, got {value!r}.")
