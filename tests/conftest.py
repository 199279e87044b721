"""Shared fixtures and helpers: tiny datasets in each real on-disk format (generators every test module may
import from here; no test module imports another) and an in-process runner for the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from resnet_tasks.data.masks import VOC_PALETTE
from resnet_tasks.labels import IGNORE_INDEX

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

COMMON_TRAINER_ARGS = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("blue", "green", "red"),
    per_class: int = 8,
    size: tuple[int, int] = (40, 48),
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """A learnable ImageFolder: each class is a noisy image whose dominant channel is the class colour."""
    rng = np.random.default_rng(seed)
    channel = {"red": 0, "green": 1, "blue": 2}
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = (rng.random((*size, 3)) * 120).astype(np.uint8)
                image[..., channel.get(name, index % 3)] += 120
                Image.fromarray(image).save(folder / f"{name}_{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `resnet-tasks ARGS` in this process; returns (exit code, stdout, stderr)."""
    from resnet_tasks.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        # Lightning's log handlers keep the stream they first saw; point them at this test's capture.
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.stream = sys.stderr  # not setStream(): it flushes the old, closed stream
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def read_metrics(out: str) -> dict[str, float]:
    """The metrics.json whose path the CLI printed in `out`."""
    for line in out.splitlines():
        if line.startswith("metrics written: "):
            return json.loads(Path(line.split(": ", 1)[1]).read_text())
    raise AssertionError(f"no metrics.json path printed in:\n{out}")


def printed_path(out: str, prefix: str) -> Path:
    """The path the CLI printed after `prefix` (e.g. 'predictions written: ')."""
    for line in out.splitlines():
        if line.startswith(prefix):
            return Path(line[len(prefix) :].strip())
    raise AssertionError(f"no line starting with {prefix!r} in:\n{out}")


# ----------------------------------------------------------------------------------------------- detection data
TINY_COCO_CATEGORIES = [{"id": 9, "name": "bird"}, {"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}]  # unsorted, gaps


def draw_boxes(size: tuple[int, int], boxes: list[list[float]], seed: int) -> np.ndarray:
    """Noise background with one bright filled rectangle per XYWH box (so a detector has something to see)."""
    height, width = size
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    for i, (x, y, w, h) in enumerate(boxes):
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(width, int(x + w)), min(height, int(y + h))
        image[y0:y1, x0:x1] = (200, 80 + 60 * (i % 3), 40)
    return image


# Per split: (file stem, (height, width), [(category id, XYWH box, iscrowd, area or None)]).
TINY_COCO: dict[str, list[tuple[str, tuple[int, int], list[tuple[int, list[float], int, float | None]]]]] = {
    "train2017": [
        ("t0", (64, 80), [(2, [4, 6, 30, 24], 0, None), (5, [40, 30, 28, 30], 0, None)]),
        ("t1", (80, 64), [(9, [10, 10, 40, 50], 0, None), (2, [0, 0, 64, 80], 1, 3000.0)]),  # + a crowd region
        ("t2", (64, 80), [(5, [20, 12, 36, 40], 0, None), (9, [70, 10, 0, 20], 0, None)]),  # + zero width
        ("t3", (64, 64), []),  # no objects
        ("t4", (64, 80), [(2, [60, 40, 40, 40], 0, None)]),  # extends past the border: clipped to 20 x 24
        ("t5", (80, 64), [(9, [8, 30, 44, 30], 0, None), (5, [2, 2, 20, 20], 0, None)]),
    ],
    "val2017": [
        ("v0", (64, 80), [(2, [6, 8, 28, 22], 0, 500.0), (5, [42, 28, 30, 30], 0, None)]),
        ("v1", (80, 64), [(9, [10, 12, 38, 48], 0, None), (2, [30, 50, 30, 28], 1, 700.0)]),  # crowd kept
        ("v2", (64, 64), []),  # no objects
        ("v3", (64, 80), [(5, [18, 10, 40, 42], 0, None), (2, [-5, -5, 3, 3], 0, None)]),  # dropped: no area inside
    ],
}


def make_tiny_coco(root: Path, splits: dict | None = None) -> Path:
    """A COCO-layout dataset with non-contiguous, unsorted category ids, crowd, empty and degenerate boxes."""
    splits = splits or TINY_COCO
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id, annotation_id = 100, 1
    for split, entries in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for stem, (height, width), objects in entries:
            image_id += 3  # non-contiguous image ids too
            Image.fromarray(draw_boxes((height, width), [o[1] for o in objects if not o[2]], image_id)).save(
                root / split / f"{stem}.jpg", quality=95
            )
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width})
            for category_id, box, crowd, area in objects:
                entry = {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": box,
                         "iscrowd": crowd, "area": area if area is not None else box[2] * box[3]}  # fmt: skip
                annotations.append(entry)
                annotation_id += 1
        data = {"images": images, "annotations": annotations, "categories": TINY_COCO_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data, indent=1))
    return root


