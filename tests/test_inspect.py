"""`resnet-tasks inspect`: counts and dataset.json on the quickstart configs (bundled shapes in their ImageFolder, COCO
and VOC layouts), problems planted in copies of them, and the exit code when training would fail."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from resnet_tasks.data.inspection import AnchorGeometry, inspect_data
from resnet_tasks.data.shapes import COCO_CATEGORY_IDS, SHAPE_CLASSES, generate_shapes
from tests.conftest import printed_path

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL = 12, 6


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=64)


def inspect(run_cli: Callable, task: str, root: Path, out: Path, *extra: str) -> tuple[int, str, str, dict[str, Any]]:
    """Run inspect with a quickstart config on `root`; (exit code, stdout, stderr, dataset.json)."""
    config = REPO / "configs" / "quickstart" / f"{task}.yaml"
    code, stdout, stderr = run_cli(
        "inspect", "--config", config, "--data.root", root, "--trainer.default_root_dir", out, *extra
    )
    written = printed_path(stdout, "dataset written: ")
    assert written.parent == printed_path(stdout, "class histogram written: ").parent
    assert (written.parent / "class_histogram.png").stat().st_size > 0
    return code, stdout, stderr, json.loads(written.read_text())


def problems_of(data: dict[str, Any]) -> dict[str, list[str]]:
    """File name -> its problems."""
    found: dict[str, list[str]] = {}
    for entry in data["problems"]:
        found.setdefault(Path(entry["file"]).name, []).append(entry["problem"])
    return found


@pytest.mark.parametrize("task, layout", [("classification", "imagefolder"), ("detection", "coco"),
                                          ("segmentation", "voc")])  # fmt: skip
def test_quickstart_configs_count_every_split(
    run_cli: Callable, shapes: Path, tmp_path: Path, task: str, layout: str
) -> None:
    code, out, err, data = inspect(run_cli, task, shapes / layout, tmp_path)
    assert code == 0, err
    manifest = json.loads((shapes / "shapes.json").read_text())["splits"]
    assert data["task"] == task and data["problems"] == []
    assert set(data["splits"]) == {"train", "val"}  # test evaluates val: not listed twice
    names = [entry["name"] for entry in data["classes"]]
    for split, expected in manifest.items():
        counts = data["splits"][split]
        total = sum(entry[split] for entry in data["classes"])
        if task == "detection":
            sizes = {"min": [64, 64], "max": [64, 64]}
            assert counts == {"images": expected["images"], "negatives": expected["empty_images"],
                              "instances": expected["objects"], "image_size": sizes}  # fmt: skip
            assert total == expected["objects"]
        elif task == "segmentation":
            assert counts["images"] == expected["images"] and counts["negatives"] == expected["empty_images"]
            background = next(entry for entry in data["classes"] if entry["name"] == "background")
            assert background[split] == expected["images"]  # every scene shows some background
        else:
            assert counts["images"] == expected["images"] - expected["empty_images"] == total  # one crop per scene
            assert counts["negatives"] == 0
    if task == "detection":
        assert names == list(SHAPE_CLASSES)
        assert [entry["id"] for entry in data["classes"]] == [COCO_CATEGORY_IDS[name] for name in SHAPE_CLASSES]
    else:
        assert names == (["background"] if task == "segmentation" else []) + list(SHAPE_CLASSES)
    assert "problems: 0" in out and "train" in out
    if task == "segmentation":
        assert "decode" in out  # says which checks read pixels


def _exif_rotated_jpeg(path: Path, width: int, height: int) -> None:
    """A JPEG stored `width` x `height` whose EXIF orientation (6) turns it: it decodes to height x width."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path, exif=exif.tobytes(), quality=90)


