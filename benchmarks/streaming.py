"""Streaming data: training images/s on one core, read from LitData chunks (`resnet-tasks optimize`) vs the same
JPEGs as ImageFolder files; same decoder and transforms (ImageNet train preset), loader in the main process.

    python benchmarks/streaming.py --images 512 --width 500 --height 375 --passes 5 --out streaming.json

Also in the suite: `python benchmarks/run.py --only streaming [--quick]`. Both loaders run in one process, one
thread, alternating (files, chunks, files, ...); figures are medians of the passes. Needs the `[stream]` extra.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from decode import write_jpegs
from timing import Sizes, alternate, median, opencv_threads, torch_threads, write_report

CLASSES = 4


def write_image_folder(root: Path, images: int, width: int, height: int) -> Path:
    """`images` photo-like JPEGs split over CLASSES class folders of ROOT/train (and one per class in ROOT/val, so
    no share of train is held out as val)."""
    per_class = max(1, images // CLASSES)
    for index in range(CLASSES):
        write_jpegs(root / "train" / f"class_{index}", per_class, width, height, seed=index)
        write_jpegs(root / "val" / f"class_{index}", 1, width, height, seed=CLASSES + index)
    return root


def bench_streaming(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Images/s per core of one training epoch: files (ImageFolderDataModule) vs chunks (the streaming module)."""
    from resnet_tasks.data.classification import ImageFolderDataModule
    from resnet_tasks.data.streaming import StreamingClassificationDataModule
    from resnet_tasks.optimize import optimize_split

    width, height = sizes.data_size
    batch_size = 4
    with tempfile.TemporaryDirectory() as folder:
        root = write_image_folder(Path(folder) / "images", sizes.data_images, width, height)
        chunks = Path(folder) / "chunks"
        optimize_split(root, "train", str(chunks / "train"), workers=1)
        options = {"batch_size": batch_size, "num_workers": 0, "pin_memory": False}
        files = ImageFolderDataModule(root=str(root), **options)
        streaming = StreamingClassificationDataModule(root=str(chunks), **options)
        loaders = {"files": files.train_dataloader(), "chunks": streaming.train_dataloader()}
        counts: dict[str, int] = {}

        def epoch(name: str) -> None:
            counts[name] = sum(len(batch["label"]) for batch in loaders[name])

        with torch_threads(1), opencv_threads(0):
            times = alternate({name: lambda name=name: epoch(name) for name in loaders}, sizes.data_passes, warmup=1)
        chunk_bytes = sum(path.stat().st_size for path in (chunks / "train").glob("*.bin"))
        file_bytes = sum(path.stat().st_size for path in (root / "train").rglob("*.jpg"))
    rates = {name: counts[name] / median(seconds) for name, seconds in times.items()}
    return {
        "images": counts["files"],
        "image_size": [width, height],
        "images_per_s_per_core_files": rates["files"],
        "images_per_s_per_core_chunks": rates["chunks"],
        "ratio_chunks_over_files": rates["chunks"] / rates["files"],
        "bytes_chunks_over_files": chunk_bytes / file_bytes,
        "seconds_files": times["files"],
        "seconds_chunks": times["chunks"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = Sizes(data_images=args.images, data_size=(args.width, args.height), data_passes=args.passes)
    result = write_report(args.out, bench_streaming(sizes, torch.device("cpu")))
    print(
        f"{result['images']} images {args.width}x{args.height}, one core: files "
        f"{result['images_per_s_per_core_files']:.0f} img/s, chunks {result['images_per_s_per_core_chunks']:.0f} "
        f"img/s (x{result['ratio_chunks_over_files']:.2f}); chunk bytes / file bytes "
        f"{result['bytes_chunks_over_files']:.3f}"
    )


if __name__ == "__main__":
    main()
