"""A dataset as training sees it, without training: per split the images, negatives and per-class counts, and every
problem found (unreadable files, boxes or masks that disagree with their images, objects too small for the detector's
anchors, one image in two splits or in none). Images are read to their headers and hashed, not decoded; segmentation
masks are decoded (their values are in the pixels), their images are not."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from resnet_tasks.data.detection_annotations import DetectionAnnotations
from resnet_tasks.data.io import EXIF_ORIENTATION_TAG, IMAGE_EXTENSIONS, UnreadableImageError, jpeg_state
from resnet_tasks.data.segmentation import BINARY_MASKS_HINT
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace

# The splits inspected; one that fails to build stops `fit` unless it is "test".
SPLITS = ("train", "val", "test")
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees
T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: the file it concerns, one line saying what, a kind for grouping, and whether it stops
    training (`fatal`)."""

    file: str
    problem: str
    kind: str
    fatal: bool = False


@dataclass(frozen=True)
class AnchorGeometry:
    """What the detector sees of an object: torchvision's resize (shorter side to `min_size`, longer side at most
    `max_size`) and its smallest anchors (`anchor_size` px at each of `aspect_ratios`). An object whose best IoU
    with those anchors, centred on it, is under `min_iou` (the RPN's background threshold) is too small."""

    min_size: int
    max_size: int
    anchor_size: float
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_iou: float = 0.3

    def too_small(
        self, widths: np.ndarray, heights: np.ndarray, image_w: np.ndarray, image_h: np.ndarray
    ) -> np.ndarray:
        """Per object (its box size and its image's size, in the file's pixels): True when it is too small."""
        short = np.maximum(np.minimum(image_w, image_h), 1).astype(np.float64)
        long = np.maximum(np.maximum(image_w, image_h), 1).astype(np.float64)
        scale = np.minimum(self.min_size / short, self.max_size / long)
        w, h = widths * scale, heights * scale
        best = np.zeros(len(w))
        for ratio in self.aspect_ratios:  # torchvision: h = size * sqrt(r), w = size / sqrt(r)
            anchor_w, anchor_h = self.anchor_size / np.sqrt(ratio), self.anchor_size * np.sqrt(ratio)
            inter = np.minimum(w, anchor_w) * np.minimum(h, anchor_h)
            best = np.maximum(best, inter / (w * h + anchor_w * anchor_h - inter))
        return (best < self.min_iou) & (w * h < self.anchor_size**2)


@dataclass
class SplitSummary:
    """One split's figures: image count, negatives (no object), per-class counts (label-space order), size range."""

    images: int
    negatives: int
    counts: np.ndarray
    smallest: tuple[int, int] | None = None  # (width, height), each the minimum over the split
    largest: tuple[int, int] | None = None

    @property
    def instances(self) -> int:
        return int(self.counts.sum())


@dataclass
class DatasetReport:
    """What `inspect_data` found: the task, the classes `(label, id, name)`, the splits, problems and notes."""

    task: str
    classes: list[tuple[int, int, str]]
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def blocking(self) -> list[Problem]:
        """The problems that make training fail."""
        return [problem for problem in self.problems if problem.fatal]

    def unused(self, split: str) -> list[str]:
        """Names of the classes with no instance in `split`."""
        counts = self.splits[split].counts
        return [name for label, _, name in self.classes if counts[label] == 0]

    def to_json(self) -> dict[str, Any]:
        """The `dataset.json` content (see the contract: task, classes, splits, problems)."""
        splits = {}
        for name, split in self.splits.items():
            splits[name] = {"images": split.images, "negatives": split.negatives, "instances": split.instances}
            if split.smallest is not None and split.largest is not None:
                splits[name]["image_size"] = {"min": list(split.smallest), "max": list(split.largest)}
        classes = [
            {"id": ident, "name": name, **{s: int(self.splits[s].counts[label]) for s in self.splits}}
            for label, ident, name in self.classes
        ]
        problems = [{"file": problem.file, "problem": problem.problem} for problem in self.problems]
        return {"task": self.task, "classes": classes, "splits": splits, "problems": problems}


# ---------------------------------------------------------------------------------------------- reading files
@dataclass(frozen=True)
class FileFacts:
    """An image file's size as the decoder returns it (EXIF orientation applied), its content hash, or an error."""

    width: int = 0
    height: int = 0
    orientation: int = 1
    digest: bytes = b""
    error: str = ""