def test_planted_detection_problems_are_named_per_file(run_cli: Callable, shapes: Path, tmp_path: Path) -> None:
    root = shutil.copytree(shapes / "coco", tmp_path / "coco")
    train_file = root / "annotations" / "instances_train2017.json"
    train = json.loads(train_file.read_text())
    train["annotations"][0]["bbox"] = [40.0, 40.0, 50.0, 50.0]  # reaches beyond the 64 px image
    train["annotations"][1]["bbox"] = [10.0, 10.0, 0.0, 5.0]  # no width: degenerate
    rotated = train["images"][2]
    _exif_rotated_jpeg(root / "train2017" / rotated["file_name"], width=64, height=48)
    rotated["width"], rotated["height"] = 64, 48  # the stored size; the decoder turns it to 48x64
    train_file.write_text(json.dumps(train))
    val = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    copied = val["images"][0]["file_name"]
    shutil.copy(root / "train2017" / train["images"][3]["file_name"], root / "val2017" / copied)
    shutil.copy(root / "train2017" / train["images"][4]["file_name"], root / "train2017" / "stray.jpg")

    code, out, err, data = inspect(run_cli, "detection", root, tmp_path / "run")
    assert code == 0, err  # all of these are trained around: reported, not fatal
    found = problems_of(data)
    clipped, dropped = (next(i["file_name"] for i in train["images"] if i["id"] == a["image_id"])
                        for a in train["annotations"][:2])  # fmt: skip
    assert any("1 box(es) extend beyond the image" in p and "instances_train2017.json" in p for p in found[clipped])
    assert any("1 box(es) are degenerate" in p for p in found[dropped])  # named per image
    (size,) = found[rotated["file_name"]]
    assert "annotated 64x48 but the image decodes to 48x64 (EXIF orientation 6" in size
    (duplicate,) = found[copied]
    assert "the same image as" in duplicate and train["images"][3]["file_name"] in duplicate and "train" in duplicate
    assert found["stray.jpg"] == ["in no split (it sits in an image folder of the splits, but no split lists it)"]
    assert "[duplicate]" in out and "[no split]" in out and "[size]" in out


def test_objects_smaller_than_the_smallest_anchor(run_cli: Callable, shapes: Path, tmp_path: Path) -> None:
    # At min_size 64 (scale 1 on 64 px images) with 64 px anchors, the shapes' 7..30 px objects are too small.
    anchors = "[[64], [128], [256], [512], [1024]]"
    code, out, err, data = inspect(
        run_cli, "detection", shapes / "coco", tmp_path,
        "--model.min_size", "64", "--model.max_size", "64", "--model.anchor_sizes", anchors,
    )  # fmt: skip
    assert code == 0, err
    small = [entry for entry in data["problems"] if "too small for the smallest anchor (64 px)" in entry["problem"]]
    assert small and "[small objects]" in out


def test_anchor_geometry_follows_torchvision_resize_and_anchor_shapes() -> None:
    anchors = AnchorGeometry(min_size=800, max_size=1333, anchor_size=32, aspect_ratios=(0.5, 1.0, 2.0))
    # 640x480 image: scale 800/480. A 10x10 box becomes 16.7 px: IoU (16.7/32)^2 = 0.27 < 0.3 with the square anchor.
    small = anchors.too_small(
        np.array([10.0, 14.0, 5.0]), np.array([10.0, 14.0, 40.0]), np.full(3, 640), np.full(3, 480)
    )
    assert small.tolist() == [True, False, False]  # 14 px -> 23 px: IoU 0.53; 5x40 -> 8x67: larger than the anchor


def test_missing_training_annotations_fail_with_dataset_json_written(
    run_cli: Callable, shapes: Path, tmp_path: Path
) -> None:
    root = shutil.copytree(shapes / "coco", tmp_path / "coco")
    (root / "annotations" / "instances_train2017.json").unlink()
    code, out, err, data = inspect(run_cli, "detection", root, tmp_path / "run")
    assert code != 0 and "training would fail" in err and "instances_train2017.json" in err
    assert "Traceback" not in err
    assert "train" not in data["splits"] and data["splits"]["val"]["images"] == NUM_VAL


