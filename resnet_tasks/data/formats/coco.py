"""COCO detection data wherever its files are: the COCO 2017, Roboflow and CVAT layouts under `--data.root`, or an
annotation file and an image folder per split; and the bundled shapes set in COCO format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnet_tasks.data.detection import DetectionDataModule
from resnet_tasks.data.detection_annotations import DetectionAnnotations
from resnet_tasks.data.formats.coco_files import (
    COCO_LAYOUT,
    class_categories,
    coco_categories,
    parse_coco_annotations,
    read_categories,
    read_json,
    same_categories,
)
from resnet_tasks.data.shapes import shapes_layout
from resnet_tasks.data.splitting import tell
from resnet_tasks.errors import UserError

__all__ = ["COCO_LAYOUT", "CocoDetectionDataModule", "ShapesDetectionDataModule"]

KEYS = ("train", "val", "test")
ROBOFLOW_FILE = "_annotations.coco.json"
# The split names each layout looks for, per key (the first on disk is the default).
DEFAULT_NAMES = {
    "COCO 2017": {"train": ("train2017",), "val": ("val2017",), "test": ()},
    "Roboflow": {"train": ("train",), "val": ("valid", "val"), "test": ("test",)},
    "CVAT": {"train": ("train", "default"), "val": ("val", "valid", "validation"), "test": ("test",)},
}


def layouts_text(names: list[str] | None = None) -> str:
    """What `CocoDetectionDataModule` looks for under --data.root (COCO 2017 for the split `names`), in one line."""
    names = names or ["train2017", "val2017"]
    files = " or ".join(f"annotations/instances_{name}.json" for name in names)
    folders = " / ".join(f"{name}/" for name in names)
    return (
        f"looked for {files} with {folders} (COCO 2017; split names --data.train_split / --data.val_split), "
        f"train/{ROBOFLOW_FILE} and valid/{ROBOFLOW_FILE} beside the images (Roboflow), annotations/instances_<name>"
        ".json with images/ (CVAT). Point --data.root at one of these, or name each split's files: "
        "--data.train_annotations FILE --data.train_images DIR (and val_, test_; relative to --data.root or absolute)."
    )


@dataclass(frozen=True)
class CocoSplit:
    """Where one split's files are: its annotation file, the folder its `file_name`s are relative to (`root` /
    `prefix`), and the key that named it (`option`, for messages)."""

    annotations: Path
    root: Path
    prefix: str
    option: str

    @property
    def images(self) -> Path:
        return self.root / self.prefix if self.prefix else self.root


@dataclass(frozen=True)
class CocoLayout:
    """A layout found under a root: its name and its splits on disk, by name (COCO 2017: any name)."""

    name: str
    root: Path
    splits: dict[str, CocoSplit]

    def default(self, key: str) -> str | None:
        if self.name == "COCO 2017":
            return DEFAULT_NAMES[self.name][key][0] if DEFAULT_NAMES[self.name][key] else None
        lower = {name.lower(): name for name in self.splits}
        found = [lower[name] for name in DEFAULT_NAMES[self.name][key] if name in lower]
        if key == "train" and not found and len(self.splits) == 1:
            found = list(self.splits)  # one split (CVAT's "default", ...): the training data
        return found[0] if found else None

    def split(self, name: str, key: str) -> CocoSplit:
        if self.name == "COCO 2017":
            path = self.root / "annotations" / f"instances_{name}.json"
            return CocoSplit(path, self.root, name, f"--data.{key}_split {name}")
        if name not in self.splits:
            raise UserError(
                f"The {self.name} layout under {self.root} has no split {name!r} (--data.{key}_split); its splits "
                f"are {', '.join(sorted(self.splits))}."
            )
        return self.splits[name]


def find_layout(root: Path, names: list[str]) -> CocoLayout | None:
    """The COCO layout under `root` (COCO 2017 for the split `names` given or its defaults, CVAT, Roboflow), or None."""
    annotations = root / "annotations"
    coco_names = [name for name in names if (annotations / f"instances_{name}.json").is_file()]
    cvat_images = root / "images"
    if coco_names and (not cvat_images.is_dir() or any((root / name).is_dir() for name in coco_names)):
        return CocoLayout("COCO 2017", root, {})
    cvat_files = sorted(annotations.glob("instances_*.json")) if annotations.is_dir() else []
    if cvat_files and cvat_images.is_dir():
        splits = {}
        for path in cvat_files:
            name = path.stem[len("instances_") :]
            images = cvat_images / name if (cvat_images / name).is_dir() else cvat_images
            splits[name] = CocoSplit(path, root, images.relative_to(root).as_posix(), f"CVAT subset {name}")
        return CocoLayout("CVAT", root, splits)
    folders = sorted(path.parent for path in root.glob(f"*/{ROBOFLOW_FILE}"))
    if folders:
        splits = {f.name: CocoSplit(f / ROBOFLOW_FILE, root, f.name, f"Roboflow split {f.name}") for f in folders}
        return CocoLayout("Roboflow", root, splits)
    return None


class CocoDetectionDataModule(DetectionDataModule):
    """COCO instances data: per split an annotation file and an image folder.

    `{train,val,test}_annotations` / `{train,val,test}_images` name a split's files (relative to `root` or
    absolute; the images default to the annotation file's folder) and win over `*_split`. The other splits come
    from the layout found under `root` (`layouts_text`): COCO 2017 (`*_split` name `annotations/instances_<split>.json`
    and `<split>/`, default train2017 / val2017), Roboflow (`valid` is the val split) or CVAT; there the `*_split`
    keys take the layout's split names. Without a val split, `val_fraction` of the training images (default 0.1) is
    held out (`split_seed`); without a test split, `test` evaluates val.

    Classes are the categories of the annotation files (the same list in every split, read in `__init__` without
    the annotations, so `num_classes` is known at once), by id, with their own ids and names; a category that owns
    no annotation and is the `supercategory` of others is not a class. Crowd boxes are kept for evaluation only.
    """

    def __init__(
        self,
        train_split: str | None = None,
        val_split: str | None = None,
        test_split: str | None = None,
        train_annotations: str | None = None,
        val_annotations: str | None = None,
        test_annotations: str | None = None,
        train_images: str | None = None,
        val_images: str | None = None,
        test_images: str | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_split=train_split, val_split=val_split, test_split=test_split, **kwargs)
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.train_annotations, self.val_annotations, self.test_annotations = (
            train_annotations,
            val_annotations,
            test_annotations,
        )
        self.train_images, self.val_images, self.test_images = train_images, val_images, test_images
        self.sources: dict[str, CocoSplit] = {}
        self.layout: CocoLayout | None = None
        given = {key: getattr(self, f"{key}_annotations") for key in KEYS}
        if self.root is None and self.predict_path is not None and not any(given.values()):
            return  # predicting on a folder: the label space comes from the model's weights
        self._resolve_splits(given)
        files = {}
        for source in {source.annotations: source for source in self.sources.values()}.values():
            if source.annotations.is_file():
                files[source.annotations] = read_categories(source.annotations)
        if not files:
            missing = next(iter(self.sources.values())).annotations
            raise UserError(f"Missing COCO annotation file {missing}.\n{COCO_LAYOUT}")
        self.categories = same_categories(files)
        classes, parents = class_categories(self.categories, list(files))
        for parent in parents:
            tell(f"category {parent['id']} {parent['name']!r} is the supercategory of others and has no annotation: "
                 "not a class")  # fmt: skip
        if not classes:
            raise UserError(f"{next(iter(files))} lists no category that could be a class: {self.categories}.")
        self.set_label_space([str(entry["name"]) for entry in classes], [entry["id"] for entry in classes])

    # ------------------------------------------------------------------ where the splits are
    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.root is None else self.root / path

    def _resolve_splits(self, given: dict[str, str | None]) -> None:
        """Set `sources` and the split names of train/val/test: the files given per split, the rest from the
        layout found under `root`; say in one line where the data is."""
        described = []
        for key in KEYS:
            images = getattr(self, f"{key}_images")
            if given[key] is None:
                if images is not None:
                    raise UserError(
                        f"--data.{key}_images needs --data.{key}_annotations FILE (the COCO file listing its images)."
                    )
                continue
            annotations = self._resolve(str(given[key]))
            if not annotations.is_file():
                raise UserError(f"COCO annotation file {annotations} (--data.{key}_annotations) does not exist.")
            folder = self._resolve(images) if images is not None else annotations.parent
            if not folder.is_dir():
                raise UserError(f"Image folder {folder} (--data.{key}_images) does not exist.")
            name = str(annotations)
            self.sources[name] = CocoSplit(annotations, folder, "", f"--data.{key}_annotations {annotations}")
            setattr(self, f"{key}_split", name)
            described.append(f"{key} {annotations}")
        rest = [key for key in KEYS if given[key] is None]
        if rest and (self.root is not None or not described):
            root = self.require_root()
            named = [name for key in rest if (name := getattr(self, f"{key}_split"))]
            self.layout = find_layout(root, named or ["train2017", "val2017"])
            if self.layout is None and not described:
                raise UserError(f"No COCO dataset found under {root}: {layouts_text(named)}")
        for key in rest:
            name = None
            if self.layout is not None:
                name = getattr(self, f"{key}_split") or self.layout.default(key)
                if name is not None:
                    self.sources[name] = self.layout.split(name, key)
            setattr(self, f"{key}_split", name)
        if self.layout is not None:
            found = ", ".join(f"{key} {name}" for key in rest if (name := getattr(self, f"{key}_split")))
            described.insert(0, f"{self.layout.name} layout under {self.layout.root} ({found})")
        if self.predict_split is not None and self.predict_split not in self.sources:
            if self.layout is None:
                raise UserError(
                    f"--data.predict_split {self.predict_split}: no layout under --data.root to find it in."
                )
            self.sources[self.predict_split] = self.layout.split(self.predict_split, "predict")
        if not self.sources:
            raise UserError(f"No COCO split found: {layouts_text()}")
        tell(f"COCO data: {'; '.join(described)}")

    def describe_split(self, key: str) -> str:
        name = getattr(self, f"{key}_split")
        return str(self.sources[name].annotations) if name in self.sources else super().describe_split(key)

    @property
    def category_ids(self) -> list[int]:
        """The dataset's category ids of labels 1..K (sorted), from the label space."""
        return [] if self.label_space is None else list(self.label_space.category_ids[1:])

    # ------------------------------------------------------------------ reading a split
    def load_split(self, split: str) -> DetectionAnnotations:
        source = self.sources.get(split)
        if source is None:
            raise UserError(f"{type(self).__name__} has no split {split!r}; its splits are {sorted(self.sources)}.")
        if not source.annotations.is_file():
            raise UserError(f"Missing COCO annotation file {source.annotations}.\n{COCO_LAYOUT}")
        if not source.images.is_dir():
            raise UserError(f"Missing COCO image folder {source.images} ({source.option}).\n{COCO_LAYOUT}")
        data = read_json(source.annotations)
        categories = coco_categories(data, source.annotations)
        same_categories({self._category_source(): self.categories, source.annotations: categories})
        annotations = parse_coco_annotations(source.annotations, source.prefix, source.root, self.category_ids, data)
        annotations.require_images(
            f"Its file_names are read relative to {source.images} ({source.option}); pass the folder they are "
            "relative to as --data.<train|val|test>_images DIR."
        )
        self.summarise(split, annotations)
        return annotations

    def _category_source(self) -> Path:
        return next(s.annotations for s in self.sources.values() if s.annotations.is_file())


class ShapesDetectionDataModule(CocoDetectionDataModule):
    """The bundled synthetic shapes set in COCO format (generated on first use under data/shapes)."""

    def __init__(self, root: str | None = None, batch_size: int = 8, num_workers: int = 2, **kwargs: Any) -> None:
        if root is None and kwargs.get("predict_path") is None:
            root = shapes_layout("coco")
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, **kwargs)
