"""The shapes dataset's scenes: seeded gradients, texture and distractor lines with circles, squares and triangles
drawn over them, their class-index masks, and the object-centred crops of the ImageFolder layout."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from resnet_tasks.labels import IGNORE_INDEX

# Order is fixed: segmentation index k+1 and the ImageFolder index k (alphabetical order, which this is) both
# follow it.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")

_EMPTY_FRACTION = 0.02  # share of scenes with no object at all (negatives for detection)
_SUPERSAMPLE = 4  # draw masks at 4x and box-filter down: anti-aliased edges without per-pixel Python
_MIN_DOMINANCE = 1.5  # largest visible area >= 1.5x every other one: the ImageFolder label is unambiguous
_MIN_VISIBLE_FRACTION = 0.6  # an occluded object keeps at least 60% of its pixels
_CROP_CONTEXT = 1.3  # ImageFolder crop side = 1.3x the largest object's longer box side (some context around it)


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
        bump = np.outer(np.exp(-((coords - cy) ** 2) / (2 * sigma**2)), np.exp(-((coords - cx) ** 2) / (2 * sigma**2)))
        canvas += amplitude * bump[None]
    return canvas


def _draw_distractor_lines(rng: np.random.Generator, canvas: np.ndarray, size: int) -> np.ndarray:
    picture = Image.fromarray(np.ascontiguousarray(np.clip(canvas, 0, 255).astype(np.uint8).transpose(1, 2, 0)))
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
        draw.ellipse([cx - radius * factor, cy - radius * factor, cx + radius * factor, cy + radius * factor], fill=255)
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
            for (label, _outline, centre), alpha, full, visible, box in zip(placed, alphas, fulls, visibles, boxes):
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


def split_plan(rng: np.random.Generator, count: int) -> list[tuple[int | None, int]]:
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
