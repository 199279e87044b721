"""Trainer callbacks: a checkpoint on SIGTERM/SIGUSR1/SIGINT (SIGUSR1 also requeues a SLURM job), `last.ckpt`,
RNG streams in checkpoints, the skip report."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_multi_avg_fn

from resnet_tasks import compat
from resnet_tasks.config import global_batch_size, run_dir
from resnet_tasks.tasks.base import CHECKPOINT_KEY

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
LAST_CHECKPOINT = "last.ckpt"
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


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes for this SLURM job (`<array job>_<task>` in a job array), or None."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def in_slurm_batch_job() -> bool:
    """Inside a SLURM job that can be requeued (not an interactive `srun --job-name bash|interactive` shell)."""
    return slurm_job_id() is not None and SLURMEnvironment.job_name() not in ("bash", "interactive")


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this job (found on PATH); prints what happened, returns whether it worked."""
    job_id = slurm_job_id()
    scontrol = shutil.which("scontrol")
    if job_id is None or scontrol is None:
        print(f"not requeued: {'no scontrol on PATH' if job_id else 'not a SLURM job'}", flush=True)
        return False
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}", flush=True)
        return False
    print(f"requeued SLURM job {job_id}: it resumes from this checkpoint when it starts again", flush=True)
    return True


def requeued_slurm_job() -> bool:
    """This process belongs to a SLURM job that was requeued (SLURM counts restarts in SLURM_RESTART_COUNT)."""
    return in_slurm_batch_job() and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def find_resume_checkpoint(root: str | Path) -> Path | None:
    """The newest readable `interrupted.ckpt` or `last.ckpt` of the runs under `root` (a `default_root_dir`)."""
    from resnet_tasks.checkpoint_io import checkpoint_problem

    root = Path(root)
    found = [p for name in (INTERRUPTED_CHECKPOINT, LAST_CHECKPOINT) for p in root.rglob(name) if p.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(path) is None:
            return path
    return None


class InterruptCheckpoint(Callback):
    """Stop at the next step boundary on SIGTERM, SIGUSR1 or Ctrl+C and write `checkpoints/interrupted.ckpt`.

    The checkpoint holds a consistent state (never one taken mid-step) that `--ckpt_path` resumes exactly. A second
    Ctrl+C aborts at once. SIGUSR1 is SLURM's warning before a time limit (`#SBATCH --signal=SIGUSR1@90`): inside a
    SLURM job the job is then requeued with `scontrol requeue`, and the requeued job resumes from the checkpoint
    (see `find_resume_checkpoint`). A signal during a validation stops at its end. Under DDP the ranks agree every
    `agree_every_n_steps` optimizer steps whether any of them got a signal, so they all stop after the same step,
    whichever rank it reached.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, agree_every_n_steps: int = 10) -> None:
        # Under DDP the ranks compare their flags every N optimizer steps (a host sync; never every step).
        self.agree_every_n_steps = max(1, int(agree_every_n_steps))
        self._previous_handlers: dict[int, Any] = {}
        self._stop = False
        self._requeue = False  # a SIGUSR1 came (also when a SIGTERM follows it before the checkpoint is written)
        self.path: Path | None = None
        self.requeued = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in on_fit_start: Lightning installs its SIGTERM handler between the two, and ours replaces it.
        self._stop = self._requeue = False
        handler = self._make_handler(trainer)
        for signum in self.SIGNALS:
            try:
                self._previous_handlers[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave the signals alone
                break

    def _make_handler(self, trainer: L.Trainer) -> Any:
        def handle(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._stop:
                raise KeyboardInterrupt
            if not self._stop and trainer.is_global_zero:
                again = " (Ctrl+C again aborts)" if signum == signal.SIGINT else ""
                name = signal.Signals(signum).name
                print(f"\n{name}: finishing this step and saving a checkpoint{again}.", flush=True)
            self._stop = True
            self._requeue = self._requeue or signum == signal.SIGUSR1
            if trainer.world_size == 1 and trainer.training:
                compat.stop_after_this_step(trainer)

        return handle

    def _agree(self, trainer: L.Trainer) -> None:
        """At the same point on every rank: stop if any rank was signalled (requeue if any got SIGUSR1)."""
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            flags = torch.tensor([int(self._stop), int(self._requeue)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            self._stop, self._requeue = (bool(flag) for flag in flags.tolist())
        if self._stop:
            compat.stop_after_this_step(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Every rank reaches the same optimizer steps: agreeing every N of them keeps the ranks in step without a
        # host sync per step (a stop comes at most N steps after the signal; SLURM warns ~90 s ahead).
        if trainer.world_size == 1 or trainer.global_step % self.agree_every_n_steps == 0:
            self._agree(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A stop decided at an epoch's last step: Lightning would abort the validation that follows at its first
        # batch (no checkpoint: not training); let that validation run whole, and stop at its end instead.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._stop:
            compat.stop_after_this_step(trainer, False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._agree(trainer)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous_handlers.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous_handlers = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        self.path = run_dir(trainer) / "checkpoints" / INTERRUPTED_CHECKPOINT
        if compat.fit_between_epochs(trainer):
            # Stopped between two epochs (Lightning checks SIGTERM again after an epoch's end): the epoch loop
            # still counts the finished epoch's batches, so a resume would continue "mid-epoch". Record what
            # the next epoch's start looks like instead, so the run and its data resume at that epoch's batch 0.
            compat.reset_epoch_batch_progress(trainer)
        trainer.save_checkpoint(self.path, weights_only=False)
        if not trainer.is_global_zero:
            return
        print(f"checkpoint written on interrupt: {self.path} (resume with --ckpt_path {self.path})", flush=True)
        if self._requeue and in_slurm_batch_job():
            self.requeued = requeue_slurm_job()


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
        folder = Path(dirpath) if dirpath else run_dir(trainer) / "checkpoints"
        trainer.save_checkpoint(folder / LAST_CHECKPOINT, weights_only=False)

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
            global_batch = global_batch_size(batch, trainer.world_size, trainer.accumulate_grad_batches)
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
            self.decay = global_batch_ema_decay(self.raw_decay, global_batch, self.update_every_n_steps, epochs)
            # lerp leaves a value that did not change (a frozen stage) bit-identical; `decay*ema + (1-decay)*x` does not
            compat.set_ema_average_function(self, get_ema_multi_avg_fn(decay=self.decay))
            if trainer.is_global_zero:
                print(f"EMA: decay {self.decay:.6f} ({self.raw_decay} rescaled to global batch {global_batch})")
        super().setup(trainer, pl_module, stage)


# The entry of a checkpoint's `resnet_tasks` dict holding the data module's `eval_preprocessing()`.
PREPROCESSING_KEY = "preprocessing"


class StoreEvalPreprocessing(L.Callback):
    """Every checkpoint holds the data module's evaluation preprocessing (`eval_preprocessing()`, under
    `checkpoint["resnet_tasks"]["preprocessing"]`): `export` reads it there, without the dataset."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        preprocessing = getattr(trainer.datamodule, "eval_preprocessing", None)
        if callable(preprocessing):
            checkpoint.setdefault(CHECKPOINT_KEY, {})[PREPROCESSING_KEY] = preprocessing()


def stored_preprocessing(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation preprocessing `StoreEvalPreprocessing` wrote into a checkpoint (None: it holds none, e.g.
    written before checkpoints stored it)."""
    found = (checkpoint.get(CHECKPOINT_KEY) or {}).get(PREPROCESSING_KEY)
    return dict(found) if isinstance(found, Mapping) else None
