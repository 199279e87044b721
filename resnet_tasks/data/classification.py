"""Classification data: images with class labels (the ImageFolder / ImageNet layout and the bundled shapes images),
their datasets and the `ImageFolderDataModule` the other classification modules build on."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from resnet_tasks.data.base import BaseDataModule
from resnet_tasks.data.gpu_decode import DeviceImagePipeline, EncodedImages, collate_encoded, read_encoded
from resnet_tasks.data.io import IMAGE_EXTENSIONS, UnreadableImageError, list_images, read_image
from resnet_tasks.data.sampling import RepeatedAugmentationSampler, TrainSampler, default_num_workers, item_and_seed
from resnet_tasks.data.shapes import shapes_layout
from resnet_tasks.data.splitting import choose_val_fraction, hold_out, save_val_split, tell
from resnet_tasks.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZED_CROP_RATIO,
    ResizedCropSampler,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace

IMAGEFOLDER_LAYOUT = """expected layout:
  ROOT/train/<class name>/*.jpg|jpeg|png
  ROOT/val/<class name>/*.jpg|jpeg|png"""
# What a classification model's output means (the exported model's sidecar says it).
CLASSIFICATION_OUTPUT = "probs: (N, C) float32 softmax probabilities, C = len(class_names)"


class ImageListDataset(Dataset):
    """Images from a list of files with integer labels (-1 = unknown), as {"image", "label", "name"} items.

    Paths live in one numpy byte array and labels in an int64 array, so DataLoader workers share them
    instead of copying a Python list of a million tuples on read.
    """

    def __init__(self, files: list[Path], labels: list[int], transform: Callable, root: Path | None = None) -> None:
        self.root = root
        names = [str(p.relative_to(root)) if root is not None else p.name for p in files]
        self.paths = np.array([os.fsencode(p) for p in files])
        self.names = np.array([n.encode() for n in names])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item_and_seed(item)
        image = read_image(os.fsdecode(self.paths[index]))
        return {
            **self.transform(image, seed),  # "image" uint8 CHW (+ "erase": random erasing's box)
            "label": int(self.labels[index]),
            "name": self.names[index].decode(),
        }


def _no_transform(image: Any, seed: int | None = None) -> Any:
    return image  # the device path transforms whole batches on the device (a picklable no-op for the base class)


class EncodedImageListDataset(ImageListDataset):
    """The same files for the device decode path: items hold the file undecoded (`read_encoded`), its path and the
    sample's seed (None in evaluation); the device decodes and augments the batch."""

    def __init__(self, files: list[Path], labels: list[int], root: Path | None = None) -> None:
        super().__init__(files, labels, transform=_no_transform, root=root)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item_and_seed(item)
        path = os.fsdecode(self.paths[index])
        return {
            "image": read_encoded(path),
            "path": path,
            "seed": seed,
            "label": int(self.labels[index]),
            "name": self.names[index].decode(),
        }


def scan_image_folder(split_dir: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """Files and labels of an ImageFolder split, classes given by `class_names` (folder names)."""
    index = {name: i for i, name in enumerate(class_names)}
    files: list[Path] = []
    labels: list[int] = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        if entry.name not in index:
            raise UserError(
                f"Class folder {Path(entry.path)} is not among the training classes; every class in "
                f"{split_dir} must also exist under ROOT/train. {IMAGEFOLDER_LAYOUT}"
            )
        for file in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if file.is_file() and os.path.splitext(file.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(Path(file.path))
                labels.append(index[entry.name])
    if not files:
        raise UserError(f"No images found under {split_dir}. {IMAGEFOLDER_LAYOUT}")
    return files, labels


class ImageFolderDataModule(BaseDataModule):
    """Any dataset in the ImageFolder / ImageNet layout (`root/train/<class>/...`, `root/val/<class>/...`).

    Training uses torchvision's ImageNet preset (RandomResizedCrop + flip); evaluation resizes the shorter
    side to `resize_size` and centre-crops `crop_size`. The `test` stage evaluates the `val` split unless a
    `test` folder exists. `predict` runs over `predict_path` (a folder of images) or the val split. Without a
    `val` folder (or with `val_fraction` given), val is a seeded, class-stratified share of `train`
    (`val_fraction`, default 0.1; `split_seed`), saved by `fit` as `val_split.txt` in the run directory.

    `decode_device: cuda` moves JPEG decoding and the crop/flip/normalise steps onto the GPU (workers only read
    bytes; see `resnet_tasks.data.gpu_decode`): for when the CPU cores cannot keep the GPU busy. The crop of a
    sample is the same on both paths (one `ResizedCropSampler`); TrivialAugment and random erasing exist on the CPU
    path only.

    `num_workers` None: one DataLoader worker per core but one, at most 8 (`default_num_workers`). Measured: the
    ImageNet training pipeline decodes and augments about 500 images/s per core, so 6-8 workers feed a GPU's
    3,000 images/s; DataLoader's default prefetch (2 batches per worker) is kept, as 4 measured no faster.
    """

    def __init__(
        self,
        crop_size: int = 224,
        resize_size: int = 256,
        eval_crop_size: int | None = None,
        train_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        class_names: list[str] | None = None,
        auto_augment: Literal["ta_wide"] | None = None,
        random_erase: float = 0.0,
        repeated_augmentations: int = 1,
        decode_device: Literal["cpu", "cuda"] = "cpu",
        num_workers: int | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.val_fraction, self.split_seed = val_fraction, split_seed
        super().__init__(num_workers=default_num_workers() if num_workers is None else num_workers, **kwargs)
        if repeated_augmentations < 1:
            raise UserError(f"--data.repeated_augmentations must be >= 1 (1 = off), got {repeated_augmentations}.")
        self.decode_device = decode_device
        self.device_pipeline: DeviceImagePipeline | None = None
        if decode_device not in ("cpu", "cuda"):
            raise UserError(f"--data.decode_device must be cpu or cuda, got {decode_device!r}.")
        if decode_device == "cuda":
            if not torch.cuda.is_available():
                raise UserError(
                    "--data.decode_device cuda decodes JPEGs on the GPU, but no CUDA GPU is visible "
                    "(torch.cuda.is_available() is False). Use --data.decode_device cpu (decoding in the DataLoader "
                    "workers) or run on a machine with a GPU."
                )
            if auto_augment is not None or random_erase > 0:
                raise UserError(
                    "--data.decode_device cuda applies RandomResizedCrop, flip and normalisation only; "
                    "--data.auto_augment and --data.random_erase run on the CPU path. Use --data.decode_device cpu "
                    "or turn those two off."
                )
            self.device_pipeline = DeviceImagePipeline(
                crop_size,
                resize_size,
                eval_crop_size or crop_size,
                ResizedCropSampler(tuple(train_scale), RESIZED_CROP_RATIO, hflip),
                tuple(mean),
                tuple(std),
            )
        self.auto_augment = auto_augment
        self.random_erase = random_erase
        self.repeated_augmentations = repeated_augmentations
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.eval_crop_size = eval_crop_size or crop_size
        self.train_scale = tuple(train_scale)
        self.hflip = hflip
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.folder_names: list[str] = []
        if self.predict_path is not None and self.root is not None and not self.root.is_dir():
            self.root = None  # predicting on a folder needs no dataset (the config may name one not here)
        if self.root is not None:
            self.folder_names = self._discover_classes()
            names = list(class_names) if class_names else list(self.folder_names)
            if len(names) != len(self.folder_names):
                raise UserError(
                    f"--data.class_names has {len(names)} names but {self.root} has "
                    f"{len(self.folder_names)} class folders."
                )
            self.label_space = LabelSpace(tuple(names))
        elif self.predict_path is None:
            self.require_root()

    def _discover_classes(self) -> list[str]:
        root = self.require_root()
        for split in ("train", "val"):
            split_dir = root / split
            if split_dir.is_dir():
                names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
                if not names:
                    raise UserError(f"{split_dir} has no class folders. {IMAGEFOLDER_LAYOUT}")
                return names
        raise UserError(f"{root} has neither a train/ nor a val/ folder. {IMAGEFOLDER_LAYOUT}")

    def train_transform(self) -> Callable:
        return imagenet_train_transform(
            self.crop_size,
            self.train_scale,
            self.hflip,
            trivial_augment=self.auto_augment == "ta_wide",
            random_erase=self.random_erase,
        )

    def train_sampler(self, dataset_len: int) -> TrainSampler:
        """The shuffled order, or repeated augmentation with `repeated_augmentations` > 1."""
        if self.repeated_augmentations > 1:
            return RepeatedAugmentationSampler(dataset_len, seed=self.seed, repetitions=self.repeated_augmentations)
        return super().train_sampler(dataset_len)

    def eval_transform(self) -> Callable:
        return imagenet_eval_transform(self.eval_crop_size, self.resize_size)

    def image_list(self, files: list[Path], labels: list[int], root: Path, train: bool) -> ImageListDataset:
        """The dataset of `files` with their `labels`: decoded and transformed in the workers, or read undecoded
        for the device decode path."""
        if self.device_pipeline is not None:
            return EncodedImageListDataset(files, labels, root=root)
        transform = self.train_transform() if train else self.eval_transform()
        return ImageListDataset(files, labels, transform, root=root)

    @functools.cached_property
    def held_out(self) -> float | None:
        """The share of `train` held out as val (None: the `val` folder is the val split)."""
        root = self.require_root()
        return choose_val_fraction(self.val_fraction, (root / "val").is_dir(), str(root / "train"))

    def split_dataset(self, split: str, train: bool) -> Dataset:
        """The images of the split folder `split` under the root (train/val: held out of `train` where it applies)."""
        root = self.require_root()
        from_train = split in ("train", "val") and self.held_out is not None
        split_dir = root / ("train" if from_train else split)
        if not split_dir.is_dir():
            raise UserError(f"Missing split folder {split_dir}. {IMAGEFOLDER_LAYOUT}")
        files, labels = scan_image_folder(split_dir, self.folder_names)
        if from_train:
            names = [str(path.relative_to(root)) for path in files]
            chosen = hold_out(names, labels, float(self.held_out), self.split_seed, str(split_dir))[split == "val"]
            files, labels = [files[i] for i in chosen], [labels[i] for i in chosen]
        return self.image_list(files, labels, root, train)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage == "fit" and self.held_out is not None and self.trainer is not None:
            save_val_split(self.trainer, lambda: [name.decode() for name in self.dataset("val").names])

    def build_dataset(self, key: str) -> Dataset:
        """train/val from their folders; test from `test/` when it exists, else val; predict over `predict_path`
        (else the val split)."""
        if key == "predict":
            if self.predict_path is None:
                return self.dataset("val")
            folder = Path(self.predict_path)
            files = list_images(folder)
            return self.image_list(files, [-1] * len(files), folder, train=False)
        if key == "test":
            if self.root is not None and (self.root / "test").is_dir():
                return self.split_dataset("test", train=False)
            tell("no test split: test evaluates the val split")
            return self.dataset("val")
        return self.split_dataset(key, train=key == "train")

    def collate(self, train: bool) -> Callable | None:
        """On the device decode path, items are collated undecoded (`collate_encoded`)."""
        return collate_encoded if self.device_pipeline is not None else None

    def eval_preprocessing(self) -> dict[str, Any]:
        """Shorter side to `resize_size`, centre crop `eval_crop_size`, the module's mean/std."""
        resize = {"resize": int(self.resize_size), "crop": int(self.eval_crop_size)}
        return {**super().eval_preprocessing(), **resize, "output": CLASSIFICATION_OUTPUT}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Device decode path: decode and augment the moved batch on its device (else the uint8 images become the
        model's input: `BaseDataModule.to_model_input`).

        A corrupt image is skipped and counted in training, as on the CPU path (`take_skip_report`); in
        evaluation it stops the run with an error naming the file.
        """
        if not isinstance(batch, dict) or not isinstance(batch.get("image"), EncodedImages):
            return super().on_after_batch_transfer(batch, dataloader_idx)
        assert self.device_pipeline is not None
        encoded: EncodedImages = batch["image"]
        labels: torch.Tensor = batch["label"]
        images, failures = self.device_pipeline(encoded, labels.device, self.model_channels_last())
        if not failures:
            return {**batch, "image": images}
        if encoded.seeds is None:
            raise UnreadableImageError(next(iter(failures.values())))
        self.skipped.extend(failures.values())
        if self.trainer is not None and self.trainer.training:
            self.seen_in_epoch -= len(failures)
        kept = [i for i in range(len(encoded)) if i not in failures]
        if not kept:
            return None
        index = torch.tensor(kept, device=labels.device)
        return {"image": images, "label": labels[index], "name": [batch["name"][i] for i in kept]}


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k in the ImageFolder layout (`root/train/n01440764/...`, `root/val/n01440764/...`)."""


class ShapesClassificationDataModule(ImageFolderDataModule):
    """The bundled shapes as an ImageFolder: 64 px crops centred on each scene's largest shape, labelled with
    its class; generated on first use.

    Small images keep CPU training to minutes: mild scale jitter (the shape must stay in view), evaluation at
    the native size.
    """

    def __init__(
        self,
        root: str | None = None,
        num_workers: int = 2,
        crop_size: int = 64,
        resize_size: int = 64,
        train_scale: tuple[float, float] = (0.8, 1.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root if root is not None else shapes_layout("imagefolder"),
            num_workers=num_workers,
            crop_size=crop_size,
            resize_size=resize_size,
            train_scale=train_scale,
            **kwargs,
        )
