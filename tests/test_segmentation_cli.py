"""End to end through `resnet-tasks`: fit, test and predict on a tiny VOC set; metrics.json agrees with the PNGs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import make_segmentation_voc as make_tiny_voc
from tests.conftest import printed_path, read_metrics


def test_fit_test_predict_and_metrics_match_written_masks(tmp_path: Path, run_cli: Callable) -> None:
    root = make_tiny_voc(tmp_path / "voc", num_train=4, num_val=5)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "resnet_tasks.SegmentationTask",
            "init_args": {
                "backbone": {"name": "resnet18", "output_stride": 16},
                "optimizer": {"name": "adamw", "lr": 1.0e-3},
            },
        },
        "data": {
            "class_path": "resnet_tasks.VOCSegmentationDataModule",
            "init_args": {
                "root": str(root),
                "batch_size": 2,
                "eval_batch_size": 2,
                "num_workers": 0,
                "crop_size": 32,
                "eval_size": 40,  # network input differs from the original size: logits are resized back
            },
        },
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    code, out, err = run_cli("fit", "--config", config_path)
    assert code == 0, err
    checkpoint = printed_path(out, "best checkpoint: ")
    code, out, err = run_cli("test", "--config", config_path, "--ckpt_path", checkpoint)
    assert code == 0, err
    metrics = read_metrics(out)
    code, out, err = run_cli("predict", "--config", config_path, "--ckpt_path", checkpoint)
    assert code == 0, err
    mask_dir = printed_path(out, "predictions written: ")
    assert mask_dir.name == "masks"

    voc = root / "VOCdevkit" / "VOC2012"
    stems = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    assert sorted(p.stem for p in mask_dir.glob("*.png")) == sorted(stems)
    confusion = np.zeros((21, 21), dtype=np.int64)
    for stem in stems:
        predicted = Image.open(mask_dir / f"{stem}.png")
        assert predicted.mode == "P"
        truth = np.asarray(Image.open(voc / "SegmentationClass" / f"{stem}.png"))
        predicted = np.asarray(predicted)
        assert predicted.shape == truth.shape  # original size, not the 40 px network input
        keep = truth != 255
        np.add.at(confusion, (truth[keep].astype(int), predicted[keep].astype(int)), 1)
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    assert metrics["miou"] == pytest.approx(np.mean(tp[present] / union[present]), abs=1e-3)
    assert metrics["pixel_acc"] == pytest.approx(tp.sum() / confusion.sum(), abs=1e-3)
    assert "iou/background" in metrics


def test_voc_recipe_with_resnet18_and_batch_size_one(tmp_path: Path, run_cli: Callable) -> None:
    # The shipped VOC recipe, with the backbone swapped by one override, runs a training and a validation step.
    root = make_tiny_voc(tmp_path / "voc", num_train=2, num_val=2)
    code, out, err = run_cli(
        "fit", "--config", "configs/segmentation/voc_fcn_resnet50.yaml", "--config", "configs/trainer/cpu.yaml",
        "--trainer.strategy", "auto", "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", tmp_path / "runs",
        "--model.backbone.name", "resnet18", "--model.backbone", '{"weights": null}',  # no ImageNet file offline
        "--data.root", root, "--data.batch_size", "1", "--data.num_workers", "0",
        "--data.crop_size", "40", "--data.eval_size", "48",
    )  # fmt: skip
    assert code == 0, err
