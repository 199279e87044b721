"""COCO instances as semantic segmentation over VOC's 20 categories: the benchmark of torchvision's FCN figures.

Masks follow torchvision's `references/segmentation/coco_utils.py`: annotations of the 20 COCO categories that
VOC shares are painted with their VOC class (polygons and RLE alike, crowd regions included), pixels covered
by more than one of them become 255 (ignored), everything else is background. Training keeps images whose kept
annotations' `area` fields sum to more than 1000; evaluation keeps every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from resnet_tasks.data.formats.coco_files import COCO_LAYOUT, coco_categories, read_json
from resnet_tasks.data.formats.voc_segmentation import VOC_SEGMENTATION_CLASSES
from resnet_tasks.data.io import UnreadableImageError, image_size_hw, read_image
from resnet_tasks.data.sampling import item_and_seed
from resnet_tasks.data.segmentation import SegmentationDataModule, evaluation_item, training_item
from resnet_tasks.data.transforms import segmentation_eval_transform, segmentation_train_transform
from resnet_tasks.errors import UserError
from resnet_tasks.labels import BACKGROUND, IGNORE_INDEX, LabelSpace

# VOC class index -> (COCO category id, COCO's name for it); index 0 is the background (no COCO category).
COCO_VOC_CATEGORIES: tuple[tuple[int, str], ...] = (
    (0, BACKGROUND), (5, "airplane"), (2, "bicycle"), (16, "bird"), (9, "boat"), (44, "bottle"), (6, "bus"),
    (3, "car"), (17, "cat"), (62, "chair"), (21, "cow"), (67, "dining table"), (18, "dog"), (19, "horse"),
    (4, "motorcycle"), (1, "person"), (64, "potted plant"), (20, "sheep"), (63, "couch"), (7, "train"), (72, "tv"),
)  # fmt: skip
# torchvision's CAT_LIST: the COCO category id of each VOC class index.
COCO_VOC_CATEGORY_IDS: tuple[int, ...] = tuple(category_id for category_id, _ in COCO_VOC_CATEGORIES)
# torchvision's `_has_valid_annotation`: a training image needs more than this much annotated area.
TORCHVISION_MIN_TRAIN_AREA = 1000.0


# ----------------------------------------------------------------------------------------------- storage
@dataclass
class SemanticAnnotations:
    """One split's VOC-category annotations as flat numpy arrays (no per-object Python objects to copy on read).

    Image i owns annotations `first_annotation[i]:first_annotation[i+1]`, each with its VOC class in `labels`.
    Annotation a is either polygons `first_polygon[a]:first_polygon[a+1]` (polygon p = `coordinates`
    `first_coordinate[p]:first_coordinate[p+1]`, float64 as parsed, so rasterisation equals pycocotools'
    `annToMask`) or a compressed RLE string `rle_bytes[first_rle_byte[a]:first_rle_byte[a+1]]`; neither means an
    empty segmentation. Memory: 8 bytes per polygon coordinate (float32 would change rasterised edge pixels; an
    estimated 250 MB for COCO train2017's VOC categories, shared by forked workers), a byte or two per RLE run, one
    short file name per image. Masks themselves are rasterised per item, in `mask()`.
    """

    folder: str
    file_names: np.ndarray
    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    first_annotation: np.ndarray
    labels: np.ndarray
    first_polygon: np.ndarray
    first_coordinate: np.ndarray
    coordinates: np.ndarray
    first_rle_byte: np.ndarray
    rle_bytes: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, index: int) -> str:
        return str(Path(self.folder) / str(self.file_names[index]))

    def size(self, index: int) -> tuple[int, int]:
        return int(self.heights[index]), int(self.widths[index])

    def instance_mask(self, annotation: int, height: int, width: int) -> np.ndarray:
        """One annotation's (H, W) uint8 0/1 mask, exactly as pycocotools' `annToMask`."""
        polygons = range(int(self.first_polygon[annotation]), int(self.first_polygon[annotation + 1]))
        if len(polygons):
            starts = self.first_coordinate
            parts = [self.coordinates[starts[p] : starts[p + 1]] for p in polygons]
            return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width)))
        start, end = int(self.first_rle_byte[annotation]), int(self.first_rle_byte[annotation + 1])
        if end > start:
            return mask_utils.decode({"size": [height, width], "counts": self.rle_bytes[start:end].tobytes()})
        return np.zeros((height, width), dtype=np.uint8)

    def mask(self, index: int) -> np.ndarray:
        """Image `index`'s (H, W) uint8 label map: VOC class where one instance covers a pixel, 255 where several do.

        torchvision's rule: the maximum of class x instance mask over instances, then 255 wherever the instance
        masks sum to more than 1 (so where instances overlap, the class never shows: the pixel is ignored).
        """
        height, width = self.size(index)
        target = np.zeros((height, width), dtype=np.uint8)
        count = np.zeros((height, width), dtype=np.uint16)
        for annotation in range(int(self.first_annotation[index]), int(self.first_annotation[index + 1])):
            instance = self.instance_mask(annotation, height, width)
            np.maximum(target, instance * self.labels[annotation], out=target)
            count += instance
        target[count > 1] = IGNORE_INDEX
        return target


class _SemanticBuilder:
    """Collects one split's annotations image by image, then packs them into `SemanticAnnotations`."""

    def __init__(self) -> None:
        self.file_names: list[str] = []
        self.image_ids: list[int] = []
        self.heights: list[int] = []
        self.widths: list[int] = []
        self.first_annotation = [0]
        self.labels: list[int] = []
        self.first_polygon = [0]
        self.first_coordinate = [0]
        self.coordinates: list[np.ndarray] = []
        self.first_rle_byte = [0]
        self.rle_bytes: list[bytes] = []

    def add_image(self, image: dict[str, Any], objects: list[tuple[int, list[Any] | bytes]]) -> None:
        self.file_names.append(str(image["file_name"]))
        self.image_ids.append(int(image["id"]))
        self.heights.append(int(image["height"]))
        self.widths.append(int(image["width"]))
        for label, segmentation in objects:
            self.labels.append(label)
            if isinstance(segmentation, bytes):
                self.rle_bytes.append(segmentation)
                self.first_rle_byte.append(self.first_rle_byte[-1] + len(segmentation))
                self.first_polygon.append(self.first_polygon[-1])
                continue
            for polygon in segmentation:
                coordinates = np.asarray(polygon, dtype=np.float64).reshape(-1)
                self.coordinates.append(coordinates)
                self.first_coordinate.append(self.first_coordinate[-1] + len(coordinates))
            self.first_polygon.append(self.first_polygon[-1] + len(segmentation))
            self.first_rle_byte.append(self.first_rle_byte[-1])
        self.first_annotation.append(len(self.labels))

    def build(self, folder: Path, source: Path) -> SemanticAnnotations:
        coordinates = np.concatenate(self.coordinates) if self.coordinates else np.zeros(0, dtype=np.float64)
        return SemanticAnnotations(
            folder=str(folder),
            file_names=np.asarray(self.file_names, dtype=np.str_),
            image_ids=np.asarray(self.image_ids, dtype=np.int64),
            heights=np.asarray(self.heights, dtype=np.int32),
            widths=np.asarray(self.widths, dtype=np.int32),
            first_annotation=np.asarray(self.first_annotation, dtype=np.int64),
            labels=np.asarray(self.labels, dtype=np.uint8),
            first_polygon=np.asarray(self.first_polygon, dtype=np.int64),
            first_coordinate=np.asarray(self.first_coordinate, dtype=np.int64),
            coordinates=coordinates,
            first_rle_byte=np.asarray(self.first_rle_byte, dtype=np.int64),
            rle_bytes=np.frombuffer(b"".join(self.rle_bytes), dtype=np.uint8),
            source=str(source),
        )


def _compressed_rle(segmentation: dict[str, Any], height: int, width: int, where: str) -> bytes:
    """An RLE segmentation (COCO's uncompressed `counts` list, or a compressed string) as compressed bytes."""
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not isinstance(size, (list, tuple)) or [int(s) for s in size] != [height, width] or counts is None:
        raise UserError(
            f"{where} has an RLE segmentation of size {size!r}, but its image is {height}x{width} (HxW); an RLE "
            "needs 'size' = [height, width] of its image and 'counts'. Fix or remove the annotation."
        )
    if isinstance(counts, list):
        return bytes(mask_utils.frPyObjects(segmentation, height, width)["counts"])
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)


