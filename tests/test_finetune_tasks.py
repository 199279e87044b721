"""Fine-tuning schedules through the CLI on the three tasks (tiny shapes data, a CIFAR ResNet-20 at 32-64 px, 2 steps
an epoch): frozen means bit-identical (BatchNorm statistics included), unfreezing by epoch, milestones from the top,
the printed layer-wise LRs, whole-model weights of another class count, one-line errors, exact resume across an
unfreeze, and the same parameters on two DDP ranks after an unfreeze."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from resnet_tasks.callbacks import INTERRUPTED_CHECKPOINT
from tests.conftest import COMMON_TRAINER_ARGS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "classification": "configs/quickstart/classification.yaml",
    "detection": "configs/quickstart/detection.yaml",
    "segmentation": "configs/quickstart/segmentation.yaml",
}
# resnet20: three stages (layer1..layer3) after the stem; detection's pyramid then has 3 + 1 levels.
ANCHORS = [[8], [16], [32], [64]]
TASK_ARGS = {
    "classification": ["--model.backbone.name", "resnet20", "--data.crop_size", "32", "--data.resize_size", "32"],
    "detection": ["--model.backbone.name", "resnet20", "--model.anchor_sizes", str(ANCHORS), "--model.min_size", "64",
                  "--model.max_size", "64", "--model.rpn_post_nms_top_n_train", "50",
                  "--model.box_batch_size_per_image", "16"],
    "segmentation": ["--model.backbone.name", "resnet20", "--data.crop_size", "48"],
}  # fmt: skip
LAYOUTS = {"classification": "imagefolder", "detection": "coco", "segmentation": "voc"}
# The shapes data has 3 classes (+ background for detection and segmentation); the weights are made for more.
OTHER_COUNT = {"classification": 5, "detection": 6, "segmentation": 7}
CLASS_LAYERS = {
    "classification": ["fc"],
    "detection": ["model.roi_heads.box_predictor.bbox_pred", "model.roi_heads.box_predictor.cls_score"],
    "segmentation": ["model.aux_classifier.4", "model.classifier.4"],
}
BACKBONE = {"classification": "backbone.", "detection": "model.backbone.body.", "segmentation": "model.backbone."}


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after optimizer step `step` (as a cluster scheduler would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def every_n_steps(steps: int) -> list[str]:
    """A checkpoint `step=N.ckpt` after every `steps` optimizer steps (2 per epoch here: step=2 ends epoch 0)."""
    return ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.every_n_train_steps={steps}",
            "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}"]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=64)


def task_class(task: str) -> type:
    import resnet_tasks

    return getattr(resnet_tasks, {"classification": "ClassificationTask", "detection": "DetectionTask",
                                  "segmentation": "SegmentationTask"}[task])  # fmt: skip


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Whole-model weights (a `.pth` of the task's state dict) of each task for another class count, built as the
    tests' configs build the model."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    paths = {}
    for task in CONFIGS:
        options = yaml.safe_load((REPO / CONFIGS[task]).read_text())["model"]["init_args"]
        options = {key: value for key, value in options.items() if key not in ("optimizer", "scheduler")}
        options["backbone"] = {**options["backbone"], "name": "resnet20"}
        if task == "detection":
            options["anchor_sizes"] = ANCHORS
        model = task_class(task)(num_classes=OTHER_COUNT[task], **options)
        with torch.no_grad():  # BN statistics that differ from a fresh model's
            for name, buffer in model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.uniform_(-0.1, 0.1)
        paths[task] = folder / f"{task}.pth"
        torch.save(model.state_dict(), paths[task])
    return paths


def fit_args(task: str, shapes: Path, root: Path, epochs: int = 2) -> list[str]:
    """`fit` on the shapes data, 2 steps an epoch, no validation."""
    return ["--config", CONFIGS[task], *TASK_ARGS[task], "--data.root", str(shapes / LAYOUTS[task]),
            "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.max_epochs", str(epochs),
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root), *COMMON_TRAINER_ARGS]  # fmt: skip


def fit(run_cli: Callable, task: str, shapes: Path, root: Path, *args: Any, epochs: int = 2) -> str:
    """`resnet-tasks fit` (see `fit_args`) with `args`; returns stdout (asserts success)."""
    code, out, err = run_cli("fit", *fit_args(task, shapes, root, epochs), *args)
    assert code == 0, err[-3000:]
    return out


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def checkpoint(root: Path, name: str) -> Path:
    (path,) = root.rglob(name)
    return path


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> set[str]:
    """Keys under `prefix` (weights and BN statistics) whose values differ."""
    return {key for key in after if key.startswith(prefix) and not torch.equal(before[key], after[key])}


def stages(keys: set[str], prefix: str) -> set[str]:
    return {key[len(prefix) :].split(".")[0] for key in keys}


def weights_as_task_keys(task: str, path: Path) -> dict[str, torch.Tensor]:
    """The weights file in the task's own state-dict keys (what the backbone must still equal while frozen)."""
    model = task_class(task).__new__(task_class(task))
    return model.model_state_dict(torch.load(path, weights_only=True))


