"""Detection annotations as column arrays: one split's images, their boxes and labels, and what was fixed on reading
(boxes clipped to their image or dropped as degenerate, per image), built by `AnnotationBuilder` from any format."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from resnet_tasks.errors import UserError


def _no_counts() -> np.ndarray:
    return np.zeros(0, dtype=np.int32)


@dataclass
class DetectionAnnotations:
    """All annotations of one split as flat numpy arrays (Detectron2's serialize idea).

    Image i owns objects `offsets[i]:offsets[i+1]` of `boxes` (float32 XYXY, pixels), `labels` (int64,
    contiguous 1..K), `crowd` / `difficult` (uint8) and `areas` (float32; COCO's annotation area). A DataLoader
    worker touching these arrays does not copy them (no per-object Python refcounts), unlike a list of dicts.
    `file_names` are relative to `root`, in one numpy bytes array. `image_ids` are the dataset's ids (COCO) or
    positions (VOC, whose results use the file stem: `string_ids`). `clipped_per_image` / `dropped_per_image`
    count, per image, the boxes clipped to the image and dropped as degenerate on reading; `clipped_boxes` /
    `dropped_boxes` are those counts over the split as read (`source` names it).
    """

    root: str
    file_names: np.ndarray
    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    difficult: np.ndarray
    areas: np.ndarray
    string_ids: bool = False
    clipped_boxes: int = 0
    dropped_boxes: int = 0
    source: str = ""
    clipped_per_image: np.ndarray = field(default_factory=_no_counts)
    dropped_per_image: np.ndarray = field(default_factory=_no_counts)

    def __post_init__(self) -> None:
        for name in ("clipped_per_image", "dropped_per_image"):
            if len(getattr(self, name)) != len(self.image_ids):  # built without them: none recorded
                setattr(self, name, np.zeros(len(self.image_ids), dtype=np.int32))

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, index: int) -> str:
        return self.file_names[index].decode("utf-8")

    def image_path(self, index: int) -> Path:
        return Path(self.root) / self.file_name(index)

    def result_image_id(self, index: int) -> int | str:
        """The image id written to results: the COCO id, or the file stem for datasets without ids (VOC)."""
        if self.string_ids:
            return Path(self.file_name(index)).stem
        return int(self.image_ids[index])

    def objects(self, index: int) -> slice:
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))

    @property
    def object_counts(self) -> np.ndarray:
        """The number of objects of each image."""
        return np.diff(self.offsets)

    @property
    def negatives(self) -> int:
        """The images without any object (crowd regions count as objects)."""
        return int((self.object_counts == 0).sum())

    def subset(self, keep: np.ndarray) -> DetectionAnnotations:
        """The images where `keep` is True, or at the indices `keep` (objects re-packed)."""
        keep = np.asarray(keep)
        indices = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]
        objects = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        counts = self.offsets[indices + 1] - self.offsets[indices]
        names = ("file_names", "image_ids", "heights", "widths", "clipped_per_image", "dropped_per_image")
        per_image = {name: getattr(self, name)[indices] for name in names}
        per_object = {name: getattr(self, name)[objects] for name in ("boxes", "labels", "crowd", "difficult", "areas")}
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        return dataclasses.replace(self, offsets=offsets, **per_image, **per_object)

    def most_frequent_labels(self) -> np.ndarray:
        """Per image its most frequent label (the smallest on a tie), 0 for an image without objects."""
        image_of = np.repeat(np.arange(len(self)), self.object_counts)
        result = np.zeros(len(self), dtype=np.int64)
        if not len(image_of):
            return result
        span = int(self.labels.max()) + 1
        pairs, counts = np.unique(image_of * span + self.labels, return_counts=True)
        images, labels = pairs // span, pairs % span
        order = np.lexsort((labels, -counts, images))  # per image: most objects first, then the smallest label
        first = np.ones(len(order), dtype=bool)
        first[1:] = images[order][1:] != images[order][:-1]
        result[images[order][first]] = labels[order][first]
        return result

    def require_images(self, hint: str) -> None:
        """A UserError when none of the first images is on disk: they are looked for in the wrong folder (`hint`
        says how to point at the right one). Single missing files are left to reading (skipped in training)."""
        first = range(min(len(self), 20))
        if len(first) and not any(self.image_path(i).is_file() for i in first):
            raise UserError(
                f"{self.source}: its first image {self.image_path(0)} is not on disk, nor are the next ones. {hint}"
            )

    def report_fixed_boxes(self) -> None:
        """One warning per split naming how many boxes were clipped to the image or dropped as degenerate."""
        if self.clipped_boxes or self.dropped_boxes:
            rank_zero_warn(
                f"{self.source}: clipped {self.clipped_boxes} box(es) to their image and dropped "
                f"{self.dropped_boxes} degenerate box(es) (no area inside the image)."
            )

    def summary(self, class_names: Sequence[str], negatives_trained: bool = True) -> str:
        """One line: the split (`source`), its images, negatives and boxes, and the classes without any box in it."""
        line = f"{self.source}: {len(self)} images, {len(self.labels)} boxes, {self.negatives} negatives (no object)"
        if self.negatives and not negatives_trained:
            line += " not trained on (remove_images_without_annotations)"
        counts = np.bincount(self.labels, minlength=len(class_names) + 1)[1:]
        unused = [name for name, count in zip(class_names, counts) if count == 0]
        if unused:
            listed = ", ".join(unused[:10]) + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
            line += f"; no box of {len(unused)} class(es): {listed}"
        return line


@dataclass
class AnnotationBuilder:
    """Collects per-image objects, clips boxes to the image and drops degenerate ones, then packs arrays."""

    root: str
    source: str
    string_ids: bool = False
    file_names: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    crowd: list[np.ndarray] = field(default_factory=list)
    difficult: list[np.ndarray] = field(default_factory=list)
    areas: list[np.ndarray] = field(default_factory=list)
    clipped_per_image: list[int] = field(default_factory=list)
    dropped_per_image: list[int] = field(default_factory=list)

    @property
    def clipped(self) -> int:
        return sum(self.clipped_per_image)

    @property
    def dropped(self) -> int:
        return sum(self.dropped_per_image)

    def add_image(
        self,
        file_name: str,
        image_id: int,
        height: int,
        width: int,
        boxes_xyxy: np.ndarray,
        labels: np.ndarray,
        crowd: np.ndarray,
        difficult: np.ndarray,
        areas: np.ndarray,
    ) -> None:
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        clipped = boxes.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        valid = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        self.dropped_per_image.append(int((~valid).sum()))
        self.clipped_per_image.append(int((valid & np.any(clipped != boxes, axis=1)).sum()))
        self.file_names.append(file_name)
        self.image_ids.append(int(image_id))
        self.heights.append(int(height))
        self.widths.append(int(width))
        self.counts.append(int(valid.sum()))
        self.boxes.append(clipped[valid].astype(np.float32))
        self.labels.append(np.asarray(labels, dtype=np.int64)[valid])
        self.crowd.append(np.asarray(crowd, dtype=np.uint8)[valid])
        self.difficult.append(np.asarray(difficult, dtype=np.uint8)[valid])
        self.areas.append(np.asarray(areas, dtype=np.float32)[valid])

    def build(self) -> DetectionAnnotations:
        def cat(parts: list[np.ndarray], dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype=dtype)

        return DetectionAnnotations(
            root=self.root,
            file_names=np.array([name.encode("utf-8") for name in self.file_names], dtype=np.bytes_),
            image_ids=np.asarray(self.image_ids, dtype=np.int64),
            heights=np.asarray(self.heights, dtype=np.int32),
            widths=np.asarray(self.widths, dtype=np.int32),
            offsets=np.concatenate(([0], np.cumsum(self.counts, dtype=np.int64))).astype(np.int64),
            boxes=cat(self.boxes, np.float32, (0, 4)).reshape(-1, 4),
            labels=cat(self.labels, np.int64, (0,)),
            crowd=cat(self.crowd, np.uint8, (0,)),
            difficult=cat(self.difficult, np.uint8, (0,)),
            areas=cat(self.areas, np.float32, (0,)),
            string_ids=self.string_ids,
            clipped_boxes=self.clipped,
            dropped_boxes=self.dropped,
            source=self.source,
            clipped_per_image=np.asarray(self.clipped_per_image, dtype=np.int32),
            dropped_per_image=np.asarray(self.dropped_per_image, dtype=np.int32),
        )
