"""The bundled synthetic "shapes" dataset: seeded scenes of circles, squares and triangles, written once
in the real ImageFolder, COCO and PASCAL VOC layouts so every task can be tried without downloads."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from resnet_tasks.data.masks import VOC_PALETTE
from resnet_tasks.data.shapes_scenes import (
    SHAPE_CLASSES,
    ShapeObject,
    object_crop,
    render_scene,
    segmentation_mask,
    split_plan,
)
from resnet_tasks.errors import UserError

# Deliberately non-contiguous, as in real COCO, so that label <-> category id mapping bugs show up.
COCO_CATEGORY_IDS: dict[str, int] = {"circle": 1, "square": 3, "triangle": 7}
# Bump whenever the generator's output changes: ensure_shapes then regenerates stale copies.
SHAPES_VERSION = 2
MANIFEST_NAME = "shapes.json"
JPEG_QUALITY = 90
DEFAULT_PARAMS: dict[str, int] = {"num_train": 800, "num_val": 200, "image_size": 128, "seed": 0}
SHAPES_DIR_ENV = "RESNET_TASKS_SHAPES_DIR"

_SPLIT_CODES = {"train": 1, "val": 2}


def _voc_xml(stem: str, size: int, objects: list[ShapeObject]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{stem}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "resnet-tasks synthetic shapes"
    ET.SubElement(source, "annotation").text = "resnet-tasks shapes generator"
    size_node = ET.SubElement(root, "size")
    ET.SubElement(size_node, "width").text = str(size)
    ET.SubElement(size_node, "height").text = str(size)
    ET.SubElement(size_node, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = SHAPE_CLASSES[obj.label]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = "0"
        box = ET.SubElement(node, "bndbox")
        x0, y0, x1, y1 = obj.box
        # VOC boxes are 1-based inclusive pixel indices: first column x0 -> x0 + 1, last column x1 - 1 -> x1.
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8")


def _encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _encode_palette_png(mask: np.ndarray) -> bytes:
    picture = Image.fromarray(mask)
    picture.putpalette(VOC_PALETTE)  # an "L" image becomes "P" with the VOC colours
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_params(num_train: Any, num_val: Any, image_size: Any, seed: Any) -> None:
    checks = (
        ("num_train", num_train, 1),
        ("num_val", num_val, 1),
        ("image_size", image_size, 32),
        ("seed", seed, 0),
    )
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"shapes dataset: {name}={value!r} is invalid; use an integer >= {minimum}.")


def generate_shapes(
    root: str | Path, *, num_train: int = 800, num_val: int = 200, image_size: int = 128, seed: int = 0
) -> Path:
    """Write the shapes dataset under `root` in the ImageFolder, COCO and VOC layouts (see data/README.md).

    Deterministic: the same arguments give byte-identical files. Image ids run 1..num_train+num_val over both
    splits and the stem of image id i is `shapes_{i:06d}` in every layout. The `shapes.json` manifest is
    written last, so a folder holding it is complete. Silent; returns `root` as a Path.
    """
    _check_params(num_train, num_val, image_size, seed)
    root = Path(root)
    coco_dir = root / "coco"
    voc_dir = root / "voc" / "VOCdevkit" / "VOC2012"
    folders = [coco_dir / "annotations", voc_dir / "JPEGImages", voc_dir / "Annotations"]
    folders += [
        voc_dir / "SegmentationClass",
        voc_dir / "ImageSets" / "Main",
        voc_dir / "ImageSets" / "Segmentation",
    ]
    for split in ("train", "val"):
        folders.append(coco_dir / f"{split}2017")
        folders += [root / "imagefolder" / split / name for name in SHAPE_CLASSES]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)

    categories = [{"id": COCO_CATEGORY_IDS[name], "name": name, "supercategory": "shape"} for name in SHAPE_CLASSES]
    next_image_id = 1
    next_annotation_id = 1
    stems_by_split: dict[str, list[str]] = {}
    presence: dict[str, dict[str, list[int]]] = {}
    summary: dict[str, dict[str, int]] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        plan = split_plan(np.random.default_rng([seed, _SPLIT_CODES[split]]), count)
        images, annotations, stems = [], [], []
        presence[split] = {name: [] for name in SHAPE_CLASSES}
        for dominant, num_objects in plan:
            image_id = next_image_id
            next_image_id += 1
            stem = f"shapes_{image_id:06d}"
            stems.append(stem)
            scene = render_scene(np.random.default_rng([seed, 0, image_id]), image_size, dominant, num_objects)
            jpeg = _encode_jpeg(scene.image)
            (coco_dir / f"{split}2017" / f"{stem}.jpg").write_bytes(jpeg)
            (voc_dir / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg)
            if scene.objects:
                label, crop = object_crop(scene)
                (root / "imagefolder" / split / SHAPE_CLASSES[label] / f"{stem}.jpg").write_bytes(_encode_jpeg(crop))
            (voc_dir / "Annotations" / f"{stem}.xml").write_bytes(_voc_xml(stem, image_size, scene.objects))
            (voc_dir / "SegmentationClass" / f"{stem}.png").write_bytes(_encode_palette_png(segmentation_mask(scene)))
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": image_size, "height": image_size})
            present = {obj.label for obj in scene.objects}
            for index, name in enumerate(SHAPE_CLASSES):
                presence[split][name].append(1 if index in present else -1)
            for obj in scene.objects:
                rle = mask_utils.encode(np.asfortranarray(obj.visible_mask.astype(np.uint8)))
                x0, y0, x1, y1 = obj.box
                annotations.append(
                    {
                        "id": next_annotation_id,
                        "image_id": image_id,
                        "category_id": COCO_CATEGORY_IDS[SHAPE_CLASSES[obj.label]],
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "area": float(obj.visible_mask.sum()),
                        "iscrowd": 0,
                        "segmentation": {
                            "size": [int(v) for v in rle["size"]],
                            "counts": rle["counts"].decode("utf-8"),
                        },
                    }
                )
                next_annotation_id += 1
        dataset = {
            "info": {"description": "resnet-tasks synthetic shapes", "version": str(SHAPES_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (coco_dir / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dataset))
        stems_by_split[split] = stems
        summary[split] = {
            "images": count,
            "empty_images": sum(1 for dominant, _ in plan if dominant is None),
            "objects": len(annotations),
        }

    stems_by_split["trainval"] = stems_by_split["train"] + stems_by_split["val"]
    for split, stems in stems_by_split.items():
        listing = "".join(f"{stem}\n" for stem in stems)
        (voc_dir / "ImageSets" / "Main" / f"{split}.txt").write_text(listing)
        (voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(listing)
    # Per-class image lists as in the VOC devkit: 1 = the class is present, -1 = it is not.
    presence["trainval"] = {name: presence["train"][name] + presence["val"][name] for name in SHAPE_CLASSES}
    for split, by_class in presence.items():
        for name, flags in by_class.items():
            lines = "".join(f"{stem} {flag:2d}\n" for stem, flag in zip(stems_by_split[split], flags))
            (voc_dir / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(lines)

    manifest = _manifest(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    manifest["splits"] = summary
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def _manifest(**params: int) -> dict[str, Any]:
    return {
        "generator": "resnet_tasks.data.shapes",
        "version": SHAPES_VERSION,
        "params": dict(sorted(params.items())),
        "classes": list(SHAPE_CLASSES),
        "coco_category_ids": dict(COCO_CATEGORY_IDS),
    }


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _manifest_matches(root: Path, params: dict[str, int]) -> bool:
    found = _read_manifest(root)
    if found is None:
        return False
    expected = _manifest(**params)
    return all(found.get(key) == value for key, value in expected.items())


def _replaceable(root: Path) -> bool:
    """Only an empty folder or an earlier shapes dataset may be replaced: never delete a user's own data."""
    if not root.is_dir():
        return False
    return (root / MANIFEST_NAME).is_file() or not any(root.iterdir())


