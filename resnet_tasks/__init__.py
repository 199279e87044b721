"""resnet-tasks: one ResNet-family backbone, three heads (classification, detection, segmentation)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use: `import resnet_tasks` stays cheap)
_EXPORTS = {
    "build_backbone": "resnet_tasks.backbones",
    "list_backbones": "resnet_tasks.backbones",
    "ClassificationTask": "resnet_tasks.tasks.classification",
    "DetectionTask": "resnet_tasks.tasks.detection",
    "SegmentationTask": "resnet_tasks.tasks.segmentation",
    "ImageFolderDataModule": "resnet_tasks.data.classification",
    "ImageNetDataModule": "resnet_tasks.data.classification",
    "CIFARDataModule": "resnet_tasks.data.formats.cifar",
    "ShapesClassificationDataModule": "resnet_tasks.data.classification",
    "CocoDetectionDataModule": "resnet_tasks.data.formats.coco",
    "ShapesDetectionDataModule": "resnet_tasks.data.formats.coco",
    "VOCDetectionDataModule": "resnet_tasks.data.formats.voc",
    "YoloDetectionDataModule": "resnet_tasks.data.formats.yolo",
    "VOCSegmentationDataModule": "resnet_tasks.data.formats.voc_segmentation",
    "ShapesSegmentationDataModule": "resnet_tasks.data.formats.voc_segmentation",
    "CocoSegmentationDataModule": "resnet_tasks.data.formats.coco_segmentation",
    "SegmentationFolderDataModule": "resnet_tasks.data.formats.folders",
    "CsvClassificationDataModule": "resnet_tasks.data.formats.csv",
    "StreamingClassificationDataModule": "resnet_tasks.data.streaming",
    "StreamingDetectionDataModule": "resnet_tasks.data.streaming",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'resnet_tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
