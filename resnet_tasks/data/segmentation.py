"""The segmentation data layer every format shares: images with class-index label maps, their training crops and
original-size evaluation items, the collates and the `SegmentationDataModule` base (the modules in `formats/`
only find their files or parse their annotations)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from resnet_tasks.data.base import BaseDataModule
from resnet_tasks.data.io import image_size_hw, image_to_tensor, list_images, read_image
from resnet_tasks.data.masks import load_mask
from resnet_tasks.data.sampling import SizeGroupedEvalBatchSampler, item_and_seed
from resnet_tasks.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    segmentation_eval_transform,
    segmentation_train_transform,
)
from resnet_tasks.errors import UserError
from resnet_tasks.labels import IGNORE_INDEX

# What a segmentation model's output means (the exported model's sidecar says it).
# What to do when masks mark objects with 255 (0/255) and are read with the default void 255 (said by fit and inspect).
BINARY_MASKS_HINT = (
    "for masks that mark objects with 255 (0/255), pass --data.ignore_index null and a --data.classes_file with the "
    "rows '0,background' and '255,NAME'"
)
SEGMENTATION_OUTPUT = (
    "mask: (N, H, W) class indices at the input size. predict resizes the logits back to the original "
    "size before the argmax; resizing this mask with nearest neighbour differs only along class borders."
)


def valid_label_table(num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Lookup table over uint8 values: True for class ids 0..num_classes-1 and the ignore index."""
    table = np.zeros(256, dtype=bool)
    table[:num_classes] = True
    table[ignore_index] = True
    return table


# ---------------------------------------------------------------------------------------------- items
def training_item(transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int | None) -> dict[str, Any]:
    """A training crop {"image", "mask"}: the augmentation seeded per sample (when a seed is given)."""
    if seed is not None:
        transform.set_random_seed(seed)
    out = transform(image=image, mask=mask)
    return {"image": image_to_tensor(out["image"]), "mask": torch.from_numpy(np.ascontiguousarray(out["mask"]))}


def evaluation_item(transform: A.Compose, image: np.ndarray, mask: np.ndarray | None, path: str) -> dict[str, Any]:
    """An evaluation item: the network input, "size" (of `image`, where scores are taken), "input_size", "stem",
    "path" and, when given, the "mask" at `image`'s size."""
    network_input = transform(image=image)["image"]
    item: dict[str, Any] = {
        "image": image_to_tensor(network_input),
        "size": image.shape[:2],
        "input_size": network_input.shape[:2],
        "stem": Path(path).stem,
        "path": str(path),
    }
    if mask is not None:
        item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))
    return item


class SegmentationDataset(Dataset):
    """Images with optional label maps (PNG or SBD .mat), checked on read, in train or eval form.

    Train items: {"image": (3,h,w) uint8 (normalised after the transfer), "mask": (h,w) uint8}. Eval items add
    "size" (original H, W), "input_size" (network input h, w), "stem" and "path"; their mask stays at the original
    size.
    Paths are kept in numpy string arrays (no per-item Python objects for workers to copy on read).
    """

    def __init__(
        self,
        images: Sequence[str | Path],
        masks: Sequence[str | Path] | None,
        transform: A.Compose,
        *,
        train: bool,
        num_classes: int | None,
    ) -> None:
        self.images = np.array([str(p) for p in images])
        self.masks = np.array([str(p) for p in masks]) if masks is not None else None
        if self.masks is not None and len(self.masks) != len(self.images):
            raise ValueError("one mask per image expected")
        if train and self.masks is None:
            raise ValueError("training needs masks")
        self.transform = transform
        self.train = train
        self.num_classes = num_classes
        self.valid = valid_label_table(num_classes) if num_classes is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, from the file headers."""
        return [image_size_hw(path) for path in self.images]

    def decode_mask(self, path: str) -> np.ndarray:
        """The label map stored at `path` as class indices (a subclass decodes its own mask format)."""
        return load_mask(path)

    def read_mask(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The checked label map of item `index` (values in {0..C-1, 255}, its image's size), without decoding the
        image: its (height, width) is `image_size` when given, else read from the file's header."""
        if self.masks is None:
            raise ValueError("this dataset has no masks")
        image_path, mask_path = self.images[index], self.masks[index]
        mask = self.decode_mask(mask_path)
        height, width = image_size if image_size is not None else image_size_hw(image_path)
        if mask.shape != (height, width):
            raise UserError(
                f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
                f"{width}x{height}; a label map must have its image's size. Fix or remove this pair."
            )
        if self.valid is not None and not self.valid[mask].all():
            bad = sorted(int(v) for v in np.unique(mask[~self.valid[mask]]))[:10]
            raise UserError(
                f"Mask {mask_path} has values {bad} outside the class ids 0..{self.num_classes - 1} and 255 "
                "(ignore). Masks must be palette/grayscale PNGs whose pixels are class indices, not colours."
            )
        return mask

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The image and its checked mask (same size, values in {0..C-1, 255})."""
        image = read_image(self.images[index])
        if self.masks is None:
            return image, None
        return image, self.read_mask(index, image.shape[:2])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item_and_seed(item)
        image, mask = self.load(index)
        if self.train:
            return training_item(self.transform, image, mask, seed)
        return evaluation_item(self.transform, image, mask, self.images[index])


# ---------------------------------------------------------------------------------------------- batches
def collate_train(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack fixed-size training crops."""
    return {"image": torch.stack([i["image"] for i in items]), "mask": torch.stack([i["mask"] for i in items])}


def collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch images of any size: pad images with 0 (0 after normalisation, the mean: `model_input` zeroes what lies
    beyond "input_size"), masks with 255.

    "input_size" and "size" keep each image's valid region as (height, width) host tuples: they set crops and
    resizes, so they never travel to the device and are never read back. `SizeGroupedEvalBatchSampler` batches
    only images of one original size, so with it nothing is ever padded (padding would let the network see the
    padded border, a small difference from per-image evaluation).
    """
    height = max(i["image"].shape[1] for i in items)
    width = max(i["image"].shape[2] for i in items)
    images = items[0]["image"].new_zeros((len(items), 3, height, width))
    for k, item in enumerate(items):
        images[k, :, : item["image"].shape[1], : item["image"].shape[2]] = item["image"]
    batch: dict[str, Any] = {
        "image": images,
        "size": [(int(i["size"][0]), int(i["size"][1])) for i in items],
        "input_size": [(int(i["input_size"][0]), int(i["input_size"][1])) for i in items],
        "stem": [i["stem"] for i in items],
        "path": [i["path"] for i in items],
    }
    if all("mask" in i for i in items):
        mask_h = max(i["mask"].shape[0] for i in items)
        mask_w = max(i["mask"].shape[1] for i in items)
        masks = torch.full((len(items), mask_h, mask_w), IGNORE_INDEX, dtype=torch.uint8)
        for k, item in enumerate(items):
            masks[k, : item["mask"].shape[0], : item["mask"].shape[1]] = item["mask"]
        batch["mask"] = masks
    return batch


# ---------------------------------------------------------------------------------------------- data module
class SegmentationDataModule(BaseDataModule):
    """What every segmentation module shares: training crops (`crop_size`, random scale in `scale_range`, flip),
    evaluation at each image's original size (the network input's shorter side at `eval_size`; None: as is) in
    batches of images of one original size, and `predict_path` (a folder of images; the class count then comes
    from the model's weights).

    Subclasses set `label_space` and build the datasets of their splits in `split_dataset(key)` (`files_dataset`
    makes one from image and mask files).
    """

    def __init__(
        self,
        crop_size: int = 480,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        eval_size: int | None = 520,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip = hflip
        self.eval_size = eval_size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def split_dataset(self, key: str) -> Dataset:
        """The dataset of "train", "val", "test" or "predict" (no `predict_path`) from the data's own splits."""
        raise NotImplementedError(f"{type(self).__name__} must implement split_dataset()")

    def train_transform(self) -> A.Compose:
        return segmentation_train_transform(self.crop_size, self.scale_range, self.hflip)

    def eval_transform(self) -> A.Compose:
        return segmentation_eval_transform(self.eval_size)

    def files_dataset(self, images: Sequence[Path], masks: Sequence[Path] | None, train: bool) -> SegmentationDataset:
        """A dataset of image files and their mask files (None: images only), in training or evaluation form."""
        transform = self.train_transform() if train else self.eval_transform()
        return SegmentationDataset(images, masks, transform, train=train, num_classes=self.num_classes)

    def build_dataset(self, key: str) -> Dataset:
        if key == "predict" and self.predict_path is not None:
            return self.files_dataset(list_images(self.predict_path), None, train=False)
        return self.split_dataset(key)

    def collate(self, train: bool) -> Callable:
        return collate_train if train else collate_eval

    def eval_batch_sampler(self, dataset: Dataset) -> Sampler:
        """Batches of images of one original size (the dataset's `image_sizes()`): nothing is padded."""
        return SizeGroupedEvalBatchSampler(dataset.image_sizes(), self.eval_batch_size)  # type: ignore[attr-defined]

    def eval_preprocessing(self) -> dict[str, Any]:
        """Shorter side to `eval_size` (None: as is), the module's mean/std."""
        resize = None if self.eval_size is None else int(self.eval_size)
        return {**super().eval_preprocessing(), "resize": resize, "output": SEGMENTATION_OUTPUT}