def _area(annotation: dict[str, Any], segmentation: list[Any] | bytes, height: int, width: int) -> float:
    """COCO's `area` field (what torchvision's training filter sums); the mask's pixel count when it is absent."""
    if "area" in annotation:
        return float(annotation["area"])
    if isinstance(segmentation, bytes):
        return float(mask_utils.area({"size": [height, width], "counts": segmentation}))
    if not segmentation:
        return 0.0
    return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))))


def check_coco_categories(data: Any, path: Path) -> None:
    """The file must use COCO's own ids for VOC's categories (ids are mapped to VOC classes by number)."""
    names = {int(entry["id"]): str(entry["name"]) for entry in coco_categories(data, path)}
    for category_id, coco_name in COCO_VOC_CATEGORIES[1:]:
        if category_id in names and names[category_id] != coco_name:
            raise UserError(
                f"{path} names category id {category_id} {names[category_id]!r}, but COCO's id {category_id} is "
                f"{coco_name!r}. CocoSegmentationDataModule maps COCO 2017's category ids onto VOC's classes, so it "
                f"needs COCO's own instances files.\n{COCO_LAYOUT}"
            )


def parse_semantic_annotations(
    path: Path, folder: Path, min_area: float | None = None, data: Any | None = None
) -> SemanticAnnotations:
    """Read a COCO instances file into `SemanticAnnotations` over VOC's classes (other categories are dropped).

    With `min_area`, only images whose kept annotations (crowd included) have `area` fields summing to more
    than `min_area` stay (torchvision's training filter); without it every image stays. The JSON is dropped on
    return: only numpy arrays survive.
    """
    if data is None:
        data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} has no 'images' list; is it a COCO instances file?\n{COCO_LAYOUT}")
    check_coco_categories(data, path)
    label_of = {category_id: label for label, category_id in enumerate(COCO_VOC_CATEGORY_IDS) if label > 0}
    images = data["images"]
    position: dict[int, int] = {}
    for index, image in enumerate(images):
        try:
            position[int(image["id"])] = index
            int(image["height"]), int(image["width"]), str(image["file_name"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: image entry {image!r} needs 'id', 'file_name', 'width' and 'height'.") from None
    objects: list[list[tuple[int, list[Any] | bytes]]] = [[] for _ in images]
    areas = np.zeros(len(images), dtype=np.float64)
    for annotation in data.get("annotations") or []:
        image_id = annotation.get("image_id")
        if image_id not in position:
            raise UserError(
                f"{path}: annotation {annotation.get('id')} refers to image id {image_id}, which is not in 'images'."
            )
        label = label_of.get(annotation.get("category_id"))
        if label is None:
            continue  # not one of VOC's categories
        index = position[image_id]
        height, width = int(images[index]["height"]), int(images[index]["width"])
        where = f"{path}: annotation {annotation.get('id')} (image {images[index]['file_name']})"
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, dict):
            segmentation = _compressed_rle(segmentation, height, width, where)
        elif not isinstance(segmentation, list) or not all(isinstance(p, (list, tuple)) for p in segmentation):
            raise UserError(
                f"{where} has segmentation {str(segmentation)[:80]!r}; semantic masks need polygons "
                "([[x1, y1, x2, y2, ...], ...]) or an RLE ({'size': [h, w], 'counts': ...})."
            )
        objects[index].append((label, segmentation))
        areas[index] += _area(annotation, segmentation, height, width)
    builder = _SemanticBuilder()
    for index, image in enumerate(images):
        if min_area is None or (objects[index] and areas[index] > min_area):
            builder.add_image(image, objects[index])
    return builder.build(folder, path)


# ---------------------------------------------------------------------------------------------- transforms
def torchvision_eval_resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's evaluation preset on an image and its label map: shorter side to `size`, through PIL, the
    image bilinear and antialiased, the mask nearest; the longer side is truncated as torchvision does."""
    resized_image = TF.resize(Image.fromarray(image), [size], InterpolationMode.BILINEAR, antialias=True)
    resized_mask = TF.resize(Image.fromarray(mask), [size], InterpolationMode.NEAREST)
    return np.array(resized_image), np.array(resized_mask)


# ---------------------------------------------------------------------------------------------- dataset
class CocoSegmentationDataset(Dataset):
    """COCO images with semantic masks built on the fly from `SemanticAnnotations`, in train or eval form.

    Items as `SegmentationDataset`'s: train {"image", "mask"} (the crop); eval adds "size", "input_size", "stem",
    "path". With `resize_to` (torchvision's protocol) evaluation resizes image and mask to that shorter side and
    "size" is the resized size, so scores are taken there; without it the mask keeps the original size.
    """

    def __init__(
        self, annotations: SemanticAnnotations, transform: A.Compose, *, train: bool, resize_to: int | None = None
    ) -> None:
        self.annotations = annotations
        self.transform = transform
        self.train = train
        self.resize_to = resize_to

    def __len__(self) -> int:
        return len(self.annotations)

    def _check_size(self, index: int, found: tuple[int, int]) -> None:
        """Skipped and counted in training, evaluation stops: an image whose size is not the annotated one."""
        height, width = self.annotations.size(index)
        if tuple(found) != (height, width):
            raise UnreadableImageError(
                f"Image {self.annotations.path(index)} is {found[1]}x{found[0]} (WxH) but {self.annotations.source} "
                f"says {width}x{height}; its masks would not fit. Replace the file with the dataset's original (an "
                "EXIF rotation or a re-encoded image changes the size)."
            )

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and its label map (same size)."""
        image = read_image(self.annotations.path(index))
        self._check_size(index, image.shape[:2])
        return image, self.annotations.mask(index)

    def read_mask(self, index: int) -> np.ndarray:
        """The label map of item `index` from its annotations, without decoding the image (size from its header)."""
        self._check_size(index, image_size_hw(self.annotations.path(index)))
        return self.annotations.mask(index)

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, from the annotation file (COCO lists them)."""
        return [self.annotations.size(i) for i in range(len(self.annotations))]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item_and_seed(item)
        image, mask = self.load(index)
        if self.train:
            return training_item(self.transform, image, mask, seed)
        if self.resize_to is not None:
            image, mask = torchvision_eval_resize(image, mask, self.resize_to)
        return evaluation_item(self.transform, image, mask, self.annotations.path(index))


# ---------------------------------------------------------------------------------------------- data module
class CocoSegmentationDataModule(SegmentationDataModule):
    """COCO 2017 as VOC-class semantic segmentation (torchvision's FCN/DeepLabV3 benchmark): `root/annotations/
    instances_<split>.json` + `root/<split>/*.jpg`.

    Classes: VOC's 21 (background first); COCO's other 60 categories are background. Training keeps images whose
    VOC-category annotations cover more than `train_min_area` (COCO `area` fields, crowd included; torchvision:
    1000) and augments as torchvision's preset: shorter side random in `scale_range` x `base_size` (None:
    scale each image by a factor in `scale_range`, as the VOC module), `crop_size` crop, flip. Evaluation keeps
    every image. `eval_protocol`: "original" resizes only the network input (shorter side `eval_size`) and
    scores at each image's original resolution; "torchvision" resizes image and mask to shorter side `eval_size`
    (PIL: bilinear antialiased / nearest) and scores at that size, as torchvision's published figures were
    measured. `predict` always writes masks at the original size (over `predict_path`, else the val split).
    """

    def __init__(
        self,
        batch_size: int = 4,
        eval_protocol: Literal["original", "torchvision"] = "original",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        base_size: int | None = 520,
        train_min_area: float = TORCHVISION_MIN_TRAIN_AREA,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if eval_protocol not in ("original", "torchvision"):
            raise UserError(f"--data.eval_protocol must be 'original' or 'torchvision', got {eval_protocol!r}.")
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.base_size, self.eval_protocol = base_size, eval_protocol
        self.train_min_area = float(train_min_area)
        if self.predict_path is None or self.root is not None:
            # (Predicting on a folder of images alone, the label space is the model's: its weights or checkpoint.)
            self.label_space = LabelSpace(VOC_SEGMENTATION_CLASSES, background=True, ignore_index=IGNORE_INDEX)
        self._annotations: dict[tuple[str, bool], SemanticAnnotations] = {}

    # ------------------------------------------------------------------ layout
    def annotations(self, split: str, train: bool) -> SemanticAnnotations:
        """The split's annotations (training-filtered when `train`), parsed once."""
        key = (split, train)
        if key not in self._annotations:
            root = self.require_root()
            path = root / "annotations" / f"instances_{split}.json"
            if not path.is_file():
                raise UserError(f"Missing COCO annotation file {path}.\n{COCO_LAYOUT}")
            folder = root / split
            if not folder.is_dir():
                raise UserError(f"Missing COCO image folder {folder}.\n{COCO_LAYOUT}")
            parsed = parse_semantic_annotations(path, folder, self.train_min_area if train else None)
            if not len(parsed):
                condition = f" with more than {self.train_min_area:g} px of VOC categories" if train else ""
                raise UserError(f"{path} has no images{condition}.\n{COCO_LAYOUT}")
            self._annotations[key] = parsed
        return self._annotations[key]

    # ------------------------------------------------------------------ datasets
    def train_transform(self) -> A.Compose:
        return segmentation_train_transform(self.crop_size, self.scale_range, self.hflip, base_size=self.base_size)

    def _eval_dataset(self, split: str, protocol: str) -> CocoSegmentationDataset:
        """Under the torchvision protocol the dataset resizes image and mask, and the transform only normalises."""
        if protocol == "torchvision":
            transform, resize_to = segmentation_eval_transform(None), self.eval_size
        else:
            transform, resize_to = self.eval_transform(), None
        annotations = self.annotations(split, train=False)
        return CocoSegmentationDataset(annotations, transform, train=False, resize_to=resize_to)

    def split_dataset(self, key: str) -> Dataset:
        """The splits' images; `predict` (without `predict_path`) writes masks of the val split at their original
        size, whatever the protocol."""
        if key == "train":
            annotations = self.annotations(self.train_split, train=True)
            return CocoSegmentationDataset(annotations, self.train_transform(), train=True)
        if key == "test" and self.test_split == self.val_split:
            return self.dataset("val")
        split = {"val": self.val_split, "test": self.test_split, "predict": self.val_split}[key]
        return self._eval_dataset(split, "original" if key == "predict" else self.eval_protocol)
