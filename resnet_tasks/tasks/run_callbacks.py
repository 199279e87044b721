"""The callbacks every task brings to its runs (`TaskBase.configure_callbacks`): the global RNG streams in
checkpoints, for an exact resume, and the per-epoch report of images the data skipped."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

# Where RNGState keeps the global RNG streams in a checkpoint (a top-level key, as since the first release).
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


class RNGState(Callback):
    """Save the global RNG streams (torch, numpy, Python) in checkpoints and restore them when `fit` resumes.

    Dropout and batch-level augmentation (mixup/cutmix) draw from these, so a resumed run continues them exactly.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(RNG_KEY)
        if state and trainer.state.fn == "fit":
            torch.set_rng_state(state["torch"])
            _set_numpy_rng_state(state["numpy"])
            random.setstate(_as_tuple(state["python"]))


class SkipReport(Callback):
    """At each training epoch's end, print the data module's report of unreadable images it skipped.

    The data module counts and judges (it raises above its `max_skipped_fraction`); this only asks it.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        take = getattr(trainer.datamodule, "take_skip_report", None)
        report = take() if take is not None else None
        if report:
            pl_module.print(report)
