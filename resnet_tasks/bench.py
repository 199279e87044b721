"""The benchmark suite: Lightning overhead, data pipeline, COCO evaluation, worker memory, metrics, backbone, GPU.

    python -m resnet_tasks.bench [--quick] [--only NAME ...] [--out results.json] [--device cpu|cuda]

Every figure compares two implementations side by side in one process, alternating (A, B, A, B, ...) so
that load drift on a shared machine hits both alike, and reports medians. Not part of the test run
(`tests/test_bench.py` only smoke-tests the smallest sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

BENCHMARKS = ("lightning", "data", "decode", "coco_eval", "memory", "segmentation_metric", "backbone", "gpu")


@dataclasses.dataclass
class Sizes:
    """Problem sizes of every benchmark; `full` (default), `quick` and `tiny` (smoke test) presets."""

    rounds: int = 3  # Lightning: alternating (Trainer, loop) rounds
    warmup_steps: int = 1  # untimed steps at the start of every round
    timed_steps: int = 5
    classification: tuple[int, int] = (16, 112)  # batch size, image size
    detection: tuple[int, int] = (1, 192)
    segmentation: tuple[int, int] = (2, 160)
    data_images: int = 64
    data_size: tuple[int, int] = (500, 375)
    data_passes: int = 5
    coco_images: int = 2000  # 5000 (COCO val) with --coco-images 5000: ~3x longer
    coco_detections: int = 100
    coco_repeats: int = 2
    memory_images: int = 30_000  # --memory-images 100000 for COCO train's size: ~3x longer
    memory_workers: int = 4
    memory_batch_size: int = 32
    memory_counterfactual: bool = True
    seg_shape: tuple[int, int, int, int] = (2, 21, 512, 512)
    seg_repeats: int = 7
    backbone: tuple[str, int, int, int] = ("resnet50", 4, 160, 6)  # name, batch, size, steps


FULL = Sizes()
QUICK = Sizes(
    rounds=2, warmup_steps=1, timed_steps=4, classification=(8, 96), detection=(2, 192), segmentation=(2, 128),
    data_images=24, data_passes=3, coco_images=200, coco_repeats=2, memory_images=5000,
    memory_counterfactual=True, seg_repeats=5, backbone=("resnet18", 4, 128, 4),
)  # fmt: skip
TINY = Sizes(
    rounds=2, warmup_steps=1, timed_steps=2, classification=(2, 32), detection=(1, 64), segmentation=(1, 32),
    data_images=4, data_size=(64, 48), data_passes=2, coco_images=20, coco_detections=10, coco_repeats=2,
    memory_images=400, memory_workers=2, memory_batch_size=16, memory_counterfactual=True,
    seg_shape=(1, 21, 32, 32), seg_repeats=2, backbone=("resnet18", 2, 32, 2),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- helpers
def alternate(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Seconds of each candidate over `repeats` alternating rounds (A, B, A, B, ...), after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for index in range(warmup + repeats):
        for name, run in candidates.items():
            gc.collect()
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            if index >= warmup:
                times[name].append(seconds)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- Lightning overhead
def _task_and_batches(task: str, sizes: Sizes, device: torch.device, count: int) -> tuple[Any, list[Any]]:
    """A task module (resnet18 on CPU, resnet50 on CUDA) and `count` pre-generated training batches."""
    from resnet_tasks.tasks.base import BackboneConfig, SchedulerConfig

    backbone = BackboneConfig(name="resnet50" if device.type == "cuda" else "resnet18")
    scheduler = SchedulerConfig(name="cosine", interval="step")
    generator = torch.Generator().manual_seed(0)
    batches: list[Any] = []
    if task == "classification":
        from resnet_tasks.tasks.classification import ClassificationTask

        batch, size = sizes.classification if device.type == "cpu" else (64, 224)
        module = ClassificationTask(num_classes=10, backbone=backbone, scheduler=scheduler)
        for _ in range(count):
            batches.append(
                {
                    "image": torch.randn(batch, 3, size, size, generator=generator).to(device),
                    "label": torch.randint(0, 10, (batch,), generator=generator).to(device),
                }
            )
    elif task == "detection":
        from resnet_tasks.tasks.detection import DetectionTask

        batch, size = sizes.detection if device.type == "cpu" else (4, 800)
        module = DetectionTask(
            num_classes=3, backbone=backbone, scheduler=scheduler, min_size=size, max_size=int(size * 4 / 3)
        )
        for _ in range(count):
            images, targets = [], []
            for _ in range(batch):
                height, width = size, int(size * 4 / 3)
                images.append(torch.rand(3, height, width, generator=generator).to(device))
                xy = torch.rand(3, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
                wh = (0.2 + 0.2 * torch.rand(3, 2, generator=generator)) * torch.tensor([width, height])
                targets.append(
                    {
                        "boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(1, 4, (3,), generator=generator).to(device),
                    }
                )
            batches.append((images, targets))
    elif task == "segmentation":
        from resnet_tasks.tasks.segmentation import SegmentationTask

        batch, size = sizes.segmentation if device.type == "cpu" else (8, 480)
        module = SegmentationTask(num_classes=5, backbone=backbone, scheduler=scheduler)
        for _ in range(count):
            batches.append(
                {
                    "image": torch.randn(batch, 3, size, size, generator=generator).to(device),
                    "mask": torch.randint(0, 5, (batch, size, size), generator=generator, dtype=torch.uint8).to(device),
                }
            )
    else:
        raise ValueError(task)
    return module, batches


class _InMemoryBatches(torch.utils.data.Dataset):
    """Pre-built batches served as-is (the loader adds no collation work for either side)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Any:
        return self.batches[index]


