"""CIFAR-10 / CIFAR-100 from torchvision's python-pickle files: the arrays, their dataset and `CIFARDataModule`."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from resnet_tasks.data.base import BaseDataModule
from resnet_tasks.data.classification import CLASSIFICATION_OUTPUT, ImageListDataset
from resnet_tasks.data.io import list_images
from resnet_tasks.data.sampling import item_and_seed
from resnet_tasks.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_eval_transform,
    cifar_train_transform,
    imagenet_eval_transform,
)
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace


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
            **self.transform(self.images[index], seed),  # "image" uint8 CHW
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

    def build_dataset(self, key: str) -> Dataset:
        """The train / val (held out of train) / test split, or `predict_path`'s images (else val) for predict."""
        if key == "predict":
            if self.predict_path is None:
                return self.dataset("val")
            files = list_images(self.predict_path)
            transform = imagenet_eval_transform(32, 32)
            return ImageListDataset(files, [-1] * len(files), transform, root=Path(self.predict_path))
        root = self.require_root()
        if key in ("train", "val") and self.val_size > 0:
            images, labels, _ = load_cifar(root, self.variant, train=True)
            order = np.random.default_rng(self.seed).permutation(len(labels))
            chosen = np.sort(order[self.val_size :] if key == "train" else order[: self.val_size])
            return self.split(images[chosen], labels[chosen], key)
        images, labels, _ = load_cifar(root, self.variant, train=key == "train")
        return self.split(images, labels, "train" if key == "train" else "test")

    def split(self, images: np.ndarray, labels: np.ndarray, name: str) -> ArrayImageDataset:
        """A dataset of `images` named `name/<index>`, with the training transform for "train"."""
        if name == "train":
            transform = cifar_train_transform()
        else:
            transform = cifar_eval_transform()
        return ArrayImageDataset(images, labels, transform, name)

    def eval_preprocessing(self) -> dict[str, Any]:
        """The 32 px images as they are, the variant's mean/std."""
        return {**super().eval_preprocessing(), "resize": 32, "crop": 32, "output": CLASSIFICATION_OUTPUT}
