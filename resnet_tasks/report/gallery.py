"""The prediction gallery: a grid of evaluated images, ground truth beside the prediction, drawn with PIL.

Every image is scaled to a fixed cell (small images are enlarged first) before boxes and text are drawn, so
labels stay legible for 128-pixel images as for photos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from resnet_tasks.evaluation.gallery import GalleryItem
from resnet_tasks.report.drawing import WHITE, box_colour, mask_colour, overlay_mask

CELL = 256  # pixels of one image panel (square, image letterboxed inside)
HEADER = 22  # title strip above a sample
FONT_SIZE = 13
CAPTION_LINES = 4  # classification: truth + top-3
BACKGROUND = (255, 255, 255)
RIGHT, WRONG = (20, 130, 40), (200, 30, 30)


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled scalable font at `size` pixels."""
    return ImageFont.load_default(size=size)


def fit_image(image: np.ndarray, size: int = CELL) -> tuple[Image.Image, float, tuple[int, int]]:
    """The image scaled (up or down) to fit a `size` square, on a white square; returns it, the scale and the
    offset of the image inside the square."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(np.ascontiguousarray(image)).resize(new, Image.Resampling.BILINEAR)
    cell = Image.new("RGB", (size, size), BACKGROUND)
    offset = ((size - new[0]) // 2, (size - new[1]) // 2)
    cell.paste(picture, offset)
    return cell, scale, offset


def text_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int]) -> None:
    """`text` on a filled `colour` label whose top-left corner is `xy` (kept inside the cell); black on light
    colours, white on dark ones."""
    face = font()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    width, height = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), CELL - width)
    y = min(max(0.0, xy[1] - height), CELL - height)
    draw.rectangle([x, y, x + width, y + height], fill=colour)
    light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if light else (255, 255, 255), font=face)


def colour_of(name: str, colours: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    """One colour per class name across the gallery: the colour of its label when `colours` was seeded with the
    label space's names (`class_colours`), else the next colour in order of first appearance."""
    if name not in colours:
        colours[name] = box_colour(len(colours) + 1)
    return colours[name]


def class_colours(items: Sequence[GalleryItem]) -> dict[str, tuple[int, int, int]]:
    """Class name -> box colour from the items' class names (label i of the label space gets `box_colour(i)`,
    as in the prediction pictures); empty when the items do not name their classes."""
    names = next((getattr(item, "class_names", None) or item.mask_names for item in items), [])
    return {name: box_colour(label) for label, name in enumerate(names) if label > 0}


def boxes_panel(
    item: GalleryItem,
    boxes: np.ndarray | None,
    names: Sequence[str],
    scores: Sequence[float] | None,
    colours: dict[str, tuple[int, int, int]],
) -> Image.Image:
    """The image with `boxes` (XYXY in the item's pixels) labelled "name" or "name score"."""
    cell, scale, (dx, dy) = fit_image(item.image)
    draw = ImageDraw.Draw(cell)
    for i, box in enumerate(np.asarray(boxes if boxes is not None else np.zeros((0, 4))).reshape(-1, 4)):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        colour = colour_of(names[i], colours)
        draw.rectangle([x1 + dx, y1 + dy, x2 + dx, y2 + dy], outline=colour, width=2)
        label = names[i] if scores is None else f"{names[i]} {scores[i]:.2f}"
        text_box(draw, (x1 + dx, y1 + dy), label, colour)
    return cell


def mask_panel(item: GalleryItem, mask: np.ndarray | None, alpha: float = 0.55) -> Image.Image:
    """The image with each non-background class of `mask` painted in its VOC colour (ignore pixels white)."""
    image = item.image
    if mask is not None and mask.shape == image.shape[:2]:
        image = overlay_mask(image, mask, alpha, ignore_colour=WHITE)
    cell, _, _ = fit_image(image)
    return cell