@pytest.mark.parametrize("task", list(CONFIGS))
def test_freeze_then_unfreeze_on_weights_of_another_class_count(
    task: str, shapes: Path, other_weights: dict[str, Path], tmp_path: Path, run_cli: Callable
) -> None:
    schedule = ["--model.finetune.strategy", "freeze_then_unfreeze", "--model.finetune.unfreeze_at", "1"]
    schedule += ["--model.trainable_backbone_layers", "2"] if task == "detection" else []
    out = fit(run_cli, task, shapes, tmp_path, "--model.weights", other_weights[task], *schedule, *every_n_steps(2))
    names = ", ".join(CLASS_LAYERS[task])
    assert f"loaded every tensor except the class layers {names} (made for {OTHER_COUNT[task]} classes)" in out
    assert "finetune: epoch 1: " in out and "unfrozen" in out
    prefix = BACKBONE[task]
    weights = weights_as_task_keys(task, other_weights[task])
    epoch0, epoch1 = state(checkpoint(tmp_path, "step=2.ckpt")), state(checkpoint(tmp_path, "step=4.ckpt"))
    assert changed(weights, epoch0, prefix) == set()  # frozen: weights and BN statistics bit-identical
    moved = changed(weights, epoch1, prefix)
    if task == "detection":  # trainable_backbone_layers 2 keeps the stem and layer1 frozen (frozen BN: pretrained)
        assert stages(moved, prefix) == {"layer2", "layer3"}
        assert "layer3, layer2 (" in out and "stem, layer1 frozen by frozen_stages / trainable_backbone_layers" in out
    else:
        assert stages(moved, prefix) == {"conv1", "bn1", "layer1", "layer2", "layer3"}
        assert f"{prefix}layer1.0.bn1.running_mean" in moved and "backbone (" in out
    head = task_class(task).head_key if task == "classification" else f"model.{task_class(task).head_key}"
    assert epoch1[head].shape[0] == {"classification": 3, "detection": 4, "segmentation": 4}[task]  # data's classes


@pytest.mark.parametrize("task", list(CONFIGS))
def test_freeze_keeps_the_backbone_bit_identical(
    task: str, shapes: Path, other_weights: dict[str, Path], tmp_path: Path, run_cli: Callable
) -> None:
    out = fit(run_cli, task, shapes, tmp_path, "--model.weights", other_weights[task],
              "--model.finetune.strategy", "freeze", epochs=1)  # fmt: skip
    assert "frozen throughout" in out
    weights = weights_as_task_keys(task, other_weights[task])
    last = state(checkpoint(tmp_path, "last.ckpt"))
    assert changed(weights, last, BACKBONE[task]) == set()  # weights and BN statistics
    assert changed(weights, last, "model.rpn." if task == "detection" else "")  # the head trained


