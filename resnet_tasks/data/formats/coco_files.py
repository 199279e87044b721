"""COCO instances files: the JSON reader, the category list (read without the annotations), the one label-space
rule for categories, and the parser of a file's images and boxes into `DetectionAnnotations`."""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_tasks.data.detection_annotations import AnnotationBuilder, DetectionAnnotations
from resnet_tasks.errors import UserError

COCO_LAYOUT = """Expected COCO layout under --data.root:
  annotations/instances_train2017.json
  annotations/instances_val2017.json
  train2017/*.jpg
  val2017/*.jpg
(split names follow --data.train_split / --data.val_split / --data.test_split)"""

_CATEGORIES_KEY = re.compile(rb'"categories"\s*:\s*\[')
_FIRST_READ = 1 << 20  # bytes decoded after the "categories" key at first (doubled until the list ends)


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
    except OSError as error:
        raise UserError(f"Cannot read annotation file {path}: {error.strerror or error}.") from None


def coco_categories(data: Any, path: Path) -> list[dict[str, Any]]:
    """The `categories` list of a COCO file, sorted by id, checked for ids and names."""
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or not data["categories"]:
        raise UserError(
            f"{path} has no 'categories' list; a COCO instances file holds 'images', 'annotations' and 'categories'."
        )
    return _checked_categories(data["categories"], path)


def _checked_categories(entries: list[Any], path: Path) -> list[dict[str, Any]]:
    categories = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
            raise UserError(f"{path}: category entry {entry!r} needs an integer 'id' and a 'name'.")
        categories.append(entry)
    ids = [entry["id"] for entry in categories]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: category ids repeat ({sorted(ids)}); each category needs its own id.")
    return sorted(categories, key=lambda entry: entry["id"])


def _scanned_categories(data: mmap.mmap) -> list[Any] | None:
    decoder = json.JSONDecoder()
    for match in _CATEGORIES_KEY.finditer(data):
        start, length = match.end() - 1, _FIRST_READ
        while True:
            text = data[start : start + length].decode("utf-8", errors="ignore")
            try:
                value, _ = decoder.raw_decode(text)
            except json.JSONDecodeError:
                if start + length >= len(data):
                    break
                length *= 2
                continue
            if value and all(isinstance(entry, dict) and "id" in entry and "name" in entry for entry in value):
                return value
            break
    return None


def read_categories(path: Path) -> list[dict[str, Any]]:
    """The categories of a COCO file, sorted by id, without parsing its images and annotations: the file is scanned
    for the "categories" key and only that list is decoded (the whole file is parsed when the scan finds none)."""
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            entries = _scanned_categories(data)
    except (OSError, ValueError):  # unreadable or empty: read_json says which
        entries = None
    if entries is None:
        return coco_categories(read_json(path), path)
    return _checked_categories(entries, path)


def owns_annotations(path: Path, category_id: int) -> bool:
    """Whether any annotation of the COCO file `path` has `category_id` (a scan of the file, nothing parsed)."""
    pattern = re.compile(rb'"category_id"\s*:\s*' + str(int(category_id)).encode() + rb"(?![0-9.eE])")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return pattern.search(data) is not None


def same_categories(files: dict[Path, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The one category list of every split's file; UserError naming two files whose lists differ."""
    (first, reference), *others = files.items()
    expected = [(entry["id"], str(entry["name"])) for entry in reference]
    for path, categories in others:
        found = [(entry["id"], str(entry["name"])) for entry in categories]
        if found != expected:
            extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
            raise UserError(
                f"{path} and {first} list different categories (only in the first: {extra[:5]}; only in the second: "
                f"{missing[:5]}, as (id, name)); all splits must share one category list. Export them together."
            )
    return reference


def class_categories(categories: list[dict[str, Any]], files: Sequence[Path]) -> tuple[list[dict], list[dict]]:
    """(classes, parents): a category that owns no annotation in any of `files` and is the `supercategory` of others
    (Roboflow's parent, often id 0) is not a class; every other category is one, used or not."""
    parents = []
    for entry in categories:
        children = [o for o in categories if o is not entry and o.get("supercategory") == entry["name"]]
        if children and not any(owns_annotations(path, entry["id"]) for path in files):
            parents.append(entry)
    return [entry for entry in categories if entry not in parents], parents


def parse_coco_annotations(
    path: Path, image_folder: str, root: Path, category_ids: Sequence[int], data: Any | None = None
) -> DetectionAnnotations:
    """Read a COCO instances file into compact arrays; category ids become contiguous labels 1..K.

    `category_ids` is the sorted id list that defines the labels (label k <-> category_ids[k-1]). Image files are
    `root / image_folder / file_name` (`image_folder` "" when `root` is the image folder). The parsed JSON is
    dropped on return: only numpy arrays survive.
    """
    if data is None:
        data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} has no 'images' list; is it a COCO instances file?")
    label_of = {category_id: label for label, category_id in enumerate(category_ids, start=1)}
    images = data["images"]
    position: dict[int, int] = {}
    for index, image in enumerate(images):
        try:
            position[int(image["id"])] = index
            image["file_name"], image["width"], image["height"]  # noqa: B018 - presence check
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: image entry {image!r} needs 'id', 'file_name', 'width' and 'height'.") from None
    per_image: list[list[dict[str, Any]]] = [[] for _ in images]
    for annotation in data.get("annotations") or []:
        image_id = annotation.get("image_id")
        if image_id not in position:
            raise UserError(
                f"{path}: annotation {annotation.get('id')} refers to image id {image_id}, which is not in 'images'."
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
    prefix = f"{image_folder}/" if image_folder else ""
    for image, objects in zip(images, per_image):
        xywh = np.asarray([a["bbox"] for a in objects], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        builder.add_image(
            file_name=f"{prefix}{image['file_name']}",
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
