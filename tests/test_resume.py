"""Exact resume: a run stopped by SIGTERM mid-epoch and resumed ends bitwise-equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from resnet_tasks.callbacks import INTERRUPTED_CHECKPOINT
from resnet_tasks.cli import ResNetTasksCLI, _import_components

STEPS = 8  # 24 training images, batch 8: 3 steps per epoch, so the run ends mid-epoch 2
STOP_AT = 4  # SIGTERM after step 4: mid-epoch 1


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after optimizer step `step` (as a cluster scheduler would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _cli(image_folder: Path, root: Path, *extra: str) -> ResNetTasksCLI:
    _import_components()
    args = [
        "--config", "configs/classification/imagenet_resnet50.yaml",
        "--data.root", str(image_folder), "--data.crop_size", "32", "--data.resize_size", "36",
        "--data.batch_size", "8", "--data.num_workers", "1",
        "--model.backbone.name", "resnet18", "--model.mixup_alpha", "0.2", "--model.dropout", "0.2",
        "--model.optimizer.lr", "0.01", "--model.scheduler.name", "cosine", "--model.scheduler.interval", "step",
        "--model.scheduler.warmup_steps", "2", "--model.scheduler.milestones", "[]",
        "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1", "--trainer.deterministic", "true",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(root), *extra,
    ]  # fmt: skip
    return ResNetTasksCLI(
        model_class=L.LightningModule, datamodule_class=L.LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args, run=False,
        auto_configure_optimizers=False,
    )  # fmt: skip


def _final_state(cli: ResNetTasksCLI) -> tuple[dict, dict, list[float]]:
    optimizer = cli.trainer.optimizers[0]
    return cli.model.state_dict(), optimizer.state_dict(), [g["lr"] for g in optimizer.param_groups]


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run(image_folder: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    straight = _cli(image_folder, tmp_path / "straight")
    straight.trainer.fit(straight.model, straight.datamodule)
    expected = _final_state(straight)
    assert straight.trainer.global_step == STEPS

    L.seed_everything(0)
    stopped = _cli(image_folder, tmp_path / "stopped")
    stopped.trainer.callbacks.append(SigtermAt(STOP_AT))
    with pytest.raises(SystemExit):
        stopped.trainer.fit(stopped.model, stopped.datamodule)
    checkpoint = next((tmp_path / "stopped").rglob(INTERRUPTED_CHECKPOINT))
    assert torch.load(checkpoint, weights_only=True)["global_step"] == STOP_AT

    L.seed_everything(0)
    resumed = _cli(image_folder, tmp_path / "resumed")
    resumed.model.skip_pretrained_weights = True
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(checkpoint))
    weights, optimizer_state, lrs = _final_state(resumed)
    assert resumed.trainer.global_step == STEPS
    assert lrs == expected[2]
    assert weights.keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert torch.equal(weights[key], value), key
    for index, state in expected[1]["state"].items():
        assert torch.equal(optimizer_state["state"][index]["momentum_buffer"], state["momentum_buffer"])
