"""DetectionTask: torchvision's layout and detections, backbone swaps, freezing rules, label spaces, the writer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image

from resnet_tasks.data.formats.coco import CocoDetectionDataModule
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace
from resnet_tasks.tasks.detection import DetectionTask
from resnet_tasks.writers.detection import DetectionWriter, box_colour
from tests.conftest import make_tiny_coco

COCO_WEIGHTS = "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"
SMALL = {
    "min_size": 64,
    "max_size": 96,
    "anchor_sizes": [[8], [16], [32], [64], [128]],
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "box_batch_size_per_image": 32,
}


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("coco"))


def test_state_dict_keys_equal_torchvision_fasterrcnn_resnet50_fpn() -> None:
    ours = DetectionTask(num_classes=91).model.state_dict()
    theirs = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[key].shape == theirs[key].shape for key in ours)


def test_torchvision_state_dict_gives_torchvision_detections(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # Random weights score every class low: keep them all (score threshold 0), from fewer proposals (speed).
    options = {
        "min_size": 96,
        "max_size": 128,
        "box_score_thresh": 0.0,
        "rpn_pre_nms_top_n_test": 200,
        "rpn_post_nms_top_n_test": 50,
    }
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, **options
    ).eval()
    path = tmp_path / "frcnn.pth"
    torch.save(reference.state_dict(), path)
    task = DetectionTask(weights=str(path), **options)
    assert task.num_classes == 91 and task.label_space.category_id(90) == 90  # COCO's 91-row layout
    assert task.label_space.class_names[:2] == ("background", "person") and task.label_space.background
    task.load_pretrained()
    task.eval()
    images = [torch.rand(3, 80, 112), torch.rand(3, 96, 72)]
    with torch.no_grad():
        expected = reference(images)
        got = task(images)
    for ours, theirs in zip(got, expected):
        assert len(theirs["boxes"]) > 0
        assert torch.equal(ours["labels"], theirs["labels"])
        assert torch.allclose(ours["boxes"], theirs["boxes"], atol=1e-4)
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-5)


def test_pretrained_weights_switch_to_frozen_bn_and_three_trainable_stages(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    task = DetectionTask(num_classes=4, backbone={"name": "resnet18", "weights": str(path)}, **SMALL)
    body = task.backbone_module()
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert task.hparams["backbone"]["norm"] == "bn"  # the user's config is what gets saved
    task.load_pretrained()
    assert torch.equal(body.conv1.weight, torch.load(path)["conv1.weight"])

    scratch = DetectionTask(num_classes=4, backbone={"name": "resnet18"}, **SMALL).backbone_module()
    assert isinstance(scratch.bn1, torch.nn.BatchNorm2d) and all(p.requires_grad for p in scratch.parameters())
    frozen = DetectionTask(num_classes=4, backbone={"name": "resnet18"}, trainable_backbone_layers=0, **SMALL)
    assert not any(p.requires_grad for p in frozen.backbone_module().parameters())
    with pytest.raises(UserError, match="trainable_backbone_layers"):
        DetectionTask(num_classes=4, backbone={"name": "resnet18"}, trainable_backbone_layers=6, **SMALL)


def test_resnet18_fpn_is_sized_from_the_backbone_and_trains(tiny_coco: Path) -> None:
    torch.manual_seed(0)
    task = DetectionTask(num_classes=4, backbone={"name": "resnet18"}, **SMALL)
    assert task.model.backbone.fpn.inner_blocks[-1][0].in_channels == 512
    data = CocoDetectionDataModule(root=str(tiny_coco), batch_size=2, num_workers=0)
    data.setup("fit")
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)  # uint8 -> float, as in fit
    task.train()
    losses = task.training_losses(batch)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert task.model.backbone.body.conv1.weight.grad is not None
    assert task.model.roi_heads.box_predictor.cls_score.weight.grad is not None
    assert task.model.roi_heads.box_predictor.cls_score.out_features == 4  # background + 3 classes


def test_label_space_of_torchvision_coco_weights_is_read_without_the_file() -> None:
    with pytest.warns(UserWarning, match="keeps the weights' label space"):
        task = DetectionTask(num_classes=4, backbone={"name": "resnet18"}, weights=COCO_WEIGHTS)
    assert task.num_classes == 91 and task.model.roi_heads.box_predictor.cls_score.out_features == 91
    assert task.label_space.class_names[:2] == ("background", "person") and task.label_space.category_id(90) == 90
    assert type(task.backbone_module().bn1).__name__ == "FrozenBatchNorm2d"


def test_configuration_errors() -> None:
    with pytest.raises(UserError, match="needs its classes"):
        DetectionTask(num_classes=None, backbone={"name": "resnet18"})
    with pytest.raises(UserError, match="at least 2"):
        DetectionTask(num_classes=1, backbone={"name": "resnet18"})
    with pytest.raises(UserError, match="set up for 2 classes.*data has 3"):
        DetectionTask(num_classes=2, label_space=LabelSpace.with_background(["cat", "dog"]))
    with pytest.raises(UserError, match="anchor_sizes"):
        DetectionTask(num_classes=2, backbone={"name": "resnet18"}, anchor_sizes=[[32], [64]])
    with pytest.raises(UserError, match="unknown torchvision weights"):
        DetectionTask(num_classes=2, backbone={"name": "resnet18"}, weights="FasterRCNN_ResNet50_FPN_Weights.NOPE")
    with pytest.raises(UserError, match="not found"):
        DetectionTask(backbone={"name": "resnet18"}, weights="/nowhere/model.pth")
    # With the classes known (load_from_checkpoint's hyper-parameters) the model builds; loading the weights
    # themselves still fails loudly when they are needed.
    task = DetectionTask(num_classes=2, backbone={"name": "resnet18"}, weights="/nowhere/model.pth")
    with pytest.raises(UserError, match="not found"):
        task.load_pretrained()


def test_metrics_compare_in_category_id_space(tiny_coco: Path) -> None:
    """Model labels (COCO ids, torchvision weights) and data labels (contiguous) meet as category ids."""
    task = DetectionTask(backbone={"name": "resnet18"}, weights=COCO_WEIGHTS)
    # Data label 3 is the data's category id 9; the model's output 9 is COCO's category id 9.
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([3]),
              "category_ids": torch.tensor([9]), "iscrowd": torch.tensor([0]),
              "difficult": torch.tensor([0], dtype=torch.uint8), "area": torch.tensor([100.0])}  # fmt: skip
    detection = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([9]), "scores": torch.tensor([0.9])}
    task.evaluation_update("val", ([torch.zeros(3, 10, 10)], [target]), [detection])
    assert float(task.coco_metric.compute()["map"]) == pytest.approx(1.0)


def test_writer_writes_coco_results_and_pictures(tmp_path: Path) -> None:
    writer = DetectionWriter()
    writer.start(tmp_path, LabelSpace.with_background(["cat", "dog", "bird"], [2, 5, 9]))
    images = [torch.rand(3, 40, 60), torch.rand(3, 50, 30)]
    # The predictions name their images; the batch's targets carry nothing the writer reads.
    outputs = [
        {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([3, 1]),
         "scores": torch.tensor([0.9, 0.2]), "index": 0, "image_key": 17, "file_name": "val/a.jpg"},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
         "index": 1, "image_key": "b", "file_name": "b.jpg"},
    ]  # fmt: skip
    writer.write_batch(outputs[1:], ([images[1]], [{}]))  # out of order: the file is in dataset order
    writer.write_batch(outputs[:1], ([images[0]], [{}]))
    written = writer.finish(SimpleNamespace(world_size=1, is_global_zero=True))
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert written[0] == tmp_path / "predictions.json"
    assert results == [
        {"image_id": 17, "category_id": 9, "bbox": [10.0, 5.0, 20.0, 20.0], "score": pytest.approx(0.9)},
        {"image_id": 17, "category_id": 2, "bbox": [0.0, 0.0, 4.0, 4.0], "score": pytest.approx(0.2)},
    ]
    picture = tmp_path / "pictures" / "a.jpg"
    assert picture.is_file() and (tmp_path / "pictures" / "b.jpg").is_file()
    with Image.open(picture) as image:
        assert image.size == (60, 40)
        edge = image.getpixel((10, 15))  # on the left edge of the drawn box (score 0.9 >= 0.5), label 3
        assert max(abs(a - b) for a, b in zip(edge, box_colour(3))) < 60


def test_picture_boxes_are_coloured_by_class(tmp_path: Path) -> None:
    writer = DetectionWriter()
    writer.start(tmp_path, LabelSpace.with_background(["cat", "dog"]))
    image = torch.zeros(3, 40, 80)
    detections = {"boxes": torch.tensor([[5.0, 5.0, 35.0, 35.0], [45.0, 5.0, 75.0, 35.0]]),
                  "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.9])}  # fmt: skip
    with Image.open(writer.draw(image, detections, "two")) as picture:
        cat, dog = picture.getpixel((5, 20)), picture.getpixel((45, 20))

    def distance(pixel: tuple[int, ...], colour: tuple[int, int, int]) -> int:
        return sum(abs(a - b) for a, b in zip(pixel, colour))

    # JPEG blurs a 2 px line's colour a little: each edge is nearer its own class colour than the other's.
    assert distance(cat, box_colour(1)) < distance(cat, box_colour(2))
    assert distance(dog, box_colour(2)) < distance(dog, box_colour(1))