def file_facts(path: str) -> FileFacts:
    """Read one file's bytes (for the hash) and its header (for the size); pixels are not decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return FileFacts(error=f"cannot read it ({error.strerror or error})")
    digest = hashlib.blake2b(data, digest_size=16).digest()
    if jpeg_state(data) == "truncated":
        return FileFacts(digest=digest, error="truncated JPEG (no end-of-image marker); re-download or remove it")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception as error:  # PIL raises many types for broken files
        return FileFacts(digest=digest, error=f"not a readable image ({type(error).__name__}: {error})")
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return FileFacts(width, height, orientation, digest)


def parallel_map(function: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """`function` over `items` on a few threads (file reads and PNG decoding release the GIL)."""
    if len(items) < 64:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(function, items, chunksize=32))


# ---------------------------------------------------------------------------------------------- the splits
@dataclass
class SplitView:
    """What inspection reads of one split: its image files and the task's annotations of them."""

    name: str
    dataset: Any
    images: list[str]
    detection: DetectionAnnotations | None = None
    labels: np.ndarray | None = None  # classification: one label per image
    masks: list[str] | None = None  # segmentation: the mask files (read through `dataset.read_mask`)


def full_detection_annotations(datamodule: Any, split: str, dataset: Any) -> DetectionAnnotations:
    """A detection split's annotations with its negatives (a training dataset may have dropped them)."""
    split_annotations = getattr(datamodule, "split_annotations", None)
    if callable(split_annotations):
        full = split_annotations(split)
        if isinstance(full, DetectionAnnotations):
            return full
    return dataset.annotations


def split_view(datamodule: Any, split: str, dataset: Any) -> SplitView:
    """Read a built dataset's files and annotations (detection, segmentation or classification)."""
    annotations = getattr(dataset, "annotations", None)
    if isinstance(annotations, DetectionAnnotations):
        full = full_detection_annotations(datamodule, split, dataset)
        images = [str(full.image_path(i)) for i in range(len(full))]
        return SplitView(split, dataset, images, detection=full)
    if annotations is not None and hasattr(annotations, "path") and callable(getattr(dataset, "read_mask", None)):
        images = [annotations.path(i) for i in range(len(annotations))]  # masks drawn from the annotation file
        return SplitView(split, dataset, images, masks=list(images))
    if getattr(dataset, "masks", None) is not None and callable(getattr(dataset, "read_mask", None)):
        return SplitView(split, dataset, [str(p) for p in dataset.images], masks=[str(p) for p in dataset.masks])
    if getattr(dataset, "labels", None) is not None:
        paths = getattr(dataset, "paths", None)
        images = [os.fsdecode(p) for p in paths] if paths is not None else []  # none: in memory (CIFAR)
        return SplitView(split, dataset, images, labels=np.asarray(dataset.labels, dtype=np.int64))
    raise UserError(
        f"inspect reads datasets of labelled image files; the {split} split of {type(datamodule).__name__} is a "
        f"{type(dataset).__name__}. Inspect the files it was made from with their own data module."
    )


