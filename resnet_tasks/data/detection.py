"""The detection data layer every format shares: annotations as column arrays, the dataset and its transforms,
aspect-ratio grouped batches and the DetectionDataModule base (`coco.py` and `voc.py` only parse their formats)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from resnet_tasks.data.common import (
    BaseDataModule,
    ResumableBatchSampler,
    TrainSampler,
    item_and_seed,
    list_images,
    read_image,
)
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace


# ----------------------------------------------------------------------------------------------- storage
@dataclass
class DetectionAnnotations:
    """All annotations of one split as flat numpy arrays (Detectron2's serialize idea).

    Image i owns objects `offsets[i]:offsets[i+1]` of `boxes` (float32 XYXY, pixels), `labels` (int64,
    contiguous 1..K), `crowd` / `difficult` (uint8) and `areas` (float32; COCO's annotation area). A DataLoader
    worker touching these arrays does not copy them (no per-object Python refcounts), unlike a list of dicts.
    `file_names` are relative to `root`, in one numpy bytes array. `image_ids` are the dataset's ids (COCO) or
    positions (VOC, whose results use the file stem: `string_ids`).
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

    def subset(self, keep: np.ndarray) -> DetectionAnnotations:
        """The images where `keep` is True (objects re-packed)."""
        indices = np.flatnonzero(keep)
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]
        objects = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        counts = self.offsets[indices + 1] - self.offsets[indices]
        return DetectionAnnotations(
            root=self.root,
            file_names=self.file_names[indices],
            image_ids=self.image_ids[indices],
            heights=self.heights[indices],
            widths=self.widths[indices],
            offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            boxes=self.boxes[objects],
            labels=self.labels[objects],
            crowd=self.crowd[objects],
            difficult=self.difficult[objects],
            areas=self.areas[objects],
            string_ids=self.string_ids,
            clipped_boxes=self.clipped_boxes,
            dropped_boxes=self.dropped_boxes,
            source=self.source,
        )

    def report_fixed_boxes(self) -> None:
        """One warning per split naming how many boxes were clipped to the image or dropped as degenerate."""
        if self.clipped_boxes or self.dropped_boxes:
            rank_zero_warn(
                f"{self.source}: clipped {self.clipped_boxes} box(es) to their image and dropped "
                f"{self.dropped_boxes} degenerate box(es) (no area inside the image)."
            )


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
    clipped: int = 0
    dropped: int = 0

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
        self.dropped += int((~valid).sum())
        self.clipped += int((valid & np.any(clipped != boxes, axis=1)).sum())
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
        )


