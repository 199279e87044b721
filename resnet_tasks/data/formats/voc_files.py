"""PASCAL VOC XML files wherever they are: the XML reader, finding an XML's image (any extension), and the layouts
`VOCDetectionDataModule` recognises (VOCdevkit, Roboflow's "Pascal VOC" export, LabelImg / CVAT) with their splits."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_tasks.data.io import IMAGE_EXTENSIONS, stems_from_list
from resnet_tasks.errors import UserError

ROBOFLOW_SPLITS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}
LIST_SPLITS = {"train": ("train", "trainval", "default"), "val": ("val", "valid", "validation"), "test": ("test",)}
PER_CLASS_LIST = re.compile(r".+_(train|val|trainval|test)")
ALL = "all"  # the one split of a LabelImg folder without ImageSets/Main


def layouts_text(root: Path) -> str:
    """What `VOCDetectionDataModule` looks for under `root`, in one line."""
    return (
        f"looked for {root}/VOCdevkit/VOC<year>/ with Annotations/, JPEGImages/ and ImageSets/Main/<set>.txt "
        "(VOCdevkit; splits YEAR-SET joined by '+', e.g. --data.train_split 2007-trainval+2012-trainval), split "
        f"folders such as {root}/train/ and valid/ holding x.jpg beside x.xml (Roboflow), {root}/Annotations/*.xml "
        f"with {root}/JPEGImages/ and, where present, ImageSets/Main/<name>.txt (LabelImg/CVAT)."
    )


def parse_split(split: str) -> list[tuple[str, str]]:
    """'2007-trainval+2012-trainval' -> [('2007', 'trainval'), ('2012', 'trainval')]."""
    parts = []
    for part in split.split("+"):
        year, _, image_set = part.strip().partition("-")
        if not year or not image_set:
            raise UserError(
                f"VOC split {split!r}: each part must read YEAR-SET, e.g. 2007-trainval+2012-trainval or 2007-test."
            )
        parts.append((year, image_set))
    return parts


# ----------------------------------------------------------------------------------------------- one XML
@dataclass(frozen=True)
class VocRecord:
    """What one XML says: the image's size (0 when absent), its `<filename>`, and per object (direct `<object>`
    children; their `<part>`s are not objects) the name, the box as written and the difficult flag."""

    height: int
    width: int
    filename: str
    names: tuple[str, ...]
    boxes: np.ndarray
    difficult: np.ndarray


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise UserError(f"VOC annotation {path} lacks <{tag}> in <{node.tag}>. Fix or re-download the file.")
    return child.text.strip()


def read_voc_xml(path: Path) -> VocRecord:
    """Read one VOC XML (boxes as written: xmin, ymin, xmax, ymax)."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as error:
        line, column = error.position
        raise UserError(f"Malformed VOC annotation {path}: {error.msg} (line {line}, column {column}).") from None
    except OSError as error:
        raise UserError(f"Cannot read VOC annotation {path}: {error.strerror or error}.") from None
    root = tree.getroot()
    size = root.find("size")
    height = width = 0
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        try:
            width, height = int(float(_text(size, "width", path))), int(float(_text(size, "height", path)))
        except ValueError:
            raise UserError(f"VOC annotation {path} has a non-numeric <size>.") from None
    filename = root.find("filename")
    names, boxes, difficult = [], [], []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        box = obj.find("bndbox")
        if box is None:
            raise UserError(f"VOC annotation {path}: object {name!r} has no <bndbox>.")
        try:
            boxes.append([float(_text(box, tag, path)) for tag in ("xmin", "ymin", "xmax", "ymax")])
        except ValueError:
            raise UserError(f"VOC annotation {path}: object {name!r} has a non-numeric <bndbox>.") from None
        flag = obj.find("difficult")
        try:
            difficult.append(int(float(flag.text.strip())) if flag is not None and flag.text else 0)
        except ValueError:
            raise UserError(f"VOC annotation {path}: object {name!r} has <difficult>{flag.text}</difficult>; "
                            "expected 0 or 1.") from None  # fmt: skip
        names.append(name)
    return VocRecord(
        height=height,
        width=width,
        filename=(filename.text or "").strip() if filename is not None else "",
        names=tuple(names),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        difficult=np.asarray(difficult, dtype=np.uint8),
    )


@dataclass
class ImageFolder:
    """A folder's images by stem (listed once): an XML's image is the one with its stem, any image extension."""

    path: Path
    _by_stem: dict[str, list[str]] | None = None

    def find(self, xml: Path, filename: str) -> str:
        """The file name of `xml`'s image: by the XML's stem, else by `<filename>`'s stem; when none is on disk,
        `<filename>` (or `<stem>.jpg`), which reading then reports as missing."""
        if self._by_stem is None:
            self._by_stem = {}
            names = os.listdir(self.path) if self.path.is_dir() else []
            for name in sorted(names):
                stem, extension = os.path.splitext(name)
                if extension.lower() in IMAGE_EXTENSIONS:
                    self._by_stem.setdefault(stem, []).append(name)
        candidates = self._by_stem.get(xml.stem) or self._by_stem.get(Path(filename).stem) or []
        if len(candidates) > 1:
            if filename in candidates:
                return filename
            raise UserError(
                f"{xml}: its image is ambiguous, {' and '.join(candidates)} in {self.path} share its stem. Rename or "
                "remove one."
            )
        if candidates:
            return candidates[0]
        return filename if Path(filename).stem == xml.stem else f"{xml.stem}.jpg"


