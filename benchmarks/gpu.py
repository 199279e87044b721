"""One GPU benchmark: training and inference images/s of the three tasks, hand-written loop vs our Trainer path.

    python benchmarks/gpu.py [--device cuda|cpu] [--out bench-results/gpu] [--budget-s 450]

Generates its own data in a temporary folder (JPEGs in the ImageFolder, COCO and VOC layouts; nothing is
downloaded). Rows, bf16-mixed on a GPU: ResNet-50 classification at 224 px, Faster R-CNN R50-FPN at 800x1333 and
FCN R50 (output stride 8) at 512 px; for each, (a) a hand-written loop over plain torchvision models and (b) our
task + data module classes through `lightning.Trainer`, eager vs channels_last (vs `compile` of the backbone for
classification and segmentation), on in-memory tensors and on JPEG files through our DataLoader (and the GPU decode
path for classification); inference images/s; peak GPU memory; the data path alone over a sweep of worker counts;
a torch.profiler breakdown of one Faster R-CNN and one FCN training step. At most 30 timed steps per cell after
warmup, CUDA-synchronised clocks; a failing cell prints its error and the others still run. Prints one table and
writes it as JSON and markdown (`--out` + .json/.md). Without CUDA (or `--device cpu`) a CPU fallback runs the same
table at tiny sizes with resnet18 backbones and says which cells it skipped and why.

Also the `gpu` entry of the suite (`python benchmarks/run.py --only gpu --device cuda`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import synchronize  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU plan (the real models and sizes) or the CPU fallback's tiny one."""

    backbone: str
    precision: str
    warmup: int
    timed: int
    classification: tuple[int, int]  # batch, crop size
    classification_jpeg: tuple[int, int, int, int]  # unique files, hard links of each, width, height
    detection: tuple[int, int, int]  # batch, min size, max size (the model's own resize)
    detection_jpeg: tuple[int, int, int, int]
    segmentation: tuple[int, int]  # batch, crop size
    segmentation_jpeg: tuple[int, int, int, int]
    workers: tuple[int, ...]  # the data path's sweep
    data_batches: int  # timed batches per data-path cell
    compile: bool
    channels_last: bool
    cuda: bool
    threads: int | None  # torch threads (None: torch's default)
    detection_sampling: tuple[int, int]  # RPN proposals kept in training, RoIs sampled per image


GPU_PLAN = Plan(
    backbone="resnet50", precision="bf16-mixed", warmup=5, timed=25,
    classification=(256, 224), classification_jpeg=(1024, 8, 500, 375),
    detection=(4, 800, 1333), detection_jpeg=(64, 4, 1333, 800),
    segmentation=(8, 512), segmentation_jpeg=(64, 4, 640, 512),
    workers=(4, 8, 16), data_batches=12, compile=True, channels_last=True, cuda=True, threads=None,
    detection_sampling=(2000, 512),
)  # fmt: skip
CPU_PLAN = Plan(
    backbone="resnet18", precision="32-true", warmup=1, timed=2,
    classification=(2, 32), classification_jpeg=(8, 1, 64, 48),
    detection=(1, 64, 96), detection_jpeg=(4, 1, 96, 64),
    segmentation=(1, 48), segmentation_jpeg=(4, 1, 64, 48),
    workers=(0, 2), data_batches=2, compile=False, channels_last=False, cuda=False, threads=1,
    detection_sampling=(100, 32),
)  # fmt: skip
NUM_DETECTION_CLASSES = 3  # categories of the generated COCO file (+ background)
NUM_SEGMENTATION_CLASSES = 21  # VOC's 20 + background


