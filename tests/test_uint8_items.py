"""Items cross the DataLoader workers as uint8 for every task, and the model's input made after the transfer
(`on_after_batch_transfer`: float, normalised, random erasing, padding, the model's memory format) equals what the
workers made before to float tolerance. The reference is the earlier worker-side pipeline, kept here:
albumentations' `Normalize` on the uint8 image, torchvision's `RandomErasing` on the normalised tensor under the
same per-sample seed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from resnet_tasks.data.classification import ImageFolderDataModule
from resnet_tasks.data.formats.cifar import CIFARDataModule
from resnet_tasks.data.formats.coco import CocoDetectionDataModule
from resnet_tasks.data.formats.voc_segmentation import VOCSegmentationDataModule
from resnet_tasks.data.io import image_to_tensor, read_image
from resnet_tasks.data.segmentation import collate_eval, collate_train
from resnet_tasks.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZED_CROP_RATIO,
    ResizedCropSampler,
    SeededResizedCrop,
    erase_box,
)
from tests.conftest import make_segmentation_voc, make_tiny_coco, write_cifar10

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> A.Normalize:
    return A.Normalize(mean=mean, std=std, max_pixel_value=255.0)


def moved(data: Any, items: list[Any], collate: Any = default_collate, channels_last: bool = False) -> Any:
    """What the model receives for `items`: collated, then the data module's hook (the CPU stands in for the device;
    `channels_last` as the model would say it through the Trainer)."""
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(channels_last=channels_last))
    try:
        return data.on_after_batch_transfer(collate(items), 0)
    finally:
        data.trainer = None


# ---------------------------------------------------------------------------------------------- classification
def old_imagenet_train(image: np.ndarray, seed: int, size: int, erase_p: float, mean: Any, std: Any) -> torch.Tensor:
    """The ImageNet V2 recipe as the workers ran it: crop + flip, TrivialAugment (uint8), normalise, erase."""
    crop = SeededResizedCrop(size, ResizedCropSampler((0.08, 1.0), RESIZED_CROP_RATIO, True))
    pixels = image_to_tensor(crop(image, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pixels = v2.TrivialAugmentWide()(pixels)
        tensor = v2.Normalize(mean=list(mean), std=list(std))(pixels.float().div_(255.0))
        return v2.RandomErasing(p=erase_p, value=0)(tensor)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("uint8_folder"), per_class=4)


def test_classification_items_are_uint8_and_the_model_input_is_unchanged(folder: Path) -> None:
    data = ImageFolderDataModule(root=str(folder), crop_size=32, resize_size=36, batch_size=4, num_workers=0,
                                 auto_augment="ta_wide", random_erase=0.5)  # fmt: skip
    train = data.dataset("train")
    seeds = [1000 + 17 * i for i in range(8)]
    items = [train[(i, seed)] for i, seed in enumerate(seeds)]
    assert all(item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32) for item in items)
    erased = [bool(item["erase"][2:].prod() > 0) for item in items]
    assert any(erased) and not all(erased)  # both cases are compared below
    batch = moved(data, items)
    assert "erase" not in batch and batch["image"].dtype == torch.float32
    for k, seed in enumerate(seeds):
        image = read_image(train.paths[k].decode())
        reference = old_imagenet_train(image, seed, 32, 0.5, data.mean, data.std)
        torch.testing.assert_close(batch["image"][k], reference, **TOLERANCE)
    # Evaluation: shorter side to 36, centre crop 32, normalise.
    val = data.dataset("val")
    batch = moved(data, [val[0], val[1]])
    old_eval = A.Compose([A.SmallestMaxSize(max_size=36), A.CenterCrop(32, 32), normalize(data.mean, data.std)])
    for k in range(2):
        reference = image_to_tensor(old_eval(image=read_image(val.paths[k].decode()))["image"])
        assert val[k]["image"].dtype == torch.uint8
        torch.testing.assert_close(batch["image"][k], reference, **TOLERANCE)


def test_random_erasing_box_is_torchvisions_for_the_seed_and_reproducible() -> None:
    erase = v2.RandomErasing(p=0.5, value=0)
    state = torch.get_rng_state()
    for seed in range(40):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            box = erase_box(erase, torch.zeros(3, 24, 40, dtype=torch.uint8))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            zeroed = erase(torch.ones(3, 24, 40)) == 0
        expected = torch.zeros(24, 40, dtype=torch.bool)
        top, left, height, width = box.tolist()
        expected[top : top + height, left : left + width] = True
        assert torch.equal(zeroed.all(0), expected) and torch.equal(zeroed.any(0), expected), seed
    assert torch.equal(torch.get_rng_state(), state)


def test_cifar_items_are_uint8_and_normalised_after_the_transfer(tmp_path: Path) -> None:
    data = CIFARDataModule(root=str(write_cifar10(tmp_path)), val_size=10, num_workers=0, batch_size=4)
    train, test = data.dataset("train"), data.dataset("test")
    old_train = A.Compose([
        A.PadIfNeeded(min_height=40, min_width=40, border_mode=0, fill=0), A.RandomCrop(32, 32),
        A.HorizontalFlip(p=0.5), normalize(data.mean, data.std),
    ])  # fmt: skip
    seeds = [5, 6, 7, 8]
    batch = moved(data, [train[(i, seed)] for i, seed in enumerate(seeds)])
    for k, seed in enumerate(seeds):
        old_train.set_random_seed(seed)
        reference = image_to_tensor(old_train(image=train.images[k])["image"])
        torch.testing.assert_close(batch["image"][k], reference, **TOLERANCE)
    assert test[0]["image"].dtype == torch.uint8
    reference = image_to_tensor(normalize(data.mean, data.std)(image=test.images[0])["image"])
    torch.testing.assert_close(moved(data, [test[0]])["image"][0], reference, **TOLERANCE)


def test_channels_last_model_gets_nhwc_input_with_the_same_values(folder: Path) -> None:
    data = ImageFolderDataModule(root=str(folder), crop_size=32, resize_size=36, num_workers=0, random_erase=1.0)
    train = data.dataset("train")
    items = [train[(i, 40 + i)] for i in range(3)]
    plain, nhwc = moved(data, items), moved(data, items, channels_last=True)
    assert nhwc["image"].is_contiguous(memory_format=torch.channels_last)
    assert plain["image"].is_contiguous() and torch.equal(plain["image"], nhwc["image"])


def test_device_decode_path_builds_the_model_layout(folder: Path) -> None:
    from resnet_tasks.data.gpu_decode import DeviceImagePipeline, collate_encoded, read_encoded

    pipeline = DeviceImagePipeline(32, 36, 32, ResizedCropSampler(), IMAGENET_MEAN, IMAGENET_STD)
    paths = sorted(str(p) for p in (folder / "train").rglob("*.jpg"))[:2]
    items = [{"image": read_encoded(p), "path": p, "seed": None, "label": 0, "name": p} for p in paths]
    encoded = collate_encoded(items)["image"]
    plain, _ = pipeline(encoded, torch.device("cpu"))
    nhwc, _ = pipeline(encoded, torch.device("cpu"), channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, nhwc)


def test_a_trained_model_sees_float_nhwc_batches(folder: Path, tmp_path: Path) -> None:
    import lightning as L

    from resnet_tasks.tasks.classification import ClassificationTask

    data = ImageFolderDataModule(root=str(folder), crop_size=32, resize_size=32, batch_size=4, num_workers=0)
    task = ClassificationTask(label_space=data.label_space, backbone={"name": "resnet20"}, channels_last=True)
    seen: list[tuple[torch.dtype, bool]] = []

    class Inputs(L.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            seen.append((batch["image"].dtype, batch["image"].is_contiguous(memory_format=torch.channels_last)))

    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Inputs()],
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert seen == [(torch.float32, True)]


# ---------------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> VOCSegmentationDataModule:
    root = make_segmentation_voc(tmp_path_factory.mktemp("uint8_voc"), num_train=4, num_val=3)
    return VOCSegmentationDataModule(root=str(root), batch_size=2, num_workers=0, crop_size=40, eval_size=36)


def test_segmentation_items_are_uint8_and_the_model_input_is_unchanged(voc: VOCSegmentationDataModule) -> None:
    train = voc.dataset("train")
    seeds = [3, 4, 5]
    items = [train[(i, seed)] for i, seed in enumerate(seeds)]
    assert all(item["image"].dtype == torch.uint8 for item in items)
    batch = moved(voc, items, collate_train)
    old_train = A.Compose([*voc.train_transform().transforms, normalize(voc.mean, voc.std)])
    for k, seed in enumerate(seeds):
        image, mask = train.load(k)
        old_train.set_random_seed(seed)
        reference = old_train(image=image, mask=mask)
        torch.testing.assert_close(batch["image"][k], image_to_tensor(reference["image"]), **TOLERANCE)
        assert torch.equal(batch["mask"][k], torch.from_numpy(reference["mask"]))
    # Evaluation of images of different sizes in one batch: the padding is 0 after normalisation, as before.
    val = voc.dataset("val")
    items = [val[k] for k in range(3)]
    assert len({tuple(item["input_size"]) for item in items}) > 1 and items[0]["image"].dtype == torch.uint8
    batch = moved(voc, items, collate_eval, channels_last=True)
    old_eval = A.Compose([A.SmallestMaxSize(max_size=36), normalize(voc.mean, voc.std)])
    for k in range(len(items)):
        reference = image_to_tensor(old_eval(image=val.load(k)[0])["image"])
        height, width = reference.shape[-2:]
        torch.testing.assert_close(batch["image"][k, :, :height, :width], reference, **TOLERANCE)
        assert batch["image"][k, :, height:].abs().sum() == 0 and batch["image"][k, :, :, width:].abs().sum() == 0


# ---------------------------------------------------------------------------------------------- detection
def test_detection_items_are_uint8_and_the_model_input_is_unchanged(tmp_path: Path) -> None:
    root = make_tiny_coco(tmp_path / "coco")
    data = CocoDetectionDataModule(root=str(root), batch_size=2, num_workers=0)
    data.setup("fit")
    train, val = data.dataset("train"), data.dataset("val")
    items = [train[(0, 11)], train[(1, 12)]]
    assert all(image.dtype == torch.uint8 for image, _ in items)
    images, targets = moved(data, items, data.collate(train=True))
    for k, seed in enumerate((11, 12)):
        ann = train.annotations
        span = ann.objects(k)
        keep = (ann.crowd[span] == 0) & (ann.difficult[span] == 0)
        transform = train.transform
        transform.set_random_seed(seed)
        out = transform(
            image=read_image(ann.image_path(k)), bboxes=ann.boxes[span][keep], labels=ann.labels[span][keep]
        )
        assert torch.equal(images[k], image_to_tensor(out["image"]).float() / 255.0)  # pixels / 255, exactly
        assert targets[k]["index"] == k
    image, _ = val[1]
    (moved_image,), _ = moved(data, [val[1]], data.collate(train=False))
    assert image.dtype == torch.uint8 and image.untyped_storage().nbytes() == 3 * 80 * 64  # 1 byte per value
    assert torch.equal(moved_image, image_to_tensor(read_image(val.annotations.image_path(1))).float() / 255.0)
