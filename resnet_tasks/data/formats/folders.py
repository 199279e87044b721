"""Semantic segmentation from folders: images and class-index masks paired by file stem (CamVid's `train/` +
`trainannot/`, Roboflow's `x.jpg` + `x_mask.png` + `_classes.csv`), or RGB colour masks with a colour table.

Masks are remapped when read: each class's pixel value to its class index, the user's void value to the internal
`IGNORE_INDEX` (never a class, never scored), anything else is an error naming the file and the values.
The val split is the data's own, or a seeded hold-out of the training images (`--data.val_fraction`; plain seeded
random, not stratified: a mask's classes are known only once its pixels are read).
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
from PIL import Image

from resnet_tasks.data.io import IMAGE_EXTENSIONS
from resnet_tasks.data.segmentation import BINARY_MASKS_HINT, SegmentationDataModule, SegmentationDataset
from resnet_tasks.data.splitting import choose_val_fraction, hold_out, save_val_split, tell
from resnet_tasks.errors import UserError
from resnet_tasks.labels import BACKGROUND, IGNORE_INDEX, LabelSpace

MASK_EXTENSIONS = (*IMAGE_EXTENSIONS, ".tif", ".tiff", ".gif")
ROBOFLOW_CLASSES_FILE = "_classes.csv"  # Roboflow's PNG-mask export: "Pixel Value, Class" per split folder
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}
FOLDERS_LAYOUT = """Expected, per split (train, val or valid, test; relative to --data.root or absolute):
  images in --data.<split>_images DIR, masks in --data.<split>_masks DIR (default: beside the images), paired
  by file stem plus --data.mask_suffix (e.g. x.jpg + x_mask.png with --data.mask_suffix _mask); a mask's pixel
  values are class ids (mode L or P), or colours listed in --data.palette (CSV name,r,g,b)."""


# ---------------------------------------------------------------------------------------------- class tables
def _int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def read_classes_file(path: Path) -> tuple[list[int], list[str]]:
    """(pixel values, class names) of a classes file: one name per line (value = line number), or a CSV of a
    pixel value and a class name, with or without a header (Roboflow: `Pixel Value, Class`)."""
    if not path.is_file():
        raise UserError(f"Missing classes file {path}. Check --data.classes_file.")
    rows = [[cell.strip() for cell in row] for row in csv.reader(path.read_text(encoding="utf-8-sig").splitlines())]
    rows = [row for row in rows if any(row)]
    if rows and all(len(row) == 1 for row in rows):
        return list(range(len(rows))), [row[0] for row in rows]
    header = rows[0] if rows and not any(_int(cell) is not None for cell in rows[0]) else None
    body = rows[1:] if header is not None else rows
    value_column = next((i for i in range(len(body[0]) if body else 0) if _int(body[0][i]) is not None), None)
    if value_column is None or any(len(row) < 2 or _int(row[value_column]) is None for row in body):
        raise UserError(
            f"Cannot read classes file {path}: expected one class name per line, or CSV rows of a pixel value and "
            "a class name (e.g. 'Pixel Value, Class' then '0, background')."
        )
    name_column = 1 if value_column == 0 else 0
    if header is not None:
        named = [i for i, cell in enumerate(header) if cell.lower() in ("class", "name", "class name", "label")]
        name_column = named[0] if named and named[0] != value_column else name_column
    return [int(row[value_column]) for row in body], [row[name_column] for row in body]


def read_palette(path: Path) -> tuple[list[str], list[tuple[int, int, int]]]:
    """(names, colours) of a colour table CSV `name,r,g,b` (a header line is skipped)."""
    if not path.is_file():
        raise UserError(f"Missing palette file {path}. Check --data.palette.")
    names, colours = [], []
    for number, row in enumerate(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        rgb = [_int(cell) for cell in cells[1:4]]
        if len(cells) < 4 or any(v is None or not 0 <= v <= 255 for v in rgb):
            if number == 1:
                continue  # header
            raise UserError(f"{path} line {number}: expected name,r,g,b with r, g, b in 0..255, got {row}.")
        names.append(cells[0])
        colours.append((rgb[0], rgb[1], rgb[2]))  # type: ignore[arg-type]
    if not names:
        raise UserError(f"Palette {path} lists no colours; expected CSV rows name,r,g,b.")
    return names, colours


def _rgb_codes(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.int32)
    return (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]


class MaskDecoder:
    """Turns a mask file into class indices: a table over 8-bit pixel values (values[i] -> class i, the void value
    -> IGNORE_INDEX), or with `colours` a colour table (colour row r -> value r, then the same table)."""

    def __init__(self, values: Sequence[int], void: int | None, colours: Sequence[tuple[int, int, int]] | None) -> None:
        self.table = np.full(256 if colours is None else len(colours), -1, dtype=np.int16)
        for index, value in enumerate(values):
            self.table[value] = index
        if void is not None and 0 <= void < len(self.table):
            self.table[void] = IGNORE_INDEX
        self.codes = None if colours is None else _rgb_codes(np.asarray(colours, dtype=np.int32))
        self.order = None if self.codes is None else np.argsort(self.codes)

    def __call__(self, path: str | Path) -> np.ndarray:
        try:
            with Image.open(path) as picture:
                mode = picture.mode
                if self.codes is not None:
                    pixels = np.asarray(picture.convert("RGB"))
                elif mode in ("L", "P"):
                    pixels = np.asarray(picture, dtype=np.uint8)
                else:
                    raise UserError(
                        f"Mask {path} has mode {mode!r}; expected class indices (mode L or P). For colour masks "
                        "pass --data.palette FILE (CSV name,r,g,b)."
                    )
        except UserError:
            raise
        except Exception as error:  # PIL raises many types for broken files
            raise UserError(f"Corrupt or unreadable mask {path} ({type(error).__name__}: {error}).") from None
        if self.codes is None:
            labels = self.table[pixels]
            if (labels < 0).any():
                bad = sorted(int(v) for v in np.unique(pixels[labels < 0]))[:10]
                raise UserError(
                    f"Mask {path} has values {bad} that are neither a class's pixel value nor the void value "
                    "(--data.ignore_index). Add them to --data.classes_file / --data.class_names, or fix the mask."
                )
            return labels.astype(np.uint8)
        codes = _rgb_codes(pixels)
        assert self.order is not None
        rows = self.order[np.searchsorted(self.codes, codes, sorter=self.order).clip(0, len(self.order) - 1)]
        unknown = self.codes[rows] != codes
        if unknown.any():
            bad = [(c >> 16, (c >> 8) & 255, c & 255) for c in np.unique(codes[unknown])[:10].tolist()]
            raise UserError(f"Mask {path} has colours {bad} (r, g, b) that are not in --data.palette. Add them.")
        labels = self.table[rows]
        return labels.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- pairing
def pair_images_and_masks(images_dir: Path, masks_dir: Path, suffix: str) -> tuple[list[Path], list[Path]]:
    """(images, masks) paired by stem: `x.<any image ext>` with `x<suffix>.<any mask ext>` in `masks_dir`."""
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise UserError(f"Folder {folder} does not exist. {FOLDERS_LAYOUT}")
    same = images_dir.resolve() == masks_dir.resolve()
    if same and not suffix:
        raise UserError(
            f"Masks beside the images in {images_dir} need --data.mask_suffix (e.g. _mask for x.jpg + x_mask.png); "
            "or give the mask folder (--data.<split>_masks DIR)."
        )
    masks: dict[str, Path] = {}
    for path in sorted(masks_dir.iterdir()):
        if path.suffix.lower() in MASK_EXTENSIONS and path.stem.endswith(suffix):
            stem = path.stem[: len(path.stem) - len(suffix)]
            if stem in masks:
                raise UserError(f"{masks[stem]} and {path} are both masks of {stem!r}. Remove one.")
            masks[stem] = path
    images: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS and not (same and path.stem.endswith(suffix)):
            if path.stem in images:
                raise UserError(f"{images[path.stem]} and {path} share the stem {path.stem!r}. Rename one.")
            images[path.stem] = path
    if not images:
        raise UserError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}. {FOLDERS_LAYOUT}")
    unpaired = [path for stem, path in images.items() if stem not in masks]
    if unpaired:
        raise UserError(
            f"{len(unpaired)} of {len(images)} images in {images_dir} have no mask, e.g. {unpaired[0].name} (expected "
            f"{masks_dir / (unpaired[0].stem + suffix)}.png or another image extension). Add the masks, move these "
            "images out, or check --data.mask_suffix."
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        tell(f"{len(orphans)} masks in {masks_dir} have no image and are not used, e.g. {masks[orphans[0]].name}")
    return list(images.values()), [masks[stem] for stem in images]


class FolderSegmentationDataset(SegmentationDataset):
    """`SegmentationDataset` whose masks are decoded by a `MaskDecoder` (remapped to class indices and ignore)."""

    def __init__(self, images: Sequence[Path], masks: Sequence[Path] | None, transform: A.Compose, *, train: bool,
                 decoder: MaskDecoder | None) -> None:  # fmt: skip
        super().__init__(images, masks, transform, train=train, num_classes=None)
        self.decoder = decoder

    def decode_mask(self, path: str) -> np.ndarray:
        return self.decoder(path) if self.decoder is not None else super().decode_mask(path)


# ---------------------------------------------------------------------------------------------- data module
class SegmentationFolderDataModule(SegmentationDataModule):
    """Semantic segmentation from image and mask folders (see `FOLDERS_LAYOUT`).

    Split folders default to `train`, `val` or `valid`, `test` under `root` (the root itself for train when it
    holds the images). Classes: `class_names` (pixel value = position), `classes_file` (a name per line, or a CSV
    of pixel value and class name; Roboflow's `_classes.csv` beside the training images is found by itself) or
    `palette` (CSV name,r,g,b for RGB masks; a colour's row number is its value). `ignore_index`: the void value
    (None: none); a class with that value is void, not a class. Without a val split, `val_fraction` of the
    training images (default 0.1) is held out; without a test split, `test` evaluates the val split.
    Evaluation is at the original size (as for VOC).
    """

    def __init__(
        self,
        batch_size: int = 8,
        train_images: str | None = None,
        val_images: str | None = None,
        test_images: str | None = None,
        train_masks: str | None = None,
        val_masks: str | None = None,
        test_masks: str | None = None,
        mask_suffix: str = "",
        class_names: list[str] | None = None,
        classes_file: str | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        palette: str | None = None,
        val_fraction: float | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        given = {"train": train_images, "val": val_images, "test": test_images}
        self.image_dirs = {split: self._folder(value, split) for split, value in given.items()}
        masks = {"train": train_masks, "val": val_masks, "test": test_masks}
        self.mask_dirs = {split: self._resolve(masks[split]) or self.image_dirs[split] for split in masks}
        self.mask_suffix = mask_suffix
        self.ignore_index = ignore_index
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.decoder: MaskDecoder | None = None
        if self.image_dirs["train"] is not None or self.predict_path is None:
            self.label_space, self.decoder = self._classes(class_names, classes_file, palette, ignore_index)

    # ------------------------------------------------------------------ layout
    def _resolve(self, value: str | None) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.root is None else self.root / path

    def _folder(self, value: str | None, split: str) -> Path | None:
        """The split's image folder: given, else a conventional name under root (None when absent)."""
        if value is not None:
            return self._resolve(value)
        if self.root is None:
            return None
        for name in SPLIT_FOLDERS[split]:
            if (self.root / name).is_dir():
                return self.root / name
        holds_images = self.root.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in self.root.iterdir())
        return self.root if split == "train" and holds_images else None

    def _train_dir(self) -> Path:
        folder = self.image_dirs["train"]
        if folder is None:
            self.require_root()
            raise UserError(f"No training images: {self.root} has no train/ folder; pass --data.train_images DIR. "
                            f"{FOLDERS_LAYOUT}")  # fmt: skip
        return folder

    def _classes(self, names: list[str] | None, classes_file: str | None, palette: str | None,
                 void: int | None) -> tuple[LabelSpace, MaskDecoder]:  # fmt: skip
        """The label space and the mask decoder from the class options (one line says where names came from)."""
        colours = None
        if sum(option is not None for option in (names, classes_file, palette)) > 1:
            raise UserError("Give the classes once: --data.class_names, --data.classes_file or --data.palette.")
        if palette is not None:
            palette_names, colours = read_palette(self._resolve(palette))  # type: ignore[arg-type]
            values, file_names = list(range(len(colours))), palette_names
        elif classes_file is not None:
            values, file_names = read_classes_file(self._resolve(classes_file))  # type: ignore[arg-type]
        elif names:
            values, file_names = list(range(len(names))), list(names)
        else:
            candidates = [folder / ROBOFLOW_CLASSES_FILE for folder in (self.image_dirs["train"], self.root) if folder]
            found = next((path for path in candidates if path.is_file()), None)
            if found is None:
                raise UserError(
                    "SegmentationFolderDataModule needs the class names: --data.class_names [..], --data.classes_file "
                    "FILE (a name per line, or a CSV of pixel value and class name) or --data.palette FILE (RGB masks)."
                )
            values, file_names = read_classes_file(found)
            tell(f"class names from {found}")
        bad = [v for v in values if not 0 <= v <= 255] if colours is None else []
        if bad or len(set(values)) != len(values):
            raise UserError(f"Class pixel values must be distinct and in 0..255, got {values}. Check the classes.")
        keep = [i for i, value in enumerate(values) if value != void]
        if len(keep) < len(values):
            tell(f"pixel value {void} ({file_names[values.index(void)]}) is --data.ignore_index: void, not a class")
        values, class_names = [values[i] for i in keep], [file_names[i] for i in keep]
        if not 1 <= len(class_names) < IGNORE_INDEX:
            raise UserError(f"{len(class_names)} classes; a segmentation needs 1 to {IGNORE_INDEX - 1}.")
        ids = None if values == list(range(len(values))) or colours is not None else tuple(values)
        space = LabelSpace(tuple(class_names), ids, background=class_names[0] == BACKGROUND, ignore_index=IGNORE_INDEX)
        return space, MaskDecoder(values, void, colours)

    def _relative(self, path: Path) -> str:
        return os.path.relpath(path, self.root) if self.root is not None else str(path)

    @functools.cached_property
    def held_out(self) -> float | None:
        """The share of the training images held out as val (None: the data's own val split)."""
        return choose_val_fraction(self.val_fraction, self.image_dirs["val"] is not None, str(self._train_dir()))

    def split_files(self, split: str) -> tuple[list[Path], list[Path]]:
        """(images, masks) of "train", "val" or "test", with the val split held out of train where it applies."""
        if split in ("train", "val") and self.held_out is not None:
            images, masks = pair_images_and_masks(self._train_dir(), self.mask_dirs["train"], self.mask_suffix)
            keys = [self._relative(path) for path in images]
            train, val = hold_out(keys, None, float(self.held_out), self.split_seed, str(self._train_dir()))
            chosen = train if split == "train" else val
            return [images[i] for i in chosen], [masks[i] for i in chosen]
        folder = self._train_dir() if split == "train" else self.image_dirs[split]
        if folder is None:
            raise UserError(f"No {split} split: pass --data.{split}_images DIR. {FOLDERS_LAYOUT}")
        return pair_images_and_masks(folder, self.mask_dirs[split] or folder, self.mask_suffix)

    # ------------------------------------------------------------------ datasets
    def files_dataset(self, images: Sequence[Path], masks: Sequence[Path] | None, train: bool) -> SegmentationDataset:
        transform = self.train_transform() if train else self.eval_transform()
        return FolderSegmentationDataset(images, masks, transform, train=train, decoder=self.decoder)

    def split_dataset(self, key: str) -> SegmentationDataset:
        """train/val (held out of train where that applies); test from its folder, else val (said once); predict
        (with no `predict_path`) over val."""
        if key == "predict" or (key == "test" and self.image_dirs["test"] is None):
            if key == "test":
                tell("no test split: test evaluates the val split")
            return self.dataset("val")
        images, masks = self.split_files(key)
        dataset = self.files_dataset(images, masks, train=key == "train")
        if key == "train":
            self._say_if_no_objects(dataset)
        return dataset

    def _say_if_no_objects(self, dataset: SegmentationDataset, sample: int = 16) -> None:
        """One line when the first training masks hold void but no object class: 0/255 masks read with void 255."""
        paths = list(dataset.masks[:sample]) if dataset.masks is not None else []
        try:
            maps = [dataset.decode_mask(str(path)) for path in paths]
        except UserError:
            return  # a bad mask: reported where it is read
        first_object = 1 if self.label_space.background else 0
        objects = any(((m >= first_object) & (m != IGNORE_INDEX)).any() for m in maps)
        if any((m == IGNORE_INDEX).any() for m in maps) and not objects:
            tell(
                f"the first {len(maps)} training masks hold no object class, only void (--data.ignore_index) and "
                f"background: {BINARY_MASKS_HINT} (resnet-tasks inspect checks every mask)"
            )

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage == "fit" and self.held_out is not None and self.trainer is not None:
            save_val_split(self.trainer, lambda: [self._relative(Path(p)) for p in self.dataset("val").images])
