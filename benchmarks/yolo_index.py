"""Benchmark: indexing a YOLO dataset (Ultralytics data.yaml, Roboflow layout), cold and from the cache.

Generates `--images` images (tiny JPEGs of a few sizes, some EXIF-rotated) with their label files
(boxes, polygon rows, empty and missing files) split 90/10 into train/valid, then times
`YoloDetectionDataModule(data_yaml=...).annotations(split)` for both splits: first without a cache (every label
file and image header parsed, the cache written), then again (the cache read and its fingerprint checked).
Targets on a 2-core machine for 100k images: under 60 s cold, under 3 s cached.

    python benchmarks/yolo_index.py --images 100000 [--dir DIR] [--out yolo_index.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resnet_tasks.data.formats.yolo import YoloDetectionDataModule

NAMES = ["car", "person", "bicycle", "dog", "cat", "bus", "truck", "bird"]


def _encoded(size: tuple[int, int], fmt: str, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (90, 120, 150))
    if orientation is None:
        image.save(buffer, fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, fmt, exif=exif.tobytes())
    return buffer.getvalue()


def _label_texts(count: int, seed: int) -> list[str]:
    """A pool of label files: 0-8 rows each, about one in ten a polygon row, about one in ten empty."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        rows = []
        for _ in range(int(rng.integers(0, 9))):
            cls = int(rng.integers(0, len(NAMES)))
            cx, cy = rng.uniform(0.2, 0.8, size=2)
            w, h = rng.uniform(0.05, 0.35, size=2)
            if rng.random() < 0.1:
                xs, ys = cx + w / 2 * np.array([-1, 1, 1, -1]), cy + h / 2 * np.array([-1, -1, 1, 1])
                rows.append(f"{cls} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in zip(xs, ys)))
            else:
                rows.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        texts.append("".join(f"{row}\n" for row in rows))
    return texts


def generate(root: Path, images: int, seed: int = 0) -> Path:
    """A Roboflow-style YOLO export under `root` (train/ and valid/, `../x/images` paths); returns its data.yaml."""
    files = [
        (".jpg", _encoded((640, 480), "JPEG")),
        (".jpg", _encoded((480, 640), "JPEG")),
        (".jpg", _encoded((640, 480), "JPEG", orientation=6)),
        (".jpeg", _encoded((320, 320), "JPEG")),
    ]
    texts = _label_texts(1000, seed)
    val_count = images // 10
    for split, count in (("train", images - val_count), ("valid", val_count)):
        image_dir, label_dir = root / split / "images", root / split / "labels"
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            extension, data = files[index % len(files)]
            stem = f"{split}_{index:06d}"
            (image_dir / f"{stem}{extension}").write_bytes(data)
            if index % 50 != 7:  # a few images without a label file: negatives, as empty files are
                (label_dir / f"{stem}.txt").write_text(texts[index % len(texts)])
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
        f"nc: {len(NAMES)}\nnames: {json.dumps(NAMES)}\n"
    )
    return data_yaml


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (the parse's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def index_once(data_yaml: Path) -> tuple[float, float, int, int]:
    """Wall and CPU seconds to index train + val through the data module, with the image and box counts."""
    start, cpu = time.perf_counter(), cpu_seconds()
    module = YoloDetectionDataModule(data_yaml=str(data_yaml))
    annotations = [module.annotations(split) for split in ("train", "val")]
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return seconds, cpu, sum(len(a) for a in annotations), sum(len(a.labels) for a in annotations)


def bench_yolo_index(images: int, folder: Path | None = None, cached_passes: int = 3) -> dict[str, Any]:
    """Generate the dataset, then index it cold (no cache) once and from the cache `cached_passes` times."""
    root = Path(tempfile.mkdtemp(prefix="yolo-index-", dir=folder))
    try:
        start = time.perf_counter()
        data_yaml = generate(root, images)
        generated = time.perf_counter() - start
        load_before = os.getloadavg()[0]
        cold, cold_cpu, count, boxes = index_once(data_yaml)
        cached = sorted(index_once(data_yaml)[:2] for _ in range(cached_passes))
        return {
            "images": count,
            "boxes": boxes,
            "generate_s": round(generated, 1),
            "cold_s": round(cold, 2),
            "cold_cpu_s": round(cold_cpu, 2),
            "cached_s_median": round(cached[len(cached) // 2][0], 3),
            "cached_cpu_s_median": round(cached[len(cached) // 2][1], 3),
            "cached_s_all": [round(wall, 3) for wall, _ in cached],
            # Other work on the machine stretches the wall times; the CPU seconds are what indexing itself costs.
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "targets": {"cold_s": 60.0, "cached_s": 3.0},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="images in train + val (90/10)")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary dataset goes (default: $TMPDIR)")
    parser.add_argument("--cached-passes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    result = bench_yolo_index(args.images, args.dir, args.cached_passes)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
