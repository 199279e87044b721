"""YOLO detection data: Ultralytics' data.yaml and its path rules, label files parsed into the column store (in
worker processes, then cached: `yolo_cache`), and the YOLO detection data module."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from resnet_tasks.data.detection import DetectionDataModule
from resnet_tasks.data.detection_annotations import AnnotationBuilder, DetectionAnnotations
from resnet_tasks.data.formats.yolo_cache import YoloIndex, cache_locations, cached_index, fingerprint, relative_name
from resnet_tasks.data.io import IMAGE_EXTENSIONS, image_size_hw
from resnet_tasks.data.splitting import tell
from resnet_tasks.errors import UserError

# Ultralytics accepts normalised coordinates up to 1% outside 0..1 (rounding in exporters); boxes are then clipped.
TOLERANCE = 0.01
CHUNK_SIZE = 2048  # images per task of the parallel cold parse
ROW_FORMAT = "A YOLO row reads 'class cx cy w h' (or 'class x1 y1 x2 y2 x3 y3 ...' for a polygon), normalised to 0..1"
IMAGES_FOLDER, LABELS_FOLDER = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"


# ----------------------------------------------------------------------------------------------- data.yaml
@dataclass(frozen=True)
class YoloDataYaml:
    """What a data.yaml says: the dataset root (`path`), each split's image sources (folders or `.txt` lists of
    images; splits not on disk are left out) and the class names (index = YOLO class id)."""

    file: Path
    root: Path
    names: tuple[str, ...]
    splits: dict[str, tuple[Path, ...]]


def read_data_yaml(file: str | Path) -> YoloDataYaml:
    """Read an Ultralytics data.yaml with Ultralytics' rules (`check_det_dataset`).

    `path` (the root) is relative to the yaml's folder (or, failing that, to the working directory, as
    Ultralytics reads it) and defaults to the yaml's folder; split paths are relative to the root, and a
    `../x` that does not exist there is read as `x` (Roboflow writes `train: ../train/images` beside the
    yaml). `train` and `val` must exist; a `test` that is not on disk is absent, said in one line.
    """
    file = Path(file).expanduser().resolve()
    data = _load_yaml(file)
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
    names = _class_names(data, file)
    root = _dataset_root(data, file)
    splits: dict[str, tuple[Path, ...]] = {}
    for key in ("train", "val", "test"):
        sources = _split_sources(data, key, root, file)
        if sources is None:
            if key != "test":
                raise UserError(
                    f"{file} has no '{key}:' key; a YOLO data.yaml names the 'train' and 'val' images (a folder, a "
                    ".txt list of images or a list of folders)."
                )
            continue
        missing = [source for source in sources if not source.exists()]
        if missing and key != "test":
            raise UserError(
                f"{file}: '{key}: {data[key]}' points to {missing[0]}, which does not exist. Fix the path "
                f"(relative to {root})."
            )
        if missing:
            tell(f"{file}: '{key}: {data[key]}' is not on disk ({missing[0]}): no test split (test evaluates val)")
            continue
        splits[key] = sources
    return YoloDataYaml(file=file, root=root, names=names, splits=splits)


def _load_yaml(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"YOLO data.yaml {file} does not exist. Check --data.data_yaml.")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"Malformed YAML in {file}{where}: {getattr(error, 'problem', None) or error}.") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a YOLO data.yaml: expected the keys 'train', 'val' and 'names'.")
    return data


def _class_names(data: dict[str, Any], file: Path) -> tuple[str, ...]:
    names, count = data.get("names"), data.get("nc")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise UserError(f"{file}: 'nc: {count}' must be the number of classes (a positive integer).")
    if names is None:
        if count is None:
            raise UserError(f"{file} has neither 'names' nor 'nc'; list the class names, e.g. names: [cat, dog].")
        names = [f"class_{i}" for i in range(count)]
    if isinstance(names, dict):
        try:
            by_id = {int(key): str(value) for key, value in names.items()}
        except (TypeError, ValueError):
            raise UserError(f"{file}: the keys of 'names' must be class ids 0, 1, ...; got {list(names)}.") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise UserError(f"{file}: 'names' must number the classes 0..{len(by_id) - 1}; got ids {sorted(by_id)}.")
        names = [by_id[i] for i in range(len(by_id))]
    if not isinstance(names, list) or not names:
        raise UserError(f"{file}: 'names' must be a list of class names or a {{id: name}} mapping; got {names!r}.")
    if count is not None and count != len(names):
        raise UserError(f"{file}: 'nc: {count}' but 'names' lists {len(names)} classes; make them agree.")
    return tuple(str(name) for name in names)


def _dataset_root(data: dict[str, Any], file: Path) -> Path:
    given = data.get("path")
    if not given:
        return file.parent
    path = Path(str(given)).expanduser()
    candidates = [path] if path.is_absolute() else [file.parent / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise UserError(
        f"{file}: 'path: {given}' is not a folder (looked for {' and '.join(map(str, candidates))}). Fix it, or "
        "remove it to use the data.yaml's folder."
    )


def _split_sources(data: dict[str, Any], key: str, root: Path, file: Path) -> tuple[Path, ...] | None:
    value = data.get(key)
    if value is None or value == "" or value == []:
        return None
    sources = []
    for entry in value if isinstance(value, list) else [value]:
        if not isinstance(entry, str):
            raise UserError(f"{file}: '{key}' must be a path or a list of paths; got {entry!r}.")
        source = (root / entry).resolve()
        if not source.exists() and entry.startswith("../"):
            source = (root / entry[3:]).resolve()  # Roboflow's `../train/images` beside the yaml
        sources.append(source)
    return tuple(sources)


# ----------------------------------------------------------------------------------------------- files
def list_split_images(sources: tuple[Path, ...], root: Path) -> tuple[list[str], Counter]:
    """A split's image paths (sorted, unique) and a count per extension of the other files it names.

    A folder is searched recursively; a `.txt` lists one image per line: `./x` relative to the list's folder
    (as Ultralytics reads it), other relative paths relative to `root`.
    """
    images: list[str] = []
    others: Counter = Counter()
    for source in sources:
        if source.is_dir():
            names = _files_below(str(source))
        elif source.suffix.lower() == ".txt":
            lines = (line.strip() for line in source.read_text(encoding="utf-8").splitlines())
            names = [
                os.path.normpath(source.parent / line[2:] if line.startswith("./") else root / line)
                for line in lines
                if line
            ]
        else:
            raise UserError(f"{source} is neither a folder of images nor a .txt list of images.")
        for name in names:
            base, dot, extension = name.rpartition(".")
            extension = f".{extension.lower()}" if dot and os.sep not in extension else ""
            if extension in IMAGE_EXTENSIONS:
                images.append(name)
            elif extension != ".txt":
                others[extension or "(none)"] += 1
    return sorted(set(images)), others


def _files_below(folder: str) -> list[str]:
    """Every file under `folder`, recursively (symbolic links followed)."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                files += _files_below(entry.path)
            else:
                files.append(entry.path)
    return files


