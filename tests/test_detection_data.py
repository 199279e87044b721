"""Detection data: COCO / VOC parsing into compact arrays, targets, crowd / difficult / degenerate boxes, errors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_tasks.data.detection import DetectionAnnotations, detection_collate
from resnet_tasks.data.formats.coco import CocoDetectionDataModule
from resnet_tasks.data.formats.voc import VOCDetectionDataModule, parse_split
from resnet_tasks.data.sampling import AspectRatioBatchSampler, TrainSampler, aspect_ratio_groups
from resnet_tasks.errors import UserError

CATEGORIES = [{"id": 9, "name": "bird"}, {"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}]  # unsorted, gaps


def _draw(size: tuple[int, int], boxes: list[list[float]], seed: int) -> np.ndarray:
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
            Image.fromarray(_draw((height, width), [o[1] for o in objects if not o[2]], image_id)).save(
                root / split / f"{stem}.jpg", quality=95
            )
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width})
            for category_id, box, crowd, area in objects:
                entry = {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": box,
                         "iscrowd": crowd, "area": area if area is not None else box[2] * box[3]}  # fmt: skip
                annotations.append(entry)
                annotation_id += 1
        data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data, indent=1))
    return root


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("coco"))


def _module(root: Path, **kwargs) -> CocoDetectionDataModule:
    options = {"batch_size": 2, "num_workers": 0}
    options.update(kwargs)
    return CocoDetectionDataModule(root=str(root), **options)


def test_label_space_is_sorted_category_ids_with_background_placeholder(tiny_coco: Path) -> None:
    data = _module(tiny_coco)
    assert data.num_classes == 4  # background included, as the model counts its outputs
    assert data.label_space.class_names == ("background", "cat", "dog", "bird") and data.label_space.background
    assert data.label_space.category_ids == (-1, 2, 5, 9)  # the background has no dataset id
    data.setup("validate")
    _, target = data.dataset("val")[0]
    assert target["category_ids"].tolist() == [(-1, 2, 5, 9)[label] for label in target["labels"].tolist()]


def test_val_targets_keep_crowd_empty_images_and_report_fixed_boxes(tiny_coco: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _module(tiny_coco)
        data.setup("validate")
    assert any("dropped 1 degenerate" in str(w.message) for w in caught)
    dataset = data.dataset("val")
    image, target = dataset[1]  # v1: one object + one crowd region, both kept for evaluation
    assert image.dtype == torch.float32 and image.shape == (3, 80, 64) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [3, 1] and target["iscrowd"].tolist() == [0, 1]
    assert target["boxes"][0].tolist() == [10, 12, 48, 60]  # XYWH -> XYXY
    assert target["area"].tolist() == [38 * 48, 700.0]  # COCO's area, not the box's
    assert target["orig_size"].tolist() == [80, 64] and target["image_key"] == 124 and target["image_id"] == 124
    image, target = dataset[2]  # no objects: N = 0 with the right shapes and dtypes
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    _, target = dataset[3]  # the box entirely outside the image is gone
    assert target["labels"].tolist() == [2]


def test_training_targets_drop_crowd_and_degenerate_and_clip(tiny_coco: Path) -> None:
    data = _module(tiny_coco, hflip_prob=0.0)
    data.setup("fit")
    annotations = data.annotations("train2017")
    assert annotations.dropped_boxes == 1 and annotations.clipped_boxes == 1  # t2's zero width; t4
    train = data.dataset("train")
    # t3 has no objects: left out of training by default (torchvision's recipe), kept on request
    assert len(train) == 5
    keys = [train[i][1]["image_key"] for i in range(len(train))]
    _, t1 = train[keys.index(106)]
    assert t1["labels"].tolist() == [3] and t1["iscrowd"].tolist() == [0]  # crowd region out of training
    _, t2 = train[keys.index(109)]
    assert t2["labels"].tolist() == [2]  # zero-width box dropped
    _, t4 = train[keys.index(115)]
    assert t4["boxes"].tolist() == [[60, 40, 80, 64]]  # clipped to the image
    data = _module(tiny_coco, remove_images_without_annotations=False)
    data.setup("fit")
    train = data.dataset("train")
    assert len(train) == 6
    _, empty = train[3]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_horizontal_flip_moves_boxes_with_the_image(tiny_coco: Path) -> None:
    data = _module(tiny_coco, hflip_prob=1.0)
    data.setup("fit")
    image, target = data.dataset("train")[0]  # t0, width 80
    expected = torch.tensor([[46.0, 6, 76, 30], [12, 30, 40, 60]])
    assert torch.allclose(target["boxes"], expected, atol=1e-3)  # albumentations works in normalised floats
    assert image[0, 10, 70] > 0.7  # the bright rectangle is now on the right


def test_annotations_are_compact_arrays_without_json_objects(tiny_coco: Path) -> None:
    data = _module(tiny_coco)
    data.setup("fit")
    for dataset in (data.dataset("train"), data.dataset("val")):
        annotations = dataset.annotations
        assert isinstance(annotations, DetectionAnnotations)
        for name, value in vars(annotations).items():
            assert isinstance(value, (np.ndarray, str, int, bool)), (name, type(value))
        assert annotations.file_names.dtype.kind == "S" and annotations.boxes.dtype == np.float32
        assert annotations.labels.dtype == np.int64 and annotations.crowd.dtype == np.uint8
        assert len(annotations.offsets) == len(annotations) + 1
    assert not any(isinstance(v, (dict, list)) and len(v) > 8 for v in vars(data.dataset("train")).values())


def test_grouped_batches_share_an_aspect_ratio_group_and_have_equal_counts() -> None:
    widths = np.array([80, 64] * 9 + [80])
    heights = np.array([64, 80] * 9 + [64])
    groups = aspect_ratio_groups(widths, heights, 3)
    assert len(set(groups.tolist())) == 2
    for world_size in (1, 2):
        lengths = []
        for rank in range(world_size):
            sampler = TrainSampler(len(widths), shuffle=True, seed=0)
            sampler.rank, sampler.world_size = rank, world_size
            sampler.num_samples = -(-len(widths) // world_size)
            batches = AspectRatioBatchSampler(sampler, groups, batch_size=3)
            batches.set_epoch(1)
            assert sampler.epoch == 1
            emitted = list(batches)
            assert len(emitted) == len(batches) == sampler.num_samples // 3
            assert all(len(b) == 3 and len({int(groups[i]) for i, _ in b}) == 1 for b in emitted)
            assert {i for i, _ in sum(emitted, [])} <= set(sampler.indices())
            # Resuming at batch 2 of epoch 1 gives exactly the batches an uninterrupted pass gives from there.
            again = AspectRatioBatchSampler(sampler, groups, batch_size=3)
            again.load_state_dict({"epoch": 1, "batches_done": 2})
            assert list(again) == emitted[2:]
            assert again.state_dict() == {"epoch": 1, "batches_done": len(emitted)}
            lengths.append(len(emitted))
        assert len(set(lengths)) == 1


def test_train_loader_batches_and_collates(tiny_coco: Path) -> None:
    data = _module(tiny_coco)
    data.setup("fit")
    images, targets = next(iter(data.train_dataloader()))
    assert len(images) == len(targets) == 2
    assert {tuple(i.shape[1:]) for i in images} in ({(64, 80)}, {(80, 64)})  # one aspect-ratio group
    images, targets = detection_collate([data.dataset("val")[0], data.dataset("val")[2]])
    assert isinstance(images, list) and targets[1]["boxes"].shape == (0, 4)


def test_missing_annotation_file_names_it_and_shows_the_layout(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    with pytest.raises(UserError, match=r"No COCO dataset found(.|\n)*instances_val2017\.json(.|\n)*Roboflow(.|\n)*CVAT"):
        _module(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        _module(tmp_path / "nowhere")


def test_missing_image_folder_is_a_user_error(tiny_coco: Path, tmp_path: Path) -> None:
    root = make_tiny_coco(tmp_path / "coco")
    (root / "train2017").rename(root / "elsewhere")
    data = _module(root)
    with pytest.raises(UserError, match=r"Missing COCO image folder .*train2017"):
        data.setup("fit")


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    root = make_tiny_coco(tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    path.write_text('{\n  "images": [],\n  "annotations": [}\n')
    with pytest.raises(UserError, match=r"instances_val2017\.json.*line 3, column 19"):
        _module(root)


def test_unknown_category_names_the_image_and_the_id(tmp_path: Path) -> None:
    root = make_tiny_coco(tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 42
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"image v0\.jpg .*category id 42"):
        _module(root).setup("validate")


def test_unreadable_image_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    root = make_tiny_coco(tmp_path)
    (root / "val2017" / "v0.jpg").write_bytes(b"not a jpeg")
    data = _module(root)
    data.setup("validate")
    with pytest.raises(UserError, match=r"v0\.jpg"):
        data.dataset("val")[0]


def test_predict_folder_needs_no_root(tiny_coco: Path) -> None:
    data = CocoDetectionDataModule(predict_path=str(tiny_coco / "val2017"), num_workers=0, batch_size=2)
    assert data.num_classes is None
    data.setup("predict")
    images, targets = next(iter(data.predict_dataloader()))
    assert [t["image_key"] for t in targets] == ["v0", "v1"] and images[0].shape == (3, 64, 80)


# --------------------------------------------------------------------------------------------------- VOC
def _voc_xml(stem: str, size: tuple[int, int] | None, objects: list[tuple[str, list[int], int]]) -> str:
    parts = [f"<annotation><filename>{stem}.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def make_tiny_voc(root: Path) -> Path:
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
                Image.fromarray(_draw((64, 72), [], 1)).save(base / "JPEGImages" / f"{stem}.jpg")
                # image "c" has no <size>: read from the JPEG header
                size = None if stem == "c" else (64, 72)
                (base / "Annotations" / f"{stem}.xml").write_text(_voc_xml(stem, size, objects))
    return root


def test_voc_splits_difficult_and_pixel_convention(tmp_path: Path) -> None:
    root = make_tiny_voc(tmp_path)
    assert parse_split("2007-trainval+2012-trainval") == [("2007", "trainval"), ("2012", "trainval")]
    data = VOCDetectionDataModule(root=str(root), class_names=["cat", "dog"], batch_size=1, num_workers=0,
                                  hflip_prob=0.0)  # fmt: skip
    assert data.num_classes == 3 and data.label_space.category_ids == (-1, 1, 2)
    assert data.label_space.class_names == ("background", "cat", "dog")
    data.setup("fit")
    train = data.dataset("train")
    assert len(train) == 2  # a (07) + d (12)
    _, target = train[0]
    assert target["labels"].tolist() == [2]  # the difficult cat is out of the training target
    assert target["boxes"].tolist() == [[4, 4, 30, 30]]  # 1-based inclusive -> 0-based continuous
    val = data.dataset("val")
    _, target = val[0]
    assert target["labels"].tolist() == [1, 2] and target["difficult"].tolist() == [0, 1]
    assert target["image_key"] == "b"
    _, target = val[1]
    assert target["boxes"].shape == (0, 4) and val.annotations.widths[1] == 72
    assert data.evaluation_style == "voc"


def test_voc_errors(tmp_path: Path) -> None:
    root = make_tiny_voc(tmp_path)
    with pytest.raises(UserError, match="YEAR-SET"):
        VOCDetectionDataModule(root=str(root), train_split="2007trainval")
    data = VOCDetectionDataModule(root=str(root), num_workers=0)  # the 20 VOC classes: no "cat"/"dog" spelling
    data.setup("validate")  # b holds "cat" and "dog", both VOC classes
    bad = root / "VOCdevkit" / "VOC2007" / "Annotations" / "b.xml"
    bad.write_text(bad.read_text().replace("<name>cat</name>", "<name>unicorn</name>"))
    data = VOCDetectionDataModule(root=str(root), num_workers=0)
    with pytest.raises(UserError, match=r"b\.xml.*unicorn"):
        data.setup("validate")
    bad.write_text("<annotation><object>")
    data = VOCDetectionDataModule(root=str(root), num_workers=0)
    with pytest.raises(UserError, match=r"Malformed VOC annotation .*b\.xml"):
        data.setup("validate")
    data = VOCDetectionDataModule(root=str(root), num_workers=0, val_split="2009-test")
    with pytest.raises(UserError, match=r"VOC2009.*test\.txt"):
        data.setup("validate")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
