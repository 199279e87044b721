"""Detection data: COCO / VOC parsing into compact arrays, targets, crowd / difficult / degenerate boxes, errors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_tasks.data.detection import DetectionAnnotations, detection_collate
from resnet_tasks.data.formats.coco import CocoDetectionDataModule
from resnet_tasks.data.formats.voc import VOCDetectionDataModule, parse_split
from resnet_tasks.data.sampling import AspectRatioBatchSampler, TrainSampler, aspect_ratio_groups
from resnet_tasks.errors import UserError
from tests.conftest import make_detection_voc as make_tiny_voc
from tests.conftest import make_tiny_coco


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
    assert image.dtype == torch.uint8 and image.shape == (3, 80, 64)  # pixels / 255 after the transfer
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
    with pytest.raises(UserError, match=r"No COCO dataset(.|\n)*instances_val2017\.json(.|\n)*Roboflow(.|\n)*CVAT"):
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
