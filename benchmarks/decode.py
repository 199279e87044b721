"""Benchmark: JPEG decode speed of PIL, OpenCV (what `data.io.read_image` uses) and torchvision.io.

All three decode the same generated JPEGs in one process, one thread, alternating (PIL, OpenCV,
torchvision, PIL, ...) so that machine-load drift hits each alike; figures are medians of the passes.
It also checks that the decoders give the same pixels (max absolute difference, fraction of equal bytes).

    python benchmarks/decode.py --images 64 --width 500 --height 375 --passes 5 --out decode.json
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image
from timing import Sizes, alternate, median, opencv_threads, torch_threads, write_report
from torchvision.io import decode_jpeg, read_file


def write_jpegs(folder: Path, count: int, width: int, height: int, quality: int = 90, seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs (smooth gradients + blobs + noise, so the DCT has real work), written by PIL."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(count):
        image = np.empty((height, width, 3), dtype=np.float32)
        for channel in range(3):
            fx, fy, phase = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 2 * np.pi)
            image[..., channel] = 128 + 90 * np.sin(fx * xx + fy * yy + phase)
        for _ in range(6):  # a few coloured discs: sharp edges, like objects
            cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 80)
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = rng.uniform(0, 255, size=3)
        image += rng.normal(0, 8, size=image.shape)
        path = folder / f"image_{index:04d}.jpg"
        # 4:2:0 chroma subsampling, as in almost every camera / ImageNet JPEG.
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=quality, subsampling=2)
        paths.append(path)
    return paths


def decode_pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def decode_opencv(path: Path) -> np.ndarray:
    # The same calls as resnet_tasks.data.io.read_image (minus its error handling).
    data = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def decode_torchvision(path: Path) -> np.ndarray:
    return decode_jpeg(read_file(str(path))).permute(1, 2, 0).numpy()


DECODERS: dict[str, Callable[[Path], np.ndarray]] = {
    "pil": decode_pil,
    "opencv": decode_opencv,
    "torchvision": decode_torchvision,
}


def compare_pixels(paths: list[Path], reference: str = "pil") -> dict[str, dict[str, float]]:
    """Per decoder: max |difference| to the reference decoder and the fraction of identical bytes."""
    result: dict[str, dict[str, float]] = {}
    for name, decode in DECODERS.items():
        if name == reference:
            continue
        worst, equal, total = 0, 0, 0
        for path in paths:
            ref = DECODERS[reference](path).astype(np.int16)
            other = decode(path).astype(np.int16)
            if ref.shape != other.shape:
                raise AssertionError(f"{name} decoded {path} as {other.shape}, {reference} as {ref.shape}")
            diff = np.abs(ref - other)
            worst = max(worst, int(diff.max()))
            equal += int((diff == 0).sum())
            total += diff.size
        result[name] = {"max_abs_diff": worst, "equal_fraction": equal / total}
    return result


def _decode_all(decode: Callable[[Path], np.ndarray], paths: list[Path]) -> None:
    for path in paths:
        decode(path)


def run(paths: list[Path], passes: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Images/s per decoder (single thread), alternating decoders pass by pass; medians over passes."""
    with torch_threads(1), opencv_threads(0):
        # Decoding from the page cache is what we time, not the disk: read every file once first.
        for path in paths:
            path.read_bytes()
        candidates = {name: functools.partial(_decode_all, decode, paths) for name, decode in DECODERS.items()}
        times = alternate(candidates, repeats=passes, warmup=warmup, collect=False)
    rates = {name: len(paths) / median(values) for name, values in times.items()}
    equality = compare_pixels(paths)
    return {
        "images": len(paths),
        "passes": passes,
        "images_per_s": rates,
        "speed_ratio_opencv_over_pil": rates["opencv"] / rates["pil"],
        "speed_ratio_torchvision_over_pil": rates["torchvision"] / rates["pil"],
        "pixels_vs_pil": equality,
        "pixel_equal_opencv_pil": equality["opencv"]["max_abs_diff"] == 0,
        "pixel_equal_torchvision_pil": equality["torchvision"]["max_abs_diff"] == 0,
        "versions": {
            "pillow": Image.__version__,
            "opencv": cv2.__version__,
            "torchvision": torchvision.__version__,
            "pil_libjpeg_turbo": _pil_libjpeg_version(),
        },
    }


def bench_decode(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """The suite's entry (`python benchmarks/run.py --only decode`): `run` on generated JPEGs of the suite's sizes."""
    width, height = sizes.data_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), sizes.data_images, width, height)
        return run(paths, passes=sizes.data_passes)


def _pil_libjpeg_version() -> str:
    try:
        from PIL import features

        return str(features.version("libjpeg_turbo"))
    except Exception:  # older Pillow has no such feature entry
        return "unknown"


def describe(result: dict[str, Any]) -> str:
    """A few lines for the console."""
    lines = [f"JPEG decode, {result['images']} images, 1 thread, median of {result['passes']} alternating passes:"]
    for name, rate in result["images_per_s"].items():
        lines.append(f"  {name:12s} {rate:8.1f} images/s")
    for name, stats in result["pixels_vs_pil"].items():
        lines.append(
            f"  {name} vs pil: max |diff| {stats['max_abs_diff']}, identical bytes {stats['equal_fraction']:.4%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None, help="decode these *.jpg instead of generated ones")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder is not None:
            paths = sorted(args.folder.glob("*.jpg"))
        else:
            paths = write_jpegs(Path(tmp), args.images, args.width, args.height, args.quality)
        result = run(paths, passes=args.passes)
    print(describe(result))
    return write_report(args.out, result)


if __name__ == "__main__":
    main()