def test_segmentation_mask_problems_stop_training(run_cli: Callable, shapes: Path, tmp_path: Path) -> None:
    root = shutil.copytree(shapes / "voc", tmp_path / "voc")
    voc = root / "VOCdevkit" / "VOC2012"
    stems = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(voc / "SegmentationClass" / f"{stems[0]}.png")
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(voc / "SegmentationClass" / f"{stems[1]}.png")
    code, out, err, data = inspect(run_cli, "segmentation", root, tmp_path / "run")
    assert code != 0 and "training would fail" in err and "Traceback" not in err
    found = problems_of(data)
    assert "64x40 (WxH)" in found[f"{stems[0]}.png"][0]
    assert "[9]" in found[f"{stems[1]}.png"][0]
    assert data["splits"]["train"]["images"] == NUM_TRAIN


def test_image_folder_with_a_truncated_val_image(run_cli: Callable, image_folder: Path, tmp_path: Path) -> None:
    root = shutil.copytree(image_folder, tmp_path / "images")
    broken = sorted((root / "val" / "red").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:200])
    code, out, err, data = inspect(
        run_cli, "classification", root, tmp_path / "run", "--data", "resnet_tasks.ImageFolderDataModule"
    )
    assert code != 0 and "training would fail" in err and broken.name in err
    assert data["splits"]["train"]["images"] == 24 and [entry["train"] for entry in data["classes"]] == [8, 8, 8]
    assert "truncated JPEG" in problems_of(data)[broken.name][0]


