"""Trainer callbacks: a checkpoint on SIGTERM/SIGINT, `last.ckpt`, RNG streams in checkpoints, the skip report."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_avg_fn

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
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


class InterruptCheckpoint(Callback):
    """Stop at the next step boundary on SIGTERM or Ctrl+C and write `checkpoints/interrupted.ckpt`.

    Lightning turns SIGTERM into a clean stop after the current step; we treat the first SIGINT the same way
    (a second one aborts at once), so the checkpoint always holds a consistent state that `--ckpt_path`
    resumes exactly.
    """

    def __init__(self) -> None:
        self._previous_handler: Any = None
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self._previous_handler = signal.signal(signal.SIGINT, self._make_handler(trainer))
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous_handler = None

    def _make_handler(self, trainer: L.Trainer) -> Any:
        def handle(signum: int, frame: Any) -> None:
            if trainer.received_sigterm:
                raise KeyboardInterrupt
            print("\nInterrupted: finishing this step and saving a checkpoint (Ctrl+C again aborts).", flush=True)
            trainer._signal_connector.received_sigterm = True

        return handle

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / INTERRUPTED_CHECKPOINT
        epochs = trainer.fit_loop.epoch_progress.current
        if epochs.completed == epochs.ready:
            # Stopped between two epochs (Lightning checks SIGTERM again after an epoch's end): the epoch loop
            # still counts the finished epoch's batches, so a resume would continue "mid-epoch". Record what
            # the next epoch's start looks like instead, so the run and its data resume at that epoch's batch 0.
            trainer.fit_loop.epoch_loop.batch_progress.reset_on_run()
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            print(f"checkpoint written on interrupt: {self.path} (resume with --ckpt_path {self.path})")


class LastCheckpoint(Callback):
    """Keep `checkpoints/last.ckpt` at the latest state: after every validation during fit and at the end.

    Lightning's own `save_last` only rewrites it when a top-k checkpoint was saved in the same step, so a run
    whose metric stopped improving would leave `last.ckpt` at its best epoch, not its last.
    """

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.global_step == 0:
            return
        checkpoint_callback = trainer.checkpoint_callback
        dirpath = getattr(checkpoint_callback, "dirpath", None) if checkpoint_callback is not None else None
        folder = Path(dirpath) if dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


def global_batch_ema_decay(decay: float, global_batch: int, every_n_steps: int, max_epochs: int) -> float:
    """torchvision's references' EMA decay for a run: `decay` rescaled by global batch x update period / epochs.

    The recipe's decay (e.g. 0.99998 every 32 steps, ResNet-50 V2) is a per-image rate; torchvision applies
    `alpha = min(1, (1 - decay) * global_batch * every_n_steps / epochs)` and averages with `1 - alpha`.
    """
    alpha = min(1.0, (1.0 - decay) * global_batch * every_n_steps / max(1, max_epochs))
    return 1.0 - alpha


class GlobalBatchEMA(EMAWeightAveraging):
    """Lightning's EMA weight averaging with the decay adjusted to the run as torchvision's references do.

    `decay` is the recipe's raw value; at the start of `fit` the decay actually used (`self.decay`) follows the
    global batch (the data module's batch size x devices x accumulation), the update period and the epochs.
    """

    def __init__(self, decay: float = 0.99998, update_every_n_steps: int = 32, **kwargs: Any) -> None:
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps, **kwargs)
        self.raw_decay = decay
        self.decay = decay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            batch = getattr(trainer.datamodule, "batch_size", None) or getattr(pl_module, "batch_size", None) or 1
            global_batch = int(batch) * trainer.world_size * trainer.accumulate_grad_batches
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
            self.decay = global_batch_ema_decay(self.raw_decay, global_batch, self.update_every_n_steps, epochs)
            self._kwargs["avg_fn"] = get_ema_avg_fn(decay=self.decay)
            if trainer.is_global_zero:
                print(f"EMA: decay {self.decay:.6f} ({self.raw_decay} rescaled to global batch {global_batch})")
        super().setup(trainer, pl_module, stage)
