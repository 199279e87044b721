"""Config groups (dataclasses) built from what YAML, the command line or a checkpoint's hyper-parameters hold."""

from __future__ import annotations

import dataclasses
from typing import Any

from resnet_tasks.errors import UserError


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
