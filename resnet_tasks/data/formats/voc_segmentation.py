"""PASCAL VOC semantic segmentation (optionally with SBD's train_aug set) and the bundled shapes in that layout.

Training: random scale 0.5-2.0, random crop padded with 255 (mask) / 0 (image), horizontal flip, ImageNet
normalisation. Evaluation: the image is resized (shorter side `eval_size`) for the network and the mask
stays at its original size; the task resizes logits back, so scores are at the original resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from resnet_tasks.data.io import stems_from_list
from resnet_tasks.data.segmentation import SegmentationDataModule
from resnet_tasks.data.shapes import SHAPE_CLASSES, shapes_layout
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


class VOCSegmentationDataModule(SegmentationDataModule):
    """PASCAL VOC 2012 segmentation: `root/VOCdevkit/VOC2012` (root may also be VOCdevkit or VOC2012 itself).

    `train_split`: a list in ImageSets/Segmentation (`train`, `trainval`, ...) or `train_aug`: SBD + VOC train
    minus VOC val (10,582 images) from SegmentationClassAug/*.png or SBD's cls/*.mat (VOC's own PNG is used
    where it exists). `test` and `predict` (without `predict_path`) evaluate the `val_split`.
    """

    def __init__(
        self,
        batch_size: int = 8,
        train_split: str = "train",
        val_split: str = "val",
        class_names: list[str] | None = None,
        year: str = "VOC2012",
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.train_split = train_split
        self.val_split = val_split
        self.year = year
        names = list(class_names) if class_names else list(VOC_SEGMENTATION_CLASSES)
        if len(names) > IGNORE_INDEX:
            raise UserError(f"--data.class_names has {len(names)} names; at most {IGNORE_INDEX} fit a PNG mask.")
        if self.predict_path is None or self.root is not None:
            # (Predicting on a folder of images alone, the label space is the model's: its weights or checkpoint.)
            self.label_space = LabelSpace(tuple(names), background=names[0] == BACKGROUND, ignore_index=IGNORE_INDEX)

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

    # ------------------------------------------------------------------ datasets
    def split_dataset(self, key: str) -> Dataset:
        """`train_split` for training; `val_split` for val, test and predict."""
        if key == "train":
            return self.files_dataset(*self.split_files(self.train_split), train=True)
        if key == "val":
            return self.files_dataset(*self.split_files(self.val_split), train=False)
        return self.dataset("val")


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
            class_names=[BACKGROUND, *SHAPE_CLASSES],
            root=root if root is not None else shapes_layout("voc"),
            num_workers=num_workers,
            crop_size=crop_size,
            eval_size=eval_size,
            **kwargs,
        )
