"""GPU training throughput: images/s of ResNet-50 (bf16, channels_last), Faster R-CNN R50-FPN (AMP) and FCN R50.

Run in the suite: `python benchmarks/run.py --only gpu --device cuda`
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning_overhead import batch_loader, step_periods, task_and_batches
from timing import Sizes, median


def bench_gpu(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Training images/s on one GPU: ResNet-50 (bf16 + channels_last), Faster R-CNN R50-FPN (AMP), FCN R50."""
    if device.type != "cuda":
        return {"skipped": "GPU figures need --device cuda (a CUDA GPU); nothing measured on CPU"}
    import lightning as L

    from resnet_tasks.backbones import BackboneConfig

    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device)}
    setups = {
        "resnet50_classification_bf16_channels_last": ("classification", "bf16-mixed"),
        "faster_rcnn_r50_fpn_amp": ("detection", "16-mixed"),
        "fcn_r50_bf16": ("segmentation", "bf16-mixed"),
    }
    for label, (task, precision) in setups.items():
        steps = 25
        module, batches = task_and_batches(task, sizes, device, steps)
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
        trainer.fit(module, train_dataloaders=batch_loader(batches))
        first = batches[0]
        images = len(first[0]) if task == "detection" else int(first["image"].shape[0])
        step = median(step_periods(clock.starts, 5))
        result[label] = {"precision": precision, "batch_size": images, "step_s": step, "images_per_s": images / step}
        del trainer, module, batches
        torch.cuda.empty_cache()
    return result
