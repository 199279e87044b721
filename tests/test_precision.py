"""Mixed precision and the non-finite loss guard, through real Trainer runs of the CLI (bf16 autocast on CPU)."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from resnet_tasks.tasks.base import TaskBase
from resnet_tasks.tasks.detection import DetectionTask
from tests.conftest import CLASSIFICATION_RUN as CLASSIFICATION
from tests.conftest import COMMON_TRAINER_ARGS, make_image_folder, read_metrics
from tests.conftest import DETECTION_RUN as DETECTION
from tests.conftest import SEGMENTATION_RUN as SEGMENTATION

BF16 = ["--trainer.precision", "bf16-mixed", "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0"]


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=15, num_val=11, image_size=64)


def nan_box_regression_for(calls: int | None) -> Callable:
    """DetectionTask.training_losses with loss_box_reg replaced by NaN for the first `calls` steps (None: always)."""
    original = DetectionTask.training_losses
    count = {"n": 0}

    def training_losses(self: DetectionTask, batch: object) -> dict[str, torch.Tensor]:
        losses = original(self, batch)
        count["n"] += 1
        if calls is None or count["n"] <= calls:
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses

    return training_losses


def logged_train_losses(root_dir: Path) -> list[float]:
    (path,) = root_dir.glob("lightning_logs/version_0/metrics.csv")
    return [float(row["train/loss"]) for row in csv.DictReader(path.open()) if row.get("train/loss")]


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_head_trains_under_bf16_mixed(task: str, run_cli, tiny_shapes: Path, tmp_path: Path) -> None:
    if task == "classification":
        args = [*CLASSIFICATION, "--data.root", str(make_image_folder(tmp_path / "images", per_class=4))]
        main_metric = "top1"
    else:
        args = [*SEGMENTATION, "--data.root", str(tiny_shapes / "voc"), "--trainer.limit_val_batches", "1"]
        main_metric = "miou"
    code, out, err = run_cli("fit", *args, *BF16, "--trainer.max_steps", "3", "--trainer.default_root_dir",
                             tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err
    losses = logged_train_losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(value) for value in losses)
    metrics = read_metrics(out)
    assert 0.0 <= metrics[main_metric] <= 1.0


def test_detection_bf16_skips_non_finite_steps_then_trains(
    run_cli, tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 detection; the first 2 steps have a NaN box loss: both are skipped (named), training then goes on."""
    monkeypatch.setattr(DetectionTask, "training_losses", nan_box_regression_for(2))
    code, out, err = run_cli(
        "fit", *DETECTION, "--data.root", str(tiny_shapes / "coco"), *BF16, "--trainer.max_steps", "4",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    assert re.search(r"Non-finite loss term\(s\) \['loss_box_reg'\] in 2 of the \d steps up to step \d", out), out
    losses = logged_train_losses(tmp_path / "run")
    assert len(losses) == 4 and [math.isfinite(value) for value in losses] == [False, False, True, True]
    assert {"map", "map_50", "map_75"} <= set(read_metrics(out))


def test_detection_aborts_after_consecutive_non_finite_steps(
    run_cli, tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DetectionTask, "training_losses", nan_box_regression_for(None))
    monkeypatch.setattr(TaskBase, "max_consecutive_bad_steps", 3)

    code, out, err = run_cli(
        "fit", *DETECTION, "--data.root", str(tiny_shapes / "coco"), "--trainer.max_steps", "10",
        "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 2, err  # a UserError: one line on stderr, no traceback
    assert err.strip().splitlines()[-1].startswith("error: Training diverged: loss term(s) ['loss_box_reg'] were ")
    assert "3 consecutive steps" in err and "Traceback" not in err
    assert "up to step 3" in err  # the guard reads its device counters every K steps: it aborts at step 3