# ---------------------------------------------------------------------------------------------- the checks
def detection_counts(
    view: SplitView,
    facts: dict[str, FileFacts],
    num_classes: int,
    anchors: AnchorGeometry | None,
    report: DatasetReport,
) -> tuple[np.ndarray, int]:
    """Per-class box counts and negatives of a detection split; box, size and anchor problems into `report`."""
    ann = view.detection
    assert ann is not None
    for index in np.flatnonzero(ann.clipped_per_image + ann.dropped_per_image):
        clipped, dropped = int(ann.clipped_per_image[index]), int(ann.dropped_per_image[index])
        what = [f"{clipped} box(es) extend beyond the image (clipped to it)"] if clipped else []
        what += [f"{dropped} box(es) are degenerate (no area inside the image: dropped)"] if dropped else []
        report.problems.append(Problem(view.images[index], f"{' and '.join(what)}; fix them in {ann.source}", "boxes"))
    per_image = np.diff(ann.offsets)
    image_of = np.repeat(np.arange(len(ann)), per_image)
    small = np.zeros(len(ann.labels), dtype=bool)
    if anchors is not None and len(small):
        sizes = (ann.boxes[:, 2:] - ann.boxes[:, :2]).astype(np.float64)
        small = anchors.too_small(sizes[:, 0], sizes[:, 1], ann.widths[image_of], ann.heights[image_of])
    small_per_image = np.bincount(image_of[small], minlength=len(ann))
    for index, path in enumerate(view.images):
        found = facts[path]
        annotated = (int(ann.widths[index]), int(ann.heights[index]))
        if not found.error and annotated != (found.width, found.height):
            boxes = ann.boxes[ann.objects(index)]
            outside = int(((boxes[:, 2] > found.width + 0.5) | (boxes[:, 3] > found.height + 0.5)).sum())
            turned = f" (EXIF orientation {found.orientation} turns it)" if found.orientation != 1 else ""
            what = (
                f"annotated {annotated[0]}x{annotated[1]} but the image decodes to {found.width}x{found.height}"
                f"{turned}; {outside} of {len(boxes)} box(es) reach beyond it. Fix the annotated size or the file"
            )
            report.problems.append(Problem(path, what, "size"))
        if small_per_image[index]:
            assert anchors is not None
            what = (
                f"{small_per_image[index]} object(s) too small for the smallest anchor ({anchors.anchor_size:g} px) "
                f"at the model's input size (best IoU under {anchors.min_iou:g})"
            )
            report.problems.append(Problem(path, what, "small objects"))
    counts = np.bincount(ann.labels, minlength=num_classes)[:num_classes]
    return counts, int((per_image == 0).sum())


def segmentation_counts(
    view: SplitView, facts: dict[str, FileFacts], space: LabelSpace, report: DatasetReport
) -> tuple[np.ndarray, int]:
    """Images containing each class and negatives (no object class) of a segmentation split, from the masks as the
    dataset reads them (`dataset.read_mask`: its size and value checks, the image not decoded); mask problems into
    `report`, and one when void is all that is left of the objects (0/255 masks read with void 255, the default)."""
    assert view.masks is not None
    num_classes = space.num_classes

    def pixel_counts(index: int) -> np.ndarray | UserError | None:
        if facts[view.images[index]].error:
            return None  # already reported as unreadable
        try:
            return np.bincount(np.asarray(view.dataset.read_mask(index), dtype=np.uint8).ravel(), minlength=256)
        except UserError as error:
            return error

    counts = np.zeros(num_classes, dtype=np.int64)
    negatives, void, pixels = 0, 0, 0
    for index, result in enumerate(parallel_map(pixel_counts, range(len(view.images)))):
        if isinstance(result, UserError):
            skipped = isinstance(result, UnreadableImageError)  # training skips these; others stop it
            kind = "unreadable" if skipped else "mask"
            report.problems.append(
                Problem(view.masks[index], str(result), kind, fatal=not skipped and view.name != "test")
            )
        elif result is not None:
            present = np.flatnonzero(result[:num_classes])
            counts[present] += 1
            negatives += int(not np.any(present > 0) if space.background else present.size == 0)
            void, pixels = void + int(result[space.ignore_index]), pixels + int(result.sum())
    if void and not (counts[1:] if space.background else counts).any():
        what = (
            f"no mask holds an object class and {void / pixels:.0%} of their pixels are void (the --data.ignore_index "
            f"value): {BINARY_MASKS_HINT}"
        )
        report.problems.append(Problem(f"{view.name} split", what, "void"))
    return counts, negatives


def cross_split_checks(views: Iterable[SplitView], facts: dict[str, FileFacts], report: DatasetReport) -> None:
    """The same image (by content) in two splits; images in the splits' folders that no split lists."""
    views = list(views)
    first: dict[bytes, tuple[str, str]] = {}
    for view in views:
        for path in view.images:
            digest = facts[path].digest
            if not digest:
                continue
            split, other = first.setdefault(digest, (view.name, path))
            if split != view.name:
                report.problems.append(Problem(path, f"the same image as {other} of the {split} split", "duplicate"))
    images = {os.path.abspath(path) for view in views for path in view.images}
    known = images | {os.path.abspath(path) for view in views for path in view.masks or ()}
    for folder in sorted({os.path.dirname(path) for path in images}):
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
            extension = os.path.splitext(entry.name)[1].lower()
            if extension in IMAGE_EXTENSIONS and entry.is_file() and os.path.abspath(entry.path) not in known:
                what = "in no split (it sits in an image folder of the splits, but no split lists it)"
                report.problems.append(Problem(entry.path, what, "no split"))