def _loader(batches: list[Any]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_InMemoryBatches(batches), batch_size=None, shuffle=False, num_workers=0)


def _step_periods(starts: list[float], warmup: int) -> list[float]:
    """Times between consecutive step starts (everything a step costs: data, step, scheduler, logging)."""
    periods = [b - a for a, b in zip(starts, starts[1:])]
    return periods[warmup:]


def _plain_loss(task: str, module: Any, batch: Any) -> torch.Tensor:
    """The loss a hand-written loop computes with the task's torch modules (no Lightning hooks, no logging)."""
    import torch.nn.functional as F

    if task == "classification":
        return F.cross_entropy(module(batch["image"]), batch["label"])
    if task == "detection":
        images, targets = batch
        return sum(module.model(images, targets).values())
    outputs = module.model(batch["image"], with_aux=True)
    target = batch["mask"].long()
    loss = F.cross_entropy(outputs["out"], target, ignore_index=255)
    return loss + 0.5 * F.cross_entropy(outputs["aux"], target, ignore_index=255)


def lightning_overhead(task: str, sizes: Sizes, device: torch.device, workdir: Path) -> dict[str, Any]:
    """Per-step time of one task under `Trainer.fit` vs a plain PyTorch loop over the same module and batches.

    Fairness: one module object, the optimizer and LR scheduler Lightning built (reused by the loop), the same
    DataLoader over the same in-memory batches, progress bar and checkpointing off, the CSV logger on with
    `log_every_n_steps=1` (every timed step pays for logging), warmup steps excluded on both sides. A step's
    time is the period between consecutive step starts, so work Lightning does after `on_train_batch_end`
    (scheduler, logger) is counted too.
    """
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    steps = sizes.warmup_steps + sizes.timed_steps + 1  # +1: the last period needs the next step's start
    module, batches = _task_and_batches(task, sizes, device, steps)
    module = module.to(device)

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            synchronize(device)
            self.starts.append(time.perf_counter())

    trainer_times: list[float] = []
    loop_times: list[float] = []
    per_round: list[float] = []
    optimizer = scheduler = None
    for round_index in range(sizes.rounds):
        # Side A: Lightning.
        clock = StepClock()
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=CSVLogger(str(workdir / "lightning_logs"), name=task),
            log_every_n_steps=1,
            callbacks=[clock],
            deterministic=False,
        )
        gc.collect()
        trainer.fit(module, train_dataloaders=_loader(batches))
        synchronize(device)
        a = _step_periods(clock.starts, sizes.warmup_steps)
        optimizer = trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        del trainer

        # Side B: the hand-written loop, same module / optimizer / scheduler / loader.
        module.train()
        starts: list[float] = []
        gc.collect()
        for batch in _loader(batches):
            synchronize(device)
            starts.append(time.perf_counter())
            loss = _plain_loss(task, module, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        synchronize(device)
        b = _step_periods(starts, sizes.warmup_steps)
        trainer_times += a
        loop_times += b
        per_round.append(median(b) / median(a))
        if round_index == 0 and not a:
            raise RuntimeError("no timed Lightning steps: raise --timed-steps")
    t_trainer, t_loop = median(trainer_times), median(loop_times)
    return {
        "model": f"{type(module).__name__}({module.backbone_config.name})",
        "step_s_trainer": t_trainer,
        "step_s_loop": t_loop,
        "ratio_loop_over_trainer": t_loop / t_trainer,
        "ratio_per_round": per_round,
        "timed_steps_per_side": len(trainer_times),
        "goal": 0.98,
        "met": t_loop / t_trainer >= 0.98,
    }


def bench_lightning(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task in ("classification", "detection", "segmentation"):
            torch.manual_seed(0)
            result[task] = lightning_overhead(task, sizes, device, Path(tmp))
    return result


# ----------------------------------------------------------------------------------------------- data pipeline
def _decode_module() -> Any:
    """benchmarks/decode.py (next to the package in a source checkout)."""
    return _load_script("decode")


def _load_script(name: str) -> Any:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the suite from a source checkout of resnet-tasks")
    spec = importlib.util.spec_from_file_location(f"resnet_tasks_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def bench_data(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Decode + ImageNet train augmentation, images/s on one core: ours (OpenCV + albumentations) vs
    torchvision's reference transforms (PIL + transforms.v2 RandomResizedCrop/flip/normalise), same JPEGs."""
    import cv2
    from PIL import Image
    from torchvision.transforms import v2

    from resnet_tasks.data.common import read_image
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
        paths = _decode_module().write_jpegs(Path(tmp), sizes.data_images, width, height)
        for path in paths:
            path.read_bytes()  # page cache: time decoding, not the disk
        shapes = {tuple(ours_transform(read_image(paths[0])).shape), tuple(reference(paths[0]).shape)}
        if shapes != {(3, 224, 224)}:
            raise AssertionError(f"pipelines disagree on output shape: {shapes}")
        previous_cv = cv2.getNumThreads()
        cv2.setNumThreads(0)
        try:
            with torch_threads(1):  # "per core": one thread, one process, like a DataLoader worker
                times = alternate(
                    {
                        "ours": lambda: [ours_transform(read_image(p)) for p in paths],
                        "torchvision": lambda: [reference(p) for p in paths],
                    },
                    repeats=sizes.data_passes,
                    warmup=1,
                )
        finally:
            cv2.setNumThreads(previous_cv)
    ours_rate = len(paths) / median(times["ours"])
    reference_rate = len(paths) / median(times["torchvision"])
    return {
        "images": len(paths),
        "image_size": [width, height],
        "images_per_s_per_core_ours": ours_rate,
        "images_per_s_per_core_torchvision": reference_rate,
        "ratio_ours_over_torchvision": ours_rate / reference_rate,
    }


def bench_decode(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """benchmarks/decode.py: PIL vs OpenCV vs torchvision.io on the same JPEGs."""
    decode = _decode_module()
    width, height = sizes.data_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = decode.write_jpegs(Path(tmp), sizes.data_images, width, height)
        return decode.run(paths, passes=sizes.data_passes)


# ----------------------------------------------------------------------------------------------- COCO evaluation
def synthetic_coco(num_images: int, detections_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A deterministic COCO instances dict (80 non-contiguous category ids, ~1% crowd boxes) and detections
    in COCO results format: half are jittered copies of ground-truth boxes (varied IoU), half random."""
    rng = np.random.default_rng(seed)
    category_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    width, height = 640, 480
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        count = int(rng.integers(1, 15))
        wh = np.exp(rng.uniform(np.log(6), np.log(300), size=(count, 2)))
        xy = rng.uniform(0, 1, size=(count, 2)) * (np.array([width, height]) - wh)
        categories = rng.choice(category_ids, size=count)
        for box_xy, box_wh, category in zip(xy, wh, categories):
            crowd = int(rng.random() < 0.01)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": [round(float(v), 2) for v in (*box_xy, *box_wh)],
                    "area": round(float(box_wh[0] * box_wh[1]), 2),
                    "iscrowd": crowd,
                }
            )
        for index in range(detections_per_image):
            if index % 2 == 0:
                source = int(rng.integers(count))
                noise = rng.normal(0, 0.12, size=4) * np.concatenate([wh[source], wh[source]])
                box = np.concatenate([xy[source], wh[source]]) + noise
                box[2:] = np.maximum(box[2:], 1.0)
                category = categories[source] if rng.random() < 0.8 else rng.choice(category_ids)
            else:
                size = np.exp(rng.uniform(np.log(6), np.log(300), size=2))
                box = np.concatenate([rng.uniform(0, 1, size=2) * (np.array([width, height]) - size), size])
                category = rng.choice(category_ids)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": [round(float(v), 2) for v in box],
                    "score": round(float(rng.random()), 4),
                }
            )
    categories_list = [{"id": i, "name": f"category_{i}"} for i in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories_list}, detections


def _pycocotools_stats(ground_truth: dict, detections: list[dict]) -> np.ndarray:
    """The reference: pycocotools COCO + loadRes + COCOeval evaluate/accumulate/summarize."""
    import io
    from contextlib import redirect_stdout

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        results = coco.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco, results, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def _metric_inputs(ground_truth: dict, detections: list[dict]) -> list[tuple[list[dict], list[dict]]]:
    """The same data as torchmetrics inputs (XYXY tensors), in validation-step-sized chunks of 8 images."""

    def xyxy(boxes: list[list[float]]) -> torch.Tensor:
        array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return torch.from_numpy(np.concatenate([array[:, :2], array[:, :2] + array[:, 2:]], axis=1)).float()

    per_image_gt: dict[int, list[dict]] = {image["id"]: [] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        per_image_gt[annotation["image_id"]].append(annotation)
    per_image_dt: dict[int, list[dict]] = {image_id: [] for image_id in per_image_gt}
    for detection in detections:
        per_image_dt[detection["image_id"]].append(detection)
    preds, targets = [], []
    for image_id in per_image_gt:
        gts, dts = per_image_gt[image_id], per_image_dt[image_id]
        preds.append(
            {
                "boxes": xyxy([d["bbox"] for d in dts]),
                "scores": torch.tensor([d["score"] for d in dts], dtype=torch.float32),
                "labels": torch.tensor([d["category_id"] for d in dts], dtype=torch.int64),
            }
        )
        targets.append(
            {
                "boxes": xyxy([a["bbox"] for a in gts]),
                "labels": torch.tensor([a["category_id"] for a in gts], dtype=torch.int64),
                "iscrowd": torch.tensor([a["iscrowd"] for a in gts], dtype=torch.int64),
                "area": torch.tensor([a["area"] for a in gts], dtype=torch.float32),
            }
        )
    return [(preds[i : i + 8], targets[i : i + 8]) for i in range(0, len(preds), 8)]


def _our_coco_metric(chunks: list[tuple[list[dict], list[dict]]], backend: str | None) -> dict[str, float]:
    """resnet_tasks.evaluation.detection.coco_map_metric: update per validation batch, then compute."""
    import io
    from contextlib import redirect_stdout

    from resnet_tasks.evaluation import detection

    patch = mock.patch.object(detection, "coco_backend", lambda: backend) if backend else contextlib.nullcontext()
    with patch, redirect_stdout(io.StringIO()):
        metric = detection.coco_map_metric()
        for preds, targets in chunks:
            metric.update(preds, targets)
        result = metric.compute()
    return {name: float(result[name]) for name in ("map", "map_50", "map_75")}


def bench_coco_eval(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Our COCO mAP metric (torchmetrics, backend faster_coco_eval when installed) vs pycocotools COCOeval."""
    from resnet_tasks.evaluation.detection import coco_backend

    ground_truth, detections = synthetic_coco(sizes.coco_images, sizes.coco_detections)
    chunks = _metric_inputs(ground_truth, detections)
    auto_backend = coco_backend()
    outputs: dict[str, Any] = {}

    def keep(name: str, run: Callable[[], Any]) -> Callable[[], None]:
        def wrapped() -> None:
            outputs[name] = run()

        return wrapped

    candidates = {
        "pycocotools": keep("pycocotools", lambda: _pycocotools_stats(ground_truth, detections)),
        f"ours[{auto_backend}]": keep("ours", lambda: _our_coco_metric(chunks, None)),
    }
    if auto_backend != "pycocotools":
        candidates["ours[pycocotools]"] = keep("ours_pycocotools", lambda: _our_coco_metric(chunks, "pycocotools"))
    times = alternate(candidates, repeats=sizes.coco_repeats)
    stats = outputs["pycocotools"]
    reference = {"map": float(stats[0]), "map_50": float(stats[1]), "map_75": float(stats[2])}
    t_reference = median(times["pycocotools"])
    result: dict[str, Any] = {
        "images": sizes.coco_images,
        "detections_per_image": sizes.coco_detections,
        "ground_truth_boxes": len(ground_truth["annotations"]),
        "faster_coco_eval_installed": auto_backend == "faster_coco_eval",
        "seconds_pycocotools": t_reference,
        "ap_pycocotools": reference,
    }
    for key, name in (("ours", f"ours[{auto_backend}]"), ("ours_pycocotools", "ours[pycocotools]")):
        if key not in outputs:
            continue
        label = auto_backend if key == "ours" else "pycocotools"
        ours = outputs[key]
        difference = max(abs(ours[k] - reference[k]) for k in reference)
        result[f"backend_{label}"] = {
            "seconds": median(times[name]),
            "speedup_over_pycocotools": t_reference / median(times[name]),
            "ap": ours,
            "max_abs_ap_difference": difference,
            "ap_equal_1e-4": difference <= 1e-4,
        }
    fast = result.get("backend_faster_coco_eval")
    result["goal_speedup"] = 4.0
    result["met"] = bool(fast and fast["speedup_over_pycocotools"] >= 4.0 and fast["ap_equal_1e-4"])
    if not fast:
        result["note"] = "faster-coco-eval not installed: our metric ran on pycocotools (pip install faster-coco-eval)"
    return result


# ----------------------------------------------------------------------------------------------- worker memory
def write_memory_coco(root: Path, num_images: int, num_files: int = 100, objects_per_image: int = 3) -> Path:
    """A COCO root whose train split lists `num_images` images that reuse `num_files` tiny 8x8 JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for index in range(num_files):
        pixels = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train2017" / f"tiny_{index:03d}.jpg")
        Image.fromarray(pixels).save(root / "val2017" / f"tiny_{index:03d}.jpg")
    categories = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]
    for split, count in (("train2017", num_images), ("val2017", 8)):
        images = [
            {"id": i + 1, "file_name": f"tiny_{i % num_files:03d}.jpg", "width": 8, "height": 8} for i in range(count)
        ]
        annotations = []
        for image in images:
            for _ in range(objects_per_image):
                x, y = (float(v) for v in rng.integers(0, 4, size=2))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image["id"],
                        "category_id": int(rng.choice([1, 3, 7])),
                        "bbox": [x, y, 3.0, 3.0],
                        "area": 9.0,
                        "iscrowd": 0,
                    }
                )
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def process_memory(pid: int) -> dict[str, int]:
    """Rss / Pss / USS (private clean + dirty) of one process in bytes, from /proc/PID/smaps_rollup."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                values[parts[0][:-1]] = int(parts[1]) * 1024
    return {
        "rss": values.get("Rss", 0),
        "pss": values.get("Pss", 0),
        "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    }


class DictCocoDataset(torch.utils.data.Dataset):
    """The counterfactual: the parsed COCO JSON kept as Python lists of dicts (what our dataset avoids)."""

    def __init__(self, annotation_file: Path, image_folder: Path) -> None:
        data = json.loads(annotation_file.read_text())
        self.image_folder = image_folder
        self.images = data["images"]
        self.objects: list[list[dict]] = [[] for _ in self.images]
        position = {image["id"]: index for index, image in enumerate(self.images)}
        for annotation in data["annotations"]:
            self.objects[position[annotation["image_id"]]].append(annotation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from resnet_tasks.data.coco import image_to_tensor
        from resnet_tasks.data.common import read_image

        image = self.images[index]
        boxes = torch.tensor([a["bbox"] for a in self.objects[index]], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([a["category_id"] for a in self.objects[index]], dtype=torch.int64)
        pixels = read_image(self.image_folder / image["file_name"])
        return image_to_tensor(pixels), {"boxes": boxes, "labels": labels, "image_id": image["id"]}


def _epoch_memory(loader: torch.utils.data.DataLoader, interval: float = 0.25) -> dict[str, Any]:
    """Iterate one epoch while a thread samples the workers' memory; first sample after the first batch."""
    iterator = iter(loader)
    next(iterator)
    pids = [worker.pid for worker in iterator._workers]  # the DataLoader's worker processes
    samples: list[dict[str, float]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        total = {"t": time.perf_counter() - start, "rss": 0.0, "pss": 0.0, "uss": 0.0}
        for pid in pids:
            for key, value in process_memory(pid).items():
                total[key] += value
        samples.append(total)

    def sampler() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError):
                sample()

    sample()
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    batches = 1
    for _ in iterator:
        batches += 1
    stop.set()
    thread.join()
    sample()  # persistent workers are still alive after the epoch
    seconds = time.perf_counter() - start
    del iterator
    first, last = samples[0], samples[-1]
    steady = next((s for s in samples if s["t"] >= 0.1 * seconds), last)
    mib = 1024.0**2
    return {
        "batches": batches,
        "seconds": seconds,
        "samples": len(samples),
        "uss_mib_first": first["uss"] / mib,
        "uss_mib_last": last["uss"] / mib,
        "uss_mib_max": max(s["uss"] for s in samples) / mib,
        "pss_mib_first": first["pss"] / mib,
        "pss_mib_last": last["pss"] / mib,
        "rss_mib_last": last["rss"] / mib,
        "uss_growth": (last["uss"] - first["uss"]) / first["uss"],
        # After the workers' one-time start-up (lazy imports, allocator arenas): growth with data touched.
        "uss_mib_at_10pct": steady["uss"] / mib,
        "uss_growth_from_10pct": (last["uss"] - steady["uss"]) / steady["uss"],
        "pss_growth": (last["pss"] - first["pss"]) / first["pss"],
        "trace_uss_mib": [round(s["uss"] / mib, 1) for s in samples[:: max(1, len(samples) // 20)]],
    }


def bench_memory(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Memory of the DataLoader workers over one epoch of a big COCO JSON through CocoDetectionDataModule.

    Runs in a fresh (spawned) process: forked workers otherwise inherit this process's heap from the
    earlier benchmarks and copy it page by page as their garbage collector walks it, which is growth of
    the parent's making, not the dataset's.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_memory_in_process, sizes, torch.get_num_threads()).result()


def _memory_in_process(sizes: Sizes, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    from resnet_tasks.data.coco import CocoDetectionDataModule, detection_collate

    with tempfile.TemporaryDirectory() as tmp:
        root = write_memory_coco(Path(tmp), sizes.memory_images)
        module = CocoDetectionDataModule(
            root=str(root), batch_size=sizes.memory_batch_size, num_workers=sizes.memory_workers, pin_memory=False
        )
        module.setup("fit")
        ours = _epoch_memory(module.train_dataloader())
        result: dict[str, Any] = {
            "images": sizes.memory_images,
            "workers": sizes.memory_workers,
            "measure": "sum over workers of USS (Private_Clean + Private_Dirty, /proc/PID/smaps_rollup)",
            "ours": ours,
            "goal_growth": 0.05,
            "met": abs(ours["uss_growth_from_10pct"]) <= 0.05,
        }
        del module
        gc.collect()
        if sizes.memory_counterfactual:
            dataset = DictCocoDataset(root / "annotations" / "instances_train2017.json", root / "train2017")
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=sizes.memory_batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
                num_workers=sizes.memory_workers,
                collate_fn=detection_collate,
                persistent_workers=True,
            )
            result["python_dicts"] = _epoch_memory(loader)
            del loader, dataset
            gc.collect()
    return result


# ----------------------------------------------------------------------------------------------- segmentation metric
def bench_segmentation_metric(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Our SegmentationMetrics.update (argmax of the logits + confusion counts) vs a numpy bincount reference,
    with and without torch.use_deterministic_algorithms(True)."""
    from resnet_tasks.evaluation.segmentation import SegmentationMetrics, class_map

    batch, classes, height, width = sizes.seg_shape
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, height, width, generator=generator).to(device)
    target = torch.randint(0, classes, (batch, height, width), generator=generator, dtype=torch.uint8)
    target[torch.rand(batch, height, width, generator=generator) < 0.05] = 255  # ignore pixels
    target = target.to(device)
    logits_np, target_np = logits.cpu().numpy(), target.cpu().numpy()

    def reference() -> np.ndarray:
        predicted = logits_np.argmax(1)
        valid = target_np != 255
        index = target_np[valid].astype(np.int64) * classes + predicted[valid]
        return np.bincount(index, minlength=classes * classes).reshape(classes, classes)

    metric = SegmentationMetrics(classes).to(device)

    def ours() -> None:
        metric.update(class_map(logits), target)
        synchronize(device)

    expected = reference()
    metric.reset()
    ours()
    if not np.array_equal(metric.confusion.cpu().numpy(), expected):
        raise AssertionError("SegmentationMetrics confusion differs from the numpy bincount reference")
    result: dict[str, Any] = {"shape": list(sizes.seg_shape), "confusion_equal": True}
    for mode in ("normal", "deterministic"):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(mode == "deterministic")
        try:
            times = alternate({"ours": ours, "numpy": reference}, repeats=sizes.seg_repeats, warmup=1)
        finally:
            torch.use_deterministic_algorithms(previous)
        result[mode] = {
            "seconds_ours": median(times["ours"]),
            "seconds_numpy": median(times["numpy"]),
            "speedup_over_numpy": median(times["numpy"]) / median(times["ours"]),
        }
    return result


# ----------------------------------------------------------------------------------------------- backbone, GPU
def bench_backbone(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """benchmarks/backbone_speed.py: our backbone vs torchvision's ResNet body, forward + backward."""
    import io
    from contextlib import redirect_stdout

    name, batch, size, steps = sizes.backbone
    if device.type == "cuda":
        name, batch, size, steps = "resnet50", 64, 224, 20
    script = _load_script("backbone_speed")
    with redirect_stdout(io.StringIO()):
        result = script.main(
            ["--name", name, "--batch-size", str(batch), "--size", str(size), "--steps", str(steps),
             "--warmup", "1", "--device", str(device)]
        )  # fmt: skip
    for key in ("times_ours", "times_torchvision", "platform"):
        result.pop(key, None)
    result["goal"] = 0.98
    result["met"] = result["speed_ratio_ours_over_torchvision"] >= 0.98
    return result


def bench_gpu(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Training images/s on one GPU: ResNet-50 (bf16 + channels_last), Faster R-CNN R50-FPN (AMP), FCN R50."""
    if device.type != "cuda":
        return {"skipped": "GPU figures need --device cuda (a CUDA GPU); nothing measured on CPU"}
    import lightning as L

    from resnet_tasks.tasks.base import BackboneConfig

    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device)}
    setups = {
        "resnet50_classification_bf16_channels_last": ("classification", "bf16-mixed"),
        "faster_rcnn_r50_fpn_amp": ("detection", "16-mixed"),
        "fcn_r50_bf16": ("segmentation", "bf16-mixed"),
    }
    for label, (task, precision) in setups.items():
        steps = 25
        module, batches = _task_and_batches(task, sizes, device, steps)
        if task == "classification":
            module = type(module)(num_classes=10, backbone=BackboneConfig(name="resnet50"), channels_last=True)

        class Clock(L.Callback):
            def __init__(self) -> None:
                self.starts: list[float] = []

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                torch.cuda.synchronize(device)
                self.starts.append(time.perf_counter())

        clock = Clock()

        trainer = L.Trainer(
            accelerator="cuda", devices=1, precision=precision, max_steps=steps, limit_val_batches=0,
            num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, logger=False, callbacks=[clock],
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=_loader(batches))
        first = batches[0]
        images = len(first[0]) if task == "detection" else int(first["image"].shape[0])
        step = median(_step_periods(clock.starts, 5))
        result[label] = {"precision": precision, "batch_size": images, "step_s": step, "images_per_s": images / step}
        del trainer, module, batches
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------- the suite
RUNNERS: dict[str, Callable[[Sizes, torch.device], dict[str, Any]]] = {
    "lightning": bench_lightning,
    "data": bench_data,
    "decode": bench_decode,
    "coco_eval": bench_coco_eval,
    "memory": bench_memory,
    "segmentation_metric": bench_segmentation_metric,
    "backbone": bench_backbone,
    "gpu": bench_gpu,
}


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, value, goal) rows of the headline numbers."""
    rows: list[tuple[str, str, str, str]] = []
    for name, result in results.items():
        if "error" in result or "skipped" in result:
            rows.append((name, "-", result.get("error") or result.get("skipped"), ""))
            continue
        if name == "lightning":
            for task, figures in result.items():
                if not isinstance(figures, dict):
                    continue
                rows.append(
                    (f"lightning/{task}", f"t_loop/t_trainer ({figures['model']}; step "
                     f"{figures['step_s_loop'] * 1000:.0f} vs {figures['step_s_trainer'] * 1000:.0f} ms)",
                     _fmt(figures["ratio_loop_over_trainer"]), ">= 0.98")
                )  # fmt: skip
        elif name == "data":
            rows.append(
                ("data", f"images/s/core ours {result['images_per_s_per_core_ours']:.0f} vs torchvision "
                 f"{result['images_per_s_per_core_torchvision']:.0f}", _fmt(result["ratio_ours_over_torchvision"]),
                 "")
            )  # fmt: skip
        elif name == "decode":
            rates = result["images_per_s"]
            rows.append(
                ("decode", "images/s " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
                 + f"; pixels equal to PIL: opencv {result['pixel_equal_opencv_pil']}, "
                 f"torchvision {result['pixel_equal_torchvision_pil']}",
                 _fmt(result["speed_ratio_opencv_over_pil"]), "")
            )  # fmt: skip
        elif name == "coco_eval":
            for key in ("backend_faster_coco_eval", "backend_pycocotools"):
                if key in result:
                    figures = result[key]
                    rows.append(
                        (f"coco_eval/{key[8:]}", f"speedup vs COCOeval ({result['images']} images; |dAP| "
                         f"{figures['max_abs_ap_difference']:.1e})", _fmt(figures["speedup_over_pycocotools"], 2),
                         ">= 4x, dAP <= 1e-4")
                    )  # fmt: skip
        elif name == "memory":
            ours = result["ours"]
            rows.append(
                ("memory/ours", f"worker USS {ours['uss_mib_first']:.0f} / {ours['uss_mib_at_10pct']:.0f} -> "
                 f"{ours['uss_mib_last']:.0f} MiB (start / 10% -> end; {result['images']} images, "
                 f"{result['workers']} workers; growth from start {ours['uss_growth']:+.1%})",
                 f"{ours['uss_growth_from_10pct']:+.1%}", "within 5%")
            )  # fmt: skip
            if "python_dicts" in result:
                dicts = result["python_dicts"]
                rows.append(
                    ("memory/python_dicts", f"worker USS {dicts['uss_mib_first']:.0f} / {dicts['uss_mib_at_10pct']:.0f}"
                     f" -> {dicts['uss_mib_last']:.0f} MiB (growth from start {dicts['uss_growth']:+.1%})",
                     f"{dicts['uss_growth_from_10pct']:+.1%}", "(counterfactual)")
                )  # fmt: skip
        elif name == "segmentation_metric":
            for mode in ("normal", "deterministic"):
                figures = result[mode]
                rows.append(
                    (f"segmentation_metric/{mode}", f"update {figures['seconds_ours'] * 1000:.1f} ms vs numpy "
                     f"{figures['seconds_numpy'] * 1000:.1f} ms", _fmt(figures["speedup_over_numpy"], 2), "")
                )  # fmt: skip
        elif name == "backbone":
            rows.append(
                ("backbone", f"t_torchvision/t_ours {result['name']} fwd+bwd batch {result['batch_size']}x"
                 f"{result['size']}", _fmt(result["speed_ratio_ours_over_torchvision"]), ">= 0.98")
            )  # fmt: skip
        elif name == "gpu":
            for label, figures in result.items():
                if isinstance(figures, dict):
                    rows.append((f"gpu/{label}", "training images/s", f"{figures['images_per_s']:.0f}", ""))
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)] if rows else [0] * 4
    header = ("benchmark", "what", "value", "goal")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def run_suite(names: list[str], sizes: Sizes, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Run the named benchmarks; a failing one records its error and the others still run."""
    results: dict[str, Any] = {}
    for name in names:
        log(f"[bench] {name} ...")
        start = time.perf_counter()
        try:
            results[name] = RUNNERS[name](sizes, device)
        except Exception as error:  # one broken benchmark must not lose the others' figures
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name]["wall_s"] = round(time.perf_counter() - start, 1)
        log(f"[bench] {name} done in {results[name]['wall_s']:.0f} s")
    return results


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON (numpy/torch scalars as floats), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_tasks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute or two)")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes, for the smoke test (figures meaningless)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, metavar="NAME",
                        help=f"run only these: {' '.join(BENCHMARKS)}")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"), help="JSON output file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on CPU, where a shared machine's competing processes make "
                        "multi-threaded OpenMP steps stall unpredictably; torch's default on CUDA)")  # fmt: skip
    parser.add_argument("--coco-images", type=int, default=None, help="override the COCO evaluation image count")
    parser.add_argument("--memory-images", type=int, default=None, help="override the memory benchmark's images")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    if args.coco_images:
        sizes = dataclasses.replace(sizes, coco_images=args.coco_images)
    if args.memory_images:
        sizes = dataclasses.replace(sizes, memory_images=args.memory_images)
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    names = list(args.only or BENCHMARKS)
    start = time.perf_counter()
    try:
        results = run_suite(names, sizes, device)
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "meta": {
            "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "faster_coco_eval": importlib.util.find_spec("faster_coco_eval") is not None,
            "sizes": dataclasses.asdict(sizes),
            "wall_s": round(time.perf_counter() - start, 1),
        },
        **results,
    }
    write_report(args.out, report)
    print()
    print_table(summary_rows(results))
    print(f"\nwrote {args.out} ({report['meta']['wall_s']:.0f} s)")
    return 1 if any("error" in result for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
