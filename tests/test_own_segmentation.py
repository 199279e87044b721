"""Segmentation from your own folders: CamVid's image + annotation folders, Roboflow's PNG-mask export, RGB masks
with a colour table, the seeded val split, and the CLI end to end (fit, validate, test on val, predict)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_tasks.data.formats.folders import SegmentationFolderDataModule, read_classes_file
from resnet_tasks.data.splitting import stratified_split
from resnet_tasks.errors import UserError
from resnet_tasks.labels import IGNORE_INDEX
from tests.conftest import (
    CAMVID_CLASSES,
    CAMVID_VOID,
    COMMON_TRAINER_ARGS,
    make_camvid,
    make_roboflow_masks,
    printed_path,
    read_metrics,
)
from tests.conftest import mask_scene as scene

COLOURS = {"background": (0, 0, 0), "road": (128, 64, 128), "car": (64, 0, 128), "void": (255, 255, 255)}


def make_rgb_masks(root: Path, count: int = 4) -> Path:
    """Colour masks (RGB PNG) in `labels/` beside `images/`, and a `class_dict.csv` (name,r,g,b) colour table."""
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = ["name,r,g,b"] + [f"{name},{r},{g},{b}" for name, (r, g, b) in COLOURS.items()]
    (root / "class_dict.csv").write_text("\n".join(rows))  # no trailing newline
    colours = np.array(list(COLOURS.values()), dtype=np.uint8)
    for i in range(count):
        image, mask = scene(rng, [0, 1, 2], 3)
        Image.fromarray(image).save(root / "images" / f"f{i}.jpg")
        Image.fromarray(colours[mask]).save(root / "labels" / f"f{i}_L.png")
    return root


def small(**kwargs) -> dict:
    return dict(batch_size=2, num_workers=0, crop_size=32, eval_size=None, **kwargs)


def test_camvid_folders_remap_void_to_ignore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_camvid(tmp_path / "camvid")
    data = SegmentationFolderDataModule(
        root=str(root), train_masks="trainannot", val_masks="valannot", class_names=CAMVID_CLASSES,
        ignore_index=CAMVID_VOID, **small(),
    )  # fmt: skip
    assert data.label_space.class_names == tuple(CAMVID_CLASSES) and data.label_space.category_ids is None
    assert data.label_space.ignore_index == IGNORE_INDEX
    data.setup("fit")
    item = data.dataset("val")[0]
    original = np.asarray(Image.open(root / "valannot" / f"{item['stem']}.png"))
    expected = np.where(original == CAMVID_VOID, IGNORE_INDEX, original)
    assert np.array_equal(item["mask"].numpy(), expected)  # at the original size, void -> ignore
    batch = next(iter(data.train_dataloader()))
    assert batch["mask"].shape == (2, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= set(range(len(CAMVID_CLASSES))) | {IGNORE_INDEX}
    data.setup("test")
    assert "no test split: test evaluates the val split" in capsys.readouterr().out
    assert data.dataset("test") is data.dataset("val")


def test_roboflow_mask_export_with_void_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_roboflow_masks(tmp_path / "roboflow")
    data = SegmentationFolderDataModule(root=str(root), mask_suffix="_mask", ignore_index=0, **small())
    out = capsys.readouterr().out
    assert "class names from" in out and "_classes.csv" in out and "pixel value 0 (background)" in out
    space = data.label_space
    assert space.class_names == ("cat", "dog") and space.category_ids == (1, 2) and not space.background
    data.setup("validate")  # valid/ is the val split
    assert len(data.dataset("val")) == 3
    item = data.dataset("val")[0]
    original = np.asarray(Image.open(root / "valid" / f"{item['stem']}_mask.png"))
    assert np.array_equal(item["mask"].numpy(), np.array([IGNORE_INDEX, 0, 1], dtype=np.uint8)[original])


def test_classes_files_and_non_contiguous_values(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("background\nroad\ncar")
    assert read_classes_file(names) == ([0, 1, 2], ["background", "road", "car"])
    mapped = tmp_path / "classes.csv"
    mapped.write_text("class,value\nbackground,0\nroad,10\ncar,20\nvoid,255\n")
    assert read_classes_file(mapped) == ([0, 10, 20, 255], ["background", "road", "car", "void"])
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(2):
            mask = np.zeros((20, 24), dtype=np.uint8)
            mask[:5], mask[5:10], mask[-1] = 10, 20, 255
            Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / split / "images" / f"{i}.jpg")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    data = SegmentationFolderDataModule(
        root=str(root), classes_file=str(mapped), train_images="train/images", train_masks="train/masks",
        val_images="val/images", val_masks="val/masks", **small(),
    )  # fmt: skip
    assert data.label_space.class_names == ("background", "road", "car") and data.label_space.background
    assert data.label_space.category_ids[1:] == (10, 20)  # pixel values (the background has no id)
    mask = data.dataset("val")[0]["mask"].numpy()
    assert (mask[:5] == 1).all() and (mask[5:10] == 2).all() and (mask[10:-1] == 0).all() and (mask[-1] == 255).all()


def test_rgb_masks_with_a_palette(tmp_path: Path) -> None:
    root = make_rgb_masks(tmp_path / "rgb")
    data = SegmentationFolderDataModule(
        root=str(root), train_images="images", train_masks="labels", mask_suffix="_L",
        palette="class_dict.csv", ignore_index=3, val_fraction=0.5, **small(),
    )  # fmt: skip
    assert data.label_space.class_names == ("background", "road", "car")
    item = data.dataset("val")[0]
    colours = np.asarray(Image.open(root / "labels" / f"{item['stem']}_L.png").convert("RGB"))
    expected = np.full(colours.shape[:2], 255, dtype=np.uint8)
    for index, colour in enumerate(list(COLOURS.values())[:3]):
        expected[(colours == colour).all(-1)] = index
    assert np.array_equal(item["mask"].numpy(), expected)
    bad = colours.copy()
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(root / "labels" / f"{item['stem']}_L.png")
    with pytest.raises(UserError, match=r"_L\.png has colours \[\(1, 2, 3\)\]"):
        data.dataset("val")[0]


def test_bad_mask_value_and_layout_errors_name_the_file(tmp_path: Path) -> None:
    root = make_camvid(tmp_path / "camvid", {"train": 3, "val": 2})
    options = dict(root=str(root), train_masks="trainannot", val_masks="valannot", class_names=CAMVID_CLASSES,
                   ignore_index=CAMVID_VOID, **small())  # fmt: skip
    path = root / "valannot" / "0001TP_000000.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[0, 1], mask[0, 2] = 40, 12
    Image.fromarray(mask).save(path)
    with pytest.raises(UserError, match=r"0001TP_000000\.png has values \[12, 40\] that are neither"):
        SegmentationFolderDataModule(**options).dataset("val")[0]
    with pytest.raises(UserError, match="need --data.mask_suffix"):
        SegmentationFolderDataModule(**{**options, "val_masks": None}).dataset("val")
    (root / "trainannot" / "0001TP_000001.png").unlink()
    with pytest.raises(UserError, match=r"1 of 3 images in .*train have no mask, e\.g\. 0001TP_000001\.png"):
        SegmentationFolderDataModule(**options).dataset("train")
    with pytest.raises(UserError, match="needs the class names"):
        SegmentationFolderDataModule(root=str(root), train_masks="trainannot")


def test_held_out_val_split_is_seeded_and_stratified() -> None:
    files = [f"img/{i:03d}.jpg" for i in range(40)]
    labels = [i % 4 for i in range(40)]
    labels[-1] = 7  # a class with one item stays in train
    train, val = stratified_split(files, labels, 0.25, seed=0)
    assert sorted([*train, *val]) == list(range(40)) and not set(train) & set(val)
    assert 39 in train and {labels[i] for i in val} == {0, 1, 2, 3}
    assert [sum(labels[i] == c for i in val) for c in range(4)] == [2, 2, 2, 2]  # round(0.25 * 10 or 9)
    shuffled = list(reversed(range(40)))
    again = stratified_split([files[i] for i in shuffled], [labels[i] for i in shuffled], 0.25, seed=0)[1]
    assert sorted(files[shuffled[i]] for i in again) == sorted(files[i] for i in val)  # order does not matter
    assert not np.array_equal(stratified_split(files, labels, 0.25, seed=1)[1], val)
    assert len(stratified_split(files[:3], [0, 0, 1], 0.01, seed=0)[1]) == 1  # at least one per class of >= 2


def test_folders_cli_fit_validate_test_predict(tmp_path: Path, run_cli: Callable) -> None:
    root = make_roboflow_masks(tmp_path / "data", {"train": 8})  # one folder: val is held out of it
    common = [
        "--model", "SegmentationTask", "--model.backbone.name", "resnet20", "--model.backbone.output_stride", "32",
        "--data", "SegmentationFolderDataModule", "--data.root", root, "--data.mask_suffix", "_mask",
        "--data.ignore_index", "0", "--data.batch_size", "2", "--data.num_workers", "0", "--data.crop_size", "32",
        "--data.eval_size", "null", "--trainer.default_root_dir", tmp_path / "runs", *COMMON_TRAINER_ARGS,
    ]  # fmt: skip
    code, out, err = run_cli("fit", *common, "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0")
    assert code == 0, err
    assert "no val split: holding out 10%" in out
    split_file = printed_path(out, "val split written: ")
    assert split_file.name == "val_split.txt" and split_file.parent == tmp_path / "runs/lightning_logs/version_0"
    held_out = split_file.read_text().splitlines()
    assert len(held_out) == 1 and held_out[0].startswith("train/img") and held_out[0].endswith(".jpg")
    checkpoint = printed_path(out, "best checkpoint: ")
    code, out, err = run_cli("validate", *common, "--ckpt_path", checkpoint)
    assert code == 0, err
    assert set(read_metrics(out)) >= {"miou", "iou/cat", "iou/dog"}
    code, out, err = run_cli("test", *common, "--ckpt_path", checkpoint)
    assert code == 0, err
    assert "no test split: test evaluates the val split" in out
    code, out, err = run_cli("predict", *common, "--ckpt_path", checkpoint)
    assert code == 0, err
    masks = sorted(printed_path(out, "predictions written: ").glob("*.png"))
    assert [p.stem + ".jpg" for p in masks] == [Path(held_out[0]).name]