def summarise_split(
    view: SplitView,
    facts: dict[str, FileFacts],
    space: LabelSpace,
    anchors: AnchorGeometry | None,
    report: DatasetReport,
    max_skipped_fraction: float,
) -> SplitSummary:
    """One split's figures; its problems into `report`."""
    unreadable = [path for path in view.images if facts[path].error]
    for path in unreadable:
        # Training skips unreadable images (up to --data.max_skipped_fraction); evaluation stops at one.
        report.problems.append(
            Problem(path, f"unreadable image: {facts[path].error}", "unreadable", view.name == "val")
        )
    if view.name == "train" and len(unreadable) > max_skipped_fraction * len(view.images):
        what = (
            f"{len(unreadable)} of {len(view.images)} training images are unreadable, more than "
            f"--data.max_skipped_fraction {max_skipped_fraction:g} allows"
        )
        report.problems.append(Problem("train split", what, "unreadable", fatal=True))
    if view.detection is not None:
        counts, negatives = detection_counts(view, facts, space.num_classes, anchors, report)
    elif view.masks is not None:
        counts, negatives = segmentation_counts(view, facts, space, report)
    else:
        assert view.labels is not None
        labels = view.labels[view.labels >= 0]
        counts, negatives = np.bincount(labels, minlength=space.num_classes)[: space.num_classes], 0
    readable = [facts[path] for path in view.images if not facts[path].error]
    summary = SplitSummary(len(view.labels) if view.labels is not None else len(view.images), negatives, counts)
    if readable:
        widths, heights = [f.width for f in readable], [f.height for f in readable]
        summary.smallest, summary.largest = (min(widths), min(heights)), (max(widths), max(heights))
    return summary


# ---------------------------------------------------------------------------------------------- the whole dataset
def inspect_data(datamodule: Any, task: str | None = None, anchors: AnchorGeometry | None = None) -> DatasetReport:
    """Inspect every split `datamodule` builds (train, val, test). `task` ("detection", ...; None: from the data)
    decides whether a background class is listed; `anchors` (detection) enables the small-object check."""
    space: LabelSpace | None = getattr(datamodule, "label_space", None)
    if space is None:
        raise UserError(f"{type(datamodule).__name__} knows no classes: give it a dataset (--data.root DIR).")
    problems: list[Problem] = []
    notes: list[str] = []
    views: dict[str, SplitView] = {}
    for split in SPLITS:
        try:
            dataset = datamodule.dataset(split)
        except UserError as error:
            problems.append(Problem(f"{split} split", str(error), "split", fatal=split != "test"))
            continue
        view = split_view(datamodule, split, dataset)
        same = next((name for name, other in views.items() if other.images and other.images == view.images), None)
        if same is not None:
            notes.append(f"the {split} split holds the {same} split's images (listed once, as {same})")
        else:
            views[split] = view
    if task is None:
        kinds = [("detection", v.detection is not None) for v in views.values()]
        kinds += [("segmentation", v.masks is not None) for v in views.values()]
        task = next((name for name, found in kinds if found), "classification")
    skip_background = task == "detection" and space.background
    classes = [(i, space.category_id(i), name) for i, name in enumerate(space.class_names) if i or not skip_background]
    report = DatasetReport(task, classes, problems=problems, notes=notes)
    paths = sorted({path for view in views.values() for path in view.images})
    facts = dict(zip(paths, parallel_map(file_facts, paths)))
    max_skipped = float(getattr(datamodule, "max_skipped_fraction", 0.0))
    for view in views.values():
        report.splits[view.name] = summarise_split(view, facts, space, anchors, report, max_skipped)
    cross_split_checks(views.values(), facts, report)
    if "train" in report.splits and report.splits["train"].images == 0:
        report.problems.append(Problem("train split", "the training split has no images", "split", fatal=True))
    negatives = report.splits["train"].negatives if "train" in report.splits else 0
    if negatives and task == "detection" and getattr(datamodule, "remove_images_without_annotations", False):
        notes.append(f"the train split's {negatives} negatives are not trained on (remove_images_without_annotations)")
    if anchors is not None:
        notes.append(
            f"object sizes checked against the smallest anchor ({anchors.anchor_size:g} px) after the model's resize "
            f"(min_size {anchors.min_size}, max_size {anchors.max_size})"
        )
    if task == "segmentation":
        notes.append("class counts and mask checks decode every mask as training reads it (not the images)")
    return report
