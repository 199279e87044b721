"""PASCAL VOC detection data (XML annotations): splits such as "2007-trainval+2012-trainval", difficult objects
out of training targets and ignored in evaluation, as in the VOC devkit."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_tasks.data.common import image_size_hw, stems_from_list
from resnet_tasks.data.detection import AnnotationBuilder, DetectionAnnotations, DetectionDataModule
from resnet_tasks.errors import UserError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

VOC_LAYOUT = """Expected VOC layout under --data.root:
  VOCdevkit/VOC2007/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<set>.txt}
  VOCdevkit/VOC2012/... (same)
Splits are YEAR-SET joined by '+', e.g. --data.train_split 2007-trainval+2012-trainval."""


def parse_split(split: str) -> list[tuple[str, str]]:
    """'2007-trainval+2012-trainval' -> [('2007', 'trainval'), ('2012', 'trainval')]."""
    parts = []
    for part in split.split("+"):
        year, _, image_set = part.strip().partition("-")
        if not year or not image_set:
            raise UserError(
                f"VOC split {split!r}: each part must read YEAR-SET, e.g. 2007-trainval+2012-trainval or 2007-test."
            )
        parts.append((year, image_set))
    return parts


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise UserError(f"VOC annotation {path} lacks <{tag}> in <{node.tag}>. Fix or re-download the file.")
    return child.text.strip()


def parse_voc_xml(
    path: Path, label_of: dict[str, int]
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """(height, width, boxes, labels, difficult) of one VOC XML; height/width 0 when <size> is absent.

    VOC coordinates are 1-based inclusive pixel indices; boxes come back as continuous 0-based XYXY
    (xmin - 1, ymin - 1, xmax, ymax), so width = xmax - xmin + 1 as the devkit counts it.
    """
    try:
        tree = ET.parse(path)
    except ET.ParseError as error:
        line, column = error.position
        raise UserError(f"Malformed VOC annotation {path}: {error.msg} (line {line}, column {column}).") from None
    except OSError as error:
        raise UserError(f"Cannot read VOC annotation {path}: {error.strerror or error}.\n{VOC_LAYOUT}") from None
    root = tree.getroot()
    size = root.find("size")
    height = width = 0
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width, height = int(float(_text(size, "width", path))), int(float(_text(size, "height", path)))
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        if name not in label_of:
            raise UserError(
                f"VOC annotation {path} has an object named {name!r}, which is not among the classes "
                f"{sorted(label_of)}. Fix the file or pass --data.class_names."
            )
        box = obj.find("bndbox")
        if box is None:
            raise UserError(f"VOC annotation {path}: object {name!r} has no <bndbox>.")
        try:
            xmin, ymin, xmax, ymax = (float(_text(box, tag, path)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise UserError(f"VOC annotation {path}: object {name!r} has a non-numeric <bndbox>.") from None
        flag = obj.find("difficult")
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
        labels.append(label_of[name])
        difficult.append(int(flag.text.strip()) if flag is not None and flag.text else 0)
    return (
        height,
        width,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=np.uint8),
    )


def load_voc_split(root: Path, split: str, class_names: Sequence[str]) -> DetectionAnnotations:
    """Compact annotations for a (possibly combined) VOC split; image ids are positions, results use stems."""
    label_of = {name: label for label, name in enumerate(class_names, start=1)}
    devkit = root / "VOCdevkit"
    builder = AnnotationBuilder(root=str(root), source=f"VOC split {split}", string_ids=True)
    for year, image_set in parse_split(split):
        folder = devkit / f"VOC{year}"
        listing = folder / "ImageSets" / "Main" / f"{image_set}.txt"
        if not listing.is_file():
            raise UserError(f"Missing VOC image list {listing} (split {split!r}).\n{VOC_LAYOUT}")
        for stem in stems_from_list(listing):
            xml = folder / "Annotations" / f"{stem}.xml"
            if not xml.is_file():
                raise UserError(f"Missing VOC annotation {xml} (listed in {listing}).\n{VOC_LAYOUT}")
            height, width, boxes, labels, difficult = parse_voc_xml(xml, label_of)
            relative = f"VOCdevkit/VOC{year}/JPEGImages/{stem}.jpg"
            if height <= 0 or width <= 0:
                # Header read only (no decode): the size is needed to clip boxes and group aspect ratios.
                height, width = image_size_hw(root / relative)
            builder.add_image(
                file_name=relative,
                image_id=len(builder.image_ids),
                height=height,
                width=width,
                boxes_xyxy=boxes,
                labels=labels,
                crowd=np.zeros(len(labels), dtype=np.uint8),
                difficult=difficult,
                areas=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            )
    return builder.build()


class VOCDetectionDataModule(DetectionDataModule):
    """PASCAL VOC detection: 07+12 trainval -> 07 test by default, the VOC07 11-point metric next to COCO's.

    Labels 1..K follow `class_names` (default: the 20 VOC classes); VOC has no category ids, so results use
    the label as `category_id` and the file stem as `image_id`.
    """

    evaluation_style = "voc"

    def __init__(
        self,
        train_split: str = "2007-trainval+2012-trainval",
        val_split: str = "2007-test",
        test_split: str = "2007-test",
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_split=train_split, val_split=val_split, test_split=test_split, **kwargs)
        names = list(class_names or VOC_CLASSES)
        self.set_label_space(names, range(1, len(names) + 1))
        for split in (self.train_split, self.val_split, self.test_split):
            parse_split(split)  # bad split strings fail at once, not after the first epoch

    def load_split(self, split: str) -> DetectionAnnotations:
        root = self.require_root()
        if not (root / "VOCdevkit").is_dir():
            raise UserError(f"Missing folder {root / 'VOCdevkit'}.\n{VOC_LAYOUT}")
        return load_voc_split(root, split, self.label_space.object_names)
