"""VOC segmentation data: layout checks, SBD train_aug, transforms, original-size evaluation batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_tasks.data.formats.voc_segmentation import VOCSegmentationDataModule
from resnet_tasks.data.masks import read_sbd_mat
from resnet_tasks.data.sampling import SizeGroupedEvalBatchSampler
from resnet_tasks.data.segmentation import collate_eval
from resnet_tasks.data.transforms import segmentation_train_transform
from resnet_tasks.errors import UserError
from resnet_tasks.labels import IGNORE_INDEX
from tests.conftest import VOC_NUM_CLASSES as NUM_CLASSES
from tests.conftest import make_segmentation_voc as make_tiny_voc
from tests.conftest import voc_scene as scene
from tests.conftest import write_palette_png


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    return make_tiny_voc(tmp_path / "voc")


def module(root: Path, **kwargs) -> VOCSegmentationDataModule:
    options = dict(root=str(root), batch_size=2, num_workers=0, crop_size=32, eval_size=40)
    options.update(kwargs)
    return VOCSegmentationDataModule(**options)


def test_train_batches_hold_only_class_ids_and_ignore(voc_root: Path) -> None:
    data = module(voc_root)
    assert data.num_classes == 21 and data.label_space.class_names[0] == "background"
    data.setup("fit")
    seen: set[int] = set()
    for _ in range(3):
        for batch in data.train_dataloader():
            assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.uint8  # float on device
            assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.uint8
            seen.update(int(v) for v in batch["mask"].unique())
    assert seen <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    assert IGNORE_INDEX in seen and 0 in seen


def test_train_transform_nearest_masks_and_255_padding() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 3, 7, 255], dtype=np.uint8), size=(40, 30))
    transform = segmentation_train_transform(crop_size=96, scale_range=(0.5, 0.5), hflip=False)
    out = transform(image=image, mask=mask)
    assert out["image"].shape == (96, 96, 3) and out["mask"].shape == (96, 96)
    assert set(np.unique(out["mask"]).tolist()) <= {0, 3, 7, 255}
    # Scaled to 20x15, so everything beyond is padding: ignore in the mask, black in the (uint8) image.
    padded = np.ones((96, 96), dtype=bool)
    rows, cols = np.nonzero(out["mask"] != 255)
    padded[: rows.max() + 1, : cols.max() + 1] = False
    assert (out["mask"][padded] == 255).all()
    assert padded.sum() >= 96 * 96 - 20 * 15
    assert (out["image"][95, 95] == 0).all()
    # Upscaling must not invent values between class ids either.
    big = segmentation_train_transform(crop_size=48, scale_range=(1.7, 2.0))(image=image, mask=mask)
    assert set(np.unique(big["mask"]).tolist()) <= {0, 3, 7, 255}


def test_eval_batches_keep_original_masks_and_group_sizes(voc_root: Path) -> None:
    data = module(voc_root, eval_batch_size=4)
    data.setup("validate")
    batches = list(data.val_dataloader())
    stems = [stem for batch in batches for stem in batch["stem"]]
    assert sorted(stems) == sorted((voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split())
    for batch in batches:
        sizes = batch["size"]  # host (height, width) pairs: never moved to the device, never read back
        assert all(size == sizes[0] for size in sizes)  # one original size per batch: nothing padded
        height, width = sizes[0]
        assert tuple(batch["mask"].shape[1:]) == (height, width)
        assert min(batch["image"].shape[-2:]) == 40  # shorter side resized for the network
        assert batch["input_size"][0] == tuple(batch["image"].shape[-2:])
        for stem, mask in zip(batch["stem"], batch["mask"]):
            original = np.asarray(Image.open(voc_root / f"VOCdevkit/VOC2012/SegmentationClass/{stem}.png"))
            assert np.array_equal(mask.numpy(), original)


def test_size_grouped_batches_cover_every_image_once() -> None:
    sizes = [(10, 20), (20, 10), (10, 20), (10, 20), (5, 5), (20, 10), (10, 20)]
    batches = list(SizeGroupedEvalBatchSampler(sizes, batch_size=2))
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in batch}) == 1 and len(batch) <= 2 for batch in batches)
    assert len(SizeGroupedEvalBatchSampler(sizes, batch_size=2)) == len(batches)


def test_collate_pads_mixed_sizes_with_ignore() -> None:
    items = [
        {"image": torch.ones(3, 4, 6), "size": (8, 12), "input_size": (4, 6), "stem": "a", "path": "a.jpg",
         "mask": torch.zeros(8, 12, dtype=torch.uint8)},
        {"image": torch.ones(3, 6, 4), "size": (12, 8), "input_size": (6, 4), "stem": "b", "path": "b.jpg",
         "mask": torch.ones(12, 8, dtype=torch.uint8)},
    ]  # fmt: skip
    batch = collate_eval(items)
    assert batch["image"].shape == (2, 3, 6, 6) and batch["mask"].shape == (2, 12, 12)
    assert batch["image"][0, :, 4:].abs().sum() == 0 and (batch["mask"][0, 8:] == 255).all()
    assert (batch["mask"][1, :, 8:] == 255).all() and batch["size"] == [(8, 12), (12, 8)]


def test_mask_size_mismatch_names_the_file(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit/VOC2012"
    stem = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    write_palette_png(np.zeros((10, 10), dtype=np.uint8), voc / "SegmentationClass" / f"{stem}.png")
    data = module(voc_root)
    data.setup("fit")
    with pytest.raises(UserError, match=f"{stem}.png.*size"):
        data.dataset("train")[0]


def test_mask_values_outside_the_classes_name_the_file(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit/VOC2012"
    stem = (voc / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    path = voc / "SegmentationClass" / f"{stem}.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[0, 0] = 42  # neither a VOC class (0..20) nor 255
    write_palette_png(mask, path)
    data = module(voc_root)
    data.setup("validate")
    with pytest.raises(UserError, match=rf"{stem}\.png has values \[42\]"):
        data.dataset("val")[0]


def test_missing_layout_errors_name_what_is_missing(tmp_path: Path, voc_root: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="VOCdevkit/VOC2012.*Expected layout"):
        module(empty).setup("fit")
    with pytest.raises(UserError, match="does not exist"):
        module(tmp_path / "nowhere").setup("fit")
    voc = voc_root / "VOCdevkit/VOC2012"
    stem = (voc / "ImageSets/Segmentation/train.txt").read_text().split()[1]
    (voc / "JPEGImages" / f"{stem}.jpg").unlink()
    with pytest.raises(UserError, match=f"Missing file .*{stem}.jpg"):
        module(voc_root).setup("fit")
    with pytest.raises(UserError, match="Missing image list .*test_split.txt"):
        module(voc_root, val_split="test_split").setup("validate")
    with pytest.raises(UserError, match="train_aug needs SBD.*SegmentationClassAug"):
        module(voc_root, train_split="train_aug").setup("fit")


def test_train_aug_from_sbd_mat_files(voc_root: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    voc = voc_root / "VOCdevkit/VOC2012"
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    sbd = voc_root / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    rng = np.random.default_rng(5)
    extra = []
    for index in range(3):  # SBD-only images (in JPEGImages, without a VOC PNG)
        stem = f"2008_{index:06d}"
        image, mask = scene(rng, 40, 52, NUM_CLASSES)
        mask[mask == 255] = 0  # SBD has no ignore border
        Image.fromarray(image).save(voc / "JPEGImages" / f"{stem}.jpg", quality=95)
        scipy_io.savemat(
            sbd / "cls" / f"{stem}.mat",
            {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": np.unique(mask)}},
        )
        extra.append((stem, mask))
    (sbd / "train.txt").write_text("\n".join(stem for stem, _ in extra[:2]) + "\n")
    (sbd / "val.txt").write_text(f"{extra[2][0]}\n{val[0]}\n")  # a VOC val image: must be left out
    assert np.array_equal(read_sbd_mat(sbd / "cls" / f"{extra[0][0]}.mat"), extra[0][1])
    data = module(voc_root, train_split="train_aug")
    data.setup("fit")
    dataset = data.dataset("train")
    stems = [Path(p).stem for p in dataset.images]
    train = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    assert sorted(stems) == sorted(train + [stem for stem, _ in extra])
    index = stems.index(extra[1][0])
    assert str(dataset.masks[index]).endswith(".mat")
    image, mask = dataset.load(index)
    assert np.array_equal(mask, extra[1][1]) and image.shape[:2] == mask.shape
    assert str(dataset.masks[stems.index(train[0])]).endswith(f"SegmentationClass/{train[0]}.png")


def test_train_aug_from_segmentation_class_aug(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit/VOC2012"
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    for path in (voc / "SegmentationClass").glob("*.png"):
        write_palette_png(np.asarray(Image.open(path)), aug / path.name)
    val = set((voc / "ImageSets/Segmentation/val.txt").read_text().split())
    data = module(voc_root, train_split="train_aug")
    data.setup("fit")
    dataset = data.dataset("train")
    stems = {Path(p).stem for p in dataset.images}
    assert stems and not stems & val
    assert all("SegmentationClassAug" in str(m) for m in dataset.masks)
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text(sorted(stems)[0] + "\n")
    listed = module(voc_root, train_split="train_aug")
    listed.setup("fit")
    assert len(listed.dataset("train")) == 1


def test_predict_folder_needs_no_root(tmp_path: Path, voc_root: Path) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    for path in sorted((voc_root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    data = VOCSegmentationDataModule(predict_path=str(folder), num_workers=0, eval_size=None, eval_batch_size=2)
    assert data.num_classes is None  # the model's weights decide
    data.setup("predict")
    batches = list(data.predict_dataloader())
    assert sum(len(b["stem"]) for b in batches) == 3 and all("mask" not in b for b in batches)


def test_shapes_module_reads_the_generated_voc_set(tmp_path: Path) -> None:
    from resnet_tasks.data.formats.voc_segmentation import ShapesSegmentationDataModule
    from resnet_tasks.data.shapes import SHAPE_CLASSES, ensure_shapes

    shapes = ensure_shapes(tmp_path / "shapes", num_train=8, num_val=4, image_size=64)
    data = ShapesSegmentationDataModule(root=str(shapes / "voc"), batch_size=4, num_workers=0, crop_size=64)
    assert data.label_space.class_names == ("background", *SHAPE_CLASSES) and data.num_classes == 1 + len(SHAPE_CLASSES)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["mask"].shape == (4, 64, 64)
    assert set(batch["mask"].unique().tolist()) <= set(range(data.num_classes)) | {255}
    (val_batch,) = list(data.val_dataloader())  # eval_size None: native 64 px, one batch of 4
    assert val_batch["image"].shape == (4, 3, 64, 64) and val_batch["mask"].shape == (4, 64, 64)
