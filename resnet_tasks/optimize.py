"""`resnet-tasks optimize`: one split of an ImageFolder/ImageNet or COCO dataset as LitData chunks, for the streaming
data modules (`resnet_tasks.data.streaming`).

Each sample holds the image file's bytes as they are on disk (decoded at training time by the same decoder as the
file-based modules) and its annotations; `resnet_tasks.json` beside LitData's `index.json` holds the split's label
space, so a streaming data module announces the same classes as the file-based one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from resnet_tasks.data.chunk_metadata import require_litdata, write_metadata
from resnet_tasks.errors import UserError

FORMATS = ("imagefolder", "coco")


def classification_sample(entry: tuple[int, str, str, int]) -> dict[str, Any]:
    """One ImageFolder image as a chunk sample: its position in the split, file bytes, name and class index."""
    index, path, name, label = entry
    return {"index": index, "image": Path(path).read_bytes(), "name": name, "label": label}


def detection_sample(entry: dict[str, Any]) -> dict[str, Any]:
    """One COCO image as a chunk sample: file bytes beside its boxes (XYXY pixels), category ids and metadata."""
    sample = dict(entry)
    sample["image"] = Path(sample.pop("path")).read_bytes()
    return sample


def imagefolder_inputs(root: Path, split: str) -> tuple[list[tuple[int, str, str, int]], dict[str, Any]]:
    """The samples of an ImageFolder split (the file-based module's order) and the split's metadata."""
    from resnet_tasks.data.classification import IMAGEFOLDER_LAYOUT, ImageFolderDataModule, scan_image_folder

    module = ImageFolderDataModule(root=str(root), num_workers=0)
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"Missing split folder {split_dir}. {IMAGEFOLDER_LAYOUT}")
    files, labels = scan_image_folder(split_dir, module.folder_names)
    inputs = [(i, str(path), str(path.relative_to(root)), label) for i, (path, label) in enumerate(zip(files, labels))]
    assert module.label_space is not None
    metadata = {"format": "imagefolder", "class_names": list(module.label_space.class_names)}
    return inputs, metadata


def coco_inputs(root: Path, split: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The samples of a COCO split (`annotations/instances_<split>.json`, `<split>/`) and the split's metadata."""
    from resnet_tasks.data.formats.coco import COCO_LAYOUT, CocoDetectionDataModule

    module = CocoDetectionDataModule(root=str(root), val_split=split, test_split=split, num_workers=0)
    if not (root / split).is_dir():
        raise UserError(f"Missing COCO image folder {root / split}.\n{COCO_LAYOUT}")
    annotations = module.annotations(split)
    assert module.label_space is not None
    ids = np.asarray(module.label_space.category_ids, dtype=np.int64)
    inputs, without_objects = [], []
    for index in range(len(annotations)):
        span = annotations.objects(index)
        crowd = annotations.crowd[span]
        if not (crowd == 0).any():
            without_objects.append(index)
        inputs.append(
            {
                "index": index,
                "path": str(annotations.image_path(index)),
                "file_name": annotations.file_name(index),
                "image_id": int(annotations.image_ids[index]),
                "height": int(annotations.heights[index]),
                "width": int(annotations.widths[index]),
                "boxes": np.ascontiguousarray(annotations.boxes[span], dtype=np.float32).reshape(-1, 4),
                "category_ids": ids[annotations.labels[span]],
                "iscrowd": np.ascontiguousarray(crowd, dtype=np.uint8),
                "area": np.ascontiguousarray(annotations.areas[span], dtype=np.float32),
            }
        )
    metadata = {
        "format": "coco",
        "class_names": list(module.label_space.object_names),
        "category_ids": [int(i) for i in module.label_space.category_ids[1:]],
        # torchvision's recipe trains only on images with a usable object; the streaming module leaves these out.
        "images_without_objects": without_objects,
    }
    return inputs, metadata


def optimize_split(
    root: str | Path,
    split: str,
    out: str,
    data_format: str = "imagefolder",
    workers: int = 1,
    chunk_bytes: str = "64MB",
) -> dict[str, Any]:
    """Write `split` of the dataset at `root` as LitData chunks into `out` (a folder or an `s3://` URI); returns
    the split's metadata (also written as `resnet_tasks.json` in `out`)."""
    litdata = require_litdata()
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Dataset root {root} does not exist. Check --data.root.")
    if data_format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {data_format!r}.")
    if data_format == "imagefolder":
        inputs, metadata = imagefolder_inputs(root, split)
        function: Any = classification_sample
    else:
        inputs, metadata = coco_inputs(root, split)
        function = detection_sample
    metadata = {"split": split, "num_samples": len(inputs), **metadata}
    start = time.perf_counter()
    # LitData sets the process-wide start method (spawn by default); keep the platform's and restore it after.
    start_method = multiprocessing.get_start_method()
    try:
        litdata.optimize(
            fn=function,
            inputs=inputs,
            output_dir=out,
            chunk_bytes=chunk_bytes,
            num_workers=max(1, workers),
            mode="overwrite",
            keep_data_ordered=True,  # chunks keep the file-based order: evaluation reads them sequentially
            reorder_files=False,
            start_method=start_method,
            verbose=False,
        )
    finally:
        multiprocessing.set_start_method(start_method, force=True)
    write_metadata(out, metadata)
    metadata["seconds"] = round(time.perf_counter() - start, 2)
    return metadata


def parser() -> argparse.ArgumentParser:
    """The arguments of `resnet-tasks optimize`."""
    parser = argparse.ArgumentParser(
        prog="resnet-tasks optimize",
        allow_abbrev=False,
        description="Write one split of an ImageFolder/ImageNet or COCO dataset as LitData chunks (the image files' "
        "bytes and their labels / boxes) for the streaming data modules. Run it once per split, e.g. "
        "--split train --out DIR/train, then --split val --out DIR/val, and train with --data.root DIR.",
    )
    parser.add_argument("--data.root", dest="root", required=True, help="the dataset root (as for fit)")
    parser.add_argument("--split", default="train", help="split folder name: train, val (COCO: train2017, val2017)")
    parser.add_argument("--format", dest="data_format", choices=FORMATS, default="imagefolder", help="dataset layout")
    parser.add_argument("--out", required=True, help="output folder or object-store URI (s3://bucket/prefix/train)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="writer processes")
    parser.add_argument("--chunk_bytes", default="64MB", help="chunk size (LitData's default 64MB suits object stores)")
    return parser


def main(args: list[str]) -> None:
    """`resnet-tasks optimize ...`: convert a split and print where it went."""
    options = parser().parse_args(args)
    metadata = optimize_split(
        options.root, options.split, options.out, options.data_format, options.workers, options.chunk_bytes
    )
    print(
        f"optimized {metadata['num_samples']} {options.split} images ({options.data_format}, "
        f"{len(metadata['class_names'])} classes) in {metadata['seconds']} s: {options.out}"
    )
