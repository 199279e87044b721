"""Two-process CPU DDP (gloo) through the CLI: exact validate metrics, each image predicted once, fit without hangs.

Each task runs one DDP job (`python -m tests.test_ddp PLAN`, which calls the CLI's `main` for every step of
the plan; Lightning's launcher re-runs that command as rank 1). Shards are uneven on purpose: 15 classification
images and 11 shapes images with batches of 4. The 1-process reference runs in this process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import CLASSIFICATION_RUN as CLASSIFICATION
from tests.conftest import (
    COMMON_TRAINER_ARGS,
    DDP_TIMEOUT_S,
    clean_environment,
    make_image_folder,
    metrics_in,
)
from tests.conftest import DETECTION_RUN as DETECTION
from tests.conftest import SEGMENTATION_RUN as SEGMENTATION

REPO = Path(__file__).resolve().parents[1]
DDP_TRAINER_ARGS = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "2",
    "--trainer.strategy", "ddp",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
NUM_VAL = 11  # shapes validation images: odd, and not a multiple of the batch size (4)


def run_ddp_plan(steps: list[list[str]], folder: Path) -> str:
    """Run the CLI steps in one 2-process DDP job; returns rank 0's output (fails on an error or a hang)."""
    plan = folder / "plan.json"
    plan.write_text(json.dumps(steps))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.test_ddp", str(plan)],
        cwd=REPO,
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 joins this session: one killpg ends the whole job on a hang
    )
    try:
        output, _ = process.communicate(timeout=DDP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"DDP job did not finish in {DDP_TIMEOUT_S} s (hang):\n{output[-6000:]}")
    assert process.returncode == 0, output[-8000:]
    return output


def per_class_in(root_dir: Path) -> str:
    """The per_class.csv of the single run under `root_dir` (written beside metrics.json)."""
    (path,) = root_dir.glob("lightning_logs/version_*/per_class.csv")
    return path.read_text()


def fit_reference(task_args: list[str], data_args: list[str], folder: Path) -> tuple[Path, dict[str, float]]:
    """1 process: a short fit for a checkpoint, then `validate` on it; returns (checkpoint, metrics)."""
    from resnet_tasks.cli import main

    main(["fit", *task_args, *data_args, "--trainer.max_steps", "6", "--trainer.num_sanity_val_steps", "0",
          "--trainer.default_root_dir", str(folder / "fit1"), *COMMON_TRAINER_ARGS])  # fmt: skip
    (checkpoint,) = (folder / "fit1").glob("lightning_logs/version_0/checkpoints/last.ckpt")
    main(["validate", *task_args, *data_args, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir",
          str(folder / "val1"), *COMMON_TRAINER_ARGS])  # fmt: skip
    return checkpoint, metrics_in(folder / "val1")


def ddp_steps(task_args: list[str], data_args: list[str], checkpoint: Path, folder: Path,
              fit_args: tuple[str, ...] = ()) -> list[list[str]]:  # fmt: skip
    """validate and predict the checkpoint, then fit 3 steps (2 per epoch per rank: crosses an epoch and a
    validation) with plain `ddp`, i.e. without unused-parameter detection."""
    common = [*task_args, *data_args, *DDP_TRAINER_ARGS]
    return [
        ["validate", *common, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(folder / "val2")],
        ["predict", *common, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(folder / "pred2")],
        ["fit", *common, "--trainer.max_steps", "3", "--trainer.num_sanity_val_steps", "0",
         "--trainer.default_root_dir", str(folder / "fit2"), *fit_args],
    ]  # fmt: skip


def check_ddp_fit(folder: Path, output: str, main_metric: str) -> None:
    """The DDP fit reached its 3 steps, validated (main metric in [0, 1]) and wrote a checkpoint."""
    assert "`max_steps=3` reached" in output, output[-3000:]
    metrics = metrics_in(folder / "fit2")
    assert 0.0 <= metrics[main_metric] <= 1.0 and all(math.isfinite(value) for value in metrics.values())
    assert list((folder / "fit2").glob("lightning_logs/version_0/checkpoints/*.ckpt"))


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=15, num_val=NUM_VAL, image_size=64)


