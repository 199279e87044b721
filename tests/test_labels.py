"""The label space: one type from data to checkpoint, what weights files say about it, and old checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

from resnet_tasks.backbones import is_torchvision_weights_name, label_space_of
from resnet_tasks.errors import UserError
from resnet_tasks.labels import BACKGROUND, LabelSpace, upgrade_hyperparameters
from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.detection import DetectionTask
from resnet_tasks.tasks.segmentation import SegmentationTask
from tests.conftest import COMMON_TRAINER_ARGS, read_metrics

LEGACY = Path(__file__).parent / "data" / "segmentation_resnet20_v0.1.ckpt"
SMALL_DETECTION = {"min_size": 64, "max_size": 96, "anchor_sizes": [[8], [16], [32], [64], [128]],
                   "fpn_channels": 32}  # fmt: skip


def test_one_convention_for_background_and_num_classes() -> None:
    detection = LabelSpace.with_background(["cat", "dog"], [3, 7])
    assert detection.num_classes == 3 and detection.class_names == (BACKGROUND, "cat", "dog")
    assert detection.object_names == ("cat", "dog") and detection.category_id(2) == 7
    assert detection.to_category_ids(torch.tensor([2, 1])).tolist() == [7, 3]
    # torchvision's "__background__" (weights metadata, old checkpoints) reads as ours.
    assert LabelSpace(("__background__", "a"), background=True).class_names == (BACKGROUND, "a")
    assert LabelSpace(("a", "b")).category_id(1) == 1 and LabelSpace(("a", "b")).name(5) == "5"
    assert LabelSpace.anonymous(3, background=True).class_names == (BACKGROUND, "class_1", "class_2")
    assert LabelSpace.coerce(detection.to_dict()) == detection
    with pytest.raises(UserError, match="one category id per class"):
        LabelSpace(("a", "b"), (1,))


def test_weights_names_and_files_tell_their_label_space(tmp_path: Path) -> None:
    assert is_torchvision_weights_name("ResNet50_Weights.IMAGENET1K_V2")
    assert not is_torchvision_weights_name(str(tmp_path / "model.pth"))
    coco = label_space_of("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "cls_score.weight", "detection")
    assert coco.num_classes == 91 and coco.background and coco.name(1) == "person"
    imagenet = label_space_of("ResNet18_Weights.IMAGENET1K_V1", "fc.weight", "classification")
    assert imagenet.num_classes == 1000 and not imagenet.background
    path = tmp_path / "seven.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)
    assert label_space_of(str(path), "fc.weight", "classification") == 7  # a .pth only knows its count
    with pytest.raises(UserError, match="not found"):
        label_space_of(str(tmp_path / "gone.pth"), "fc.weight", "classification")


def test_count_only_weights_take_the_data_names(tmp_path: Path) -> None:
    path = tmp_path / "three.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    data = LabelSpace(("red", "green", "blue"))
    task = ClassificationTask(label_space=data, backbone={"name": "resnet18"}, weights=str(path))
    assert task.label_space == data
    with pytest.raises(UserError, match="predict 3 classes but the data has 2"):
        ClassificationTask(label_space=LabelSpace(("a", "b")), backbone={"name": "resnet18"}, weights=str(path))


def test_checkpoint_stores_the_label_space(tmp_path: Path) -> None:
    data = LabelSpace.with_background(["cat", "dog"], [3, 7])
    task = DetectionTask(label_space=data, backbone={"name": "resnet18"}, **SMALL_DETECTION)
    assert task.hparams["label_space"] == data.to_dict() and task.hparams["num_classes"] == 3
    path = tmp_path / "det.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "resnet_tasks": {"task": "detection"}, "pytorch-lightning_version": "2.6.0"}, path)  # fmt: skip
    assert label_space_of(str(path), DetectionTask.head_key, "detection") == data
    loaded = DetectionTask.load_from_checkpoint(path)
    assert loaded.label_space == data


def _as_written_before_the_label_space(task: DetectionTask, path: Path) -> None:
    """A detection checkpoint in the first release's format: num_classes without background, names beside."""
    hparams = {key: value for key, value in task.hparams.items() if key != "label_space"}
    hparams["num_classes"] = task.num_classes - 1
    info = {"task": "detection", "class_names": ["__background__", *task.label_space.object_names],
            "label_to_category_id": list(task.label_space.category_ids)}  # fmt: skip
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hparams, "resnet_tasks": info,
                "pytorch-lightning_version": "2.6.0"}, path)  # fmt: skip


def test_old_detection_checkpoint_loads_with_its_label_space(tmp_path: Path) -> None:
    data = LabelSpace.with_background(["cat", "dog", "bird"], [2, 5, 9])
    task = DetectionTask(label_space=data, backbone={"name": "resnet18"}, **SMALL_DETECTION)
    path = tmp_path / "old.ckpt"
    _as_written_before_the_label_space(task, path)
    loaded = DetectionTask.load_from_checkpoint(path)
    assert loaded.label_space == data and loaded.num_classes == 4
    assert torch.equal(loaded.model.roi_heads.box_predictor.cls_score.weight,
                       task.model.roi_heads.box_predictor.cls_score.weight)  # fmt: skip
    assert label_space_of(str(path), DetectionTask.head_key, "detection") == data


def test_upgrade_of_old_hyperparameters() -> None:
    old = {"num_classes": 4, "ignore_index": 200, "aux_loss": True}
    info = {"task": "segmentation", "class_names": ["background", "a", "b", "c"], "label_to_category_id": None}
    new = upgrade_hyperparameters("segmentation", old, info)
    assert "ignore_index" not in new and new["aux_loss"] is True and new["num_classes"] == 4
    space = LabelSpace.coerce(new["label_space"])
    assert space.class_names == ("background", "a", "b", "c") and space.background and space.ignore_index == 200
    assert upgrade_hyperparameters("segmentation", new, info) == new  # today's checkpoints pass unchanged


def test_checkpoint_from_before_the_change_evaluates_to_the_same_metrics(
    run_cli: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/data/segmentation_resnet20_v0.1.ckpt was written by the code before the label space (commit 10028f6)."""
    recorded = json.loads(LEGACY.with_suffix(".json").read_text())["metrics"]
    ckpt = tmp_path / LEGACY.name
    shutil.copy(LEGACY, ckpt)
    model = SegmentationTask.load_from_checkpoint(ckpt)
    assert model.label_space.class_names == ("background", "circle", "square", "triangle")
    assert model.label_space.background and model.ignore_index == 255
    code, out, err = run_cli(
        "validate", "--config", "configs/quickstart/segmentation.yaml", "--ckpt_path", ckpt,
        "--trainer.limit_val_batches", "4", "--data.num_workers", "0", "--trainer.default_root_dir", tmp_path,
        *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    metrics = read_metrics(out)
    assert set(metrics) == set(recorded)
    for name, value in recorded.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
