"""Lightning overhead: per-step time of each task under `Trainer.fit` vs a plain PyTorch loop, same module and batches.

Run in the suite: `python benchmarks/run.py --only lightning [--quick] [--device cuda]`
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from timing import Sizes, median, synchronize


def dense_batches(
    count: int,
    image_shape: tuple[int, ...],
    target_key: str,
    target_shape: tuple[int, ...],
    num_classes: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """`count` batches of random images with random class targets (labels or masks) under `target_key`."""
    return [
        {
            "image": torch.randn(*image_shape, generator=generator).to(device),
            target_key: torch.randint(0, num_classes, target_shape, generator=generator, dtype=dtype).to(device),
        }
        for _ in range(count)
    ]


def task_and_batches(task: str, sizes: Sizes, device: torch.device, count: int) -> tuple[Any, list[Any]]:
    """A task module (resnet18 on CPU, resnet50 on CUDA) and `count` pre-generated training batches."""
    from resnet_tasks.backbones import BackboneConfig
    from resnet_tasks.tasks.optim import SchedulerConfig

    backbone = BackboneConfig(name="resnet50" if device.type == "cuda" else "resnet18")
    scheduler = SchedulerConfig(name="cosine", interval="step")
    generator = torch.Generator().manual_seed(0)
    batches: list[Any] = []
    if task == "classification":
        from resnet_tasks.tasks.classification import ClassificationTask

        batch, size = sizes.classification if device.type == "cpu" else (64, 224)
        module = ClassificationTask(num_classes=10, backbone=backbone, scheduler=scheduler)
        batches = dense_batches(count, (batch, 3, size, size), "label", (batch,), 10, torch.int64, generator, device)
    elif task == "detection":
        from resnet_tasks.tasks.detection import DetectionTask

        batch, size = sizes.detection if device.type == "cpu" else (4, 800)
        module = DetectionTask(
            num_classes=4, backbone=backbone, scheduler=scheduler, min_size=size, max_size=int(size * 4 / 3)
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
        mask_shape = (batch, size, size)
        batches = dense_batches(count, (batch, 3, size, size), "mask", mask_shape, 5, torch.uint8, generator, device)
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


def batch_loader(batches: list[Any]) -> torch.utils.data.DataLoader:
    """A DataLoader that serves the pre-built batches in order, in this process."""
    return torch.utils.data.DataLoader(_InMemoryBatches(batches), batch_size=None, shuffle=False, num_workers=0)


def step_periods(starts: list[float], warmup: int) -> list[float]:
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
    module, batches = task_and_batches(task, sizes, device, steps)
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
        trainer.fit(module, train_dataloaders=batch_loader(batches))
        synchronize(device)
        a = step_periods(clock.starts, sizes.warmup_steps)
        optimizer = trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        del trainer

        # Side B: the hand-written loop, same module / optimizer / scheduler / loader.
        module.train()
        starts: list[float] = []
        gc.collect()
        for batch in batch_loader(batches):
            synchronize(device)
            starts.append(time.perf_counter())
            loss = _plain_loss(task, module, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        synchronize(device)
        b = step_periods(starts, sizes.warmup_steps)
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
    """The suite's entry: `lightning_overhead` of classification, detection and segmentation."""
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
