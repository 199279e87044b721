"""`resnet-tasks export`: ONNX files of all three tasks, from a 2-step quickstart checkpoint and from generated
torchvision-layout weights, run with onnxruntime and compared with PyTorch on image sizes not used at export;
a checkpoint exported without its dataset (the preprocessing stored at fit) and one written before checkpoints
stored it; docs/export.md's inference example, run as written; the one-line errors."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from resnet_tasks import ClassificationTask, DetectionTask, ImageFolderDataModule, SegmentationTask
from resnet_tasks.data.formats.voc_segmentation import ShapesSegmentationDataModule
from resnet_tasks.export import ONNX_OPSET, export_onnx
from resnet_tasks.labels import NO_CATEGORY_ID
from tests.conftest import COMMON_TRAINER_ARGS, make_image_folder, printed_path

REPO = Path(__file__).resolve().parents[1]
# A checkpoint written before checkpoints stored the evaluation preprocessing (and before the label space).
LEGACY_CHECKPOINT = REPO / "tests" / "data" / "segmentation_resnet20_v0.1.ckpt"
# task -> the layout of the bundled shapes its quickstart config reads
LAYOUTS = {"classification": "imagefolder", "detection": "coco", "segmentation": "voc"}
TASK_CLASSES = {"classification": ClassificationTask, "detection": DetectionTask, "segmentation": SegmentationTask}
# (N, H, W) of the parity checks: none is a size the exporter traced with (64x64, 64x80, 128x170).
UNSEEN_SIZES = {
    "classification": [(2, 48, 56), (1, 71, 93)],
    "segmentation": [(2, 48, 56), (1, 71, 93)],
    "detection": [(1, 90, 120), (1, 150, 110)],
}


def config(task: str) -> str:
    return str(REPO / "configs" / "quickstart" / f"{task}.yaml")


def cli(*args: object) -> str:
    """`resnet-tasks ARGS` in this process (for module fixtures, which cannot use capsys); returns stdout."""
    from resnet_tasks.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            assert exit_.code in (0, None), out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=64)


@pytest.fixture(scope="module")
def checkpoints(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-step quickstart checkpoint per task (tiny shapes, batch 2, no validation)."""
    runs = tmp_path_factory.mktemp("runs")
    paths = {}
    for task, layout in LAYOUTS.items():
        cli(
            "fit", "--config", config(task), "--data.root", shapes / layout, "--trainer.default_root_dir", runs / task,
            *COMMON_TRAINER_ARGS, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
            "--data.num_workers", "0", "--data.batch_size", "2",
        )  # fmt: skip
        paths[task] = runs / task / "checkpoints" / "last.ckpt"
        assert paths[task].is_file()
    return paths


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each checkpoint exported by the command, to its default place under --trainer.default_root_dir."""
    root = tmp_path_factory.mktemp("exports")
    paths = {}
    for task, checkpoint in checkpoints.items():
        out = cli(
            "export", "--config", config(task), "--ckpt_path", checkpoint, "--trainer.default_root_dir", root / task
        )
        paths[task] = printed_path(out, "model written: ")
        assert paths[task] == root / task / "lightning_logs" / "version_0" / "model.onnx"
        assert printed_path(out, "sidecar written: ") == Path(f"{paths[task]}.json")
    return paths


# ---------------------------------------------------------------------------------------------- parity
def random_images(n: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def normalized(images: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """What `predict`'s transforms feed the network: albumentations' Normalize of each HWC uint8 image."""
    normalize = A.Normalize(mean=preprocessing["mean"], std=preprocessing["std"], max_pixel_value=255.0)
    arrays = [normalize(image=image.permute(1, 2, 0).numpy())["image"] for image in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2)).float()


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_twins(ours: tuple[np.ndarray, ...], theirs: tuple[np.ndarray, ...], threshold: float) -> int:
    """Every detection in `ours` scoring >= threshold + 1e-3 has a twin in `theirs`: same category id, box within
    0.5 px, score within 1e-3. Returns how many were checked."""
    boxes, scores, labels = ours
    other_boxes, other_scores, other_labels = theirs
    checked = np.flatnonzero(scores >= threshold + 1e-3)
    for i in checked:
        twin = (
            (other_labels == labels[i])
            & (np.abs(other_boxes - boxes[i]).max(axis=1) <= 0.5)
            & (np.abs(other_scores - scores[i]) <= 1e-3)
        )
        assert twin.any(), f"no twin for box {boxes[i]} score {scores[i]:.4f} category {labels[i]}"
    return len(checked)


def check_parity(task: str, path: Path, reference: Callable[[torch.Tensor], tuple[np.ndarray, ...]]) -> None:
    """onnxruntime vs `reference` (PyTorch) on the unseen sizes, with the issue's tolerances."""
    preprocessing = json.loads(Path(f"{path}.json").read_text())["preprocessing"]
    runtime = session(path)
    threshold = 0.05  # the configs' box_score_thresh
    for seed, (n, height, width) in enumerate(UNSEEN_SIZES[task]):
        images = random_images(n, height, width, seed)
        outputs = runtime.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = reference(normalized(images, preprocessing) if task != "detection" else images)
        if task == "classification":
            assert outputs[0].shape == expected[0].shape
            assert np.abs(outputs[0] - expected[0]).max() <= 1e-4
        elif task == "segmentation":
            assert outputs[0].shape == (n, height, width) and outputs[0].dtype == np.uint8
            assert (outputs[0] == expected[0]).mean() >= 0.999
        else:
            assert assert_twins(expected, tuple(outputs), threshold) > 0  # the check is not vacuous
            assert_twins(tuple(outputs), expected, threshold)
            boxes = outputs[0]  # XYXY in the input's pixels
            assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


