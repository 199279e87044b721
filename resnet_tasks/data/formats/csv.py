"""Image classification from CSV files of (image path, label): `--data.train_csv F` (and val_, test_), columns named
by `--data.image_column` / `--data.label_column`, image paths relative to `--data.root` (or absolute)."""

from __future__ import annotations

import csv
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from resnet_tasks.data.classification import ImageFolderDataModule
from resnet_tasks.data.splitting import choose_val_fraction, hold_out, tell
from resnet_tasks.errors import UserError

CSV_SPLITS = ("train", "val", "test")


def read_labelled_csv(path: Path, image_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """(image paths, labels) as the CSV writes them; UserError naming the file for a missing column or an empty
    cell."""
    if not path.is_file():
        raise UserError(f"Missing CSV file {path}. Check --data.train_csv / val_csv / test_csv.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = columns
        for column, key in ((image_column, "image_column"), (label_column, "label_column")):
            if column not in columns:
                raise UserError(
                    f"{path} has no column {column!r} (its columns: {', '.join(columns) or 'none'}). "
                    f"Name the right one with --data.{key}."
                )
        images, labels = [], []
        for line, row in enumerate(reader, start=2):
            image, label = (row.get(image_column) or "").strip(), (row.get(label_column) or "").strip()
            if not image or not label:
                if not any((value or "").strip() for value in row.values()):
                    continue  # a blank line
                raise UserError(f"{path} line {line}: the {image_column if not image else label_column} cell is empty.")
            images.append(image)
            labels.append(label)
    if not images:
        raise UserError(f"{path} lists no images.")
    return images, labels


def sorted_labels(labels: list[str]) -> list[str]:
    """Distinct labels, sorted (numerically when every label is an integer: 2 before 10)."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


class CsvClassificationDataModule(ImageFolderDataModule):
    """Classification from CSV files: each row an image path (relative to `root`) and its label.

    Classes: `class_names` (their order gives the class indices; every label must be one of them) or the training
    CSV's distinct labels, sorted. Without `val_csv` (or with `val_fraction` given), val is a seeded share of the
    training rows (`val_fraction`, default 0.1; `split_seed`), stratified by label and saved by `fit` as
    `val_split.txt`; without `test_csv`, `test` evaluates the val split. Transforms, decoding and the other keys are
    `ImageFolderDataModule`'s.
    """

    def __init__(
        self,
        train_csv: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        # Set before the base's __init__, which asks `_discover_classes` for the class names.
        self.csv_files = {"train": train_csv, "val": val_csv, "test": test_csv}
        self.image_column = image_column
        self.label_column = label_column
        self.given_names = list(class_names) if class_names else None
        self.csv_rows: dict[str, tuple[list[str], list[str]]] = {}
        super().__init__(class_names=class_names, **kwargs)

    def csv_path(self, split: str) -> Path | None:
        """The split's CSV file: absolute, or relative to `root` (else to the working directory)."""
        value = self.csv_files[split]
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and self.root is not None and ((self.root / path).is_file() or not path.is_file()):
            return self.root / path
        return path

    def rows(self, split: str) -> tuple[list[str], list[str]]:
        """(image paths as written, labels) of a split's CSV (read once)."""
        if split not in self.csv_rows:
            path = self.csv_path(split)
            if path is None:
                raise UserError(f"No {split} split: pass --data.{split}_csv FILE.")
            self.csv_rows[split] = read_labelled_csv(path, self.image_column, self.label_column)
        return self.csv_rows[split]

    def _discover_classes(self) -> list[str]:
        if self.csv_files["train"] is None:
            raise UserError("CsvClassificationDataModule needs --data.train_csv FILE (columns image,label).")
        return self.given_names or sorted_labels(self.rows("train")[1])

    @functools.cached_property
    def held_out(self) -> float | None:
        """The share of the training rows held out as val (None: `val_csv` is the val split)."""
        return choose_val_fraction(self.val_fraction, self.csv_files["val"] is not None, str(self.csv_path("train")))

    def split_rows(self, split: str) -> tuple[list[str], list[int]]:
        """(image paths as written, class indices) of "train", "val" or "test" (val held out of train where it
        applies); every label must be a class and every image must exist."""
        from_train = split in ("train", "val") and self.held_out is not None
        source = "train" if from_train else split
        images, labels = self.rows(source)
        index = {name: i for i, name in enumerate(self.folder_names)}
        path = self.csv_path(source)
        unknown = sorted(set(labels) - set(index))
        if unknown:
            where = "the training CSV" if self.given_names is None else "--data.class_names"
            raise UserError(
                f"{path} has label {unknown[0]!r} (line {labels.index(unknown[0]) + 2}), which is not in {where}"
                f"{f' ({len(unknown)} such labels)' if len(unknown) > 1 else ''}. Fix the label or the classes."
            )
        classes = [index[label] for label in labels]
        if from_train:
            train, val = hold_out(images, classes, float(self.held_out), self.split_seed, str(path))  # type: ignore[arg-type]
            chosen = (train if split == "train" else val).tolist()
            images, classes = [images[i] for i in chosen], [classes[i] for i in chosen]
        root = self.require_root()
        for image in images:
            if not (root / image).is_file():
                raise UserError(f"Missing image {root / image} (listed in {path}). Check the path or --data.root.")
        return images, classes

    def split_dataset(self, split: str, train: bool) -> Dataset:
        images, classes = self.split_rows(split)
        root = self.require_root()
        files = [Path(os.path.normpath(root / image)) for image in images]
        dataset = self.image_list(files, classes, None, train)  # type: ignore[arg-type]
        dataset.names = np.array([image.encode() for image in images])  # named as the CSV names them
        return dataset

    def build_dataset(self, key: str) -> Dataset:
        """train/val (held out of train where that applies); test from its CSV, else val (said once); predict over
        `predict_path` (else val)."""
        if key == "predict":
            return self.dataset("val") if self.predict_path is None else super().build_dataset(key)
        if key == "test" and self.csv_files["test"] is None:
            tell("no test split: test evaluates the val split")
            return self.dataset("val")
        return self.split_dataset(key, train=key == "train")
