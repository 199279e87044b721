"""PASCAL VOC semantic segmentation (optionally with SBD's train_aug set) and the bundled shapes in that layout.

Training: random scale 0.5-2.0, random crop padded with 255 (mask) / 0 (image), horizontal flip, ImageNet
normalisation. Evaluation: the image is resized (shorter side `eval_size`) for the network and the mask
stays at its original size; the task resizes logits back, so scores are at the original resolution.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from resnet_tasks.data.common import (
    BaseDataModule,
    EvalShardSampler,
    image_size_hw,
    item_and_seed,
    list_images,
    read_image,
    stems_from_list,
)
from resnet_tasks.data.masks import read_mask
from resnet_tasks.data.shapes import SHAPE_CLASSES, shapes_layout
from resnet_tasks.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from resnet_tasks.errors import UserError
from resnet_tasks.labels import BACKGROUND, IGNORE_INDEX, LabelSpace

VOC_SEGMENTATION_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

VOC_SEGMENTATION_LAYOUT = """Expected layout under --data.root:
  VOCdevkit/VOC2012/
    JPEGImages/<stem>.jpg
    SegmentationClass/<stem>.png              palette PNG, pixel = class index, 255 = ignore
    ImageSets/Segmentation/{train,val}.txt    one stem per line
  for --data.train_split train_aug (SBD, 10,582 images), also either
    VOCdevkit/VOC2012/SegmentationClassAug/<stem>.png   (+ optional ImageSets/Segmentation/train_aug.txt)
  or SBD's benchmark_RELEASE/dataset/ (or SBD/) with cls/<stem>.mat, train.txt, val.txt"""

# Where SBD's release may live, relative to --data.root (the folder holding cls/ and train.txt).
SBD_CANDIDATES = ("benchmark_RELEASE/dataset", "SBD/dataset", "SBD", "benchmark_RELEASE")


# ---------------------------------------------------------------------------------------------- mask files
def read_sbd_mat(path: str | Path) -> np.ndarray:
    """SBD's `cls/<stem>.mat` -> HxW uint8 class map (field GTcls.Segmentation)."""
    try:
        import scipy.io
    except ImportError:
        raise UserError(
            f"Reading SBD masks ({path}) needs scipy, which resnet-tasks does not install by default: "
            "pip install scipy (or provide SegmentationClassAug/*.png instead)."
        ) from None
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=False, struct_as_record=True)
        segmentation = mat["GTcls"][0, 0]["Segmentation"]
    except Exception as error:  # scipy raises several types for broken or foreign files
        raise UserError(
            f"Cannot read SBD mask {path} ({type(error).__name__}: {error}); expected SBD's cls/*.mat with "
            "a GTcls struct holding Segmentation. Re-extract the SBD archive."
        ) from None
    return np.ascontiguousarray(segmentation, dtype=np.uint8)


def load_mask(path: str | Path) -> np.ndarray:
    """A label map from a palette/grayscale PNG or an SBD .mat file."""
    return read_sbd_mat(path) if str(path).endswith(".mat") else read_mask(path)