# ----------------------------------------------------------------------------------------------- layouts
@dataclass
class VocLayout:
    """A VOC layout found under `root` (`name`: "VOCdevkit", "Roboflow" or "LabelImg/CVAT") and its split names.

    `entries(split)` lists a split's (XML, image folder) pairs; a split name joins parts with '+'. Boxes follow the
    devkit's 1-based inclusive pixel convention in VOCdevkit (`one_based`), and are read as written elsewhere.
    """

    name: str
    root: Path
    splits: tuple[str, ...] = ()
    folders: dict[Path, ImageFolder] = field(default_factory=dict)

    @property
    def one_based(self) -> bool:
        return self.name == "VOCdevkit"

    def default(self, key: str) -> str | None:
        if self.name == "VOCdevkit":
            return {"train": "2007-trainval+2012-trainval", "val": "2007-test", "test": "2007-test"}[key]
        if self.splits == (ALL,):
            return ALL if key == "train" else None
        names = (ROBOFLOW_SPLITS if self.name == "Roboflow" else LIST_SPLITS)[key]
        found = [name for name in names if name in self.splits]
        if key == "train" and not found and len(self.splits) == 1:
            found = list(self.splits)
        return found[0] if found else None

    def check(self, split: str, key: str) -> None:
        """UserError when `split` is not a split of this layout."""
        if self.name == "VOCdevkit":
            parse_split(split)
            return
        unknown = [part for part in split.split("+") if part.strip() not in self.splits]
        if unknown:
            raise UserError(
                f"The {self.name} VOC layout under {self.root} has no split {unknown[0]!r} (--data.{key}_split); its "
                f"splits are {', '.join(self.splits)}."
            )

    def image_folder(self, path: Path) -> ImageFolder:
        return self.folders.setdefault(path, ImageFolder(path))

    def entries(self, split: str) -> list[tuple[Path, ImageFolder]]:
        """(XML, image folder) of every image of `split`, in list (or file name) order."""
        pairs = []
        for part in (p.strip() for p in split.split("+")):
            if self.name == "VOCdevkit":
                year, image_set = parse_split(part)[0]
                folder = self.root / "VOCdevkit" / f"VOC{year}"
                xmls = self._listed(folder / "ImageSets" / "Main" / f"{image_set}.txt", folder / "Annotations", split)
                images = folder / "JPEGImages"
            elif self.name == "Roboflow":
                xmls, images = sorted((self.root / part).glob("*.xml")), self.root / part
            elif part == ALL:
                xmls, images = sorted((self.root / "Annotations").glob("*.xml")), self.root / "JPEGImages"
            else:
                listing = self.root / "ImageSets" / "Main" / f"{part}.txt"
                xmls, images = self._listed(listing, self.root / "Annotations", split), self.root / "JPEGImages"
            pairs += [(xml, self.image_folder(images)) for xml in xmls]
        return pairs

    def _listed(self, listing: Path, annotations: Path, split: str) -> list[Path]:
        if not listing.is_file():
            raise UserError(f"Missing VOC image list {listing} (split {split!r}).")
        xmls = [annotations / f"{stem}.xml" for stem in stems_from_list(listing)]
        for xml in xmls:
            if not xml.is_file():
                raise UserError(f"Missing VOC annotation {xml} (listed in {listing}).")
        return xmls

    def all_xmls(self) -> list[Path]:
        """Every XML of every split (the class names outside VOCdevkit are their object names)."""
        if self.name == "Roboflow":
            return [xml for split in self.splits for xml in sorted((self.root / split).glob("*.xml"))]
        return sorted((self.root / "Annotations").glob("*.xml"))


def find_voc_layout(root: Path) -> VocLayout:
    """The VOC layout under `root`; UserError listing the layouts when there is none."""
    if (root / "VOCdevkit").is_dir():
        return VocLayout("VOCdevkit", root)
    if (root / "Annotations").is_dir():
        if not (root / "JPEGImages").is_dir():
            raise UserError(f"{root}/Annotations has no image folder beside it: expected {root}/JPEGImages.")
        lists = root / "ImageSets" / "Main"
        listed = sorted(path.stem for path in lists.glob("*.txt")) if lists.is_dir() else []
        names = [name for name in listed if not PER_CLASS_LIST.fullmatch(name)]  # not VOC's <class>_<set>.txt
        return VocLayout("LabelImg/CVAT", root, tuple(names) or (ALL,))
    folders = sorted(path.name for path in root.iterdir() if path.is_dir() and any(path.glob("*.xml")))
    if folders:
        return VocLayout("Roboflow", root, tuple(folders))
    raise UserError(f"No VOC dataset found under {root}: {layouts_text(root)}")
