"""The bundled synthetic "shapes" dataset: seeded scenes of circles, squares and triangles, written once
in the real ImageFolder, COCO and PASCAL VOC layouts so every task can be tried without downloads."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from resnet_tasks.data.masks import VOC_PALETTE
from resnet_tasks.errors import UserError
from resnet_tasks.labels import IGNORE_INDEX

# Order is fixed: segmentation index k+1 and the ImageFolder index k (alphabetical order, which this is) both
# follow it.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
# Deliberately non-contiguous, as in real COCO, so that label <-> category id mapping bugs show up.
COCO_CATEGORY_IDS: dict[str, int] = {"circle": 1, "square": 3, "triangle": 7}
# Bump whenever the generator's output changes: ensure_shapes then regenerates stale copies.
SHAPES_VERSION = 2
MANIFEST_NAME = "shapes.json"
JPEG_QUALITY = 90
DEFAULT_PARAMS: dict[str, int] = {"num_train": 800, "num_val": 200, "image_size": 128, "seed": 0}
SHAPES_DIR_ENV = "RESNET_TASKS_SHAPES_DIR"

_EMPTY_FRACTION = 0.02  # share of scenes with no object at all (negatives for detection)
_SUPERSAMPLE = 4  # draw masks at 4x and box-filter down: anti-aliased edges without per-pixel Python
_MIN_DOMINANCE = 1.5  # largest visible area >= 1.5x every other one: the ImageFolder label is unambiguous
_MIN_VISIBLE_FRACTION = 0.6  # an occluded object keeps at least 60% of its pixels
_CROP_CONTEXT = 1.3  # ImageFolder crop side = 1.3x the largest object's longer box side (some context around it)
_SPLIT_CODES = {"train": 1, "val": 2}




@dataclass
class ShapeObject:
    """One drawn object: class index into SHAPE_CLASSES, full and visible masks, box XYXY (pixel edges)."""

    label: int
    full_mask: np.ndarray
    visible_mask: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    """One rendered image (HxWx3 uint8) and its objects in drawing order (later ones occlude earlier ones)."""

    image: np.ndarray
    objects: list[ShapeObject]


def _gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    coords = np.arange(size, dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    start, end = rng.uniform(20.0, 235.0, size=(2, 3, 1, 1)).astype(np.float32)
    # Channel-first (3xHxW) while drawing: numpy broadcasting over a trailing axis of 3 is slow.
    canvas = start + (end - start) * ramp[None]
    # Soft low-contrast blobs: texture that has no sharp outline, so it is never mistaken for an object.
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.0, size, size=2)
        sigma = rng.uniform(0.05, 0.18) * size
        amplitude = rng.uniform(-45.0, 45.0, size=(3, 1, 1)).astype(np.float32)
        # A Gaussian is separable: the outer product of two 1-D profiles.
        bump = np.outer(
            np.exp(-((coords - cy) ** 2) / (2 * sigma**2)), np.exp(-((coords - cx) ** 2) / (2 * sigma**2))
        )
        canvas += amplitude * bump[None]
    return canvas


def _draw_distractor_lines(rng: np.random.Generator, canvas: np.ndarray, size: int) -> np.ndarray:
    picture = Image.fromarray(
        np.ascontiguousarray(np.clip(canvas, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    )
    draw = ImageDraw.Draw(picture)
    scale = size / 128.0
    for _ in range(int(rng.integers(1, 4))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1 * size, 1.1 * size, size=4))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        width = max(1, round(rng.uniform(1.0, 2.5) * scale))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
    return np.asarray(picture, dtype=np.float32).transpose(2, 0, 1).copy()


def _shape_outline(rng: np.random.Generator, label: int, extent: float) -> np.ndarray | float:
    """Polygon vertices around (0, 0) for squares/triangles, or the radius for a circle."""
    name = SHAPE_CLASSES[label]
    if name == "circle":
        return extent / 2.0
    if name == "square":
        half = 0.85 * extent / 2.0
        angle = rng.uniform(0.0, math.pi / 2.0)
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    else:
        radius = 1.1 * extent / math.sqrt(3.0)  # equilateral triangle with side 1.1 * extent
        angle = rng.uniform(0.0, 2.0 * math.pi / 3.0)
        thetas = np.array([0.0, 2.0 * math.pi / 3.0, 4.0 * math.pi / 3.0])
        corners = radius * np.stack([np.cos(thetas), np.sin(thetas)], axis=1)
        # Small vertex jitter: triangles are not all perfect copies of each other.
        corners = corners + rng.normal(0.0, 0.04 * radius, size=corners.shape)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return corners @ rotation.T


def _render_alpha(outline: np.ndarray | float, centre: np.ndarray, size: int) -> np.ndarray:
    """Coverage in [0, 1] of one shape (HxW float32), drawn supersampled inside its own small window only."""
    radius = outline if isinstance(outline, float) else None
    low = centre - radius if radius is not None else centre + outline.min(axis=0)
    high = centre + radius if radius is not None else centre + outline.max(axis=0)
    x0, y0 = (max(int(v) - 1, 0) for v in low)
    x1, y1 = (min(int(math.ceil(v)) + 1, size) for v in high)
    factor = _SUPERSAMPLE
    window = Image.new("L", ((x1 - x0) * factor, (y1 - y0) * factor), 0)
    draw = ImageDraw.Draw(window)
    origin = np.array([x0, y0], dtype=np.float64)
    if radius is not None:
        cx, cy = (centre - origin) * factor
        draw.ellipse(
            [cx - radius * factor, cy - radius * factor, cx + radius * factor, cy + radius * factor], fill=255
        )
    else:
        points = (outline + centre - origin) * factor
        draw.polygon([(float(x), float(y)) for x, y in points], fill=255)
    alpha = np.zeros((size, size), dtype=np.float32)
    small = window.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    alpha[y0:y1, x0:x1] = np.asarray(small, dtype=np.float32) / np.float32(255.0)
    return alpha


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out against the pixels it covers (colour never depends on the class)."""
    if len(under) > 256:  # a fixed-size sample keeps this cheap for large objects
        under = under[:: len(under) // 256]
    candidates = rng.uniform(0.0, 255.0, size=(24, 3)).astype(np.float32)
    distances = np.sqrt(((under[None, :, :] - candidates[:, None, :]) ** 2).sum(axis=2))
    # 10th percentile of the per-pixel distance: the object must contrast with most of its surroundings,
    # not just with their mean (the background is a gradient).
    contrast = np.partition(distances, len(under) // 10, axis=1)[:, len(under) // 10]
    good = np.flatnonzero(contrast >= 80.0)
    return candidates[good[0]] if good.size else candidates[int(np.argmax(contrast))]


def _place_objects(
    rng: np.random.Generator, size: int, dominant: int, count: int
) -> list[tuple[int, np.ndarray | float, np.ndarray]] | None:
    scale = size / 128.0
    # Dominant extent 30..60 px at 128 px; the others at most extent/1.55 so that, whatever the two shapes,
    # the dominant one's area is >= 1.5x theirs before occlusion (checked again after occlusion).
    dominant_extent = rng.uniform(30.0, 60.0) * scale
    labels = [dominant] + [int(v) for v in rng.integers(0, len(SHAPE_CLASSES), size=count - 1)]
    extents = [dominant_extent] + [
        rng.uniform(14.0 * scale, max(14.0 * scale, dominant_extent / 1.55)) for _ in range(count - 1)
    ]
    placed = []
    for label, extent in zip(labels, extents):
        outline = _shape_outline(rng, label, extent)
        if isinstance(outline, float):
            low, high = np.array([-outline, -outline]), np.array([outline, outline])
        else:
            low, high = outline.min(axis=0), outline.max(axis=0)
        lower, upper = 1.0 - low, size - 1.0 - high
        if np.any(upper <= lower):
            return None
        centre = rng.uniform(lower, upper)
        placed.append((label, outline, centre))
    order = rng.permutation(count)
    return [placed[i] for i in order]


def render_scene(rng: np.random.Generator, size: int, dominant: int | None, count: int) -> Scene:
    """Draw one scene: gradient, blobs and distractor lines, then `count` objects (none if dominant=None)."""
    base = _draw_distractor_lines(rng, _gradient_background(rng, size), size)
    coords = np.arange(size, dtype=np.float32)
    objects: list[ShapeObject] = []
    canvas = base
    if dominant is not None:
        for _attempt in range(200):
            placed = _place_objects(rng, size, dominant, count)
            if placed is None:
                continue
            alphas = [_render_alpha(outline, centre, size) for _label, outline, centre in placed]
            fulls = [alpha >= 0.5 for alpha in alphas]
            boxes = []
            for full in fulls:
                rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
                if rows.size:
                    boxes.append((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
            if len(boxes) != count:
                continue
            visibles = []
            covered = np.zeros((size, size), dtype=bool)
            for full in reversed(fulls):  # later objects occlude earlier ones
                visibles.append(full & ~covered)
                covered |= full
            visibles.reverse()
            full_areas = np.array([f.sum() for f in fulls], dtype=np.float64)
            visible_areas = np.array([v.sum() for v in visibles], dtype=np.float64)
            if np.any(visible_areas < _MIN_VISIBLE_FRACTION * full_areas):
                continue
            ranked = np.sort(visible_areas)[::-1]
            if placed[int(np.argmax(visible_areas))][0] != dominant:
                continue
            if count > 1 and ranked[0] < _MIN_DOMINANCE * ranked[1]:
                continue
            canvas = base.copy()
            for (label, _outline, centre), alpha, full, visible, box in zip(
                placed, alphas, fulls, visibles, boxes
            ):
                # Paint inside the box grown by the 1 px anti-aliased fringe (alpha is zero elsewhere).
                x0, y0 = max(box[0] - 1, 0), max(box[1] - 1, 0)
                x1, y1 = min(box[2] + 1, size), min(box[3] + 1, size)
                region = canvas[:, y0:y1, x0:x1]
                colour = _pick_colour(rng, region[:, full[y0:y1, x0:x1]].T)
                # A gentle linear shading across each object so that fills are not perfectly flat.
                direction = rng.uniform(0.0, 2.0 * math.pi)
                reach = max(float(np.sqrt(full.sum())), 1.0)
                ramp = (coords[None, x0:x1] - centre[0]) * math.cos(direction) + (
                    coords[y0:y1, None] - centre[1]
                ) * math.sin(direction)
                shade = np.float32(rng.uniform(-30.0, 30.0)) * np.clip(ramp / reach, -1.0, 1.0)
                fill = np.clip(colour[:, None, None] + shade[None], 0.0, 255.0)
                weight = alpha[None, y0:y1, x0:x1]
                canvas[:, y0:y1, x0:x1] = region * (1.0 - weight) + fill * weight
                objects.append(ShapeObject(label, full, visible, box))
            break
        else:  # pragma: no cover - 200 failures in a row does not happen with these size ranges
            raise RuntimeError("shapes generator could not place the objects of a scene")
    noise = np.float32(rng.uniform(3.0, 10.0)) * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.clip(np.rint(canvas + noise), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    image = np.ascontiguousarray(image)
    return Scene(image=image, objects=objects)


def segmentation_mask(scene: Scene) -> np.ndarray:
    """VOC-style class-index mask: 0 background, k+1 for SHAPE_CLASSES[k], 255 on a ~2 px outline band."""
    size = scene.image.shape[:2]
    classes = np.zeros(size, dtype=np.uint8)
    instances = np.zeros(size, dtype=np.uint8)
    for number, obj in enumerate(scene.objects, start=1):
        classes[obj.visible_mask] = obj.label + 1
        instances[obj.visible_mask] = number
    if scene.objects:
        # A 3x3 neighbourhood holding two different instance ids (or object and background) marks an outline;
        # this gives the 1-px-each-side "void" band that real VOC annotations carry.
        padded = np.pad(instances, 1, mode="edge")
        height, width = size
        windows = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
        stacked = np.stack(windows)
        classes[stacked.max(axis=0) != stacked.min(axis=0)] = IGNORE_INDEX
    return classes


def crop_window(box: tuple[int, int, int, int], image_size: int) -> tuple[float, float, float]:
    """Square window (x0, y0, side) around a box: side _CROP_CONTEXT x its longer side, shifted into the image."""
    x0, y0, x1, y1 = box
    side = min(_CROP_CONTEXT * max(x1 - x0, y1 - y0), float(image_size))
    left = min(max((x0 + x1) / 2.0 - side / 2.0, 0.0), image_size - side)
    top = min(max((y0 + y1) / 2.0 - side / 2.0, 0.0), image_size - side)
    return left, top, side


def object_crop(scene: Scene) -> tuple[int, np.ndarray]:
    """The ImageFolder view of a non-empty scene: (class index, crop of its largest object, HxWx3 uint8).

    The crop is a square around the largest object (by visible area) with some context, resized to half the
    scene size: an object-centred picture, as in ImageNet, that a small network learns to classify in minutes.
    """
    areas = [int(obj.visible_mask.sum()) for obj in scene.objects]
    largest = scene.objects[int(np.argmax(areas))]
    size = scene.image.shape[0]
    left, top, side = crop_window(largest.box, size)
    out = max(size // 2, 16)
    picture = Image.fromarray(scene.image).resize(
        (out, out), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )
    return largest.label, np.asarray(picture)


def _split_plan(rng: np.random.Generator, count: int) -> list[tuple[int | None, int]]:
    """Per scene of one split: (dominant class or None for an empty scene, number of objects)."""
    num_empty = max(1, round(count * _EMPTY_FRACTION)) if count >= 4 else 0
    empty = set(rng.choice(count, size=num_empty, replace=False).tolist()) if num_empty else set()
    num_full = count - len(empty)
    # Dominant classes balanced (a shuffled cycle): every class folder of the ImageFolder split gets images.
    dominants = np.resize(np.arange(len(SHAPE_CLASSES)), num_full)
    rng.shuffle(dominants)
    counts = rng.integers(1, 5, size=num_full)
    plan: list[tuple[int | None, int]] = []
    cursor = 0
    for index in range(count):
        if index in empty:
            plan.append((None, 0))
        else:
            plan.append((int(dominants[cursor]), int(counts[cursor])))
            cursor += 1
    return plan


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

    categories = [
        {"id": COCO_CATEGORY_IDS[name], "name": name, "supercategory": "shape"} for name in SHAPE_CLASSES
    ]
    next_image_id = 1
    next_annotation_id = 1
    stems_by_split: dict[str, list[str]] = {}
    presence: dict[str, dict[str, list[int]]] = {}
    summary: dict[str, dict[str, int]] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        plan = _split_plan(np.random.default_rng([seed, _SPLIT_CODES[split]]), count)
        images, annotations, stems = [], [], []
        presence[split] = {name: [] for name in SHAPE_CLASSES}
        for dominant, num_objects in plan:
            image_id = next_image_id
            next_image_id += 1
            stem = f"shapes_{image_id:06d}"
            stems.append(stem)
            scene = render_scene(
                np.random.default_rng([seed, 0, image_id]), image_size, dominant, num_objects
            )
            jpeg = _encode_jpeg(scene.image)
            (coco_dir / f"{split}2017" / f"{stem}.jpg").write_bytes(jpeg)
            (voc_dir / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg)
            if scene.objects:
                label, crop = object_crop(scene)
                (root / "imagefolder" / split / SHAPE_CLASSES[label] / f"{stem}.jpg").write_bytes(
                    _encode_jpeg(crop)
                )
            (voc_dir / "Annotations" / f"{stem}.xml").write_bytes(_voc_xml(stem, image_size, scene.objects))
            (voc_dir / "SegmentationClass" / f"{stem}.png").write_bytes(
                _encode_palette_png(segmentation_mask(scene))
            )
            images.append(
                {"id": image_id, "file_name": f"{stem}.jpg", "width": image_size, "height": image_size}
            )
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
        raise UserError(
            f"ensure_shapes: unknown argument(s) {unknown}; valid ones are {sorted(DEFAULT_PARAMS)}."
        )
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