def task_reference(task: str, model: torch.nn.Module) -> Callable[[torch.Tensor], tuple[np.ndarray, ...]]:
    """What the task gives in PyTorch: for normalised images (classification, segmentation) or uint8 ones
    (detection: /255 as its data module does; labels mapped to category ids as its writer does)."""
    model.eval()
    if task == "classification":
        return lambda x: (model(x).softmax(dim=1).numpy(),)
    if task == "segmentation":
        return lambda x: (model(x).argmax(dim=1).numpy(),)

    def detect(images: torch.Tensor) -> tuple[np.ndarray, ...]:
        [found] = model([images[0].float() / 255.0])
        labels = model.label_space.to_category_ids(found["labels"])
        return found["boxes"].numpy(), found["scores"].numpy(), labels.numpy()

    return detect


@pytest.mark.parametrize("task", list(LAYOUTS))
def test_checkpoint_export_runs_in_onnxruntime_like_pytorch(
    task: str, exported: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    path = exported[task]
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == ONNX_OPSET
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    info = json.loads(Path(f"{path}.json").read_text())
    assert json.loads(metadata["class_names"]) == info["class_names"]
    assert json.loads(metadata["preprocessing"]) == info["preprocessing"]
    runtime = session(path)
    [images] = runtime.get_inputs()
    assert (images.name, images.type) == ("images", "tensor(uint8)")
    assert [output.name for output in runtime.get_outputs()] == info["outputs"]
    task_model = TASK_CLASSES[task].load_from_checkpoint(checkpoints[task], map_location="cpu")
    assert info["class_names"] == list(task_model.label_space.class_names)
    if task == "detection":
        # the shapes' COCO ids (labels in the file are these); the background has none
        assert info["category_ids"] == [NO_CATEGORY_ID, 1, 3, 7]
        assert info["preprocessing"]["model_resize"] == {"min_size": 128, "max_size": 128}
    if task == "classification":
        assert (info["preprocessing"]["resize"], info["preprocessing"]["crop"]) == (64, 64)
    check_parity(task, path, task_reference(task, task_model))


def test_compile_and_channels_last_are_ignored(
    exported: dict[str, Path], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A model set up for speed (torch.compile in place, NHWC weights) exports the plain eval graph."""
    task = ClassificationTask.load_from_checkpoint(checkpoints["classification"], compile=True, channels_last=True)
    task.setup("predict")  # where fit/predict apply the speed options
    path = export_onnx(task, tmp_path / "model.onnx")
    images = random_images(2, 40, 52).numpy()
    [fast] = session(path).run(None, {"images": images})
    [plain] = session(exported["classification"]).run(None, {"images": images})
    assert np.abs(fast - plain).max() <= 1e-5


# ---------------------------------------------------------------------------------------------- torchvision layout
def torchvision_model(task: str) -> torch.nn.Module:
    """torchvision's own classes, shaped like the quickstart configs' ResNet-18 models, with seeded random weights."""
    torch.manual_seed(0)
    if task == "classification":
        return torchvision.models.resnet18(num_classes=3)
    if task == "segmentation":  # FCN at output stride 32 (torchvision's BasicBlock has no dilation)
        body = torchvision.models._utils.IntermediateLayerGetter(
            torchvision.models.resnet18(), return_layers={"layer4": "out", "layer3": "aux"}
        )
        return FCN(body, FCNHead(512, 4), FCNHead(256, 4))
    resnet = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    pyramid = BackboneWithFPN(
        resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [64, 128, 256, 512], 64, extra_blocks=LastLevelMaxPool()
    )
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((1.0,),) * 5)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        pyramid, num_classes=4, min_size=128, max_size=128, rpn_anchor_generator=anchors, box_roi_pool=pooler,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
    )  # fmt: skip


@pytest.mark.parametrize("task", list(LAYOUTS))
def test_torchvision_layout_weights_export_matches_torchvision(
    task: str, shapes: Path, run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = torchvision_model(task).eval()
    weights = tmp_path / f"{task}.pth"
    torch.save(reference.state_dict(), weights)
    calls = []
    original = torch.onnx.export

    @functools.wraps(original)  # keeps the signature the command checks for the `dynamo` switch
    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    extra = ["--model.backbone.output_stride", "32"] if task == "segmentation" else []
    code, out, err = run_cli(
        "export", "--config", config(task), "--data.root", shapes / LAYOUTS[task], "--model.weights", weights,
        *extra, "--out", tmp_path / "model.onnx",
    )  # fmt: skip
    assert code == 0, err
    path = printed_path(out, "model written: ")
    assert path == tmp_path / "model.onnx"
    # The TorchScript-based exporter, explicitly, at the pinned opset.
    assert [(call["dynamo"], call["opset_version"]) for call in calls] == [(False, ONNX_OPSET)]
    info = json.loads(Path(f"{path}.json").read_text())
    assert info["source"] == str(weights)
    if task == "classification":
        check_parity(task, path, lambda x: (reference(x).softmax(dim=1).numpy(),))
    elif task == "segmentation":
        check_parity(task, path, lambda x: (reference(x)["out"].argmax(dim=1).numpy(),))
    else:
        ids = torch.tensor(info["category_ids"])
        assert info["category_ids"] == [NO_CATEGORY_ID, 1, 3, 7]  # the weights give 4 outputs; the data names them

        def detect(images: torch.Tensor) -> tuple[np.ndarray, ...]:
            [found] = reference([images[0].float() / 255.0])
            return found["boxes"].numpy(), found["scores"].numpy(), ids[found["labels"]].numpy()

        check_parity(task, path, detect)


# ---------------------------------------------------------------------------------------------- without the dataset
def exported_info(path: Path) -> tuple[dict, dict]:
    """The ONNX metadata (JSON values decoded) and the sidecar of an exported file."""
    metadata = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    decoded = {key: value if key == "task" else json.loads(value) for key, value in metadata.items()}
    return decoded, json.loads(Path(f"{path}.json").read_text())


def test_checkpoint_exports_without_its_dataset(run_cli, tmp_path: Path) -> None:
    """fit stores the data module's evaluation preprocessing in the checkpoint; export reads it there, so the
    dataset (here moved away after fit) is not needed, and the metadata is what the data module gave. A checkpoint
    that stores none needs the data module: without its dataset, one line says so."""
    root = make_image_folder(tmp_path / "folder", per_class=2, size=(24, 28))
    data_args = ["--data", "resnet_tasks.ImageFolderDataModule", "--data.root", root, "--data.resize_size", "40",
                 "--data.crop_size", "32", "--data.num_workers", "0", "--data.batch_size", "2"]  # fmt: skip
    code, _, err = run_cli(
        "fit", "--config", config("classification"), *data_args, "--model.backbone.name", "resnet20",
        "--trainer.default_root_dir", tmp_path / "run", *COMMON_TRAINER_ARGS, "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
    )  # fmt: skip
    assert code == 0, err
    expected = ImageFolderDataModule(root=str(root), resize_size=40, crop_size=32).eval_preprocessing()
    assert (expected["resize"], expected["crop"]) == (40, 32)
    shutil.move(root, tmp_path / "elsewhere")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    export = ["export", "--config", config("classification"), *data_args, "--out", tmp_path / "model.onnx"]
    code, out, err = run_cli(*export, "--ckpt_path", checkpoint)
    assert code == 0, err
    metadata, info = exported_info(printed_path(out, "model written: "))
    assert metadata["preprocessing"] == info["preprocessing"] == expected
    assert metadata["class_names"] == info["class_names"] == ["blue", "green", "red"]

    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del content["resnet_tasks"]["preprocessing"]  # as written before checkpoints stored it
    torch.save(content, tmp_path / "older.ckpt")
    code, _, err = run_cli(*export, "--ckpt_path", tmp_path / "older.ckpt")
    line = one_error_line(code, err)
    assert f"{tmp_path / 'older.ckpt'} stores none" in line and str(root) in line


def test_torchvision_weights_export_without_the_dataset_takes_their_preprocessing(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ImageNet weights export with the ImageNet recipe where no ImageNet is on disk: the sidecar holds the
    preprocessing the weights were published with (`weights.transforms()`) and their 1000 class names."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    code, out, err = run_cli(
        "export", "--config", REPO / "configs" / "classification" / "imagenet_resnet50.yaml",
        "--model.backbone.name", "resnet18", "--model.weights", "ResNet18_Weights.IMAGENET1K_V1",
        "--data.root", tmp_path / "no_imagenet_here", "--out", tmp_path / "resnet18.onnx",
    )  # fmt: skip
    assert code == 0, err
    info = json.loads((tmp_path / "resnet18.onnx.json").read_text())
    preset = weights.transforms()
    assert {key: info["preprocessing"][key] for key in ("resize", "crop", "mean", "std")} == {
        "resize": preset.resize_size[0], "crop": preset.crop_size[0], "mean": preset.mean, "std": preset.std,
    }  # fmt: skip
    assert len(info["class_names"]) == 1000 and info["class_names"][:2] == weights.meta["categories"][:2]
    check_parity("classification", tmp_path / "resnet18.onnx", lambda x: (reference(x).softmax(dim=1).numpy(),))


def test_checkpoint_written_before_it_stored_preprocessing_takes_the_data_modules(run_cli, tmp_path: Path) -> None:
    """tests/data's checkpoint predates the stored preprocessing: the config's data module gives it (VOC
    segmentation reads its dataset only when it loads data, so none is needed)."""
    missing = tmp_path / "missing"
    code, out, err = run_cli(
        "export", "--config", config("segmentation"), "--ckpt_path", LEGACY_CHECKPOINT, "--data.root", missing,
        "--out", tmp_path / "model.onnx",
    )  # fmt: skip
    assert code == 0, err
    metadata, _ = exported_info(printed_path(out, "model written: "))
    assert metadata["preprocessing"] == ShapesSegmentationDataModule(root=str(missing)).eval_preprocessing()


# ------------------------------------------------------------------------------------------------ the docs' example
def readme_example() -> str:
    """The one Python block of docs/export.md (the inference example)."""
    [block] = re.findall(r"```py(?:thon)?\n(.*?)```", (REPO / "docs" / "export.md").read_text(), flags=re.S)
    return block


@pytest.mark.parametrize("task", list(LAYOUTS))
def test_readme_inference_example_runs(
    task: str, exported: dict[str, Path], shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    images = {
        "classification": sorted((shapes / "imagefolder" / "val").glob("*/*.jpg")),
        "detection": sorted((shapes / "coco" / "val2017").glob("*.jpg")),
        "segmentation": sorted((shapes / "voc").rglob("JPEGImages/*.jpg")),
    }[task]
    photo = images[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["infer.py", str(exported[task]), str(photo)])
    exec(compile(readme_example(), "docs/export.md", "exec"), {"__name__": "__main__"})
    names = json.loads(Path(f"{exported[task]}.json").read_text())["class_names"]
    if task == "classification":
        printed = capsys.readouterr().out.strip().splitlines()
        assert len(printed) == min(5, len(names)) and all(line.split()[0] in names for line in printed)
    elif task == "segmentation":
        mask = np.asarray(Image.open("mask.png"))
        assert mask.shape == np.asarray(Image.open(photo)).shape[:2] and mask.max() < len(names)
    else:
        assert Image.open("boxes.png").size == Image.open(photo).size


# ---------------------------------------------------------------------------------------------- errors
def one_error_line(code: int, err: str) -> str:
    """The CLI's `error: ...` line, after checking the exit status and that no traceback was printed."""
    assert code == 2 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def test_unknown_format_is_one_line(run_cli, checkpoints: dict[str, Path]) -> None:
    code, _, err = run_cli(
        "export", "--config", config("classification"), "--ckpt_path", checkpoints["classification"],
        "--format", "torchscript",
    )  # fmt: skip
    assert "Unknown --format 'torchscript'" in one_error_line(code, err)


def test_checkpoint_of_another_task_is_one_line(run_cli, checkpoints: dict[str, Path]) -> None:
    code, _, err = run_cli("export", "--config", config("classification"), "--ckpt_path", checkpoints["detection"])
    line = one_error_line(code, err)
    assert "written by the detection task" in line and "configs/quickstart/detection.yaml" in line


def test_missing_extra_names_the_pip_command(run_cli, checkpoints: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    code, _, err = run_cli("export", "--config", config("classification"), "--ckpt_path", checkpoints["classification"])
    assert 'pip install "resnet-tasks[export]"' in one_error_line(code, err)


def test_nothing_to_export_is_one_line(run_cli) -> None:
    code, _, err = run_cli("export", "--config", config("segmentation"))
    assert "--ckpt_path CKPT" in one_error_line(code, err)


def test_a_torch_without_the_torchscript_exporter_is_one_line(
    run_cli, checkpoints: dict[str, Path], monkeypatch
) -> None:
    def export_without_dynamo_switch(model: object, args: tuple = (), f: object = None, **options: object) -> None:
        raise AssertionError("not reached: the command checks the signature first")

    monkeypatch.setattr(torch.onnx, "export", export_without_dynamo_switch)
    code, _, err = run_cli("export", "--config", config("classification"), "--ckpt_path", checkpoints["classification"])
    assert "dynamo=False" in one_error_line(code, err)