def voc_xml(stem: str, size: tuple[int, int] | None, objects: list[tuple[str, list[int], int]]) -> str:
    parts = [f"<annotation><filename>{stem}.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def make_detection_voc(root: Path) -> Path:
    """VOC2007 (trainval, test) and VOC2012 (trainval) with difficult objects; 1-based inclusive boxes."""
    plan = {
        "2007": {"trainval": [("a", [("dog", [5, 5, 30, 30], 0), ("cat", [35, 10, 60, 40], 1)])],
                 "test": [("b", [("cat", [1, 1, 20, 20], 0), ("dog", [30, 30, 50, 60], 1)]), ("c", [])]},
        "2012": {"trainval": [("d", [("cat", [10, 10, 40, 50], 0)])]},
    }  # fmt: skip
    for year, sets in plan.items():
        base = root / "VOCdevkit" / f"VOC{year}"
        for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        for image_set, entries in sets.items():
            (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{s}\n" for s, _ in entries))
            for stem, objects in entries:
                Image.fromarray(draw_boxes((64, 72), [], 1)).save(base / "JPEGImages" / f"{stem}.jpg")
                # image "c" has no <size>: read from the JPEG header
                size = None if stem == "c" else (64, 72)
                (base / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem, size, objects))
    return root


# ----------------------------------------------------------------------------------------------- a tiny detector
DETECTION_QUICKSTART = "configs/quickstart/detection.yaml"
# CLI arguments that keep a detection run on 64-96 px images to seconds on a CPU.
SMALL_DETECTOR = [
    "--data.batch_size", "2", "--data.num_workers", "0", "--model.min_size", "64", "--model.max_size", "96",
    "--model.anchor_sizes", "[[8], [16], [32], [64], [128]]", "--model.rpn_pre_nms_top_n_test", "200",
    "--model.rpn_post_nms_top_n_test", "100",
]  # fmt: skip
# An untrained detector scores every class low: keep all its boxes (metrics then compare more than two zeros).
ALL_BOXES = ["--model.box_score_thresh", "0.0"]


# ----------------------------------------------------------------------------------------------- YOLO data
YOLO_ROBOFLOW_YAML = """train: ../train/images
val: ../valid/images
test: ../test/images

nc: 3
names: ['cat', 'dog', 'bird']

roboflow:
  workspace: me
  version: 1
"""


def write_image(path: Path, size: tuple[int, int] = (80, 64), orientation: int | None = None) -> Path:
    """A JPEG (or PNG, by suffix) of `size` (width, height) with a bright square, optionally EXIF-rotated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), 40, dtype=np.uint8)
    pixels[size[1] // 4 : size[1] * 3 // 4, size[0] // 4 : size[0] * 3 // 4] = (220, 90, 40)
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    Image.fromarray(pixels).save(path, **extra)
    return path


def write_labels(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_yolo_roboflow(root: Path, yaml_text: str = YOLO_ROBOFLOW_YAML) -> Path:
    """A Roboflow YOLO export: data.yaml beside train/ and valid/ (no test/ although the yaml names it)."""
    train, valid = root / "train", root / "valid"
    for stem in ("a", "b", "empty", "nolabel", "poly"):
        write_image(train / "images" / f"{stem}.jpg")
    write_labels(train / "labels" / "a.txt", "0 0.5 0.5 0.5 0.25\n2 0.25 0.25 0.1 0.125\n")
    write_labels(train / "labels" / "b.txt", "1 0.5 0.5 1 1\n\n")
    write_labels(train / "labels" / "empty.txt", "")
    write_labels(train / "labels" / "poly.txt", "1 0.1 0.2 0.5 0.25 0.4 0.75\n")
    for stem, row in (("v0", "0 0.5 0.5 0.9 0.9"), ("v1", "2 0.5 0.5 0.5 0.5")):
        write_image(valid / "images" / f"{stem}.jpg")
        write_labels(valid / "labels" / f"{stem}.txt", row + "\n")
    (root / "data.yaml").write_text(yaml_text)
    return root / "data.yaml"


# ----------------------------------------------------------------------------------------------- VOC segmentation data
VOC_NUM_CLASSES = 21


def write_palette_png(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(mask.astype(np.uint8))
    picture.putpalette(VOC_PALETTE)
    picture.save(path)


def voc_scene(rng: np.random.Generator, height: int, width: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with one coloured rectangle per object and its mask (class id inside, 255 on the outline)."""
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(2):
        label = int(rng.integers(1, num_classes))
        y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        y1, x1 = y0 + int(rng.integers(8, height // 2)), x0 + int(rng.integers(8, width // 2))
        image[y0:y1, x0:x1] = (37 * label % 256, 91 * label % 256, 53 * label % 256)
        mask[y0:y1, x0:x1] = label
        mask[y0, x0:x1] = IGNORE_INDEX
    return image, mask


def make_segmentation_voc(
    root: Path,
    num_train: int = 6,
    num_val: int = 5,
    sizes: tuple[tuple[int, int], ...] = ((48, 64), (64, 48), (56, 56)),
    num_classes: int = VOC_NUM_CLASSES,
    seed: int = 0,
) -> Path:
    """A VOC2012 segmentation layout under `root` (JPEG images, palette PNG masks, split lists)."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    for index in range(num_train + num_val):
        split = "train" if index < num_train else "val"
        stem = f"2007_{index:06d}"
        height, width = sizes[index % len(sizes)]
        image, mask = voc_scene(rng, height, width, num_classes)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{stem}.jpg", quality=95)
        write_palette_png(mask, voc / "SegmentationClass" / f"{stem}.png")
        splits[split].append(stem)
    for split, stems in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


# ----------------------------------------------------------------------------------------------- COCO segmentation data
COCO_SEGMENTATION_CATEGORIES = [
    {"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 11, "name": "fire hydrant"},
    {"id": 18, "name": "dog"}, {"id": 19, "name": "horse"}, {"id": 20, "name": "sheep"}, {"id": 21, "name": "cow"},
    {"id": 44, "name": "bottle"}, {"id": 88, "name": "teddy bear"},
]  # fmt: skip


def polygon_box(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rle_of(height: int, width: int, rows: slice, cols: slice, compressed: bool) -> dict:
    """An RLE of a rectangle: COCO's crowd form (uncompressed `counts` list) or a compressed string."""
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[rows, cols] = 1
    if compressed:
        rle = mask_utils.encode(mask)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [height, width], "counts": counts}


# Per image: (file stem, height, width, [(category id, segmentation, iscrowd, area field)]).
def coco_segmentation_scenes() -> list[tuple[str, int, int, list[tuple[int, object, int, float]]]]:
    return [
        ("overlaps", 40, 56, [
            (1, polygon_box(4, 4, 24, 24), 0, 400.0),                       # person
            (1, polygon_box(18, 2, 28, 12), 0, 100.0),                      # a second person over the first: 255
            (3, polygon_box(16, 10, 36, 30), 0, 400.0),                     # car over the person: 255
            (18, rle_of(40, 56, slice(5, 20), slice(40, 52), compressed=True), 0, 180.0),  # dog, compressed RLE
            (11, polygon_box(36, 8, 50, 16), 0, 112.0),   # fire hydrant (not VOC) over the dog: dropped
            (1, rle_of(40, 56, slice(28, 38), slice(2, 14), compressed=False), 1, 120.0),  # crowd of people
            (44, [[10, 30, 20, 30, 15, 38], [22, 30, 30, 30, 26, 39.5]], 0, 75.0),  # bottle in two parts
            (44, polygon_box(12.5, 33.2, 16.7, 39.0), 0, 24.0),             # bottle over the crowd: 255
        ]),
        ("empty", 48, 40, []),
        ("only_other", 48, 40, [(88, polygon_box(2, 2, 38, 46), 0, 1584.0)]),          # teddy bear only: background
        ("at_threshold", 40, 56, [(21, polygon_box(5.5, 5.5, 45.5, 30.5), 0, 1000.0)]),  # cow, area exactly 1000
        ("crowd_counts", 40, 56, [
            (19, polygon_box(2, 2, 30, 27), 0, 700.0),                      # horse
            (20, rle_of(40, 56, slice(20, 40), slice(28, 48), compressed=False), 1, 400.0),  # crowd of sheep
        ]),
    ]  # fmt: skip


def make_tiny_coco_segmentation(root: Path, splits: tuple[str, ...] = ("train2017", "val2017"), seed: int = 0) -> Path:
    """COCO layout with VOC and non-VOC categories, polygons, both RLE forms, overlaps, crowd and empty images."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for image_id, (stem, height, width, objects) in enumerate(coco_segmentation_scenes(), start=1):
            pixels = (rng.random((height, width, 3)) * 200 + 20).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / f"{stem}.jpg", quality=92)
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width})
            for category_id, segmentation, crowd, area in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                    "segmentation": segmentation, "iscrowd": crowd, "area": area, "bbox": [0, 0, 1, 1],
                })  # fmt: skip
        data = {"images": images, "annotations": annotations, "categories": COCO_SEGMENTATION_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


# ----------------------------------------------------------------------------------------------- mask folders
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "person", "bicycle"]


CAMVID_VOID = 11


def mask_scene(rng: np.random.Generator, values: list[int], void: int, size: tuple[int, int] = (36, 44)) -> tuple:
    """An image with rectangles coloured by class and its mask holding `values` (and `void` along one edge)."""
    height, width = size
    image = np.full((height, width, 3), 30, dtype=np.uint8)
    mask = np.full((height, width), values[0], dtype=np.uint8)
    for _ in range(2):
        value = values[int(rng.integers(1, len(values)))]
        y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        mask[y0 : y0 + height // 3, x0 : x0 + width // 3] = value
        image[y0 : y0 + height // 3, x0 : x0 + width // 3] = (70 * value % 256, 40 * value % 256, 90)
    mask[:, 0] = void
    return image, mask


def make_camvid(root: Path, splits: dict[str, int] | None = None) -> Path:
    """CamVid's SegNet layout: `train/` + `trainannot/`, `val/` + `valannot/`, grey PNG masks with void 11."""
    rng = np.random.default_rng(0)
    for split, count in (splits or {"train": 6, "val": 3}).items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            image, mask = mask_scene(rng, list(range(len(CAMVID_CLASSES))), CAMVID_VOID)
            Image.fromarray(image).save(root / split / f"0001TP_{i:06d}.png")
            Image.fromarray(mask, mode="L").save(root / f"{split}annot" / f"0001TP_{i:06d}.png")
    return root


def make_roboflow_masks(root: Path, splits: dict[str, int] | None = None) -> Path:
    """Roboflow's "Semantic Segmentation Masks" export: `x.jpg` + `x_mask.png` + `_classes.csv` per split folder;
    pixel value 0 is unlabelled."""
    rng = np.random.default_rng(1)
    for split, count in (splits or {"train": 6, "valid": 3}).items():
        folder = root / split
        folder.mkdir(parents=True)
        (folder / "_classes.csv").write_text("Pixel Value, Class\n0, background\n1, cat\n2, dog\n")
        for i in range(count):
            image, mask = mask_scene(rng, [0, 1, 2], 0)
            stem = f"img{i}_jpg.rf.{i:04x}"
            Image.fromarray(image).save(folder / f"{stem}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(folder / f"{stem}_mask.png")
    return root


# ----------------------------------------------------------------------------------------------- CIFAR data
def write_cifar10(root: Path, train: int = 60, test: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = train // 5
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}  # fmt: skip
        with open(folder / f"data_batch_{i}", "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": rng.integers(0, 255, (test, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, test).tolist()}, handle)  # fmt: skip
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return root


# ----------------------------------------------------------------------------------------------- CSV data
CSV_COLOURS = {"red": 0, "green": 1, "blue": 2}


def make_csv_dataset(root: Path, per_class: int = 6) -> Path:
    """`root/data/` holding `train.csv` (columns file,species; no trailing newline) whose paths start with `../`
    into `root/photos/`; a learnable colour per class."""
    rng = np.random.default_rng(0)
    (root / "photos").mkdir(parents=True)
    (root / "data").mkdir()
    rows = []
    for name, channel in CSV_COLOURS.items():
        for i in range(per_class):
            image = (rng.random((24, 28, 3)) * 100).astype(np.uint8)
            image[..., channel] += 150
            Image.fromarray(image).save(root / "photos" / f"{name}{i}.jpg", quality=95)
            rows.append(f"../photos/{name}{i}.jpg,{name}")
    (root / "data" / "train.csv").write_text("file,species\n" + "\n".join(rows))
    return root / "data"


# ----------------------------------------------------------------------------------------------- CLI flows
def fit_one_step_then_evaluate(run_cli: Callable, args: list[str], tmp_path: Path) -> dict[str, str]:
    """`fit` one step with `args`, then `validate`, `test` and `predict` with its last checkpoint as `--model.weights`;
    the output of each command, by name (each run in `tmp_path / command`)."""
    code, out, err = run_cli("fit", *args, "--trainer.max_steps", "1", "--trainer.max_epochs", "1",
                             "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir",
                             str(tmp_path / "fit"))  # fmt: skip
    assert code == 0, err
    outputs = {"fit": out}
    weights = ["--model.weights", str(next((tmp_path / "fit").rglob("last.ckpt")))]
    for command in ("validate", "test", "predict"):
        code, out, err = run_cli(command, *args, *weights, "--trainer.default_root_dir", str(tmp_path / command))
        assert code == 0, err
        outputs[command] = out
    return outputs


def cocoeval_stats(annotation_file: Path, results_file: Path) -> list[float]:
    """pycocotools' COCOeval box summary of `results_file` on `annotation_file` (mAP, mAP@0.5, mAP@0.75, ...)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(results_file)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(value) for value in evaluator.stats]


def assert_one_clear_error(code: int, err: str, *must_contain: str) -> str:
    """Exit 2, exactly one `error:` line containing every fragment, and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in must_contain:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ small runs of each task
# Through the CLI with `--data.root` added by the test (DDP, precision, test-time augmentation).
CLASSIFICATION_RUN = [
    "--config", "configs/classification/imagenet_resnet50.yaml", "--model.backbone.name", "resnet18",
    "--model.optimizer.lr", "0.01", "--data.crop_size", "32", "--data.resize_size", "36",
    "--data.batch_size", "4", "--data.num_workers", "0",
]  # fmt: skip
DETECTION_RUN = [
    "--config", "configs/quickstart/detection.yaml", "--data.batch_size", "4", "--data.num_workers", "0",
    "--model.min_size", "64", "--model.max_size", "64", "--model.anchor_sizes", "[[8], [16], [32], [64], [128]]",
    "--model.rpn_pre_nms_top_n_test", "200", "--model.rpn_post_nms_top_n_test", "100",
    # An almost untrained detector scores low: keep every box so that the mAPs are not all zero.
    "--model.box_score_thresh", "0.0", "--model.scheduler.warmup_steps", "0", "--trainer.max_time", "null",
]  # fmt: skip
SEGMENTATION_RUN = [
    "--config", "configs/quickstart/segmentation.yaml", "--data.batch_size", "4", "--data.num_workers", "0",
    "--data.crop_size", "64", "--trainer.check_val_every_n_epoch", "1",
]  # fmt: skip


# ------------------------------------------------------------------------------------------ processes and clusters
REPO = Path(__file__).resolve().parents[1]
# A generous bound: a DDP job that loses a rank would otherwise wait for gloo's 30-minute timeout.
DDP_TIMEOUT_S = 300


def clean_environment() -> dict[str, str]:
    """This environment minus any launcher/cluster variables (Lightning would join that job instead)."""
    prefixes = ("SLURM_", "TORCHELASTIC_", "PL_", "LSB_", "OMPI_", "PMI_")
    names = {"LOCAL_RANK", "RANK", "GROUP_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "JSM_NAMESPACE_SIZE"}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def metrics_in(root_dir: Path) -> dict[str, float]:
    """The metrics.json of the single run under `root_dir`."""
    (path,) = root_dir.glob("lightning_logs/version_*/metrics.json")
    return json.loads(path.read_text())


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run no faster on 2 threads, and on a busy machine 2 threads spin-wait for each other (4x slower).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_scontrol(folder: Path) -> Path:
    """An `scontrol` that appends its arguments to `folder/scontrol.log`; returns that log's path."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "scontrol.log"
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def sigterm_at(step: int) -> Any:
    """A Lightning callback that sends this process SIGTERM after optimizer step `step` (as a cluster scheduler would).

    Lightning is imported here, not when pytest loads this file: its log handlers would keep pytest's start-up
    stream, which is closed by the time the CLI tests log."""
    import lightning as L

    class SigtermAt(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    return SigtermAt()


# ----------------------------------------------------------------------------------------------- detection metrics
def random_detection_case(seed: int) -> tuple[list[dict], list[dict]]:
    """(predictions, targets) for a detection metric: 24 images of 300x300 px with small/medium/large objects, crowd
    regions, empty images and images without detections; coordinates on a 1/4-pixel grid (exact in float32, so both
    sides see identical numbers)."""
    rng = np.random.default_rng(seed)
    targets, preds = [], []
    for image in range(24):
        count = 0 if image % 7 == 3 else int(rng.integers(1, 6))
        sizes = rng.choice([12, 40, 130], size=count) * rng.uniform(0.7, 1.3, size=count)
        xy = rng.uniform(0, 150, size=(count, 2))
        boxes = np.concatenate([xy, xy + sizes[:, None] * rng.uniform(0.6, 1.4, size=(count, 2))], axis=1)
        boxes = np.round(np.clip(boxes, 0, 300) * 4) / 4
        labels = rng.choice([1, 3, 8], size=count)
        crowd = (rng.random(count) < 0.15).astype(np.int64)
        # COCO's area is a segment area: smaller than the box, which moves objects between size buckets.
        area = np.round((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * rng.uniform(0.5, 1.0, count))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64), "iscrowd": torch.tensor(crowd),
                        "area": torch.tensor(area, dtype=torch.float32)})  # fmt: skip
        if image % 5 == 4:  # no detections at all for this image
            preds.append({"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0),
                          "labels": torch.zeros(0, dtype=torch.int64)})  # fmt: skip
            continue
        jitter = rng.normal(0, 4, size=boxes.shape)
        det = np.concatenate([boxes + jitter, rng.uniform(0, 200, size=(3, 2)).repeat(2, axis=1) + [0, 0, 30, 30]])
        det = np.round(np.clip(det, 0, 300) * 4) / 4
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.25)
        det_labels = np.concatenate([labels, rng.choice([1, 3, 8, 5], size=3)])  # 5: a class with no ground truth
        det_labels[rng.random(len(det_labels)) < 0.1] = 3
        scores = np.round(rng.random(len(det)), 4)
        preds.append({"boxes": torch.tensor(det, dtype=torch.float32), "labels": torch.tensor(det_labels),
                      "scores": torch.tensor(scores, dtype=torch.float32)})  # fmt: skip
    return preds, targets
