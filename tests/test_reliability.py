"""Bad input through the CLI: one clear message (exit 2, no traceback) or skip + count + report."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import COMMON_TRAINER_ARGS, assert_one_clear_error, make_image_folder, read_metrics

CONFIG = "configs/classification/imagenet_resnet50.yaml"
SMALL = ["--data.crop_size", "32", "--data.resize_size", "36", "--data.batch_size", "8", "--data.num_workers", "0",
         "--model.backbone.name", "resnet18", "--model.optimizer.lr", "0.01"]  # fmt: skip


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def folder_with_one_corrupt_train_image(tmp_path: Path) -> tuple[Path, Path]:
    root = make_image_folder(tmp_path / "data", per_class=12)
    bad = root / "train" / "red" / "red_003.jpg"
    _truncate(bad)
    return root, bad


def test_corrupt_training_image_is_skipped_counted_and_reported(
    run_cli, folder_with_one_corrupt_train_image: tuple[Path, Path], tmp_path: Path
) -> None:
    root, bad = folder_with_one_corrupt_train_image
    code, out, err = run_cli("fit", "--config", CONFIG, "--data.root", root, *SMALL, "--trainer.max_epochs", "1",
                             "--data.max_skipped_fraction", "0.05", "--trainer.default_root_dir", tmp_path / "run",
                             *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err
    assert "skipped 1 unreadable training image(s)" in out and str(bad) in out
    assert "top1" in read_metrics(out)


def test_too_many_corrupt_training_images_fail_the_epoch(
    run_cli, folder_with_one_corrupt_train_image: tuple[Path, Path], tmp_path: Path
) -> None:
    root, bad = folder_with_one_corrupt_train_image
    code, out, err = run_cli("fit", "--config", CONFIG, "--data.root", root, *SMALL, "--trainer.max_epochs", "1",
                             "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert_one_clear_error(code, err, str(bad), "max_skipped_fraction")


def test_corrupt_validation_image_is_an_error_naming_the_file(run_cli, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    bad = root / "val" / "green" / "green_001.jpg"
    bad.write_bytes(b"not an image at all")
    for workers in ("0", "1"):
        code, out, err = run_cli("validate", "--config", CONFIG, "--data.root", root, *SMALL,
                                 "--data.num_workers", workers, "--trainer.default_root_dir", tmp_path / "run",
                                 *COMMON_TRAINER_ARGS)  # fmt: skip
        assert_one_clear_error(code, err, str(bad))


def test_checkpoint_for_another_model_is_explained(run_cli, image_folder: Path, tmp_path: Path) -> None:
    code, out, err = run_cli("fit", "--config", CONFIG, "--data.root", image_folder, *SMALL,
                             "--trainer.max_steps", "1", "--trainer.default_root_dir", tmp_path / "run",
                             *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    # The CLI rebuilds the model from the checkpoint's hyper-parameters; in Python a different model is explained.
    from resnet_tasks import ClassificationTask
    from resnet_tasks.errors import UserError

    other = ClassificationTask(num_classes=3, backbone={"name": "resnet34"})
    with pytest.raises(UserError, match="does not fit.*missing.*resnet18"):
        other.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    four = make_image_folder(tmp_path / "four", classes=("a", "b", "c", "d"), per_class=2)
    code, out, err = run_cli("validate", "--config", CONFIG, "--data.root", four, *SMALL, "--ckpt_path", ckpt,
                             "--trainer.default_root_dir", tmp_path / "run3", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert_one_clear_error(code, err, "set up for 3 classes", "the data has 4 (a, b, c, d)", "--ckpt_path")


def test_missing_torchvision_weights_name_the_file_and_url(
    run_cli, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    code, out, err = run_cli("fit", "--config", CONFIG, "--data.root", image_folder, *SMALL,
                             "--model.backbone.weights", "ResNet18_Weights.IMAGENET1K_V1", "--trainer.max_steps", "1",
                             "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert_one_clear_error(code, err, url, str(tmp_path / "empty_torch_home"))


class _Payload:
    def __reduce__(self):  # pragma: no cover - must never run
        return (shutil.rmtree, ("/nonexistent-resnet-tasks-marker",))


def test_weights_file_that_would_run_code_is_refused(run_cli, image_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"conv1.weight": _Payload()}, handle)
    code, out, err = run_cli("fit", "--config", CONFIG, "--data.root", image_folder, *SMALL,
                             "--model.backbone.weights", path, "--trainer.max_steps", "1",
                             "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert_one_clear_error(code, err, str(path), "execute code")


def test_wrong_backbone_weights_file_gives_key_summary(run_cli, image_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    code, out, err = run_cli("fit", "--config", CONFIG, "--data.root", image_folder, *SMALL,
                             "--model.backbone.weights", path, "--trainer.max_steps", "1",
                             "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert_one_clear_error(code, err, str(path))


def test_out_of_memory_during_a_step_is_explained(
    run_cli, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet_tasks import ClassificationTask

    def out_of_memory(self: object, batch: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ClassificationTask, "training_losses", out_of_memory)
    code, out, err = run_cli("fit", "--config", CONFIG, "--data.root", image_folder, *SMALL, "--trainer.max_steps", "2",
                             "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 3 and "Traceback" not in err
    assert "out of GPU memory" in err and "--data.batch_size" in err


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=64)


def _copy_coco(shapes: Path, dest: Path) -> Path:
    shutil.copytree(shapes / "coco", dest)
    return dest


DETECTION = ["--config", "configs/quickstart/detection.yaml", "--data.num_workers", "0"]
SEGMENTATION = ["--config", "configs/quickstart/segmentation.yaml", "--data.num_workers", "0"]


def test_detection_dataset_problems_are_one_clear_message(run_cli, tiny_shapes: Path, tmp_path: Path) -> None:
    import json

    common = [*DETECTION, "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS]
    # 1. missing root, then a root without the COCO layout
    code, out, err = run_cli("validate", *common, "--data.root", tmp_path / "nope")
    assert_one_clear_error(code, err, str(tmp_path / "nope"), "--data.root")
    code, out, err = run_cli("validate", *common, "--data.root", tiny_shapes / "imagefolder")
    assert_one_clear_error(code, err, "instances_val2017.json")
    # 3. a truncated annotation file: file, line and column
    broken = _copy_coco(tiny_shapes, tmp_path / "broken_json")
    annotations = broken / "annotations" / "instances_val2017.json"
    annotations.write_text(annotations.read_text()[:300])
    code, out, err = run_cli("validate", *common, "--data.root", broken)
    assert_one_clear_error(code, err, str(annotations), "line 1, column")
    # 5. a category id that is not among the categories
    unknown = _copy_coco(tiny_shapes, tmp_path / "unknown_category")
    annotations = unknown / "annotations" / "instances_val2017.json"
    data = json.loads(annotations.read_text())
    data["annotations"][0]["category_id"] = 42
    annotations.write_text(json.dumps(data))
    code, out, err = run_cli("validate", *common, "--data.root", unknown)
    assert_one_clear_error(code, err, str(annotations), "category id 42")
    # 2. a corrupt image in evaluation: an error naming it (a metric over fewer images would be wrong)
    corrupt = _copy_coco(tiny_shapes, tmp_path / "corrupt_image")
    image = sorted((corrupt / "val2017").glob("*.jpg"))[0]
    _truncate(image)
    code, out, err = run_cli("validate", *common, "--data.root", corrupt)
    assert_one_clear_error(code, err, str(image))


def _copy_voc(shapes: Path, tmp_path: Path, image_sets: str) -> tuple[Path, Path, str]:
    """A writable copy of the shapes VOC layout: (root, VOC2012 folder, first val stem of `image_sets`)."""
    voc = tmp_path / "voc"
    shutil.copytree(shapes / "voc", voc)
    devkit = voc / "VOCdevkit" / "VOC2012"
    return voc, devkit, (devkit / "ImageSets" / image_sets / "val.txt").read_text().split()[0]


def test_segmentation_mask_problems_are_one_clear_message(run_cli, tiny_shapes: Path, tmp_path: Path) -> None:
    from PIL import Image

    voc, devkit, stem = _copy_voc(tiny_shapes, tmp_path, "Segmentation")
    mask_path = devkit / "SegmentationClass" / f"{stem}.png"
    with Image.open(mask_path) as mask:
        mask.resize((32, 32)).save(mask_path)
    code, out, err = run_cli("validate", *SEGMENTATION, "--data.root", voc,
                             "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert_one_clear_error(code, err, str(mask_path), "32x32")


def test_truncated_voc_xml_names_file_line_and_column(run_cli, tiny_shapes: Path, tmp_path: Path) -> None:
    voc, devkit, stem = _copy_voc(tiny_shapes, tmp_path, "Main")
    xml = devkit / "Annotations" / f"{stem}.xml"
    xml.write_text(xml.read_text()[:120])
    code, out, err = run_cli("validate", "--config", "configs/detection/voc_faster_rcnn_resnet50_fpn.yaml",
                             "--data.root", voc, "--data.train_split", "2012-train", "--data.val_split", "2012-val",
                             "--data.num_workers", "0", "--model.backbone.name", "resnet18",
                             "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert_one_clear_error(code, err, str(xml), "line")


def test_detection_and_segmentation_training_skip_unreadable_images(run_cli, tiny_shapes: Path, tmp_path: Path) -> None:
    coco = _copy_coco(tiny_shapes, tmp_path / "coco")
    voc = tmp_path / "voc"
    shutil.copytree(tiny_shapes / "voc", voc)
    bad_coco = sorted((coco / "train2017").glob("*.jpg"))[0]
    _truncate(bad_coco)
    stem = (voc / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    bad_voc = voc / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg"
    _truncate(bad_voc)
    for config, root, bad in ((DETECTION, coco, bad_coco), (SEGMENTATION, voc, bad_voc)):
        code, out, err = run_cli("fit", *config, "--data.root", root, "--data.batch_size", "2",
                                 "--data.max_skipped_fraction", "0.5", "--trainer.max_epochs", "1",
                                 "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS)  # fmt: skip
        assert code == 0, err
        assert "skipped 1 unreadable training image(s)" in out and str(bad) in out
