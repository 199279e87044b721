"""Classification data: ImageFolder / ImageNet layout, CIFAR-10/100 pickles, and the bundled shapes images."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from resnet_tasks.data.common import (
    IMAGE_EXTENSIONS,
    BaseDataModule,
    RepeatedAugmentationSampler,
    TrainSampler,
    UnreadableImageError,
    default_num_workers,
    item_and_seed,
    list_images,
    read_image,
)
from resnet_tasks.data.gpu_decode import DeviceImagePipeline, EncodedImages, collate_encoded, read_encoded
from resnet_tasks.data.shapes import shapes_layout
from resnet_tasks.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZED_CROP_RATIO,
    ResizedCropSampler,
    cifar_eval_transform,
    cifar_train_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace

IMAGEFOLDER_LAYOUT = """expected layout:
  ROOT/train/<class name>/*.jpg|jpeg|png
  ROOT/val/<class name>/*.jpg|jpeg|png"""


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
            "image": self.transform(image, seed),
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
    `test` folder exists. `predict` runs over `predict_path` (a folder of images) or the val split.

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
        **kwargs: Any,
    ) -> None:
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
        self.datasets: dict[str, Dataset] = {}

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
            self.mean,
            self.std,
            trivial_augment=self.auto_augment == "ta_wide",
            random_erase=self.random_erase,
        )

    def train_sampler(self, dataset_len: int) -> TrainSampler:
        """The shuffled order, or repeated augmentation with `repeated_augmentations` > 1."""
        if self.repeated_augmentations > 1:
            return RepeatedAugmentationSampler(dataset_len, seed=self.seed, repetitions=self.repeated_augmentations)
        return super().train_sampler(dataset_len)

    def eval_transform(self) -> Callable:
        return imagenet_eval_transform(self.eval_crop_size, self.resize_size, self.mean, self.std)

    def split_dataset(self, split: str, train: bool) -> Dataset:
        root = self.require_root()
        split_dir = root / split
        if not split_dir.is_dir():
            raise UserError(f"Missing split folder {split_dir}. {IMAGEFOLDER_LAYOUT}")
        files, labels = scan_image_folder(split_dir, self.folder_names)
        if self.device_pipeline is not None:
            return EncodedImageListDataset(files, labels, root=root)
        transform = self.train_transform() if train else self.eval_transform()
        return ImageListDataset(files, labels, transform, root=root)

    def dataset(self, key: str) -> Dataset:
        if key not in self.datasets:
            if key == "train":
                self.datasets[key] = self.split_dataset("train", train=True)
            elif key == "val":
                self.datasets[key] = self.split_dataset("val", train=False)
            elif key == "test":
                has_test = self.root is not None and (self.root / "test").is_dir()
                self.datasets[key] = self.split_dataset("test" if has_test else "val", train=False)
            elif key == "predict":
                if self.predict_path is not None:
                    folder = Path(self.predict_path)
                    files = list_images(folder)
                    if self.device_pipeline is not None:
                        self.datasets[key] = EncodedImageListDataset(files, [-1] * len(files), root=folder)
                    else:
                        self.datasets[key] = ImageListDataset(
                            files, [-1] * len(files), self.eval_transform(), root=folder
                        )
                else:
                    self.datasets[key] = self.dataset("val")
        return self.datasets[key]

    def loader(self, dataset: Dataset, *, train: bool, collate_fn: Any = None, batch_sampler: Any = None) -> Any:
        """The base loader; on the device decode path its items are collated undecoded (`collate_encoded`)."""
        if self.device_pipeline is not None and collate_fn is None:
            collate_fn = collate_encoded
        return super().loader(dataset, train=train, collate_fn=collate_fn, batch_sampler=batch_sampler)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Device decode path: decode and augment the moved batch on its device.

        A corrupt image is skipped and counted in training, as on the CPU path (`take_skip_report`); in
        evaluation it stops the run with an error naming the file.
        """
        if not isinstance(batch, dict) or not isinstance(batch.get("image"), EncodedImages):
            return batch
        assert self.device_pipeline is not None
        encoded: EncodedImages = batch["image"]
        labels: torch.Tensor = batch["label"]
        images, failures = self.device_pipeline(encoded, labels.device)
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


class ArrayImageDataset(Dataset):
    """In-memory uint8 NHWC images with labels (CIFAR), as {"image", "label", "name"} items."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, prefix: str) -> None:
        self.images = images
        self.labels = labels.astype(np.int64)
        self.transform = transform
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item_and_seed(item)
        return {
            "image": self.transform(self.images[index], seed),
            "label": int(self.labels[index]),
            "name": f"{self.prefix}/{index:05d}",
        }


CIFAR_FILES = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"),
    100: ("cifar-100-python", ["train"], ["test"], "meta"),
}


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"Missing CIFAR file {path}. Put torchvision's python-pickle CIFAR files under --data.root "
            "(ROOT/cifar-10-batches-py/ or ROOT/cifar-100-python/), or pass --data.download true."
        )
    try:
        with open(path, "rb") as handle:
            # The CIFAR pickles hold only numpy arrays, lists and strings (the official files).
            return pickle.load(handle, encoding="latin1")
    except Exception as error:
        raise UserError(f"Corrupt CIFAR file {path} ({type(error).__name__}: {error}). Re-download it.") from None


def load_cifar(root: Path, variant: int, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR images (N,32,32,3 uint8), labels and class names from torchvision's python-pickle files."""
    folder, train_files, test_files, meta_file = CIFAR_FILES[variant]
    base = root / folder
    label_key = "labels" if variant == 10 else "fine_labels"
    images, labels = [], []
    for name in train_files if train else test_files:
        batch = _unpickle(base / name)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    meta = _unpickle(base / meta_file)
    names = list(meta["label_names"] if variant == 10 else meta["fine_label_names"])
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFARDataModule(BaseDataModule):
    """CIFAR-10 / CIFAR-100 from torchvision's python-pickle files under `root`.

    As in the ResNet paper, `val_size` training images (default 5,000, a fixed random subset) are held
    out for validation; `test` evaluates the official 10,000-image test set. `val_size: 0` validates on
    the test set instead.
    """

    def __init__(
        self,
        root: str | None = "data/cifar",
        variant: int = 10,
        batch_size: int = 128,
        val_size: int = 5000,
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, **kwargs)
        if variant not in CIFAR_FILES:
            raise UserError(f"--data.variant must be 10 or 100, got {variant}.")
        self.variant = variant
        self.val_size = val_size
        self.download = download
        self.mean, self.std = (CIFAR10_MEAN, CIFAR10_STD) if variant == 10 else (CIFAR100_MEAN, CIFAR100_STD)
        names = self._read_class_names()
        self.label_space = LabelSpace(tuple(names)) if names else LabelSpace.anonymous(variant)
        self.datasets: dict[str, Dataset] = {}

    def _read_class_names(self) -> list[str]:
        """The names in the dataset's meta file; before a download, CIFAR-10's well-known ones."""
        folder, _, _, meta_file = CIFAR_FILES[self.variant]
        meta_path = self.root / folder / meta_file if self.root is not None else None
        if meta_path is None or not meta_path.is_file():
            # CIFAR-100's fine names come with its download; until then they are numbered.
            return list(CIFAR10_CLASSES) if self.variant == 10 else []
        meta = _unpickle(meta_path)
        return list(meta["label_names"] if self.variant == 10 else meta["fine_label_names"])

    def prepare_data(self) -> None:
        if self.download:
            import torchvision

            dataset = torchvision.datasets.CIFAR10 if self.variant == 10 else torchvision.datasets.CIFAR100
            for train in (True, False):
                dataset(str(self.require_root()), train=train, download=True)

    def dataset(self, key: str) -> Dataset:
        """The train / val (held out of train) / test split, or `predict_path`'s images (else val) for predict."""
        if key in self.datasets:
            return self.datasets[key]
        if key == "predict":
            if self.predict_path is None:
                return self.dataset("val")
            files = list_images(self.predict_path)
            transform = imagenet_eval_transform(32, 32, self.mean, self.std)
            self.datasets[key] = ImageListDataset(files, [-1] * len(files), transform, root=Path(self.predict_path))
            return self.datasets[key]
        root = self.require_root()
        train_tf = cifar_train_transform(self.mean, self.std)
        eval_tf = cifar_eval_transform(self.mean, self.std)
        if key in ("train", "val") and self.val_size > 0:
            images, labels, names = load_cifar(root, self.variant, train=True)
            order = np.random.default_rng(self.seed).permutation(len(labels))
            val_idx, train_idx = np.sort(order[: self.val_size]), np.sort(order[self.val_size :])
            if key == "train":
                dataset: Dataset = ArrayImageDataset(images[train_idx], labels[train_idx], train_tf, "train")
            else:
                dataset = ArrayImageDataset(images[val_idx], labels[val_idx], eval_tf, "val")
        elif key == "train":
            images, labels, names = load_cifar(root, self.variant, train=True)
            dataset = ArrayImageDataset(images, labels, train_tf, "train")
        else:
            images, labels, names = load_cifar(root, self.variant, train=False)
            dataset = ArrayImageDataset(images, labels, eval_tf, "test")
        self.datasets[key] = dataset
        return dataset
