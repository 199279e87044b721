"""Every data module's `--data.*` keys: all listed by --help and --print_config, each printed default the one used.

Subclasses state only the defaults they change and pass the rest on with **kwargs; jsonargparse resolves the
chain. A pass-through that printed a parent's default where a subclass changed it would fail here.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from jsonargparse import ArgumentParser

from resnet_tasks.data.classification import (
    CIFARDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    ShapesClassificationDataModule,
)
from resnet_tasks.data.coco import CocoDetectionDataModule, ShapesDetectionDataModule
from resnet_tasks.data.coco_segmentation import CocoSegmentationDataModule
from resnet_tasks.data.common import BaseDataModule
from resnet_tasks.data.voc import VOCDetectionDataModule
from resnet_tasks.data.voc_segmentation import ShapesSegmentationDataModule, VOCSegmentationDataModule
from tests.test_classification import _write_cifar10
from tests.test_coco_segmentation import make_tiny_coco_segmentation
from tests.test_detection_data import make_tiny_coco
from tests.test_detection_data import make_tiny_voc as make_detection_voc
from tests.test_segmentation_data import make_tiny_voc as make_segmentation_voc

# Keys whose value lives elsewhere than an attribute of the same name.
NOT_ATTRIBUTES = {"class_names"}  # -> label_space


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> dict[type, dict[str, Any]]:
    base = tmp_path_factory.mktemp("roots")
    return {
        ShapesDetectionDataModule: {},
        ShapesSegmentationDataModule: {},
        ShapesClassificationDataModule: {},
        CocoDetectionDataModule: {"root": str(make_tiny_coco(base / "coco"))},
        VOCDetectionDataModule: {"root": str(make_detection_voc(base / "voc_detection"))},
        VOCSegmentationDataModule: {"root": str(make_segmentation_voc(base / "voc_segmentation"))},
        ImageFolderDataModule: {"root": str(image_folder)},
        ImageNetDataModule: {"root": str(image_folder)},
        CIFARDataModule: {"root": str(_write_cifar10(base / "cifar"))},
        CocoSegmentationDataModule: {"root": str(make_tiny_coco_segmentation(base / "coco_segmentation"))},
    }


def _keys_in_signature_chain(cls: type) -> set[str]:
    """The init parameters of `cls` and of every base it passes **kwargs on to, minus those a subclass fixes."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        if klass is BaseDataModule or (issubclass(klass, BaseDataModule) and "__init__" in vars(klass)):
            parameters = inspect.signature(klass.__init__).parameters.values()
            keys |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if klass is BaseDataModule:
            break
    keys.discard("self")
    if cls is ShapesSegmentationDataModule:
        keys.discard("class_names")  # fixed to background + the shapes
    return keys


def _same(printed: Any, used: Any) -> bool:
    if isinstance(used, Path):
        return Path(printed) == used
    if isinstance(used, (tuple, list)):
        return list(printed) == list(used)
    return printed == used


@pytest.mark.parametrize(
    "cls",
    [ShapesDetectionDataModule, ShapesSegmentationDataModule, ShapesClassificationDataModule, CocoDetectionDataModule,
     VOCDetectionDataModule, VOCSegmentationDataModule, ImageFolderDataModule, ImageNetDataModule, CIFARDataModule,
     CocoSegmentationDataModule],
    ids=lambda cls: cls.__name__,
)  # fmt: skip
def test_every_key_is_listed_and_its_printed_default_is_used(cls: type, roots: dict[type, dict[str, Any]]) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    printed = parser.get_defaults()["data"].as_dict()
    assert set(printed) == _keys_in_signature_chain(cls)
    help_text = parser.format_help()
    assert all(f"--data.{key}" in help_text for key in printed)
    given = roots[cls]
    module = cls(**given)
    for key, default in printed.items():
        if key in given or default is None:
            continue
        if key in NOT_ATTRIBUTES:
            assert module.label_space is not None
            continue
        used = getattr(module, key)
        assert _same(default, used), f"{cls.__name__}.{key}: printed {default!r}, used {used!r}"