def test_ema_and_clipping_keep_a_frozen_backbone_bit_identical(
    shapes: Path, other_weights: dict[str, Path], tmp_path: Path, run_cli: Callable
) -> None:
    ema = ["--trainer.callbacks+=GlobalBatchEMA", "--trainer.callbacks.update_every_n_steps=1",
           "--trainer.callbacks.decay=0.9", "--trainer.gradient_clip_val", "0.5"]  # fmt: skip
    out = fit(run_cli, "classification", shapes, tmp_path, "--model.weights", other_weights["classification"],
              "--model.finetune.strategy", "freeze", *ema, epochs=1)  # fmt: skip
    assert "EMA: decay" in out
    weights = weights_as_task_keys("classification", other_weights["classification"])
    assert changed(weights, state(checkpoint(tmp_path, "last.ckpt")), "backbone.") == set()


def test_milestones_layer_wise_lrs_and_exact_resume_across_an_unfreeze(
    shapes: Path, other_weights: dict[str, Path], tmp_path: Path, run_cli: Callable
) -> None:
    options = ["--model.weights", other_weights["classification"], "--model.finetune.strategy", "milestones",
               "--model.finetune.unfreeze_milestones", "[1]", "--model.finetune.layer_decay", "0.5",
               "--model.finetune.warmup_epochs", "2", "--model.optimizer.name", "sgd",
               "--trainer.deterministic", "true"]  # fmt: skip
    out = fit(run_cli, "classification", shapes, tmp_path / "whole", *options, *every_n_steps(2))
    weights = weights_as_task_keys("classification", other_weights["classification"])
    steps = {step: state(checkpoint(tmp_path / "whole", f"step={step}.ckpt")) for step in (2, 4)}
    assert changed(weights, steps[2], "backbone.") == set()
    assert stages(changed(weights, steps[4], "backbone."), "backbone.") == {"layer3"}
    # The printed param groups are the optimizer's: names, sizes and peak LRs (layer3 at 0.5 x the head's).
    assert "trains: head 195 params; layer3 (203.5K) at epoch 1; layer2, layer1, stem (65.6K) frozen throughout" in out
    table = out[out.index("param groups:") :].splitlines()[2:]
    printed = {row.split()[0]: float(row.split()[2]) for row in table if row.startswith("  ") and len(row.split()) == 4}
    saved = torch.load(checkpoint(tmp_path / "whole", "step=4.ckpt"), weights_only=True)["optimizer_states"][0]
    assert {g["name"]: pytest.approx(g["initial_lr"], rel=1e-3) for g in saved["param_groups"]} == printed
    assert printed["backbone.layer3"] == pytest.approx(0.5 * printed["head"], rel=1e-3)
    # Stopped (SIGTERM) one step into epoch 1, layer3 unfrozen and halfway through its warmup, then resumed: the
    # uninterrupted run's end, bit for bit.
    stop = ["--trainer.callbacks+=tests.test_finetune_tasks.SigtermAt", "--trainer.callbacks.step=3"]
    code, _, err = run_cli("fit", *fit_args("classification", shapes, tmp_path / "stopped"), *options, *stop)
    assert code != 0, err[-3000:]
    interrupted = checkpoint(tmp_path / "stopped", INTERRUPTED_CHECKPOINT)
    assert torch.load(interrupted, weights_only=True)["global_step"] == 3
    resumed = fit(run_cli, "classification", shapes, tmp_path / "resumed", *options, "--ckpt_path", interrupted)
    assert "finetune: resumed at epoch 1 (step 3); frozen: layer2, layer1, stem" in resumed
    whole = torch.load(checkpoint(tmp_path / "whole", "last.ckpt"), weights_only=True)
    again = torch.load(checkpoint(tmp_path / "resumed", "last.ckpt"), weights_only=True)
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    first, second = whole["optimizer_states"][0], again["optimizer_states"][0]
    assert first["param_groups"] == second["param_groups"]
    for index, entry in first["state"].items():
        assert torch.equal(entry["momentum_buffer"], second["state"][index]["momentum_buffer"])
    assert whole["lr_schedulers"] == again["lr_schedulers"]


