"""What `resnet-tasks export` traces: each task's evaluation model as a module from uint8 images to its outputs,
with the input example, dynamic axes and the preprocessing the graph does itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_tasks.compat import unwrap_compiled
from resnet_tasks.errors import UserError
from resnet_tasks.tasks.base import TaskBase
from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.detection import DetectionTask
from resnet_tasks.tasks.segmentation import SegmentationTask


class Normalize(nn.Module):
    """uint8 (N, 3, H, W) RGB -> float (pixels / 255 - mean) / std, as the evaluation transforms compute it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


class ClassificationGraph(nn.Module):
    """`images` uint8 (N, 3, H, W) -> `probs` (N, C): `ClassificationTask.forward` + softmax, as `predict_step`.

    The image is taken at the size given (the resize and crop of `predict` are the caller's, see the sidecar).
    """

    def __init__(self, task: ClassificationTask, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        # The task's modules, not its forward: channels_last, compile and TTA are training/evaluation-time options.
        self.backbone = unwrap_compiled(task.backbone)
        self.fc = unwrap_compiled(task.fc)

    def forward(self, images: Tensor) -> Tensor:
        features = list(self.backbone(self.normalize(images)).values())[-1]
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return self.fc(pooled).float().softmax(dim=1)


class SegmentationGraph(nn.Module):
    """`images` uint8 (N, 3, H, W) -> `mask` (N, H, W) class indices at the input size (argmax of the FCN logits)."""

    def __init__(self, task: SegmentationTask, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = unwrap_compiled(task.model)
        # A class map fits uint8 (masks hold at most 255 classes); a wider head keeps int64.
        self.mask_dtype = torch.uint8 if task.num_classes <= 255 else torch.int64

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(self.normalize(images), with_aux=False)["out"]
        return logits.argmax(dim=1).to(self.mask_dtype)


class DetectionGraph(nn.Module):
    """`images` uint8 (1, 3, H, W) -> `boxes` (K, 4) XYXY input pixels, `scores` (K,), `labels` (K,) category ids.

    torchvision's Faster R-CNN does its own resize (`min_size`/`max_size`), normalisation and mapping of the boxes
    back to the input size inside; the labels are mapped to the dataset's category ids by a constant table.
    """

    def __init__(self, task: DetectionTask) -> None:
        super().__init__()
        self.model = unwrap_compiled(task.model)
        ids = task.label_space.category_ids or range(task.num_classes)
        self.register_buffer("category_ids", torch.tensor(list(ids), dtype=torch.int64), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.model([images[0].float() / 255.0])[0]
        labels = self.category_ids.index_select(0, detections["labels"])
        return detections["boxes"], detections["scores"], labels


@dataclasses.dataclass
class GraphSpec:
    """What the exporter needs for one task: the module, an example input and the dynamic axes."""

    module: nn.Module
    example: Tensor
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def example_image(height: int, width: int, batch: int = 1, seed: int = 0) -> Tensor:
    """A deterministic uint8 RGB batch (N, 3, H, W) to trace the model with."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)


def graph_spec(task: TaskBase, preprocessing: Mapping[str, Any]) -> GraphSpec:
    """The exportable module of `task` with its input example and dynamic axes."""
    mean, std = preprocessing["mean"], preprocessing["std"]
    size = preprocessing.get("crop") or preprocessing.get("resize") or 64
    if isinstance(task, ClassificationTask):
        return GraphSpec(
            ClassificationGraph(task, mean, std),
            example_image(size, size),
            ["probs"],
            {"images": {0: "batch", 2: "height", 3: "width"}, "probs": {0: "batch"}},
        )
    if isinstance(task, SegmentationTask):
        return GraphSpec(
            SegmentationGraph(task, mean, std),
            example_image(size, size + size // 4),
            ["mask"],
            {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"}},
        )
    if isinstance(task, DetectionTask):
        side = int(preprocessing["model_resize"]["min_size"])
        return GraphSpec(
            DetectionGraph(task),
            example_image(side, side + side // 3),
            ["boxes", "scores", "labels"],
            {
                "images": {2: "height", 3: "width"},
                "boxes": {0: "detections"},
                "scores": {0: "detections"},
                "labels": {0: "detections"},
            },
        )
    raise UserError(f"resnet-tasks export does not know the task {type(task).__name__}.")


def model_preprocessing(task: TaskBase) -> dict[str, Any]:
    """The preprocessing a task's model does itself (detection: its own resize and mean/std), which replaces the
    data module's entries of the same names; nothing for the other tasks (the graph only normalises)."""
    if not isinstance(task, DetectionTask):
        return {}
    transform = task.model.transform
    min_size = transform.min_size[-1] if isinstance(transform.min_size, (list, tuple)) else transform.min_size
    return {
        "mean": [float(m) for m in transform.image_mean],
        "std": [float(s) for s in transform.image_std],
        "model_resize": {"min_size": int(min_size), "max_size": int(transform.max_size)},
    }


def default_preprocessing(task: TaskBase) -> dict[str, Any]:
    """The preprocessing of `task` without a data module: images as they are, ImageNet mean/std (for a model
    exported from Python; the command reads it from the config's data module)."""
    from resnet_tasks.data.base import BaseDataModule
    from resnet_tasks.data.classification import CLASSIFICATION_OUTPUT
    from resnet_tasks.data.detection import DETECTION_OUTPUT
    from resnet_tasks.data.segmentation import SEGMENTATION_OUTPUT

    outputs = {
        "classification": CLASSIFICATION_OUTPUT,
        "detection": DETECTION_OUTPUT,
        "segmentation": SEGMENTATION_OUTPUT,
    }
    output = {"output": outputs[task.task_name]}
    return {**BaseDataModule().eval_preprocessing(), **output, **model_preprocessing(task)}
