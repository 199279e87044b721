"""The detection data layer every format shares: the dataset and its transforms, the collate and the
`DetectionDataModule` base with its held-out val split (the modules in `formats/` only parse their formats into
`DetectionAnnotations`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from resnet_tasks.data.base import BaseDataModule
from resnet_tasks.data.detection_annotations import DetectionAnnotations
from resnet_tasks.data.io import image_to_tensor, list_images, read_image
from resnet_tasks.data.sampling import (
    AspectRatioBatchSampler,
    ResumableBatchSampler,
    aspect_ratio_groups,
    item_and_seed,
)
from resnet_tasks.data.splitting import choose_val_fraction, hold_out, save_val_split, tell
from resnet_tasks.data.transforms import detection_train_transform, unit_range_images
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace

# What a detection model's outputs mean (the exported model's sidecar says it).
DETECTION_OUTPUT = (
    "boxes: (K, 4) float32 XYXY in input pixels; scores: (K,) float32; labels: (K,) int64 dataset "
    "category ids (see category_ids); batch of 1 image, any height and width"
)


# ----------------------------------------------------------------------------------------------- dataset
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
        # uint8 across the workers; pixels / 255 on the device (`DetectionDataModule.to_model_input`).
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


# ----------------------------------------------------------------------------------------------- data modules
class DetectionDataModule(BaseDataModule):
    """What every detection module shares: datasets, collate, aspect-ratio grouped training batches, predict folders,
    a held-out val split and the test split's fallback.

    Label convention: labels 1..K are the object classes, 0 is the background (`label_space`: background at 0,
    with no dataset category id, never written to results). Targets carry each box's dataset category id beside its
    label, so evaluation compares in the dataset's id space whatever label space the model has.
    Subclasses implement `load_split(split)`; `evaluation_style` says which extra metrics apply ("coco"|"voc").
    `val_split` None: the data has no val split, so `val_fraction` of the training images (default 0.1) is held
    out as val; a subclass that takes `val_fraction` / `split_seed` sets them (a given fraction always holds out).
    `test_split` None: `test` evaluates the val split (said in one line).
    """

    evaluation_style: str = "coco"
    val_fraction: float | None = None
    split_seed: int = 0

    def __init__(
        self,
        batch_size: int = 2,
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str | None = "val",
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

    def summarise(self, split: str, annotations: DetectionAnnotations) -> None:
        """Print the data summary of a split once: images, boxes, negatives, classes without a box."""
        names = self.label_space.object_names if self.label_space is not None else ()
        trained = split != self.train_split or not self.remove_images_without_annotations
        tell(annotations.summary(names, negatives_trained=trained))

    # -- the splits
    @functools.cached_property
    def held_out(self) -> float | None:
        """The share of the training images held out as val (None: the data's own val split)."""
        return choose_val_fraction(self.val_fraction, self.val_split is not None, self.describe_split("train"))

    def describe_split(self, key: str) -> str:
        """The split `key` as the user knows it (a file or folder), for messages."""
        return f"{type(self).__name__} split {getattr(self, f'{key}_split')!r}"

    @functools.cached_property
    def held_out_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) image indices into the training split: seeded, stratified by each image's most frequent
        class (negatives a class of their own), a function of the file names."""
        annotations = self.annotations(self.require_split("train"))
        names = [annotations.file_name(i) for i in range(len(annotations))]
        labels = annotations.most_frequent_labels()
        return hold_out(names, labels, float(self.held_out or 0), self.split_seed, self.describe_split("train"))

    def require_split(self, key: str) -> str:
        """The split name of `key`; UserError when the data has none."""
        name = getattr(self, f"{key}_split")
        if name is None:
            raise UserError(f"{type(self).__name__}: the data has no {key} split. Pass --data.{key}_split NAME.")
        return name

    def split_annotations(self, key: str) -> DetectionAnnotations:
        """The annotations of "train", "val" or "test" as read (negatives included; val held out of train where
        that applies; test is val without a test split)."""
        if key == "test" and self.test_split is None:
            key = "val"  # test evaluates val
        if key in ("train", "val") and self.held_out is not None:
            train, val = self.held_out_indices
            return self.annotations(self.require_split("train")).subset(train if key == "train" else val)
        return self.annotations(self.require_split(key))

    # -- datasets
    def train_dataset(self) -> DetectionDataset:
        annotations = self.split_annotations("train")
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

    def build_dataset(self, key: str) -> Dataset:
        """train and val/test from their splits (val held out of train where that applies; test: val when the data
        has no test split); predict over `predict_path` (a folder of images) or `predict_split` (default val)."""
        if key == "train":
            return self.train_dataset()
        if key == "predict" and self.predict_path is not None:
            return ImageFolderDetectionDataset(self.predict_path)
        if key == "test" and self.test_split is None:
            tell("no test split: test evaluates the val split")
            return self.dataset("val")
        if key == "predict" and self.predict_split in (None, self.val_split):
            return self.dataset("val")
        if key == "val" and self.held_out is not None:
            annotations = self.split_annotations("val")
            return DetectionDataset(annotations, train=False, category_ids=self.category_id_table())
        return self.eval_dataset(self.require_split(key))

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage == "fit" and self.held_out is not None and self.trainer is not None:
            val = self.dataset("val").annotations  # type: ignore[attr-defined]
            save_val_split(self.trainer, lambda: [val.file_name(i) for i in range(len(val))])

    def collate(self, train: bool) -> Callable:
        return detection_collate

    def train_batch_sampler(self, dataset: Dataset) -> ResumableBatchSampler:
        """Batches of one aspect-ratio group (`aspect_ratio_group_factor` < 0: plain shuffled batches)."""
        if self.aspect_ratio_group_factor < 0:
            return super().train_batch_sampler(dataset)
        annotations = dataset.annotations  # type: ignore[attr-defined]
        groups = aspect_ratio_groups(annotations.widths, annotations.heights, self.aspect_ratio_group_factor)
        return AspectRatioBatchSampler(self.train_sampler(len(dataset)), groups, self.batch_size)  # type: ignore[arg-type]

    def to_model_input(self, batch: Any) -> Any:
        """(uint8 images, targets) moved to the device -> (float32 images in [0, 1], targets): the detector resizes
        and normalises with its own statistics."""
        if batch is None:
            return None
        images, targets = batch
        return unit_range_images(images), targets

    def eval_preprocessing(self) -> dict[str, Any]:
        """Images as they are: the detector resizes (`model_resize`, the model's setting) and normalises itself."""
        return {**super().eval_preprocessing(), "output": DETECTION_OUTPUT}
