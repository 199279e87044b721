"""SegmentationTask: torchvision FCN layout and parity, training steps, original-size evaluation, PNG writer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnet_tasks.backbones import BackboneConfig
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace
from resnet_tasks.tasks.optim import OptimizerConfig
from resnet_tasks.tasks.segmentation import SegmentationTask
from resnet_tasks.writers.segmentation import SegmentationWriter


@pytest.fixture(scope="module")
def torchvision_fcn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    return model.eval()


def small_task(**kwargs) -> SegmentationTask:
    options = dict(num_classes=4, backbone=BackboneConfig(name="resnet18"))
    options.update(kwargs)
    return SegmentationTask(**options)


def train_batch(batch_size: int, size: int = 48, num_classes: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch_size)
    mask = torch.randint(0, num_classes, (batch_size, size, size), generator=generator).to(torch.uint8)
    mask[:, :4] = 255
    return {"image": torch.randn(batch_size, 3, size, size, generator=generator), "mask": mask}


def test_state_dict_keys_are_torchvision_fcn_resnet50(torchvision_fcn: torch.nn.Module) -> None:
    task = SegmentationTask(num_classes=21, backbone=BackboneConfig(name="resnet50"))
    ours = {k: tuple(v.shape) for k, v in task.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in torchvision_fcn.state_dict().items()}
    assert ours == theirs
    assert task.model.backbone.strides["layer4"] == 8  # dilated, as torchvision's FCN


def test_torchvision_pth_gives_torchvision_logits(tmp_path: Path, torchvision_fcn: torch.nn.Module) -> None:
    path = tmp_path / "fcn_resnet50.pth"
    torch.save(torchvision_fcn.state_dict(), path)
    task = SegmentationTask(weights=str(path), backbone=BackboneConfig(name="resnet50"))
    assert task.num_classes == 21 and task.hparams["num_classes"] == 21
    task.load_pretrained()
    task.eval()
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = task(images)
        theirs = torchvision_fcn(images)["out"]
    assert ours.shape == (2, 21, 40, 56)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


def test_weights_fix_the_label_space() -> None:
    task = SegmentationTask(weights="FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1", backbone=BackboneConfig("resnet18"))
    assert task.num_classes == 21
    names = task.label_space.class_names
    assert names[0] == "background" and names[15] == "person" and task.label_space.background
    with pytest.raises(UserError, match="--model.backbone.weights"):
        SegmentationTask(num_classes=4, weights="FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1")
    with pytest.raises(UserError, match="num_classes"):
        SegmentationTask(num_classes=None)


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.pth")
    with pytest.raises(UserError, match="gone.pth"):
        SegmentationTask(weights=missing, backbone=BackboneConfig(name="resnet18"))
    # With the class count known (load_from_checkpoint's hyper-parameters) the model builds; loading the
    # weights themselves still fails loudly when they are needed.
    task = SegmentationTask(num_classes=21, weights=missing, backbone=BackboneConfig(name="resnet18"))
    assert task.num_classes == 21
    with pytest.raises(UserError, match="gone.pth"):
        task.load_pretrained()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_training_step_with_aux_loss(batch_size: int) -> None:
    task = small_task()
    task.train()
    losses = task.training_losses(train_batch(batch_size))
    assert set(losses) == {"loss_seg", "loss_aux"}
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert task.model.classifier[0].weight.grad is not None
    assert task.model.aux_classifier[0].weight.grad is not None


def test_without_aux_head_and_with_sync_bn() -> None:
    task = small_task(aux_loss=False, backbone=BackboneConfig(name="resnet18", norm="sync_bn", output_stride=16))
    assert task.model.aux_classifier is None
    assert isinstance(task.model.classifier[1], torch.nn.SyncBatchNorm)
    task.train()
    losses = task.training_losses(train_batch(1))
    assert set(losses) == {"loss_seg"} and torch.isfinite(losses["loss_seg"])


def test_aux_head_lr_multiplier_groups() -> None:
    task = small_task(aux_lr_mult=10.0, optimizer=OptimizerConfig(lr=0.02))
    groups = {group["name"]: group for group in task.parameter_groups()}
    assert groups["aux_head"]["lr"] == pytest.approx(0.2) and groups["head"]["lr"] == pytest.approx(0.02)
    aux = {id(p) for p in task.model.aux_classifier.parameters()}
    assert aux == {id(p) for name, g in groups.items() if name.startswith("aux_head") for p in g["params"]}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len([p for p in task.parameters() if p.requires_grad])


def test_evaluation_resizes_logits_back_to_the_original_size() -> None:
    task = small_task()
    task.eval()
    # Two images resized for the network to 40x48 and 40x40 (padded to 40x48), originally 50x60 and 30x30.
    images = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    images[1, :, :, 40:] = 0
    batch = {
        "image": images,
        "input_size": torch.tensor([[40, 48], [40, 40]]),
        "size": torch.tensor([[50, 60], [30, 30]]),
    }
    with torch.no_grad():
        masks = task.predict_masks(batch)
        logits = task(images)
    assert [tuple(m.shape) for m in masks] == [(50, 60), (30, 30)]
    expected = torch.nn.functional.interpolate(logits[1:, :, :40, :40], size=(30, 30), mode="bilinear")
    assert torch.equal(masks[1], expected.argmax(1)[0])
    # Same-size batches take the batched path: identical to the per-image computation.
    same = {"image": images[:1].repeat(2, 1, 1, 1), "input_size": torch.tensor([[40, 48]] * 2),
            "size": torch.tensor([[50, 60]] * 2)}  # fmt: skip
    with torch.no_grad():
        batched = task.predict_masks(same)
    assert torch.equal(batched[0], masks[0]) and torch.equal(batched[1], masks[0])


def test_validation_metric_counts_original_pixels_only() -> None:
    task = small_task()
    task.eval()
    mask = torch.full((1, 30, 30), 255, dtype=torch.uint8)
    mask[0, :10] = 1
    batch = {"image": torch.randn(1, 3, 24, 24), "input_size": torch.tensor([[24, 24]]),
             "size": torch.tensor([[30, 30]]), "mask": mask}  # fmt: skip
    with torch.no_grad():
        task.validation_step(batch, 0)
    assert int(task.val_metrics.confusion.sum()) == 300
    assert int(task.val_metrics.confusion[1].sum()) == 300


def test_palette_png_writer(tmp_path: Path) -> None:
    image_path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((30, 50, 3), 128, dtype=np.uint8)).save(image_path)
    mask = torch.zeros(30, 50, dtype=torch.uint8)
    mask[5:20, 10:40] = 2
    writer = SegmentationWriter(num_overlays=1)
    writer.start(tmp_path / "out", LabelSpace(("background", "a", "b"), background=True))
    writer.write_batch({"stem": ["photo"], "path": [str(image_path)], "mask": [mask]}, None)
    written = writer.finish(SimpleNamespace(world_size=1, is_global_zero=True))
    png = Image.open(tmp_path / "out" / "masks" / "photo.png")
    assert png.mode == "P" and png.size == (50, 30)
    assert np.array_equal(np.asarray(png), mask.numpy())
    assert tuple(png.getpalette()[6:9]) == (0, 128, 0)  # VOC colour of class 2
    overlay = Image.open(tmp_path / "out" / "overlays" / "photo.jpg")
    assert overlay.size == (50, 30)
    assert tmp_path / "out" / "masks" in written