def _install(staging: Path, root: Path, params: dict[str, int]) -> bool:
    """Move the finished `staging` folder to `root` atomically; False when another process got there first."""
    for _attempt in range(20):
        try:
            os.rename(staging, root)  # atomic; fails when root is a non-empty folder
            return True
        except OSError:
            if _manifest_matches(root, params):
                return False  # another process installed the same dataset meanwhile: ours is discarded
            if not root.exists():
                continue
            if not _replaceable(root):
                raise UserError(
                    f"{root} exists and is not a shapes dataset (no {MANIFEST_NAME}); "
                    f"remove it or point {SHAPES_DIR_ENV} / the root argument elsewhere."
                ) from None
            stale = root.with_name(f".{root.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(root, stale)
            except FileNotFoundError:
                continue  # someone else moved it first
            shutil.rmtree(stale, ignore_errors=True)
    raise UserError(f"could not install the shapes dataset at {root}: the folder keeps changing; try again.")


def default_shapes_root() -> Path:
    """$RESNET_TASKS_SHAPES_DIR when set, else data/shapes under the current working directory."""
    configured = os.environ.get(SHAPES_DIR_ENV)
    return Path(configured) if configured else Path.cwd() / "data" / "shapes"


def shapes_layout(layout: str) -> str:
    """The folder of one layout ("imagefolder", "coco", "voc") of the default shapes dataset, generated if needed."""
    return str(ensure_shapes() / layout)


def ensure_shapes(root: str | Path | None = None, **kwargs: int) -> Path:
    """Return the shapes dataset folder, generating it first when missing or made with other parameters.

    `kwargs` are generate_shapes' keyword arguments (num_train, num_val, image_size, seed). Generation goes to
    a temporary sibling folder renamed into place, so concurrent callers (e.g. DDP ranks) end with one
    complete dataset. Prints one line to stderr only when it generated.
    """
    unknown = sorted(set(kwargs) - set(DEFAULT_PARAMS))
    if unknown:
        raise UserError(f"ensure_shapes: unknown argument(s) {unknown}; valid ones are {sorted(DEFAULT_PARAMS)}.")
    params = {**DEFAULT_PARAMS, **kwargs}
    _check_params(**params)
    root = Path(root) if root is not None else default_shapes_root()
    root = root.expanduser().absolute()
    if _manifest_matches(root, params):
        return root
    if root.exists() and not _replaceable(root):
        raise UserError(
            f"{root} exists and is not a shapes dataset (no {MANIFEST_NAME}); "
            f"remove it or point {SHAPES_DIR_ENV} / the root argument elsewhere."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        start = time.perf_counter()
        generate_shapes(staging, **params)
        installed = _install(staging, root, params)
        if installed:
            print(
                f"resnet-tasks: generated the shapes dataset ({params['num_train']} train + "
                f"{params['num_val']} "
                f"val images, {params['image_size']} px) in {root} in {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
            )
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root
