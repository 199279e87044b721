"""Test-time augmentation: flip equivariance/invariance of the averaged logits, and detection's mirrored merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from resnet_tasks.errors import UserError
from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.detection import DetectionTask
from resnet_tasks.tasks.segmentation import SegmentationTask
from resnet_tasks.tasks.tta import classification_logits, detection_flip, mirror_boxes, segmentation_logits
from tests.conftest import COMMON_TRAINER_ARGS, read_metrics
from tests.conftest import DETECTION_RUN as DETECTION
from tests.conftest import SEGMENTATION_RUN as SEGMENTATION


@pytest.fixture(scope="module")
def segmentation_model() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=4, backbone={"name": "resnet20"}).eval()


@pytest.fixture(scope="module")
def classification_model() -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(num_classes=5, backbone={"name": "resnet20"}).eval()


@torch.no_grad()
def test_segmentation_flip_tta_is_flip_equivariant(segmentation_model: SegmentationTask) -> None:
    x = torch.randn(2, 3, 32, 40)
    tta = segmentation_logits(segmentation_model, x, "flip")
    assert torch.equal(tta, segmentation_logits(segmentation_model, x.flip(-1), "flip").flip(-1))
    assert not torch.allclose(tta, segmentation_model(x), atol=1e-4)  # it changes the plain output
    scales = segmentation_logits(segmentation_model, x, "flip_scales", scales=(0.5, 1.0, 1.5))
    assert scales.shape == tta.shape and not torch.allclose(scales, tta, atol=1e-4)


@torch.no_grad()
def test_classification_flip_tta_is_flip_invariant(classification_model: ClassificationTask) -> None:
    x = torch.randn(3, 3, 32, 32)
    tta = classification_logits(classification_model, x, "flip")
    assert torch.equal(tta, classification_logits(classification_model, x.flip(-1), "flip"))
    classification_model.tta = "flip"  # the task's own evaluation path (validate/test/predict)
    try:
        assert torch.equal(classification_model.evaluation_logits(x), tta)
    finally:
        classification_model.tta = "none"
    assert not torch.allclose(tta, classification_model(x), atol=1e-4)
    assert torch.equal(classification_logits(classification_model, x, "none"), classification_model(x))


def test_detection_flip_mirrors_back_and_merges_duplicates() -> None:
    image = torch.zeros(3, 20, 100)

    def forward(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        # A detector that sees one object at x 10..30 of whatever it is given (so at 70..90 once mirrored back).
        boxes = torch.tensor([[10.0, 2.0, 30.0, 12.0], [60.0, 2.0, 90.0, 12.0]])
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([1, 1])} for _ in images]

    mirrored = mirror_boxes(torch.tensor([[10.0, 2.0, 30.0, 12.0]]), 100)
    assert torch.equal(mirrored, torch.tensor([[70.0, 2.0, 90.0, 12.0]]))
    (merged,) = detection_flip(forward, [image], nms_iou=0.5, max_detections=100)
    # Plain: 10..30 (0.9), 60..90 (0.5). Mirrored: 70..90 (0.9), 10..40 (0.5). NMS per class keeps the 0.9 boxes.
    assert merged["boxes"].tolist() == [[10.0, 2.0, 30.0, 12.0], [70.0, 2.0, 90.0, 12.0]]
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.9])
    (capped,) = detection_flip(forward, [image], nms_iou=0.5, max_detections=1)
    assert len(capped["boxes"]) == 1


def test_tta_keys_are_checked() -> None:
    with pytest.raises(UserError, match="--model.tta 'mirror' is not one of none, flip, flip_scales"):
        ClassificationTask(num_classes=3, backbone={"name": "resnet20"}, tta="mirror")
    with pytest.raises(UserError, match="detection supports --model.tta flip"):
        DetectionTask(num_classes=4, backbone={"name": "resnet18"}, tta="flip_scales")


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_validate_with_flip_tta(task: str, run_cli, tmp_path: Path) -> None:
    """`validate --ckpt_path CKPT --model.tta flip` through the CLI: the command's TTA applies to the checkpoint
    (not the one stored in its hyper-parameters); metrics.json written, and different from the plain run's."""
    from resnet_tasks.data.shapes import generate_shapes

    shapes = generate_shapes(tmp_path / "shapes", num_train=6, num_val=6, image_size=64)
    args = [*SEGMENTATION, "--data.root", str(shapes / "voc")] if task == "segmentation" else [
        *DETECTION, "--data.root", str(shapes / "coco")]  # fmt: skip
    code, out, err = run_cli("fit", *args, "--trainer.max_steps", "1", "--trainer.max_epochs", "-1",
                             "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                             "--trainer.default_root_dir", tmp_path / "fit", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err
    (checkpoint,) = (tmp_path / "fit").glob("lightning_logs/version_0/checkpoints/last.ckpt")
    metrics = {}
    for tta in ("none", "flip"):
        code, out, err = run_cli("validate", *args, "--ckpt_path", checkpoint, "--model.tta", tta,
                                 "--trainer.default_root_dir", tmp_path / tta, *COMMON_TRAINER_ARGS)  # fmt: skip
        assert code == 0, err
        metrics[tta] = read_metrics(out)
        (hparams,) = (tmp_path / tta).glob("lightning_logs/version_0/hparams.yaml")
        assert yaml.safe_load(hparams.read_text())["tta"] == tta  # the model was built with the command's TTA
    main = "miou" if task == "segmentation" else "map_50"
    assert 0.0 <= metrics["flip"][main] <= 1.0
    if task == "segmentation":  # (a detector after one step finds nothing either way: its metrics are all 0)
        assert metrics["flip"] != metrics["none"]