def test_classification_ddp_matches_one_process(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", per_class=5, size=(36, 40))  # 15 train, 15 val images
    data = ["--data.root", str(images)]
    checkpoint, reference = fit_reference(CLASSIFICATION, data, tmp_path)
    # bf16 autocast and frozen stages under plain ddp: frozen parameters have requires_grad False, which
    # DDP leaves out of its gradient buckets, so no unused-parameter detection is needed.
    fit_args = ("--trainer.precision", "bf16-mixed", "--model.backbone.frozen_stages", "2")
    output = run_ddp_plan(ddp_steps(CLASSIFICATION, data, checkpoint, tmp_path, fit_args), tmp_path)

    assert metrics_in(tmp_path / "val2") == reference, output[-3000:]
    assert per_class_in(tmp_path / "val2") == per_class_in(tmp_path / "val1")  # rank 0 wrote it from all ranks
    assert {"loss", "top1", "top5"} <= set(reference) and 0 < reference["top1"] < 1
    # The recipe's LR (0.01 here) is for 256 images: 2 processes x 4 images use 0.01 x 8 / 256.
    assert "global batch 8 (4 per device x 2 device(s) x 1 accumulation)" in output, output[-3000:]
    assert "head 0.0003125" in output and "lr 0.01 at 256, linear scaling" in output
    rows = list(csv.DictReader(next((tmp_path / "pred2").glob("lightning_logs/version_0/predictions.csv")).open()))
    names = Counter(row["image"] for row in rows)
    expected = {str(p.relative_to(images)) for p in (images / "val").glob("*/*.jpg")}
    assert set(names) == expected and max(names.values()) == 1
    accuracy = sum(row["top1_class"] == row["target"] for row in rows) / len(rows)
    assert accuracy == pytest.approx(reference["top1"], abs=1e-6)
    check_ddp_fit(tmp_path, output, "top1")


def test_detection_ddp_matches_one_process(tiny_shapes: Path, tmp_path: Path) -> None:
    data = ["--data.root", str(tiny_shapes / "coco"), "--data.eval_batch_size", "4"]
    checkpoint, reference = fit_reference(DETECTION, data, tmp_path)
    fit_args = ("--trainer.check_val_every_n_epoch", "1")
    output = run_ddp_plan(ddp_steps(DETECTION, data, checkpoint, tmp_path, fit_args), tmp_path)

    assert metrics_in(tmp_path / "val2") == reference, output[-3000:]
    assert per_class_in(tmp_path / "val2") == per_class_in(tmp_path / "val1")  # rank 0 wrote it from all ranks
    assert {"map", "map_50", "map_75"} <= set(reference)
    results = json.loads(next((tmp_path / "pred2").glob("lightning_logs/version_0/predictions.json")).read_text())
    ground_truth = json.loads((tiny_shapes / "coco" / "annotations" / "instances_val2017.json").read_text())
    assert {r["image_id"] for r in results} == {image["id"] for image in ground_truth["images"]}
    # An image predicted twice would repeat its detections exactly.
    detections = Counter((r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"]) for r in results)
    assert max(detections.values()) == 1
    check_ddp_fit(tmp_path, output, "map")


def test_segmentation_ddp_matches_one_process(tiny_shapes: Path, tmp_path: Path) -> None:
    data = ["--data.root", str(tiny_shapes / "voc"), "--data.eval_batch_size", "4"]
    checkpoint, reference = fit_reference(SEGMENTATION, data, tmp_path)
    output = run_ddp_plan(ddp_steps(SEGMENTATION, data, checkpoint, tmp_path), tmp_path)

    assert metrics_in(tmp_path / "val2") == reference, output[-3000:]
    assert per_class_in(tmp_path / "val2") == per_class_in(tmp_path / "val1")  # rank 0 wrote it from all ranks
    assert 0 < reference["miou"] < 1 and any(name.startswith("iou/") for name in reference)
    assert f"segmentation masks: {NUM_VAL} palette PNGs" in output  # counts gathered from both ranks
    stems = (tiny_shapes / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    masks = sorted(p.stem for p in (tmp_path / "pred2").glob("lightning_logs/version_0/masks/*.png"))
    assert masks == sorted(stems)
    check_ddp_fit(tmp_path, output, "miou")


def _run_plan(plan: Path) -> None:
    """Every rank runs the same CLI steps; rank 0 spawned rank 1 at the first step and reuses it later."""
    from resnet_tasks.cli import main

    torch.set_num_threads(1)
    for args in json.loads(plan.read_text()):
        try:
            main(args)
        except SystemExit as exit_:
            if exit_.code:
                raise


if __name__ == "__main__":
    _run_plan(Path(sys.argv[1]))
