"""Data pipeline: JPEG decode + ImageNet train augmentation, images/s on one core, ours vs torchvision's reference.

Run in the suite: `python benchmarks/run.py --only data [--quick]`
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from decode import write_jpegs
from timing import Sizes, alternate, median, opencv_threads, torch_threads


def bench_data(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Decode + ImageNet train augmentation, images/s on one core: ours (OpenCV + albumentations; the worker's share,
    uint8: normalising follows on the device) vs torchvision's reference transforms (PIL + transforms.v2
    RandomResizedCrop/flip/normalise), same JPEGs."""
    from PIL import Image
    from torchvision.transforms import v2

    from resnet_tasks.data.io import read_image
    from resnet_tasks.data.transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_train_transform

    ours_transform = imagenet_train_transform()
    reference_transform = v2.Compose(
        [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def reference(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return reference_transform(image.convert("RGB"))

    width, height = sizes.data_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), sizes.data_images, width, height)
        for path in paths:
            path.read_bytes()  # page cache: time decoding, not the disk
        shapes = {tuple(ours_transform(read_image(paths[0]))["image"].shape), tuple(reference(paths[0]).shape)}
        if shapes != {(3, 224, 224)}:
            raise AssertionError(f"pipelines disagree on output shape: {shapes}")
        with opencv_threads(0), torch_threads(1):  # "per core": one thread, one process, like a DataLoader worker
            times = alternate(
                {
                    "ours": lambda: [ours_transform(read_image(p)) for p in paths],
                    "torchvision": lambda: [reference(p) for p in paths],
                },
                repeats=sizes.data_passes,
                warmup=1,
            )
    ours_rate = len(paths) / median(times["ours"])
    reference_rate = len(paths) / median(times["torchvision"])
    return {
        "images": len(paths),
        "image_size": [width, height],
        "images_per_s_per_core_ours": ours_rate,
        "images_per_s_per_core_torchvision": reference_rate,
        "ratio_ours_over_torchvision": ours_rate / reference_rate,
    }
