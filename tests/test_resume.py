"""Exact resume for every task: a run stopped by SIGTERM mid-epoch and resumed ends bitwise-equal to an
uninterrupted run. It needs the sampler state (the resumed epoch skips the batches already done) and the
per-sample augmentation seeds; without either the weights differ (checked by hand: dropping the data module's
state makes all three fail)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from resnet_tasks.callbacks import INTERRUPTED_CHECKPOINT
from resnet_tasks.lightning_cli import ResNetTasksCLI, import_components
from tests.conftest import sigterm_at

STEPS = 8
# SIGTERM after this step. Classification: 24 images, batch 8 = 3 steps per epoch, so mid-epoch 1. Detection: 11
# scenes with objects, batch 4 = 2 steps per epoch, mid-epoch 1. Segmentation: 12 scenes, batch 4 = 3 steps per
# epoch: right after an epoch's last batch (Lightning stops between epochs there).
STOP_AT = {"classification": 4, "detection": 3, "segmentation": 3}
COMMON = [
    "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1", "--trainer.deterministic", "true",
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
    "false", "--trainer.num_sanity_val_steps", "0", "--trainer.check_val_every_n_epoch", "100",
    "--data.num_workers", "1",
]  # fmt: skip
SCHEDULE = ["--model.scheduler.name", "cosine", "--model.scheduler.interval", "step",
            "--model.scheduler.warmup_steps", "2", "--model.scheduler.milestones", "[]"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=4, image_size=64)


def task_args(task: str, image_folder: Path, shapes: Path) -> list[str]:
    """Small, augmenting runs of each task (random crops / flips / mixup / dropout all draw randomness)."""
    if task == "classification":
        return [
            "--config", "configs/classification/imagenet_resnet50.yaml", "--data.root", str(image_folder),
            "--data.crop_size", "32", "--data.resize_size", "36", "--data.batch_size", "8",
            "--model.backbone.name", "resnet18", "--model.mixup_alpha", "0.2", "--model.dropout", "0.2",
            "--model.optimizer.lr", "0.01", *SCHEDULE,
        ]  # fmt: skip
    if task == "detection":
        return [
            "--config", "configs/quickstart/detection.yaml", "--data.root", str(shapes / "coco"),
            "--data.batch_size", "4", "--data.large_scale_jitter", "[0.5, 1.5]", "--data.crop_size", "64",
            "--model.min_size", "64", "--model.max_size", "64", "--model.optimizer.lr", "0.01", *SCHEDULE,
        ]  # fmt: skip
    return [
        "--config", "configs/quickstart/segmentation.yaml", "--data.root", str(shapes / "voc"),
        "--data.batch_size", "4", "--data.crop_size", "48", "--data.scale_range", "[0.5, 1.5]", *SCHEDULE,
    ]  # fmt: skip


def _cli(args: list[str], root: Path) -> ResNetTasksCLI:
    import_components()
    return ResNetTasksCLI(
        model_class=L.LightningModule, datamodule_class=L.LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, save_config_kwargs={"overwrite": True},
        args=[*args, *COMMON, "--trainer.default_root_dir", str(root)], run=False, auto_configure_optimizers=False,
    )  # fmt: skip


def _final_state(cli: ResNetTasksCLI) -> tuple[dict, dict, list[float]]:
    optimizer = cli.trainer.optimizers[0]
    return cli.model.state_dict(), optimizer.state_dict(), [g["lr"] for g in optimizer.param_groups]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_sigterm_then_resume_equals_uninterrupted_run(
    task: str, image_folder: Path, tiny_shapes: Path, tmp_path: Path
) -> None:
    args = task_args(task, image_folder, tiny_shapes)
    L.seed_everything(0)
    straight = _cli(args, tmp_path / "straight")
    straight.trainer.fit(straight.model, straight.datamodule)
    expected = _final_state(straight)
    assert straight.trainer.global_step == STEPS

    L.seed_everything(0)
    stopped = _cli(args, tmp_path / "stopped")
    stopped.trainer.callbacks.append(sigterm_at(STOP_AT[task]))
    with pytest.raises(SystemExit):
        stopped.trainer.fit(stopped.model, stopped.datamodule)
    checkpoint = next((tmp_path / "stopped").rglob(INTERRUPTED_CHECKPOINT))
    assert torch.load(checkpoint, weights_only=True)["global_step"] == STOP_AT[task]

    L.seed_everything(0)
    resumed = _cli(args, tmp_path / "resumed")
    resumed.model.skip_pretrained_weights = True
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(checkpoint))
    weights, optimizer_state, lrs = _final_state(resumed)
    assert resumed.trainer.global_step == STEPS
    assert lrs == expected[2]
    assert weights.keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert torch.equal(weights[key], value), key
    for index, state in expected[1]["state"].items():
        for name, value in state.items():  # SGD's momentum, AdamW's moments and step
            assert torch.equal(torch.as_tensor(optimizer_state["state"][index][name]), torch.as_tensor(value)), name
