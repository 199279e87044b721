"""PASCAL VOC detection data (XML annotations) in the VOCdevkit, Roboflow and LabelImg / CVAT layouts: difficult
objects out of training targets and ignored in evaluation, as in the VOC devkit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from resnet_tasks.data.detection import DetectionDataModule
from resnet_tasks.data.detection_annotations import AnnotationBuilder, DetectionAnnotations
from resnet_tasks.data.formats.voc_files import (
    VocLayout,
    VocRecord,
    find_voc_layout,
    parse_split,
    read_voc_xml,
)
from resnet_tasks.data.io import image_size_hw
from resnet_tasks.data.splitting import tell
from resnet_tasks.errors import UserError

__all__ = ["VOC_CLASSES", "VOCDetectionDataModule", "parse_split"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
KEYS = ("train", "val", "test")


class VOCDetectionDataModule(DetectionDataModule):
    """PASCAL VOC XML detection data; in VOCdevkit 07+12 trainval -> 07 test by default, the VOC07 11-point metric
    next to COCO's.

    `root` holds one of the layouts of `voc_files.layouts_text`: VOCdevkit (splits YEAR-SET joined by '+'),
    Roboflow's "Pascal VOC" export (split folders of `x.jpg` + `x.xml`; `valid` is the val split) or LabelImg /
    CVAT (`Annotations/` + `JPEGImages/`, splits from `ImageSets/Main/<name>.txt`, else every XML is the training
    split); outside VOCdevkit the split keys take the layout's split names. An XML's image is the file with its stem
    in the image folder, any image extension. Without a val split, `val_fraction` of the training images (default
    0.1) is held out (`split_seed`); without a test split, `test` evaluates val. An XML without objects is a negative.

    Labels 1..K follow `class_names` (default: the 20 VOC classes in VOCdevkit, elsewhere the object names of all
    the XMLs, sorted); VOC has no category ids, so results use the label as `category_id` and the file stem as
    `image_id`.
    """

    evaluation_style = "voc"

    def __init__(
        self,
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        class_names: list[str] | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_split=train_split, val_split=val_split, test_split=test_split, **kwargs)
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.layout: VocLayout | None = None
        self._records: dict[Path, VocRecord] = {}
        if self.root is None:
            for key in KEYS:  # bad split strings fail at once, not after the first epoch
                if getattr(self, f"{key}_split") is not None:
                    parse_split(getattr(self, f"{key}_split"))
            names = list(class_names or VOC_CLASSES)
            self.set_label_space(names, range(1, len(names) + 1))
            return
        self.layout = layout = find_voc_layout(self.require_root())
        for key in KEYS:
            name = getattr(self, f"{key}_split") or layout.default(key)
            if name is not None:
                layout.check(name, key)
            setattr(self, f"{key}_split", name)
        if self.predict_split is None:
            self.predict_split = self.val_split
        else:
            layout.check(self.predict_split, "predict")
        found = ", ".join(f"{key} {name}" for key in KEYS if (name := getattr(self, f"{key}_split")))
        tell(f"VOC data: {layout.name} layout under {layout.root} ({found})")
        names = list(class_names or (VOC_CLASSES if layout.name == "VOCdevkit" else self._object_names()))
        self.set_label_space(names, range(1, len(names) + 1))

    def _object_names(self) -> list[str]:
        """The object names of every XML of the layout, sorted (said in one line); the parsed XMLs are kept."""
        assert self.layout is not None
        names: set[str] = set()
        for xml in self.layout.all_xmls():
            record = self._records[xml] = read_voc_xml(xml)
            names.update(record.names)
        if not names:
            raise UserError(
                f"No object in any XML under {self.layout.root}: nothing to learn the class names from. Annotate the "
                "images, or pass --data.class_names [..]."
            )
        tell(f"class names (the XMLs' object names, sorted; --data.class_names to choose): {', '.join(sorted(names))}")
        return sorted(names)

    def describe_split(self, key: str) -> str:
        name = getattr(self, f"{key}_split")
        where = self.layout.root if self.layout is not None else self.root
        return f"VOC split {name!r} under {where}"

    def load_split(self, split: str) -> DetectionAnnotations:
        root = self.require_root()
        layout = self.layout
        assert layout is not None and self.label_space is not None
        label_of = {name: label for label, name in enumerate(self.label_space.object_names, start=1)}
        source = f"VOC split {split}" if layout.name == "VOCdevkit" else f"VOC ({layout.name}) split {split}"
        builder = AnnotationBuilder(root=str(root), source=source, string_ids=True)
        for xml, folder in layout.entries(split):
            record = self._records.pop(xml, None) or read_voc_xml(xml)
            unknown = [name for name in record.names if name not in label_of]
            if unknown:
                raise UserError(
                    f"VOC annotation {xml} has an object named {unknown[0]!r}, which is not among the classes "
                    f"{sorted(label_of)}. Fix the file or pass --data.class_names."
                )
            relative = os.path.relpath(folder.path / folder.find(xml, record.filename), root)
            height, width = record.height, record.width
            if height <= 0 or width <= 0:
                # Header read only (no decode): the size is needed to clip boxes and group aspect ratios.
                height, width = image_size_hw(root / relative)
            boxes = record.boxes.copy()
            if layout.one_based:  # 1-based inclusive pixel indices -> continuous 0-based (width = xmax - xmin + 1)
                boxes[:, :2] -= 1.0
            builder.add_image(
                file_name=relative,
                image_id=len(builder.image_ids),
                height=height,
                width=width,
                boxes_xyxy=boxes,
                labels=np.asarray([label_of[name] for name in record.names], dtype=np.int64),
                crowd=np.zeros(len(record.names), dtype=np.uint8),
                difficult=record.difficult,
                areas=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            )
        annotations = builder.build()
        if not len(annotations):
            raise UserError(f"{source} under {layout.root} has no XML annotation.")
        annotations.require_images(f"An XML's image is the file with its stem in {layout.name}'s image folder.")
        self.summarise(split, annotations)
        return annotations