# ----------------------------------------------------------------------------------------------- generated data
def _picture(seed: int, width: int, height: int) -> np.ndarray:
    """A photo-like RGB image: smooth random colour fields plus mild noise (JPEG size and decode cost of a photo)."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.normal(0, 8, image.shape).astype(np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_jpeg(job: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    path, seed, width, height = job
    Image.fromarray(_picture(seed, width, height)).save(path, quality=90)


def _link_copies(path: Path, copies: int, name: Callable[[int], Path]) -> list[Path]:
    """`path` plus `copies - 1` hard links (more files for the loader, one set of pages in the cache)."""
    paths = [path]
    for copy in range(1, copies):
        target = name(copy)
        try:
            os.link(path, target)
        except OSError:  # a file system without hard links: a copy
            target.write_bytes(path.read_bytes())
        paths.append(target)
    return paths


def write_image_folder(root: Path, spec: tuple[int, int, int, int], pool: Any) -> Path:
    """ImageFolder layout: `unique` photo-like JPEGs in 10 classes, each file `links` times under new names."""
    unique, links, width, height = spec
    jobs = []
    for index in range(unique):
        folder = root / "train" / f"class_{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"image_{index:05d}_0.jpg", index, width, height))
    pool.map(_write_jpeg, jobs)
    for path, *_ in jobs:
        stem = path.stem[:-2]
        _link_copies(path, links, lambda copy, p=path, s=stem: p.with_name(f"{s}_{copy}.jpg"))
    # A val split (the data module's layout wants one; the benchmark does not evaluate).
    for folder in sorted((root / "train").iterdir()):
        val = root / "val" / folder.name
        val.mkdir(parents=True, exist_ok=True)
        first = sorted(folder.iterdir())[0]
        (val / first.name).write_bytes(first.read_bytes())
    return root


def _boxes(seed: int, width: int, height: int, count: int = 4) -> list[tuple[int, int, int, int, int]]:
    """`count` random boxes (x0, y0, x1, y1, class 1..3) covering 5-40% of each side."""
    rng = np.random.default_rng(seed + 1_000_000)
    boxes = []
    for _ in range(count):
        w, h = int(width * rng.uniform(0.05, 0.4)), int(height * rng.uniform(0.05, 0.4))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        boxes.append((x0, y0, x0 + w, y0 + h, int(rng.integers(1, NUM_DETECTION_CLASSES + 1))))
    return boxes


def write_coco(root: Path, spec: tuple[int, int, int, int], pool: Any) -> Path:
    """COCO layout (annotations/instances_{train,val}2017.json, {train,val}2017/*.jpg) with 4 boxes per image."""
    unique, links, width, height = spec
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": k, "name": f"thing_{k}", "supercategory": "thing"} for k in range(1, NUM_DETECTION_CLASSES + 1)
    ]
    for split, count, copies in (("train2017", unique, links), ("val2017", 2, 1)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(folder / f"{index:06d}_0.jpg", index, width, height) for index in range(count)]
        pool.map(_write_jpeg, jobs)
        images, annotations = [], []
        for index, (path, *_) in enumerate(jobs):
            copies_of = _link_copies(path, copies, lambda c, p=path, i=index: p.with_name(f"{i:06d}_{c}.jpg"))
            for copy_path in copies_of:
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": copy_path.name, "width": width, "height": height})
                for x0, y0, x1, y1, label in _boxes(index, width, height):
                    annotations.append(
                        {"id": len(annotations) + 1, "image_id": image_id, "category_id": label, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0))}
                    )  # fmt: skip
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _voc_mask(job: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    from resnet_tasks.data.shapes import VOC_PALETTE

    path, seed, width, height = job
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1, label in _boxes(seed, width, height):
        mask[y0:y1, x0:x1] = label * 5  # classes 5, 10, 15 of VOC's 21
        mask[y0 : y0 + 2, x0:x1] = 255  # an "ignore" border band, as VOC's
    picture = Image.fromarray(mask)
    picture.putpalette(VOC_PALETTE)
    picture.save(path)


def write_voc(root: Path, spec: tuple[int, int, int, int], pool: Any) -> Path:
    """VOC2012 segmentation layout: JPEGImages, SegmentationClass palette PNGs, ImageSets/Segmentation lists."""
    unique, links, width, height = spec
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(voc / "JPEGImages" / f"img_{index:05d}_0.jpg", index, width, height) for index in range(unique)]
    pool.map(_write_jpeg, jobs)
    pool.map(_voc_mask, [(voc / "SegmentationClass" / f"img_{i:05d}_0.png", i, width, height) for i in range(unique)])
    stems = []
    for index, (path, *_) in enumerate(jobs):
        mask = voc / "SegmentationClass" / f"{path.stem}.png"
        for copy in range(links):
            stem = f"img_{index:05d}_{copy}"
            if copy:
                _link_copies(path, 2, lambda _, s=stem: voc / "JPEGImages" / f"{s}.jpg")
                _link_copies(mask, 2, lambda _, s=stem: voc / "SegmentationClass" / f"{s}.png")
            stems.append(stem)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(stems) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems[:2]) + "\n")
    return root


# ----------------------------------------------------------------------------------------------------- timing
class Clock:
    """Step start times (device-synchronised); throughput over the timed steps after `warmup`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []

    def tick(self) -> None:
        synchronize(self.device)
        self.starts.append(time.perf_counter())

    def images_per_s(self, batch: int, warmup: int) -> float:
        timed = self.starts[warmup:]
        if len(timed) < 2:
            raise RuntimeError(f"only {len(self.starts)} steps ran ({warmup} warmup): nothing timed")
        return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def lightning_clock(clock: Clock) -> Any:
    import lightning as L

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            clock.tick()

    return StepClock()


@contextlib.contextmanager
def peak_memory(device: torch.device, cell: dict[str, Any]) -> Iterator[None]:
    """Record the device's peak allocated memory of the block in `cell["peak_gib"]` (CUDA only)."""
    if device.type == "cuda":
        gc.collect()  # the previous cell's Trainer and model (reference cycles) must not count here
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if device.type == "cuda":
            cell["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def autocast(plan: Plan, device: torch.device) -> Any:
    if plan.precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on `device` (non_blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


# ------------------------------------------------------------------------------------------------ the models
def torchvision_model(task: str, plan: Plan) -> torch.nn.Module:
    """The plain torchvision model of each row (the hand-written loop's), untrained."""
    import torchvision

    if task == "classification":
        return getattr(torchvision.models, plan.backbone)(num_classes=10)
    if task == "detection":
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import FrozenBatchNorm2d

        # torchvision's fasterrcnn_resnet50_fpn as it fine-tunes from ImageNet weights: frozen BN, 3 trainable stages.
        body = getattr(torchvision.models, plan.backbone)(norm_layer=FrozenBatchNorm2d)
        _, min_size, max_size = plan.detection
        proposals, rois = plan.detection_sampling
        return FasterRCNN(
            _resnet_fpn_extractor(body, 3), num_classes=NUM_DETECTION_CLASSES + 1, min_size=min_size,
            max_size=max_size, rpn_pre_nms_top_n_train=proposals, rpn_post_nms_top_n_train=proposals,
            box_batch_size_per_image=rois,
        )  # fmt: skip
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    # fcn_resnet50's construction (output stride 8 by dilation, aux head on layer3), for any depth; torchvision's
    # basic blocks cannot dilate, so the CPU fallback's resnet18 keeps stride 32 there.
    body = getattr(torchvision.models, plan.backbone)()
    dilate = body.fc.in_features == 2048
    body = getattr(torchvision.models, plan.backbone)(replace_stride_with_dilation=[False, dilate, dilate])
    channels = body.fc.in_features
    layers = IntermediateLayerGetter(body, return_layers={"layer4": "out", "layer3": "aux"})
    heads = FCNHead(channels, NUM_SEGMENTATION_CLASSES), FCNHead(channels // 2, NUM_SEGMENTATION_CLASSES)
    return FCN(layers, *heads)


def our_task(task: str, plan: Plan, channels_last: bool, compile: bool, label_space: Any = None) -> Any:
    """Our task module of each row, configured like the torchvision model it is compared with."""
    from resnet_tasks.tasks.optim import SchedulerConfig

    classes = {"classification": 10, "detection": NUM_DETECTION_CLASSES + 1, "segmentation": NUM_SEGMENTATION_CLASSES}
    options: dict[str, Any] = dict(
        channels_last=channels_last, compile=compile, scheduler=SchedulerConfig(name="constant"),
        **({"label_space": label_space} if label_space is not None else {"num_classes": classes[task]}),
    )  # fmt: skip
    if task == "classification":
        from resnet_tasks.tasks.classification import ClassificationTask

        return ClassificationTask(backbone={"name": plan.backbone}, **options)
    if task == "detection":
        from resnet_tasks.tasks.detection import DetectionTask

        _, min_size, max_size = plan.detection
        return DetectionTask(
            backbone={"name": plan.backbone, "norm": "frozen_bn"}, trainable_backbone_layers=3,
            min_size=min_size, max_size=max_size, rpn_pre_nms_top_n_train=plan.detection_sampling[0],
            rpn_post_nms_top_n_train=plan.detection_sampling[0], box_batch_size_per_image=plan.detection_sampling[1],
            **options,
        )  # fmt: skip
    from resnet_tasks.tasks.segmentation import SegmentationTask

    return SegmentationTask(backbone={"name": plan.backbone}, **options)


def memory_batches(task: str, plan: Plan, device: torch.device, count: int = 4) -> list[Any]:
    """`count` distinct in-memory training batches on the device (cycled through by the timed steps)."""
    generator = torch.Generator().manual_seed(0)
    batches: list[Any] = []
    for _ in range(count):
        if task == "classification":
            batch, size = plan.classification
            batches.append(
                {"image": torch.randn(batch, 3, size, size, generator=generator),
                 "label": torch.randint(0, 10, (batch,), generator=generator)}
            )  # fmt: skip
        elif task == "detection":
            batch, _, _ = plan.detection
            _, _, width, height = plan.detection_jpeg
            images, targets = [], []
            for index in range(batch):
                images.append(torch.rand(3, height, width, generator=generator))
                boxes = torch.tensor([b[:4] for b in _boxes(index, width, height)], dtype=torch.float32)
                labels = torch.tensor([b[4] for b in _boxes(index, width, height)], dtype=torch.int64)
                targets.append({"boxes": boxes, "labels": labels})
            batches.append((images, targets))
        else:
            batch, size = plan.segmentation
            mask = torch.randint(0, NUM_SEGMENTATION_CLASSES, (batch, size, size), generator=generator)
            batches.append({"image": torch.randn(batch, 3, size, size, generator=generator), "mask": mask})
    return [to_device(batch, device) for batch in batches]


def plain_loss(task: str, model: torch.nn.Module, batch: Any, channels_last: bool) -> torch.Tensor:
    """The loss of a hand-written training step on a plain torchvision model."""
    import torch.nn.functional as F

    if task == "detection":
        images, targets = batch
        return sum(model(images, targets).values())
    images = batch["image"]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if task == "classification":
        return F.cross_entropy(model(images), batch["label"])
    outputs = model(images)
    target = batch["mask"].long()
    return F.cross_entropy(outputs["out"], target, ignore_index=255) + 0.5 * F.cross_entropy(
        outputs["aux"], target, ignore_index=255
    )


def batch_size_of(task: str, plan: Plan) -> int:
    return {"classification": plan.classification, "detection": plan.detection, "segmentation": plan.segmentation}[
        task
    ][0]


# ------------------------------------------------------------------------------------------------- the cells
class Bench:
    """Runs the cells of one plan, each guarded, and collects their rows."""

    def __init__(self, plan: Plan, device: torch.device, workdir: Path, budget_s: float) -> None:
        self.plan = plan
        self.device = device
        self.workdir = workdir
        self.deadline = time.perf_counter() + budget_s
        self.cells: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.data: dict[str, Path] = {}
        self.profiles: dict[str, str] = {}

    def cell(self, task: str, path: str, variant: str, data: str, run: Callable[[dict[str, Any]], None]) -> None:
        """One row: `run` fills in its figures; an error or the time budget fills in why not."""
        row: dict[str, Any] = {"task": task, "path": path, "variant": variant, "data": data}
        self.cells.append(row)
        if time.perf_counter() > self.deadline:
            row["skipped"] = "time budget spent (--budget-s)"
            self.skipped.append(f"{task} / {path} / {variant} / {data}: {row['skipped']}")
            return
        start = time.perf_counter()
        try:
            with peak_memory(self.device, row):
                run(row)
        except Exception as error:  # one failing cell must not lose the others
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            traceback.print_exc(limit=3)
        finally:
            row["wall_s"] = round(time.perf_counter() - start, 1)
            gc.collect()  # DataLoader workers and device memory of this cell go now
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu bench] {format_row(row)}", flush=True)

    def skip(self, task: str, path: str, variant: str, data: str, why: str) -> None:
        self.cells.append({"task": task, "path": path, "variant": variant, "data": data, "skipped": why})
        self.skipped.append(f"{task} / {path} / {variant} / {data}: {why}")

    # --------------------------------------------------------------------- hand-written loop
    def loop_cell(self, task: str, variant: str, data: str) -> None:
        channels_last, compile = "channels_last" in variant, "compile" in variant

        def run(row: dict[str, Any]) -> None:
            model = torchvision_model(task, self.plan).to(self.device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            if compile:
                model.compile()
            model.train()
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            batches = self.batches(task, data)
            clock = Clock(self.device)
            for _, batch in zip(range(self.plan.warmup + self.plan.timed + 1), batches):
                clock.tick()
                with autocast(self.plan, self.device):
                    loss = plain_loss(task, model, batch, channels_last)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            row["train_images_per_s"] = clock.images_per_s(batch_size_of(task, self.plan), self.plan.warmup)

        self.cell(task, "loop (torchvision)", variant, data, run)

    def batches(self, task: str, data: str) -> Iterator[Any]:
        """Training batches on the device: in-memory tensors, or JPEG files through our data module's loader."""
        if data == "memory":
            return cycle(memory_batches(task, self.plan, self.device))
        decode = "cuda" if "gpu" in data else "cpu"
        module = self.data_module(task, workers=max(self.plan.workers), decode_device=decode)
        module.setup("fit")
        loader = module.train_dataloader()

        def moved() -> Iterator[Any]:
            for batch in cycle(loader):
                batch = module.on_before_batch_transfer(batch, 0)
                batch = module.on_after_batch_transfer(to_device(batch, self.device), 0)
                yield batch

        return moved()

    # -------------------------------------------------------------------------- Trainer path
    def trainer_cell(self, task: str, variant: str, data: str) -> None:
        channels_last, compile = "channels_last" in variant, "compile" in variant
        # "host guard": the non-fused optimizer, whose non-finite guard reads its flag on the host every step (one
        # CPU-GPU sync), against the default fused one that skips on the device.
        host_guard = "host guard" in variant

        def run(row: dict[str, Any]) -> None:
            from resnet_tasks.tasks import optim

            fused_devices = optim.FUSED_DEVICES
            optim.FUSED_DEVICES = () if host_guard else fused_devices
            try:
                self._trainer_run(task, data, channels_last, compile, row)
            finally:
                optim.FUSED_DEVICES = fused_devices

        self.cell(task, "Trainer (ours)", variant, data, run)

    def _trainer_run(self, task: str, data: str, channels_last: bool, compile: bool, row: dict[str, Any]) -> None:
        """One Trainer-path cell: fit a few steps of our task and record training images/s."""
        import lightning as L

        clock = Clock(self.device)
        trainer = L.Trainer(
            accelerator=self.device.type, devices=1, precision=self.plan.precision,
            max_steps=self.plan.warmup + self.plan.timed + 1, limit_val_batches=0, num_sanity_val_steps=0,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, logger=False,
            callbacks=[lightning_clock(clock)], default_root_dir=self.workdir / "runs",
        )  # fmt: skip
        if data == "memory":
            from lightning_overhead import batch_loader

            module = our_task(task, self.plan, channels_last, compile)
            batches = memory_batches(task, self.plan, self.device)
            steps = self.plan.warmup + self.plan.timed + 1
            trainer.fit(module, train_dataloaders=batch_loader([batches[i % len(batches)] for i in range(steps)]))
        else:
            data_module = self.data_module(
                task, workers=max(self.plan.workers), decode_device="cuda" if "gpu" in data else "cpu"
            )
            module = our_task(task, self.plan, channels_last, compile, label_space=data_module.label_space)
            trainer.fit(module, datamodule=data_module)
        row["train_images_per_s"] = clock.images_per_s(batch_size_of(task, self.plan), self.plan.warmup)

    # ------------------------------------------------------------------------------ inference
    def inference_cell(self, task: str, variant: str) -> None:
        channels_last = "channels_last" in variant

        def run(row: dict[str, Any]) -> None:
            module = our_task(task, self.plan, channels_last, False).to(self.device).eval()
            module.apply_speed_options()
            batch = memory_batches(task, self.plan, self.device, count=1)[0]
            images = batch[0] if task == "detection" else batch["image"]
            clock = Clock(self.device)
            with torch.inference_mode(), autocast(self.plan, self.device):
                for _ in range(self.plan.warmup + self.plan.timed + 1):
                    clock.tick()
                    module(images)
            row["infer_images_per_s"] = clock.images_per_s(batch_size_of(task, self.plan), self.plan.warmup)

        self.cell(task, "inference (ours)", variant, "memory", run)

    # ------------------------------------------------------------------------------ data path
    def data_module(self, task: str, workers: int, decode_device: str = "cpu") -> Any:
        common = dict(num_workers=workers, seed=0)
        if task == "classification":
            from resnet_tasks.data.classification import ImageFolderDataModule

            batch, size = self.plan.classification
            return ImageFolderDataModule(
                root=str(self.data["classification"]), batch_size=batch, crop_size=size, resize_size=size * 8 // 7,
                decode_device=decode_device, **common,
            )  # fmt: skip
        if task == "detection":
            from resnet_tasks.data.formats.coco import CocoDetectionDataModule

            return CocoDetectionDataModule(
                root=str(self.data["detection"]), batch_size=self.plan.detection[0], **common
            )
        from resnet_tasks.data.formats.voc_segmentation import VOCSegmentationDataModule

        batch, size = self.plan.segmentation
        return VOCSegmentationDataModule(
            root=str(self.data["segmentation"]), batch_size=batch, crop_size=size, eval_size=size, **common
        )

    def data_cell(self, task: str, workers: int, decode_device: str = "cpu") -> None:
        label = f"{workers} workers" + (", GPU decode" if decode_device == "cuda" else "")

        def run(row: dict[str, Any]) -> None:
            module = self.data_module(task, workers, decode_device)
            module.setup("fit")
            loader = module.train_dataloader()
            clock = Clock(self.device)
            batches = iter(cycle(loader))
            for _ in range(self.plan.warmup + self.plan.data_batches + 1):
                clock.tick()
                batch = module.on_before_batch_transfer(next(batches), 0)
                # The device makes the model's input (decode on the GPU path; float, normalise on both).
                module.on_after_batch_transfer(to_device(batch, self.device), 0)
            row["data_images_per_s"] = clock.images_per_s(batch_size_of(task, self.plan), self.plan.warmup)
            del batches, loader

        self.cell(task, "data path alone", label, "jpeg", run)

    # -------------------------------------------------------------------------------- profile
    def profile(self, task: str) -> None:
        """A torch.profiler table of one training step (after two warmup steps) of our task: where the time goes."""

        def run(row: dict[str, Any]) -> None:
            from torch.profiler import ProfilerActivity, profile, record_function

            module = our_task(task, self.plan, self.plan.channels_last, False).to(self.device).train()
            module.apply_speed_options()
            optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            batch = memory_batches(task, self.plan, self.device, count=1)[0]
            parts = module.model if hasattr(module, "model") else module
            handles = label_children(parts, record_function)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])

            def step() -> None:
                with autocast(self.plan, self.device):
                    loss = sum(module.training_losses(batch).values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            for _ in range(2):
                step()
            synchronize(self.device)
            start = time.perf_counter()
            with profile(activities=activities) as prof:
                step()
                synchronize(self.device)
            wall = time.perf_counter() - start
            for handle in handles:
                handle.remove()
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            averages = prof.key_averages()
            device_total = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e6
            parts_table = averages_table([e for e in averages if e.key.startswith("## ")], "cpu_time_total", 8)
            ops_table = averages_table([e for e in averages if not e.key.startswith("## ")], sort, 15)
            busy = f", device busy {device_total * 1000:.0f} ms ({device_total / wall:.0%} of the step)"
            self.profiles[task] = (
                f"{task}: one training step {wall * 1000:.0f} ms wall (profiled)"
                f"{busy if self.device.type == 'cuda' else ''}\n"
                f"forward parts (totals include children; backward not split):\n{parts_table}\n"
                f"top ops by self {'device' if self.device.type == 'cuda' else 'CPU'} time:\n{ops_table}"
            )
            row["step_ms_profiled"] = round(wall * 1000, 1)
            if self.device.type == "cuda":
                row["device_busy"] = round(device_total / wall, 3)

        self.cell(task, "profile (ours)", "channels_last" if self.plan.channels_last else "eager", "memory", run)


def label_children(model: torch.nn.Module, record_function: Any) -> list[Any]:
    """Forward hooks that open/close a `## <child>` profiler range around each top-level child's forward."""
    handles = []
    for name, child in model.named_children():
        ranges: list[Any] = []

        def enter(module: Any, args: Any, label: str = f"## {name}", stack: list[Any] = ranges) -> None:
            stack.append(record_function(label))
            stack[-1].__enter__()

        def leave(module: Any, args: Any, output: Any, stack: list[Any] = ranges) -> None:
            if stack:
                stack.pop().__exit__(None, None, None)

        handles += [child.register_forward_pre_hook(enter), child.register_forward_hook(leave)]
    return handles


def averages_table(events: list[Any], sort: str, rows: int) -> str:
    """A compact table of profiler averages: name, calls, CPU ms (total, self), device ms (total, self)."""
    events = sorted(events, key=lambda e: getattr(e, sort.replace("cuda", "device"), 0), reverse=True)[:rows]
    lines = [f"  {'name':<48} {'calls':>6} {'cpu total':>10} {'cpu self':>9} {'dev total':>10} {'dev self':>9}  (ms)"]
    for e in events:
        cpu_total, cpu_self = e.cpu_time_total / 1000, e.self_cpu_time_total / 1000
        device_total = getattr(e, "device_time_total", 0) / 1000
        device_self = getattr(e, "self_device_time_total", 0) / 1000
        times = f"{cpu_total:>10.2f} {cpu_self:>9.2f} {device_total:>10.2f} {device_self:>9.2f}"
        lines.append(f"  {e.key[:48]:<48} {e.count:>6} {times}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the table
TASKS = ("classification", "detection", "segmentation")
PATHS = ("loop (torchvision)", "Trainer (ours)", "inference (ours)", "profile (ours)", "data path alone")
VARIANTS = ("eager", "channels_last", "channels_last+compile")


def table_order(row: dict[str, Any]) -> tuple[int, ...]:
    """Rows by task; then training on memory (by variant, loop beside Trainer), JPEG, inference, profile, data."""
    section = 0 if row["data"] == "memory" and row["path"] in PATHS[:2] else 1 if row["path"] in PATHS[:2] else 2
    variant = VARIANTS.index(row["variant"]) if row["variant"] in VARIANTS else len(VARIANTS)
    if section == 0:
        return (TASKS.index(row["task"]), section, variant, PATHS.index(row["path"]))
    return (TASKS.index(row["task"]), section, PATHS.index(row["path"]), 0)


COLUMNS = ("task", "path", "variant", "data", "train img/s", "infer img/s", "data img/s", "peak GiB", "note")


def format_row(row: dict[str, Any]) -> str:
    return " | ".join(table_cells(row))


def table_cells(row: dict[str, Any]) -> list[str]:
    def number(key: str) -> str:
        value = row.get(key)
        return f"{value:,.0f}" if isinstance(value, float) and value >= 100 else f"{value:.1f}" if value else ""

    note = row.get("error") and f"ERROR {row['error']}" or row.get("skipped") and f"skipped: {row['skipped']}" or ""
    if "step_ms_profiled" in row:
        busy = f", device busy {row['device_busy']:.0%}" if row.get("device_busy") else ""
        note = f"one step {row['step_ms_profiled']:.0f} ms{busy} (profile printed below the table)"
    peak = f"{row['peak_gib']:.1f}" if "peak_gib" in row else ""
    return [row["task"], row["path"], row["variant"], row["data"], number("train_images_per_s"),
            number("infer_images_per_s"), number("data_images_per_s"), peak, note]  # fmt: skip


def markdown_table(cells: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in cells]
    return "\n".join(lines)


def text_table(cells: list[dict[str, Any]]) -> str:
    rows = [list(COLUMNS)] + [table_cells(row) for row in cells]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def machine(device: torch.device) -> dict[str, Any]:
    import lightning
    import torchvision

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
    }
    return info


# ------------------------------------------------------------------------------------------------------ main
def cpu_skip(plan: Plan, variant: str) -> str | None:
    """Why the CPU fallback leaves out a variant (None: it runs)."""
    if "compile" in variant and not plan.compile:
        return "inductor compile on CPU costs ~1 min per shape (the CPU fallback must stay under a minute)"
    if "channels_last" in variant and not plan.channels_last:
        return "channels_last is a GPU memory-format question; the CPU fallback times eager only"
    return None


def run_benchmark(device: torch.device, budget_s: float, out: Path | None) -> dict[str, Any]:
    """Run every cell of the plan for `device`; print the table; write JSON + markdown when `out` is given."""
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if plan.threads:
        # One thread on a (possibly shared) CPU: competing processes make multi-threaded steps stall unpredictably.
        torch.set_num_threads(plan.threads)
    try:
        return _run(plan, device, budget_s, out, start)
    finally:
        torch.set_num_threads(previous_threads)


def _run(plan: Plan, device: torch.device, budget_s: float, out: Path | None, start: float) -> dict[str, Any]:
    torch.backends.cudnn.benchmark = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        workdir = Path(tmp)
        bench = Bench(plan, device, workdir, budget_s)
        with Pool(min(16, os.cpu_count() or 1)) as pool:
            bench.data = {
                "classification": write_image_folder(workdir / "imagefolder", plan.classification_jpeg, pool),
                "detection": write_coco(workdir / "coco", plan.detection_jpeg, pool),
                "segmentation": write_voc(workdir / "voc", plan.segmentation_jpeg, pool),
            }
        generated_s = time.perf_counter() - start
        print(f"[gpu bench] data generated in {generated_s:.1f} s under {workdir}", flush=True)
        if not plan.cuda:
            why = "no CUDA device (CPU fallback)"
            bench.skipped.append(f"bf16-mixed: {why}; every cell runs fp32 at tiny sizes with {plan.backbone}")
        # Most important first: should the time budget run out, the compile cells (last) are the ones skipped.
        fast = "channels_last" if plan.channels_last else "eager"
        for task in TASKS:
            for variant in ("eager", "channels_last"):
                why = cpu_skip(plan, variant)
                if why:
                    for path in ("loop (torchvision)", "Trainer (ours)"):
                        bench.skip(task, path, variant, "memory", why)
                    continue
                bench.loop_cell(task, variant, "memory")
                bench.trainer_cell(task, variant, "memory")
            if task != "segmentation":  # the guard's per-step sync: device decision vs host read
                bench.trainer_cell(task, f"{fast}, host guard", "memory")
            bench.trainer_cell(task, fast, "jpeg")
            if task == "classification":
                bench.loop_cell(task, fast, "jpeg")
                if plan.cuda:
                    bench.trainer_cell(task, fast, "jpeg, GPU decode")
                else:
                    bench.skip(task, "Trainer (ours)", fast, "jpeg, GPU decode", "GPU decode needs CUDA")
            for variant in ("eager", "channels_last"):
                why = cpu_skip(plan, variant)
                if why:
                    bench.skip(task, "inference (ours)", variant, "memory", why)
                else:
                    bench.inference_cell(task, variant)
            if task != "classification":
                bench.profile(task)
        for task in TASKS:
            for workers in plan.workers:
                bench.data_cell(task, workers)
            if task == "classification":
                if plan.cuda:
                    for workers in plan.workers:
                        bench.data_cell(task, workers, decode_device="cuda")
                else:
                    bench.skip(task, "data path alone", "GPU decode", "jpeg", "GPU decode needs CUDA")
        for task in ("classification", "segmentation"):  # detection's heads have data-dependent shapes
            variant = "channels_last+compile"
            why = cpu_skip(plan, variant)
            for path, run_cell in (("loop (torchvision)", bench.loop_cell), ("Trainer (ours)", bench.trainer_cell)):
                if why:
                    bench.skip(task, path, variant, "memory", why)
                else:
                    run_cell(task, variant, "memory")
    bench.cells.sort(key=table_order)
    report = {
        "machine": machine(device),
        "plan": dataclasses.asdict(plan),
        "wall_s": round(time.perf_counter() - start, 1),
        "cells": bench.cells,
        "skipped": bench.skipped,
        "profiles": bench.profiles,
    }
    print_report(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
        out.with_suffix(".md").write_text(markdown_report(report))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return report


def header(report: dict[str, Any]) -> str:
    m, plan = report["machine"], report["plan"]
    return (
        f"{m['device']}, {m['cpu_count']} CPU cores; torch {m['torch']}, torchvision {m['torchvision']}, lightning "
        f"{m['lightning']}, Python {m['python']}; {m['date']}; {plan['precision']}, {plan['backbone']} backbones; "
        f"{plan['timed']} timed steps after {plan['warmup']} warmup; {report['wall_s']:.0f} s in all"
    )


def print_report(report: dict[str, Any]) -> None:
    out = io.StringIO()
    print(f"\n{header(report)}\n", file=out)
    print(text_table(report["cells"]), file=out)
    if report["skipped"]:
        print("\nskipped:", file=out)
        for line in report["skipped"]:
            print(f"  skipped {line}", file=out)
    for text in report["profiles"].values():
        print(f"\n{text}", file=out)
    print(out.getvalue(), flush=True)


def markdown_report(report: dict[str, Any]) -> str:
    parts = [f"{header(report)}\n", markdown_table(report["cells"])]
    if report["skipped"]:
        parts.append("\nSkipped:\n" + "\n".join(f"- {line}" for line in report["skipped"]))
    for text in report["profiles"].values():
        parts.append(f"\n```\n{text}\n```")
    return "\n".join(parts) + "\n"


def bench_gpu(sizes: Any, device: torch.device) -> dict[str, Any]:
    """The suite's entry (`benchmarks/run.py --only gpu --device cuda`): the full GPU plan; skipped on CPU."""
    if device.type != "cuda":
        return {"skipped": "GPU figures need --device cuda (`python benchmarks/gpu.py --device cpu`: the CPU fallback)"}
    report = run_benchmark(device, budget_s=450, out=None)
    return {"gpu": report["machine"]["device"], "cells": report["cells"], "profiles": report["profiles"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu"), help="writes OUT.json and OUT.md")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="cells starting after this many seconds are skipped (under 8 min in all)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: running the CPU fallback (tiny sizes, resnet18 backbones)")
        args.device = "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":
        print("CPU fallback: tiny sizes, fp32, resnet18 backbones; the figures only show that every cell runs.")
    report = run_benchmark(device, args.budget_s, args.out)
    return 1 if any("error" in cell for cell in report["cells"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