# ----------------------------------------------------------------------------------------------- transforms
def detection_train_transform(
    hflip_prob: float = 0.5, large_scale_jitter: tuple[float, float] | None = None, crop_size: int | None = None
) -> A.Compose:
    """Training augmentation: horizontal flip, optionally large-scale jitter; boxes follow and stay inside.

    Multi-scale training is the model's job (`--model.min_size [480, ..., 800]`): its transform resizes every
    image, so a resize here would be undone. Large-scale jitter (Ghiasi et al. 2021, torchvision's `ScaleJitter`
    + `FixedSizeCrop`) is the exception: the longer side is scaled to `crop_size` x r (r drawn in
    `large_scale_jitter`), then the image is padded / randomly cropped to `crop_size` x `crop_size`; use it with
    `--model.min_size crop_size --model.max_size crop_size` so the model's resize leaves it alone.
    """
    steps: list[Any] = []
    if large_scale_jitter is not None:
        if crop_size is None:
            raise UserError("--data.large_scale_jitter needs --data.crop_size (the fixed training size, e.g. 1024).")
        low, high = large_scale_jitter
        steps += [
            A.LongestMaxSize(max_size=crop_size),
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0),
            A.PadIfNeeded(min_height=crop_size, min_width=crop_size, position="top_left", fill=0),
            A.RandomCrop(height=crop_size, width=crop_size),
        ]
    steps.append(A.HorizontalFlip(p=hflip_prob))
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True),
    )


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1] (the detector normalises with ImageNet statistics itself)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Images of different sizes stay a list (the model batches them after resizing)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionDataset(Dataset):
    """Images + targets from `DetectionAnnotations`.

    A target holds `boxes` float32 (N, 4) XYXY pixels, `labels` int64 (N,), `category_ids` int64 (N,: the
    dataset's id of each label, from `category_ids[label]`; the label itself when None), `iscrowd` int64,
    `difficult` uint8, `area` float32, `image_id` int64, `orig_size` int64 (h, w), plus `index` (position in
    the split), `image_key` (id written to results) and `file_name`. Training targets drop crowd and difficult
    objects; evaluation targets keep them, flagged, for the metrics to ignore.
    """

    def __init__(
        self,
        annotations: DetectionAnnotations,
        train: bool,
        transform: A.Compose | None = None,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        self.annotations = annotations
        self.train = train
        self.transform = transform
        self.category_ids = None if category_ids is None else np.asarray(category_ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, seed = item_and_seed(item)
        return self.item(read_image(self.annotations.image_path(index)), index, seed)

    def item(self, image: np.ndarray, index: int, seed: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """The (image, target) pair of image `index` from its decoded pixels (training: augmented with `seed`)."""
        ann = self.annotations
        height, width = image.shape[:2]
        span = ann.objects(index)
        boxes = ann.boxes[span].astype(np.float32)
        labels = ann.labels[span]
        crowd = ann.crowd[span]
        difficult = ann.difficult[span]
        areas = ann.areas[span]
        if self.train:
            keep = (crowd == 0) & (difficult == 0)
            boxes, labels = boxes[keep], labels[keep]
            # The file's size can disagree with the JSON's; the real pixels decide.
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[valid], labels[valid]
            if self.transform is not None:
                if seed is not None:
                    self.transform.set_random_seed(seed)
                out = self.transform(image=image, bboxes=boxes, labels=labels)
                image = out["image"]
                boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
                labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            crowd = np.zeros(len(labels), dtype=np.uint8)
            difficult = np.zeros(len(labels), dtype=np.uint8)
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        category_ids = self.category_ids[labels] if self.category_ids is not None else labels
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "category_ids": torch.as_tensor(category_ids, dtype=torch.int64),
            "iscrowd": torch.as_tensor(crowd, dtype=torch.int64).reshape(-1),
            "difficult": torch.as_tensor(difficult, dtype=torch.uint8).reshape(-1),
            "area": torch.as_tensor(areas, dtype=torch.float32).reshape(-1),
            "image_id": torch.tensor(int(ann.image_ids[index]), dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "index": index,
            "image_key": ann.result_image_id(index),
            "file_name": ann.file_name(index),
        }
        return image_to_tensor(image), target


class ImageFolderDetectionDataset(Dataset):
    """A plain folder of images for `predict` (no annotations): image_key is the file stem."""

    def __init__(self, folder: str | Path) -> None:
        self.files = list_images(folder)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.files[index]
        image = read_image(path)
        height, width = image.shape[:2]
        target = {
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "category_ids": torch.zeros((0,), dtype=torch.int64),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "index": index,
            "image_key": path.stem,
            "file_name": path.name,
        }
        return image_to_tensor(image), target


# ----------------------------------------------------------------------------------------------- batching
def aspect_ratio_groups(widths: np.ndarray, heights: np.ndarray, group_factor: int) -> np.ndarray:
    """Group id per image from width/height quantised on 2k+1 log-spaced bin edges in [1/2, 2] (k = factor).

    The same bins as torchvision's references (`_quantize(aspect_ratios, 2 ** linspace(-1, 1, 2k+1))`).
    """
    ratios = widths.astype(np.float64) / np.maximum(heights.astype(np.float64), 1.0)
    edges = 2.0 ** np.linspace(-1, 1, 2 * group_factor + 1)
    return np.digitize(ratios, edges)


class GroupedBatchSampler(ResumableBatchSampler):
    """Batches of images from one aspect-ratio group (less padding when the model batches them).

    Draws `(index, seed)` items from `sampler` (this rank's shard of a `TrainSampler` under DDP), fills one
    bucket per group and emits a bucket when it holds `batch_size` items. At the end the fullest unfinished
    buckets are topped up with earlier items of their own group, so every rank yields exactly
    `len(sampler) // batch_size` batches (equal counts keep DDP ranks in step).
    """

    def __init__(self, sampler: TrainSampler, group_ids: np.ndarray, batch_size: int) -> None:
        super().__init__(sampler, batch_size)
        self.group_ids = np.asarray(group_ids)

    def epoch_batches(self) -> Iterator[list[tuple[int, int]]]:
        buckets: dict[int, list[tuple[int, int]]] = defaultdict(list)
        seen: dict[int, list[tuple[int, int]]] = defaultdict(list)
        emitted = 0
        for item in self.sampler:
            group = int(self.group_ids[item[0]])
            buckets[group].append(item)
            seen[group].append(item)
            if len(buckets[group]) == self.batch_size:
                yield buckets.pop(group)
                emitted += 1
        wanted = len(self)
        for group, bucket in sorted(buckets.items(), key=lambda entry: (-len(entry[1]), entry[0])):
            if emitted >= wanted:
                break
            pool = seen[group]
            missing = self.batch_size - len(bucket)
            filler = (pool * math.ceil(missing / len(pool) + 1))[:missing]
            yield bucket + filler
            emitted += 1


# ----------------------------------------------------------------------------------------------- data modules
class DetectionDataModule(BaseDataModule):
    """What the COCO and VOC detection modules share: datasets, loaders, grouping, predict folders.

    Label convention: labels 1..K are the object classes, 0 is the background (`label_space`: background at 0
    with category id 0, never written to results). Targets carry each box's dataset category id beside its
    label, so evaluation compares in the dataset's id space whatever label space the model has.
    Subclasses implement `load_split(split)`; `evaluation_style` says which extra metrics apply ("coco"|"voc").
    """

    evaluation_style: str = "coco"

    def __init__(
        self,
        batch_size: int = 2,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        predict_split: str | None = None,
        aspect_ratio_group_factor: int = 3,
        hflip_prob: float = 0.5,
        large_scale_jitter: tuple[float, float] | None = None,
        crop_size: int | None = None,
        remove_images_without_annotations: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.predict_split = predict_split or val_split
        self.aspect_ratio_group_factor = aspect_ratio_group_factor
        self.hflip_prob = hflip_prob
        self.large_scale_jitter = None if large_scale_jitter is None else tuple(large_scale_jitter)
        self.crop_size = crop_size
        self.remove_images_without_annotations = remove_images_without_annotations
        self._annotations: dict[str, DetectionAnnotations] = {}
        self._datasets: dict[str, Dataset] = {}

    # -- subclass API
    def load_split(self, split: str) -> DetectionAnnotations:
        """Parse one split's annotations (COCO JSON, VOC XML, ...): the one method each dataset format provides."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_split()")

    def annotations(self, split: str) -> DetectionAnnotations:
        """The split's compact annotations, parsed once per process."""
        if split not in self._annotations:
            annotations = self.load_split(split)
            annotations.report_fixed_boxes()
            self._annotations[split] = annotations
        return self._annotations[split]

    def set_label_space(self, names: Sequence[str], category_ids: Sequence[int]) -> None:
        """Background, then the object classes `names` with their dataset `category_ids` (labels 1..K)."""
        self.label_space = LabelSpace.with_background(names, category_ids)

    # -- datasets
    def train_dataset(self) -> DetectionDataset:
        annotations = self.annotations(self.train_split)
        if self.remove_images_without_annotations:
            # torchvision's recipe trains only on images with at least one usable (non-crowd) object.
            usable = (annotations.crowd == 0) & (annotations.difficult == 0)
            running = np.concatenate(([0], np.cumsum(usable, dtype=np.int64)))
            counts = running[annotations.offsets[1:]] - running[annotations.offsets[:-1]]
            annotations = annotations.subset(counts > 0)
        if len(annotations) < self.batch_size:
            raise UserError(
                f"Split {self.train_split!r} has {len(annotations)} usable training image(s), fewer than "
                f"--data.batch_size {self.batch_size}."
            )
        transform = detection_train_transform(self.hflip_prob, self.large_scale_jitter, self.crop_size)
        return DetectionDataset(annotations, train=True, transform=transform, category_ids=self.category_id_table())

    def eval_dataset(self, split: str) -> DetectionDataset:
        return DetectionDataset(self.annotations(split), train=False, category_ids=self.category_id_table())

    def category_id_table(self) -> tuple[int, ...] | None:
        """Label -> the dataset's category id (None: labels are the ids)."""
        return None if self.label_space is None else self.label_space.category_ids

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self._datasets["train"] = self.train_dataset()
            self._datasets["val"] = self.eval_dataset(self.val_split)
        if stage == "validate":
            self._datasets["val"] = self.eval_dataset(self.val_split)
        if stage == "test":
            self._datasets["test"] = self.eval_dataset(self.test_split)
        if stage == "predict":
            if self.predict_path is not None:
                self._datasets["predict"] = ImageFolderDetectionDataset(self.predict_path)
            else:
                self._datasets["predict"] = self.eval_dataset(self.predict_split)

    # -- loaders
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = self._datasets["train"]
        if self.aspect_ratio_group_factor < 0:
            return self.loader(dataset, train=True, collate_fn=detection_collate)
        annotations = dataset.annotations
        groups = aspect_ratio_groups(annotations.widths, annotations.heights, self.aspect_ratio_group_factor)
        batches = GroupedBatchSampler(self.train_sampler(len(dataset)), groups, self.batch_size)
        return self.loader(dataset, train=True, collate_fn=detection_collate, batch_sampler=batches)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self._datasets["val"], train=False, collate_fn=detection_collate)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self._datasets["test"], train=False, collate_fn=detection_collate)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self._datasets["predict"], train=False, collate_fn=detection_collate)