def legend_panel(names: Sequence[str], indices: Sequence[int], width: int) -> Image.Image:
    """A strip naming the classes a mask pair shows, each with its colour."""
    strip = Image.new("RGB", (width, HEADER), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    x = 4
    for index in indices:
        colour = mask_colour(index)
        name = names[index] if 0 <= index < len(names) else str(index)
        draw.rectangle([x, 5, x + 12, 17], fill=colour, outline=(0, 0, 0))
        draw.text((x + 16, 4), name, fill=(0, 0, 0), font=font())
        x += 24 + int(draw.textlength(name, font=font()))
        if x > width - 40:
            break
    return strip


def header(title: str, note: str, width: int) -> Image.Image:
    """The title strip of one sample: the file name (its start cut to fit) and, right-aligned, `note`."""
    strip = Image.new("RGB", (width, HEADER), (235, 235, 235))
    draw = ImageDraw.Draw(strip)
    face = font()
    room = width - 16 - draw.textlength(note, font=face)
    while len(title) > 1 and draw.textlength(title, font=face) > room:
        title = "…" + title.lstrip("…")[1:]
    draw.text((4, 4), title, fill=(0, 0, 0), font=face)
    draw.text((width - 4 - draw.textlength(note, font=face), 4), note, fill=(90, 90, 90), font=face)
    return strip


def sample_picture(item: GalleryItem, colours: dict[str, tuple[int, int, int]]) -> Image.Image:
    """One sample: truth | prediction panels (detection, segmentation) or the image with its top-k labels."""
    if item.truth_mask is not None or item.pred_mask is not None:
        panels = [mask_panel(item, item.truth_mask), mask_panel(item, item.pred_mask)]
        present = sorted(
            {int(v) for m in (item.truth_mask, item.pred_mask) if m is not None for v in np.unique(m)} - {0, 255}
        )
        footer = legend_panel(item.mask_names, present, 2 * CELL)
        labels = ("truth", "prediction")
    elif item.truth_boxes is not None or item.pred_boxes is not None:
        truth = boxes_panel(item, item.truth_boxes, item.truth_names, None, colours)
        predicted = boxes_panel(item, item.pred_boxes, item.pred_names, item.pred_scores, colours)
        panels, footer, labels = [truth, predicted], None, ("truth", "prediction")
    else:
        cell, _, _ = fit_image(item.image)
        caption = Image.new("RGB", (CELL, CAPTION_LINES * (FONT_SIZE + 5) + 4), BACKGROUND)
        draw = ImageDraw.Draw(caption)
        draw.text((4, 2), f"truth: {item.truth}", fill=(0, 0, 0), font=font())
        for line, (name, probability) in enumerate(item.top[: CAPTION_LINES - 1], start=1):
            colour = RIGHT if name == item.truth else WRONG
            draw.text((4, 2 + line * (FONT_SIZE + 5)), f"{name} {probability:.2f}", fill=colour, font=font())
        panels, footer, labels = [cell], caption, ()
    note = f"loss {item.error:.2f}" if item.top else f"error {item.error:.2f}"
    width = CELL * len(panels)
    height = HEADER + CELL + (footer.height if footer is not None else 0)
    picture = Image.new("RGB", (width, height), BACKGROUND)
    picture.paste(header(item.title, note, width), (0, 0))
    for i, panel in enumerate(panels):
        picture.paste(panel, (i * CELL, HEADER))
    draw = ImageDraw.Draw(picture)
    for i, label in enumerate(labels):
        draw.text(
            (i * CELL + 4, HEADER + 2), label, fill=(0, 0, 0), font=font(), stroke_width=2, stroke_fill=(255, 255, 255)
        )
    if len(panels) == 2:
        draw.line([(CELL, HEADER), (CELL, HEADER + CELL)], fill=(120, 120, 120), width=1)
    if footer is not None:
        picture.paste(footer, (0, HEADER + CELL))
    return picture


def gallery_picture(items: Sequence[GalleryItem], columns: int | None = None) -> Image.Image | None:
    """All samples in a grid (4 per row for classification, 2 truth|prediction pairs otherwise)."""
    if not items:
        return None
    colours = class_colours(items)
    pictures = [sample_picture(item, colours) for item in items]
    if columns is None:
        columns = 4 if pictures[0].width <= CELL else 2
    columns = max(1, min(columns, len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    width = max(p.width for p in pictures)
    height = max(p.height for p in pictures)
    gap = 6
    grid = Image.new("RGB", (columns * (width + gap) - gap, rows * (height + gap) - gap), (200, 200, 200))
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        grid.paste(picture, (column * (width + gap), row * (height + gap)))
    return grid


def write_gallery(items: Sequence[GalleryItem], path: Path) -> Path | None:
    """Save the gallery of `items` as a JPEG (None when there is nothing to show)."""
    picture = gallery_picture(items)
    if picture is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, quality=88)
    return path