def label_file(image: str) -> str:
    """Ultralytics' rule: the last `/images/` of the path becomes `/labels/`, the extension `.txt`."""
    head, found, tail = image.rpartition(IMAGES_FOLDER)
    path = f"{head}{LABELS_FOLDER}{tail}" if found else image
    return os.path.splitext(path)[0] + ".txt"


def read_label_file(path: str, num_classes: int) -> tuple[np.ndarray, int, str]:
    """(rows, polygon rows, state) of a label file: rows (n, 5) = class, x1, y1, x2, y2 in 0..1 (a polygon gives
    its bounding box); state "missing", "empty" or "labelled". A bad row raises a UserError naming file and line."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return np.zeros((0, 5)), 0, "missing"
    except OSError as error:
        raise UserError(f"Cannot read YOLO label file {path} ({error}). Fix or remove it.") from None
    rows, polygons = [], 0
    for number, line in enumerate(data.splitlines(), start=1):
        fields_ = line.split()
        if not fields_:
            continue
        try:
            values = [float(value) for value in fields_]
        except ValueError:
            raise _bad_row(path, number, f"{line.decode(errors='replace').strip()!r} is not all numbers") from None
        if len(values) == 5:
            _, cx, cy, w, h = values
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        elif len(values) >= 7 and len(values) % 2 == 1:
            xs, ys = values[1::2], values[2::2]
            box, polygons = (min(xs), min(ys), max(xs), max(ys)), polygons + 1
        else:
            raise _bad_row(path, number, f"{len(values)} values")
        if not values[0].is_integer() or not 0 <= values[0] < num_classes:
            raise _bad_row(
                path,
                number,
                f"class {fields_[0].decode()} is not among the {num_classes} classes "
                f"(0..{num_classes - 1}) of the data.yaml's 'names'; fix the row or the names",
            )
        coordinates = values[1:]
        total = sum(coordinates)  # NaN when any value is: comparisons alone would let it through
        if total != total or min(coordinates) < -TOLERANCE or max(coordinates) > 1 + TOLERANCE:
            outside = next(v for v in coordinates if not -TOLERANCE <= v <= 1 + TOLERANCE)
            raise _bad_row(
                path,
                number,
                f"value {outside:g} is outside 0..1; YOLO coordinates are fractions of the "
                "image width and height (pixel coordinates?)",
            )
        rows.append((values[0], *box))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5), polygons, ("labelled" if rows else "empty")


def _bad_row(path: str, number: int, problem: str) -> UserError:
    return UserError(f"{path}, line {number}: {problem}. {ROW_FORMAT}.")


# ----------------------------------------------------------------------------------------------- index
def _index_chunk(images: list[str], root: str, num_classes: int, source: str) -> YoloIndex:
    builder = AnnotationBuilder(root=root, source=source, string_ids=True)
    counts: Counter = Counter()
    unreadable = []
    for image in images:
        rows, polygons, state = read_label_file(label_file(image), num_classes)
        try:
            height, width = image_size_hw(image)  # the EXIF-oriented size, from the header
        except UserError as error:
            unreadable.append(str(error))
            continue
        counts[state] += 1
        counts["polygons"] += polygons
        boxes = rows[:, 1:] * np.array([width, height, width, height], dtype=np.float64)
        builder.add_image(
            file_name=relative_name(image, root),
            image_id=len(builder.image_ids),
            height=height,
            width=width,
            boxes_xyxy=boxes,
            labels=rows[:, 0].astype(np.int64) + 1,
            crowd=np.zeros(len(rows), dtype=np.uint8),
            difficult=np.zeros(len(rows), dtype=np.uint8),
            areas=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        )
    return YoloIndex(builder.build(), counts, unreadable)


def _concatenate(parts: list[YoloIndex], root: str, source: str) -> YoloIndex:
    """One index from chunks parsed in order (image ids renumbered, object offsets re-based)."""
    chunks = [part.annotations for part in parts]
    arrays = {
        f.name: np.concatenate([getattr(chunk, f.name) for chunk in chunks])
        for f in fields(DetectionAnnotations)
        if f.name not in ("root", "offsets", "string_ids", "clipped_boxes", "dropped_boxes", "source")
    }
    counts = np.concatenate([np.diff(chunk.offsets) for chunk in chunks])
    arrays["image_ids"] = np.arange(len(counts), dtype=np.int64)
    arrays["offsets"] = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    arrays["boxes"] = arrays["boxes"].reshape(-1, 4)
    annotations = DetectionAnnotations(
        root=root,
        string_ids=True,
        clipped_boxes=sum(chunk.clipped_boxes for chunk in chunks),
        dropped_boxes=sum(chunk.dropped_boxes for chunk in chunks),
        source=source,
        **arrays,
    )
    return YoloIndex(
        annotations, sum((part.counts for part in parts), Counter()), [u for p in parts for u in p.unreadable]
    )


def build_index(images: list[str], root: str, num_classes: int, source: str, chunk_size: int = CHUNK_SIZE) -> YoloIndex:
    """Parse every label file and image header of a split; chunks run in worker processes on all cores."""
    chunks = [images[start : start + chunk_size] for start in range(0, len(images), chunk_size)] or [[]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, len(chunks))
    if workers <= 1 or multiprocessing.current_process().daemon:
        return _concatenate([_index_chunk(chunk, root, num_classes, source) for chunk in chunks], root, source)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        futures = [pool.submit(_index_chunk, chunk, root, num_classes, source) for chunk in chunks]
        return _concatenate([future.result() for future in futures], root, source)  # the first bad file first
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------- data module
class YoloDetectionDataModule(DetectionDataModule):
    """YOLO detection data from an Ultralytics `data.yaml` (`--data.data_yaml`), read with Ultralytics' rules.

    Classes are the yaml's `names`; their YOLO ids (0-based) are the category ids in results. Each split's labels
    are parsed once and cached beside its labels folder, or under `cache_dir` (default: the user cache directory)
    where that folder is read-only. An image with a missing or empty label file is a negative: counted, and
    trained on unless `remove_images_without_annotations` (default false, as Ultralytics trains on them). With
    `val_fraction`, that share of the training images is held out as val (`split_seed`). Without a test split,
    `test` evaluates the yaml's val split. Results use the file stem as `image_id`. A relative
    `data_yaml` is read from `root` when that is given.
    """

    def __init__(
        self,
        data_yaml: str | None = None,
        cache_dir: str | None = None,
        remove_images_without_annotations: bool = False,
        val_fraction: float | None = None,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            train_split="train",
            val_split="val",
            test_split="test",
            remove_images_without_annotations=remove_images_without_annotations,
            **kwargs,
        )
        self.cache_dir = cache_dir
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.data: YoloDataYaml | None = None
        if data_yaml is None:
            if self.predict_path is not None:
                return  # predicting on a folder: the label space comes from the model's weights
            raise UserError(
                "YoloDetectionDataModule needs --data.data_yaml FILE (an Ultralytics data.yaml), or "
                "--data.predict_path DIR to predict on a folder of images."
            )
        path = Path(data_yaml).expanduser()
        self.data = read_data_yaml(self.root / path if self.root is not None and not path.is_absolute() else path)
        if "test" not in self.data.splits:
            self.test_split = self.val_split
        self.set_label_space(self.data.names, range(len(self.data.names)))

    def load_split(self, split: str) -> DetectionAnnotations:
        if self.data is None:
            raise UserError(f"YoloDetectionDataModule needs --data.data_yaml FILE to read the split {split!r}.")
        root = str(self.data.root)
        images, others = list_split_images(self.data.splits[split], self.data.root)
        source = f"{self.data.file} split {split!r}"
        if not images:
            raise UserError(
                f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {list(map(str, self.data.splits[split]))}."
            )
        labels = [label_file(image) for image in images]
        index, origin = cached_index(
            cache_locations(Path(labels[0]).parent, split, self.cache_dir),
            fingerprint(images, labels, root, len(self.data.names)),
            root,
            source,
            lambda: build_index(images, root, len(self.data.names), source),
        )
        if index.counts["missing"] == len(images):
            raise UserError(
                f"{source}: none of its {len(images)} images has a label file (e.g. {label_file(images[0])}); YOLO "
                "labels live in a labels/ folder beside images/ (an empty .txt marks an image without objects)."
            )
        if not len(index.annotations):
            raise UserError(f"{source}: no readable image, e.g. {index.unreadable[0]}")
        tell(index.summary(split, origin, others))
        return index.annotations