def test_voc_detection_layout(run_cli: Callable, shapes: Path, tmp_path: Path) -> None:
    code, out, err, data = inspect(
        run_cli, "detection", shapes / "voc", tmp_path, "--data", "resnet_tasks.VOCDetectionDataModule",
        "--data.train_split", "2012-train", "--data.val_split", "2012-val", "--data.test_split", "2012-val",
        "--data.class_names", "[circle, square, triangle]",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((shapes / "shapes.json").read_text())["splits"]
    assert data["splits"]["train"]["instances"] == manifest["train"]["objects"]
    assert [entry["id"] for entry in data["classes"]] == [1, 2, 3]


def test_needs_a_config(run_cli: Callable) -> None:
    code, out, err = run_cli("inspect")
    assert code == 2 and "--config" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- your own data
def test_yolo_roboflow_export_counts_negatives_and_yolo_ids(tmp_path: Path) -> None:
    from resnet_tasks.data.formats.yolo import YoloDetectionDataModule
    from tests.conftest import make_yolo_roboflow as make_roboflow

    report = inspect_data(YoloDetectionDataModule(data_yaml=str(make_roboflow(tmp_path / "export")), batch_size=1))
    data = report.to_json()
    assert data["task"] == "detection"
    # The generator draws every image alike: both val images are train images too.
    assert sorted(Path(p["file"]).name for p in data["problems"]) == ["v0.jpg", "v1.jpg"]
    assert all(p["problem"].startswith("the same image as") for p in data["problems"])
    assert [(c["id"], c["name"], c["train"], c["val"]) for c in data["classes"]] == [
        (0, "cat", 1, 1), (1, "dog", 2, 0), (2, "bird", 1, 1)
    ]  # fmt: skip
    assert data["splits"]["train"] == {"images": 5, "negatives": 2, "instances": 4,
                                       "image_size": {"min": [80, 64], "max": [80, 64]}}  # fmt: skip
    assert set(data["splits"]) == {"train", "val"} and report.unused("val") == ["dog"]


def test_mask_folders_roboflow_and_camvid(tmp_path: Path) -> None:
    from resnet_tasks.data.formats.folders import SegmentationFolderDataModule
    from tests.conftest import CAMVID_CLASSES, make_camvid, make_roboflow_masks

    options = dict(batch_size=2, num_workers=0, crop_size=32, eval_size=None)
    roboflow = SegmentationFolderDataModule(
        root=str(make_roboflow_masks(tmp_path / "roboflow")), mask_suffix="_mask", ignore_index=0, **options
    )
    data = inspect_data(roboflow).to_json()  # x.jpg + x_mask.png in one folder: masks are not "in no split"
    assert data["task"] == "segmentation" and data["problems"] == []
    assert [(c["id"], c["name"]) for c in data["classes"]] == [(1, "cat"), (2, "dog")]  # pixel values
    assert data["splits"]["train"]["images"] == 6 and data["splits"]["val"]["images"] == 3
    camvid = SegmentationFolderDataModule(
        root=str(make_camvid(tmp_path / "camvid")), train_masks="trainannot", val_masks="valannot",
        class_names=CAMVID_CLASSES, ignore_index=11, **options,
    )  # fmt: skip
    data = inspect_data(camvid).to_json()
    assert data["problems"] == [] and [c["name"] for c in data["classes"]] == CAMVID_CLASSES
    assert all(c["train"] <= 6 for c in data["classes"]) and data["splits"]["val"]["images"] == 3


def test_binary_masks_read_with_void_255_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """0/255 masks (most tools' binary export) with the default void 255 leave nothing to learn: inspect says so and
    how to read them; read as the message says, the object is counted and nothing is void."""
    from resnet_tasks.data.formats.folders import SegmentationFolderDataModule

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            mask = np.zeros((32, 40), dtype=np.uint8)
            y, x = int(rng.integers(0, 16)), int(rng.integers(0, 20))
            mask[y : y + 12, x : x + 14] = 255
            Image.fromarray(np.dstack([mask] * 3)).save(tmp_path / split / f"crack_{i}.jpg")
            Image.fromarray(mask, mode="L").save(tmp_path / split / f"crack_{i}_mask.png")
    options = dict(root=str(tmp_path), mask_suffix="_mask", batch_size=2, num_workers=0, crop_size=32, eval_size=None)
    wrong = inspect_data(SegmentationFolderDataModule(class_names=["background", "crack"], **options))
    void = [problem for problem in wrong.problems if problem.kind == "void"]
    assert [problem.file for problem in void] == ["train split", "val split"] and not wrong.blocking
    assert "no mask holds an object class" in void[0].problem and "--data.ignore_index null" in void[0].problem
    assert void[0].problem.split(" and ")[1].startswith("13% of their pixels are void")  # 12 x 14 of 32 x 40
    said = capsys.readouterr().out  # training says it too, from its first masks, without reading them all
    assert "the first 4 training masks hold no object class" in said and "--data.ignore_index null" in said
    (tmp_path / "classes.csv").write_text("0,background\n255,crack")  # no trailing newline, as editors leave it
    right = inspect_data(SegmentationFolderDataModule(classes_file="classes.csv", ignore_index=None, **options))
    assert right.problems == [] and right.to_json()["classes"][1] == {"id": 255, "name": "crack", "train": 4, "val": 2}
    assert "no object class" not in capsys.readouterr().out


def test_csv_with_a_held_out_val_split(tmp_path: Path) -> None:
    from resnet_tasks.data.formats.csv import CsvClassificationDataModule
    from tests.conftest import make_csv_dataset

    data = inspect_data(CsvClassificationDataModule(
        root=str(make_csv_dataset(tmp_path)), train_csv="train.csv", image_column="file", label_column="species",
        crop_size=16, resize_size=20, batch_size=4, num_workers=0,
    )).to_json()  # fmt: skip
    assert data["task"] == "classification" and data["problems"] == []  # every photo is in train or val
    assert data["splits"]["train"]["images"] + data["splits"]["val"]["images"] == 18
    assert [c["train"] + c["val"] for c in data["classes"]] == [6, 6, 6]
