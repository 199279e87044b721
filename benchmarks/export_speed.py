"""Benchmark: CPU inference of exported ONNX models, onnxruntime vs PyTorch eager, per task (`resnet-tasks export`).

Both run the same module (uint8 images in, normalisation inside: what `export` writes) on the same images with the
same number of threads, alternating (onnxruntime, PyTorch, onnxruntime, ...) so that load drift hits both alike;
medians. Ratio = images/s of onnxruntime / images/s of PyTorch. The models are ResNet-18 tasks with random weights
(speed does not depend on the values; detection keeps its 100 detections per image either way).

    python benchmarks/export_speed.py --threads 2 --out export_speed.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from timing import alternate, median, write_report

from resnet_tasks import ClassificationTask, DetectionTask, SegmentationTask
from resnet_tasks.export import export_onnx
from resnet_tasks.export_graphs import default_preprocessing, graph_spec
from resnet_tasks.tasks.base import TaskBase

TASKS = ("classification", "segmentation", "detection")


def build_task(task: str, image_size: int) -> TaskBase:
    """A ResNet-18 model of `task` with random weights (ImageNet / VOC / COCO output counts)."""
    torch.manual_seed(0)
    backbone = {"name": "resnet18"}
    if task == "classification":
        return ClassificationTask(num_classes=1000, backbone=backbone)
    if task == "segmentation":
        return SegmentationTask(num_classes=21, backbone=backbone)
    # The model resizes inside: the shorter side to image_size, as the images given here have it already.
    return DetectionTask(num_classes=91, backbone=backbone, min_size=image_size, max_size=2 * image_size)


def bench_task(task: str, batch: int, size: int, threads: int, steps: int, warmup: int, folder: Path) -> dict:
    """Median seconds per batch of onnxruntime and PyTorch eager for one task's exported module."""
    import onnxruntime

    model = build_task(task, size)
    preprocessing = default_preprocessing(model)
    path = export_onnx(model, folder / f"{task}.onnx", preprocessing)
    module = graph_spec(model, preprocessing).module.eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # onnxruntime's idle workers spin for a while after each run by default: in alternating runs they would take
    # PyTorch's cores. No spinning: each runtime has the cores to itself while it runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if task == "detection":
        batch = 1  # the exported detector takes one image
    height, width = size, size * 4 // 3 if task == "detection" else size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    pixels = images.numpy()

    def run_torch() -> None:
        with torch.inference_mode():
            module(images)

    times = alternate(
        {"onnxruntime": lambda: session.run(None, {"images": pixels}), "pytorch": run_torch},
        repeats=steps,
        warmup=warmup,
        collect=False,
    )
    ort_s, torch_s = median(times["onnxruntime"]), median(times["pytorch"])
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "onnxruntime_s_per_batch": ort_s,
        "pytorch_s_per_batch": torch_s,
        "onnxruntime_images_per_s": batch / ort_s,
        "pytorch_images_per_s": batch / torch_s,
        "ratio_onnxruntime_over_pytorch": torch_s / ort_s,
        "paired_ratio_median": median([t / o for o, t in zip(times["onnxruntime"], times["pytorch"])]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--threads", type=int, default=2, help="threads of both runtimes (intra-op)")
    parser.add_argument("--classification", type=int, nargs=2, default=(8, 224), metavar=("BATCH", "SIZE"))
    parser.add_argument("--segmentation", type=int, nargs=2, default=(1, 320), metavar=("BATCH", "SIZE"))
    parser.add_argument(
        "--detection-size", type=int, default=480, help="detection image height (width 4/3 of it; 1 image a run)"
    )
    parser.add_argument("--steps", type=int, default=7, help="timed runs per runtime")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per runtime first")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    import onnxruntime

    sizes = {
        "classification": tuple(args.classification),
        "segmentation": tuple(args.segmentation),
        "detection": (1, args.detection_size),
    }
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
    }
    print(f"{'task':<15} {'input':>16} {'onnxruntime img/s':>18} {'PyTorch img/s':>14} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as folder:
        for task in args.tasks:
            batch, size = sizes[task]
            result = bench_task(task, batch, size, args.threads, args.steps, args.warmup, Path(folder))
            report[task] = result
            shape = f"{result['batch']}x{result['height']}x{result['width']}"
            print(
                f"{task:<15} {shape:>16} {result['onnxruntime_images_per_s']:>18.2f} "
                f"{result['pytorch_images_per_s']:>14.2f} {result['ratio_onnxruntime_over_pytorch']:>6.2f}"
            )
    return write_report(args.out, report)


if __name__ == "__main__":
    main()