def test_unusable_schedules_stop_with_one_line(shapes: Path, tmp_path: Path, run_cli: Callable) -> None:
    base = ["--config", CONFIGS["classification"], *TASK_ARGS["classification"], "--data.num_workers", "0",
            "--data.root", str(shapes / "imagefolder"), "--trainer.default_root_dir", str(tmp_path),
            *COMMON_TRAINER_ARGS]  # fmt: skip
    for args, message in [
        (["--model.finetune.strategy", "milestones", "--model.finetune.unfreeze_milestones", "[2, 1]"],
         "--model.finetune.unfreeze_milestones [2, 1] must be strictly increasing epochs"),
        (["--model.finetune.strategy", "freeze_then_unfreeze", "--model.finetune.unfreeze_at", "5",
          "--trainer.max_epochs", "2"], "--model.finetune.unfreeze_at epoch 5 is past --trainer.max_epochs 2"),
    ]:  # fmt: skip
        code, out, err = run_cli("fit", *base, *args)
        assert code != 0
        lines = [line for line in err.strip().splitlines() if "Warning" not in line and "warn" not in line]
        assert message in lines[-1] and len(lines[-1].splitlines()) == 1, err[-2000:]
    # A smoke test of a recipe (one batch, max_epochs 1) runs whatever epoch the schedule unfreezes at.
    smoke = ["--model.finetune.strategy", "freeze_then_unfreeze", "--model.finetune.unfreeze_at", "5",
             "--trainer.fast_dev_run", "true", "--data.batch_size", "2"]  # fmt: skip
    code, out, err = run_cli("fit", *base, *smoke)
    assert code == 0, err[-2000:]


# ----------------------------------------------------------------------------------------------- 2 DDP ranks
def ranks_fit(root: str, data: str) -> None:
    """Both ranks (Lightning's launcher runs this module again as rank 1): a ClassificationTask with a frozen
    backbone for epoch 0 and the whole backbone from epoch 1, plain `ddp` (no unused-parameter detection); each
    rank saves its parameters at the end of training."""
    from resnet_tasks import ClassificationTask, ShapesClassificationDataModule

    class SaveRank(L.Callback):
        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            torch.save(module.state_dict(), Path(root) / f"rank{trainer.global_rank}.pt")

    torch.set_num_threads(1)
    L.seed_everything(0)
    data_module = ShapesClassificationDataModule(root=data, batch_size=2, num_workers=0, crop_size=32, resize_size=32)
    task = ClassificationTask(
        backbone={"name": "resnet20"},
        label_space=data_module.label_space,
        optimizer={"name": "sgd", "lr": 0.05},
        finetune={"strategy": "freeze_then_unfreeze", "unfreeze_at": 1},
    )
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=2,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[SaveRank()])  # fmt: skip
    trainer.fit(task, datamodule=data_module)


def test_two_ddp_ranks_hold_the_same_parameters_after_an_unfreeze(shapes: Path, tmp_path: Path) -> None:
    from tests.conftest import DDP_TIMEOUT_S, clean_environment

    command = [sys.executable, "-m", "tests.test_finetune_tasks", str(tmp_path), str(shapes / "imagefolder")]
    done = subprocess.run(command, cwd=REPO, env=clean_environment(), capture_output=True, text=True,
                          timeout=DDP_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "finetune: epoch 1: backbone unfrozen" in done.stdout
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for key, value in ranks[0].items():
        if "running" not in key and "num_batches" not in key:  # parameters (BN statistics are per rank)
            assert torch.equal(value, ranks[1][key]), key
    assert any("running_mean" in k and not torch.equal(v, ranks[1][k]) for k, v in ranks[0].items())  # 2 shards


if __name__ == "__main__":
    ranks_fit(*sys.argv[1:])
