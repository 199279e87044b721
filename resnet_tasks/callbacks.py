"""Trainer callbacks the CLI adds by default: a checkpoint on SIGTERM/SIGINT and mid-epoch resumption."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


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
