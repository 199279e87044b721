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

from resnet_tasks.data.base import BaseDataModule
from resnet_tasks.data.classification import (
    ImageFolderDataModule,
    ImageNetDataModule,
    ShapesClassificationDataModule,
)
from resnet_tasks.data.formats.cifar import CIFARDataModule
from resnet_tasks.data.formats.coco import CocoDetectionDataModule, ShapesDetectionDataModule
from resnet_tasks.data.formats.coco_segmentation import CocoSegmentationDataModule
from resnet_tasks.data.formats.voc import VOCDetectionDataModule
from resnet_tasks.data.formats.voc_segmentation import ShapesSegmentationDataModule, VOCSegmentationDataModule
from resnet_tasks.errors import UserError
from tests.conftest import (
    make_detection_voc,
    make_segmentation_voc,
    make_tiny_coco,
    make_tiny_coco_segmentation,
    write_cifar10,
)

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
        CIFARDataModule: {"root": str(write_cifar10(base / "cifar"))},
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


# What `export` wrote into the ONNX sidecar for each quickstart config before the data modules owned it: the data
# module's evaluation preprocessing must stay exactly this (detection's `model_resize` is the model's setting).
BASE_PREPROCESSING = {
    "input": "images: uint8 RGB (N, 3, H, W), 0..255",
    "resize": None,
    "crop": None,
    "interpolation": "bilinear (OpenCV cv2.resize INTER_LINEAR: no antialiasing)",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "normalized_in_model": True,
    "model_resize": None,
}
CLASSIFICATION_OUTPUT = "probs: (N, C) float32 softmax probabilities, C = len(class_names)"
QUICKSTART_PREPROCESSING = {
    "classification": {"resize": 64, "crop": 64, "output": CLASSIFICATION_OUTPUT},
    "degradation": {"resize": 32, "crop": 32, "output": CLASSIFICATION_OUTPUT},
    "detection": {
        "output": "boxes: (K, 4) float32 XYXY in input pixels; scores: (K,) float32; labels: (K,) int64 dataset "
        "category ids (see category_ids); batch of 1 image, any height and width"
    },
    "segmentation": {
        "output": "mask: (N, H, W) class indices at the input size. predict resizes the logits back to the original "
        "size before the argmax; resizing this mask with nearest neighbour differs only along class borders."
    },
}


@pytest.mark.parametrize("name", sorted(QUICKSTART_PREPROCESSING))
def test_quickstart_data_modules_own_their_eval_preprocessing(name: str) -> None:
    import yaml

    import resnet_tasks

    data = yaml.safe_load(Path(f"configs/quickstart/{name}.yaml").read_text())["data"]
    module = getattr(resnet_tasks, data["class_path"].rsplit(".", 1)[-1])(**data.get("init_args", {}))
    preprocessing = module.eval_preprocessing()
    assert preprocessing == {**BASE_PREPROCESSING, **QUICKSTART_PREPROCESSING[name]}
    assert list(preprocessing) == [*BASE_PREPROCESSING, "output"]  # the sidecar's key order


def test_eval_preprocessing_follows_the_module_settings(roots: dict[type, dict[str, Any]]) -> None:
    cifar = CIFARDataModule(**roots[CIFARDataModule], variant=10).eval_preprocessing()
    assert (cifar["resize"], cifar["crop"], cifar["mean"]) == (32, 32, [0.4914, 0.4822, 0.4465])
    folder = ImageFolderDataModule(**roots[ImageFolderDataModule], resize_size=40, crop_size=36, mean=(0.5, 0.5, 0.5))
    assert folder.eval_preprocessing()["resize"] == 40 and folder.eval_preprocessing()["crop"] == 36
    assert folder.eval_preprocessing()["mean"] == [0.5, 0.5, 0.5]
    voc = VOCSegmentationDataModule(**roots[VOCSegmentationDataModule]).eval_preprocessing()
    assert voc["resize"] == 520 and voc["crop"] is None


def test_every_data_module_follows_the_one_loader_pattern() -> None:
    """The base builds every loader; a data module declares datasets, collate and batch samplers only."""
    import resnet_tasks

    loaders = {"train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader", "dataset"}
    modules = [getattr(resnet_tasks, name) for name in resnet_tasks.__all__ if name.endswith("DataModule")]
    assert len(modules) >= 12
    for module in modules:
        assert issubclass(module, BaseDataModule), module
        for klass in module.__mro__[: module.__mro__.index(BaseDataModule)]:
            assert not loaders & set(vars(klass)), f"{klass.__name__} overrides {loaders & set(vars(klass))}"


def test_a_training_split_smaller_than_one_batch_is_one_line(image_folder: Path) -> None:
    """drop_last would leave no training batch and Lightning would stop at once ("No training batches")."""
    data = ImageFolderDataModule(root=str(image_folder), batch_size=10_000, num_workers=0)
    data.setup("fit")
    with pytest.raises(UserError, match=r"images make no full batch of --data.batch_size 10000 \(per device\)"):
        data.train_dataloader()
    assert len(ImageFolderDataModule(root=str(image_folder), batch_size=2, num_workers=0).train_dataloader()) > 0
