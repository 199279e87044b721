"""COCO instances data: the COCO JSON parser and the COCO / shapes detection data modules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_tasks.data.detection import AnnotationBuilder, DetectionAnnotations, DetectionDataModule
from resnet_tasks.data.shapes import shapes_layout
from resnet_tasks.errors import UserError

COCO_LAYOUT = """Expected COCO layout under --data.root:
  annotations/instances_train2017.json
  annotations/instances_val2017.json
  train2017/*.jpg
  val2017/*.jpg
(split names follow --data.train_split / --data.val_split / --data.test_split)"""


# ----------------------------------------------------------------------------------------------- COCO JSON
def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error becomes a UserError naming the file, line and column."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(
            f"Malformed JSON in {path}: {error.msg} at line {error.lineno}, column {error.colno}. "
            "Fix or re-download the annotation file."
        ) from None
    except UnicodeDecodeError as error:
        raise UserError(f"Annotation file {path} is not UTF-8 JSON ({error}). Re-download it.") from None


def coco_categories(data: Any, path: Path) -> list[dict[str, Any]]:
    """The `categories` list of a COCO file, sorted by id, checked for ids and names."""
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or not data["categories"]:
        raise UserError(
            f"{path} has no 'categories' list; a COCO instances file holds 'images', 'annotations' and "
            "'categories'."
        )
    categories = []
    for entry in data["categories"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
            raise UserError(f"{path}: category entry {entry!r} needs an integer 'id' and a 'name'.")
        categories.append(entry)
    return sorted(categories, key=lambda entry: entry["id"])


def parse_coco_annotations(
    path: Path, image_folder: str, root: Path, category_ids: Sequence[int], data: Any | None = None
) -> DetectionAnnotations:
    """Read a COCO instances file into compact arrays; category ids become contiguous labels 1..K.

    `category_ids` is the sorted id list that defines the labels (label k <-> category_ids[k-1]). The parsed
    JSON is dropped on return: only numpy arrays survive.
    """
    if data is None:
        data = read_json(path)
    if not isinstance(data.get("images"), list):
        raise UserError(f"{path} has no 'images' list; is it a COCO instances file?")
    label_of = {category_id: label for label, category_id in enumerate(category_ids, start=1)}
    images = data["images"]
    position: dict[int, int] = {}
    for index, image in enumerate(images):
        try:
            position[int(image["id"])] = index
            image["file_name"], image["width"], image["height"]  # noqa: B018 - presence check
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{path}: image entry {image!r} needs 'id', 'file_name', 'width' and 'height'."
            ) from None
    per_image: list[list[dict[str, Any]]] = [[] for _ in images]
    for annotation in data.get("annotations") or []:
        image_id = annotation.get("image_id")
        if image_id not in position:
            raise UserError(
                f"{path}: annotation {annotation.get('id')} refers to image id {image_id}, which is not in "
                "'images'."
            )
        category_id = annotation.get("category_id")
        if category_id not in label_of:
            file_name = images[position[image_id]]["file_name"]
            raise UserError(
                f"{path}: image {file_name} (id {image_id}) has an annotation with category id {category_id}, "
                f"which is not among the categories {list(category_ids)}. Fix the annotation or the "
                "'categories' list."
            )
        bbox = annotation.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise UserError(
                f"{path}: annotation {annotation.get('id')} (image id {image_id}) has bbox {bbox!r}; expected "
                "[x, y, width, height]."
            )
        per_image[position[image_id]].append(annotation)
    builder = AnnotationBuilder(root=str(root), source=str(path))
    for image, objects in zip(images, per_image):
        xywh = np.asarray([a["bbox"] for a in objects], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        builder.add_image(
            file_name=f"{image_folder}/{image['file_name']}",
            image_id=int(image["id"]),
            height=int(image["height"]),
            width=int(image["width"]),
            boxes_xyxy=boxes,
            labels=np.asarray([label_of[a["category_id"]] for a in objects], dtype=np.int64),
            crowd=np.asarray([int(a.get("iscrowd", 0)) for a in objects], dtype=np.uint8),
            difficult=np.zeros(len(objects), dtype=np.uint8),
            # COCO's area is the segment's area (what COCOeval's size buckets use); boxes-only files get w*h.
            areas=np.asarray([float(a.get("area", w * h)) for a, (w, h) in zip(objects, xywh[:, 2:])]),
        )
    return builder.build()


class CocoDetectionDataModule(DetectionDataModule):
    """COCO instances data: `root/annotations/instances_<split>.json` + `root/<split>/*.jpg`.

    Category ids (sorted) map to labels 1..K, read from the val split's file in `__init__` (so `num_classes`
    is known at once); train and val must list the same categories. Crowd boxes are kept for evaluation only.
    """

    def __init__(
        self,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        **kwargs: Any,
    ) -> None:
        super().__init__(train_split=train_split, val_split=val_split, test_split=test_split, **kwargs)
        if self.root is None and self.predict_path is not None:
            return  # predicting on a folder: the label space comes from the model's weights
        root_dir = self.require_coco_root()
        path = self.annotation_file(self.val_split)
        data = read_json(path)
        categories = coco_categories(data, path)
        self.set_label_space([str(entry["name"]) for entry in categories], [entry["id"] for entry in categories])
        # The val split is parsed now anyway: keep its compact arrays, drop the JSON.
        self._annotations[self.val_split] = parse_coco_annotations(
            path, self.val_split, root_dir, self.category_ids, data
        )
        self._annotations[self.val_split].report_fixed_boxes()

    @property
    def category_ids(self) -> list[int]:
        """The dataset's category ids of labels 1..K (sorted), from the label space."""
        return [] if self.label_space is None else list(self.label_space.category_ids[1:])

    def require_coco_root(self) -> Path:
        if self.root is None:
            raise UserError(
                f"{type(self).__name__} needs a dataset: pass --data.root DIR (or --data.predict_path DIR to "
                f"predict on a folder of images).\n{COCO_LAYOUT}"
            )
        if not self.root.is_dir():
            raise UserError(f"COCO root {self.root} does not exist. Check --data.root.\n{COCO_LAYOUT}")
        return self.root

    def annotation_file(self, split: str) -> Path:
        path = self.require_coco_root() / "annotations" / f"instances_{split}.json"
        if not path.is_file():
            raise UserError(f"Missing COCO annotation file {path}.\n{COCO_LAYOUT}")
        return path

    def load_split(self, split: str) -> DetectionAnnotations:
        root = self.require_coco_root()
        path = self.annotation_file(split)
        images = root / split
        if not images.is_dir():
            raise UserError(f"Missing COCO image folder {images}.\n{COCO_LAYOUT}")
        data = read_json(path)
        ids = [entry["id"] for entry in coco_categories(data, path)]
        if ids != self.category_ids:
            raise UserError(
                f"{path} lists categories {ids}, but {self.annotation_file(self.val_split)} lists "
                f"{self.category_ids}; all splits must share one category list."
            )
        return parse_coco_annotations(path, split, root, self.category_ids, data)


class ShapesDetectionDataModule(CocoDetectionDataModule):
    """The bundled synthetic shapes set in COCO format (generated on first use under data/shapes)."""

    def __init__(
        self, root: str | None = None, batch_size: int = 8, num_workers: int = 2, **kwargs: Any
    ) -> None:
        if root is None and kwargs.get("predict_path") is None:
            root = shapes_layout("coco")
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, **kwargs)