def valid_label_table(num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Lookup table over uint8 values: True for class ids 0..num_classes-1 and the ignore index."""
    table = np.zeros(256, dtype=bool)
    table[:num_classes] = True
    table[ignore_index] = True
    return table


# ---------------------------------------------------------------------------------------------- transforms
def segmentation_train_transform(
    crop_size: int = 480,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    base_size: int | None = None,
) -> A.Compose:
    """Random scale, pad to the crop (image 0, mask 255), random crop, flip, normalise.

    The scale is a factor of the image drawn in `scale_range`, or, with `base_size` (torchvision's preset), the
    shorter side is resized to a random integer in `scale_range` x `base_size`. Masks are only ever resized
    with nearest neighbour and padded with 255, so they hold class ids and 255.
    """
    low, high = scale_range
    if base_size is None:
        resize: A.BasicTransform = A.RandomScale(
            scale_limit=(low - 1.0, high - 1.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        )
    else:
        resize = A.SmallestMaxSize(
            max_size=list(range(int(low * base_size), int(high * base_size) + 1)),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            area_for_downscale="image",
        )
    steps: list[A.BasicTransform] = [
        resize,
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return A.Compose(steps)


def segmentation_eval_transform(
    eval_size: int | None = 520, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> A.Compose:
    """Image only: shorter side to `eval_size` (bilinear; None keeps the size), then normalise."""
    steps: list[A.BasicTransform] = []
    if eval_size is not None:
        steps.append(A.SmallestMaxSize(max_size=eval_size, interpolation=cv2.INTER_LINEAR))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return A.Compose(steps)


# ---------------------------------------------------------------------------------------------- datasets
class SegmentationDataset(Dataset):
    """Images with optional label maps (PNG or SBD .mat), checked on read, in train or eval form.

    Train items: {"image": (3,h,w) float, "mask": (h,w) uint8}. Eval items add "size" (original H, W),
    "input_size" (network input h, w), "stem" and "path"; their mask stays at the original size.
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

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The image and its checked mask (same size, values in {0..C-1, 255})."""
        image_path = self.images[index]
        image = read_image(image_path)
        if self.masks is None:
            return image, None
        mask_path = self.masks[index]
        mask = load_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise UserError(
                f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}; a label map must have its image's size. Fix or remove "
                "this pair."
            )
        if self.valid is not None and not self.valid[mask].all():
            bad = sorted(int(v) for v in np.unique(mask[~self.valid[mask]]))[:10]
            raise UserError(
                f"Mask {mask_path} has values {bad} outside the class ids 0..{self.num_classes - 1} and 255 "
                "(ignore). Masks must be palette/grayscale PNGs whose pixels are class indices, not colours."
            )
        return image, mask

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item_and_seed(item)
        image, mask = self.load(index)
        if self.train:
            return training_item(self.transform, image, mask, seed)
        network_input = self.transform(image=image)["image"]
        item: dict[str, Any] = {
            "image": to_tensor(network_input),
            "size": image.shape[:2],
            "input_size": network_input.shape[:2],
            "stem": Path(self.images[index]).stem,
            "path": str(self.images[index]),
        }
        if mask is not None:
            item["mask"] = torch.from_numpy(mask)
        return item


def training_item(transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int | None) -> dict[str, Any]:
    """A training crop {"image", "mask"}: the augmentation seeded per sample (when a seed is given)."""
    if seed is not None:
        transform.set_random_seed(seed)
    out = transform(image=image, mask=mask)
    return {"image": to_tensor(out["image"]), "mask": torch.from_numpy(np.ascontiguousarray(out["mask"]))}


def collate_train(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack fixed-size training crops."""
    return {"image": torch.stack([i["image"] for i in items]), "mask": torch.stack([i["mask"] for i in items])}


def collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch images of any size: pad images with 0 (the mean after normalisation), masks with 255.

    "input_size" and "size" keep each image's valid region. `SizeGroupedBatchSampler` batches only images of
    one original size, so with it nothing is ever padded (padding would let the network see the padded
    border, a small difference from per-image evaluation).
    """
    height = max(i["image"].shape[1] for i in items)
    width = max(i["image"].shape[2] for i in items)
    images = items[0]["image"].new_zeros((len(items), 3, height, width))
    for k, item in enumerate(items):
        images[k, :, : item["image"].shape[1], : item["image"].shape[2]] = item["image"]
    batch: dict[str, Any] = {
        "image": images,
        "size": torch.tensor([i["size"] for i in items], dtype=torch.long),
        "input_size": torch.tensor([i["input_size"] for i in items], dtype=torch.long),
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


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Evaluation batches of images sharing one original size, over this rank's `EvalShardSampler` shard.

    Results equal per-image evaluation (nothing is padded) while same-size images (most of VOC is 500x375 or
    375x500) still run in batches. Every image is evaluated exactly once across ranks.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.sizes = [tuple(s) for s in sizes]
        self.batch_size = max(1, batch_size)
        self.shard = EvalShardSampler(len(self.sizes))

    def _batches(self) -> list[list[int]]:
        open_batches: dict[tuple[int, int], list[int]] = {}
        batches: list[list[int]] = []
        for index in self.shard:
            group = open_batches.setdefault(self.sizes[index], [])
            group.append(index)
            if len(group) == self.batch_size:
                batches.append(group)
                open_batches[self.sizes[index]] = []
        batches.extend(group for group in open_batches.values() if group)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


# ---------------------------------------------------------------------------------------------- data modules
class SegmentationDataModule(BaseDataModule):
    """What the segmentation data modules share: files resolved at setup, training crops, and evaluation in
    batches of images of one original size (`SizeGroupedBatchSampler`); subclasses build `dataset(key)`."""

    def image_sizes(self, dataset: Dataset) -> Sequence[tuple[int, int]]:
        """(height, width) of every image of an evaluation dataset, from the file headers."""
        return [image_size_hw(path) for path in dataset.images]  # type: ignore[attr-defined]

    def setup(self, stage: str) -> None:
        # Resolve the files now, so a bad layout fails before any training starts.
        keys = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for key in keys.get(stage, ()):
            self.dataset(key)

    def _eval_loader(self, dataset: Dataset) -> torch.utils.data.DataLoader:
        sampler = SizeGroupedBatchSampler(self.image_sizes(dataset), self.eval_batch_size)
        return self.loader(dataset, train=False, collate_fn=collate_eval, batch_sampler=sampler)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.dataset("train"), train=True, collate_fn=collate_train)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader(self.dataset("test"))

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval_loader(self.dataset("predict"))


class VOCSegmentationDataModule(SegmentationDataModule):
    """PASCAL VOC 2012 segmentation: `root/VOCdevkit/VOC2012` (root may also be VOCdevkit or VOC2012 itself).

    `train_split`: a list in ImageSets/Segmentation (`train`, `trainval`, ...) or `train_aug`: SBD + VOC train
    minus VOC val (10,582 images) from SegmentationClassAug/*.png or SBD's cls/*.mat (VOC's own PNG is used
    where it exists). `eval_size`: shorter side of the network input in evaluation (None = as is); scores
    are computed at the original resolution. `predict` runs over `predict_path` (a folder of images; the
    class count then comes from the model's weights) or else the `val_split`.
    """

    def __init__(
        self,
        batch_size: int = 8,
        train_split: str = "train",
        val_split: str = "val",
        crop_size: int = 480,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        eval_size: int | None = 520,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        class_names: list[str] | None = None,
        year: str = "VOC2012",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.train_split = train_split
        self.val_split = val_split
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip = hflip
        self.eval_size = eval_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.year = year
        names = list(class_names) if class_names else list(VOC_SEGMENTATION_CLASSES)
        if len(names) > IGNORE_INDEX:
            raise UserError(f"--data.class_names has {len(names)} names; at most {IGNORE_INDEX} fit a PNG mask.")
        if self.predict_path is None or self.root is not None:
            # (Predicting on a folder of images alone, the label space is the model's: its weights or checkpoint.)
            self.label_space = LabelSpace(tuple(names), background=names[0] == BACKGROUND, ignore_index=IGNORE_INDEX)
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ layout
    def voc_dir(self) -> Path:
        """The VOC2012 folder; UserError naming the missing folder and showing the layout."""
        root = self.require_root()
        for candidate in (root / "VOCdevkit" / self.year, root / self.year, root):
            if (candidate / "ImageSets" / "Segmentation").is_dir() or (candidate / "JPEGImages").is_dir():
                voc = candidate
                break
        else:
            raise UserError(f"Missing folder {root / 'VOCdevkit' / self.year}. {VOC_SEGMENTATION_LAYOUT}")
        for folder in ("JPEGImages", "ImageSets/Segmentation"):
            if not (voc / folder).is_dir():
                raise UserError(f"Missing folder {voc / folder}. {VOC_SEGMENTATION_LAYOUT}")
        return voc

    def _list(self, voc: Path, split: str) -> list[str]:
        path = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            raise UserError(f"Missing image list {path} (split {split!r}). {VOC_SEGMENTATION_LAYOUT}")
        return list(stems_from_list(path))

    def sbd_dir(self) -> Path | None:
        """SBD's dataset folder (holding cls/ and train.txt) under root, if present."""
        root = self.require_root()
        for candidate in SBD_CANDIDATES:
            folder = root / candidate
            if (folder / "cls").is_dir():
                return folder
        return None

    def split_files(self, split: str) -> tuple[list[Path], list[Path]]:
        """(images, masks) of a split; every listed file is checked to exist."""
        voc = self.voc_dir()
        if split == "train_aug":
            stems, masks = self._train_aug(voc)
        else:
            stems = self._list(voc, split)
            masks = [voc / "SegmentationClass" / f"{stem}.png" for stem in stems]
            if not (voc / "SegmentationClass").is_dir():
                raise UserError(f"Missing folder {voc / 'SegmentationClass'}. {VOC_SEGMENTATION_LAYOUT}")
        if not stems:
            raise UserError(f"The {split!r} split under {voc} lists no images. {VOC_SEGMENTATION_LAYOUT}")
        images = [voc / "JPEGImages" / f"{stem}.jpg" for stem in stems]
        for path in (*images, *masks):
            if not path.is_file():
                raise UserError(f"Missing file {path} (listed in the {split!r} split). {VOC_SEGMENTATION_LAYOUT}")
        return images, masks

    def _train_aug(self, voc: Path) -> tuple[list[str], list[Path]]:
        aug_dir = voc / "SegmentationClassAug"
        sbd = self.sbd_dir()
        if not aug_dir.is_dir() and sbd is None:
            raise UserError(
                f"--data.train_split train_aug needs SBD: missing {aug_dir} and SBD's cls/ folder under "
                f"{self.root}/{{{','.join(SBD_CANDIDATES)}}}. {VOC_SEGMENTATION_LAYOUT}"
            )
        val = set(self._list(voc, "val"))
        list_file = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
        if list_file.is_file():
            stems = list(stems_from_list(list_file))
        elif sbd is not None:
            pool: set[str] = set(self._list(voc, "train"))
            for name in ("train.txt", "val.txt"):
                pool.update(stems_from_list(sbd / name))
            stems = sorted(pool - val)
        else:
            stems = sorted(path.stem for path in aug_dir.glob("*.png") if path.stem not in val)
        leaked = val.intersection(stems)
        if leaked:
            raise UserError(f"{list_file} lists {len(leaked)} VOC val images (e.g. {sorted(leaked)[0]}); remove them.")
        masks = []
        for stem in stems:
            if aug_dir.is_dir():
                masks.append(aug_dir / f"{stem}.png")
            elif (voc / "SegmentationClass" / f"{stem}.png").is_file():
                masks.append(voc / "SegmentationClass" / f"{stem}.png")  # VOC's own, finer annotation
            else:
                masks.append(sbd / "cls" / f"{stem}.mat")  # type: ignore[operator]
        return stems, masks

    # ------------------------------------------------------------------ datasets and loaders
    def train_transform(self) -> A.Compose:
        return segmentation_train_transform(self.crop_size, self.scale_range, self.hflip, self.mean, self.std)

    def eval_transform(self) -> A.Compose:
        return segmentation_eval_transform(self.eval_size, self.mean, self.std)

    def dataset(self, key: str) -> Dataset:
        if key not in self.datasets:
            if key == "train":
                images, masks = self.split_files(self.train_split)
                self.datasets[key] = SegmentationDataset(
                    images, masks, self.train_transform(), train=True, num_classes=self.num_classes
                )
            elif key in ("val", "test"):
                images, masks = self.split_files(self.val_split)
                self.datasets[key] = SegmentationDataset(
                    images, masks, self.eval_transform(), train=False, num_classes=self.num_classes
                )
            elif self.predict_path is not None:
                files = list_images(self.predict_path)
                self.datasets[key] = SegmentationDataset(
                    files, None, self.eval_transform(), train=False, num_classes=None
                )
            else:
                self.datasets[key] = self.dataset("val")
        return self.datasets[key]


class ShapesSegmentationDataModule(VOCSegmentationDataModule):
    """The bundled shapes scenes in VOC segmentation layout (classes: background + SHAPE_CLASSES).

    With no root, the dataset is generated on first use (`ensure_shapes()`) and `<shapes>/voc` is read.
    Defaults suit its 128 px images: the crop is the whole image, evaluation at native size.
    """

    def __init__(
        self,
        root: str | None = None,
        num_workers: int = 1,
        crop_size: int = 128,
        eval_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root if root is not None else shapes_layout("voc"),
            num_workers=num_workers,
            crop_size=crop_size,
            eval_size=eval_size,
            class_names=[BACKGROUND, *SHAPE_CLASSES],
            **kwargs,
        )
