"""`resnet-tasks export`: a trained model as an ONNX file that runs without this package (onnxruntime + numpy).

The file takes `images`, uint8 RGB (N, 3, H, W), and normalises inside. Its class names and the evaluation
preprocessing `predict` applies travel in the ONNX metadata (`class_names`, `preprocessing`, JSON strings) and in
a sidecar `<file>.json`. Export uses torch's TorchScript-based ONNX exporter (`dynamo=False`): torch's default
(dynamo) exporter cannot export torchvision's Faster R-CNN (data-dependent shapes in `batched_nms`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace
from resnet_tasks.tasks.base import CHECKPOINT_KEY, TaskBase, no_weights
from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.detection import DetectionTask
from resnet_tasks.tasks.segmentation import SegmentationTask

FORMATS = ("onnx",)
# The opset every export is written with unless --opset says otherwise (tested; onnxruntime >= 1.18 runs it).
ONNX_OPSET = 17
# torchvision's detection ops (RoIAlign, NonMaxSuppression) need 11; the TorchScript-based exporter stops at 20.
OPSET_RANGE = (11, 20)
EXPORT_EXTRA = 'pip install "resnet-tasks[export]"'
# The torch release this exporter was tested with (named in the error if a later torch drops dynamo=False).
TESTED_TORCH = "2.14"
DEFAULT_FILE_NAME = "model.onnx"


# ---------------------------------------------------------------------------------------------- the graphs
def eager(module: nn.Module) -> nn.Module:
    """The plain module behind a `torch.compile` wrapper (export traces the eager model; `compile` is ignored)."""
    return getattr(module, "_orig_mod", module)


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
        self.backbone = eager(task.backbone)
        self.fc = eager(task.fc)

    def forward(self, images: Tensor) -> Tensor:
        features = list(self.backbone(self.normalize(images)).values())[-1]
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return self.fc(pooled).float().softmax(dim=1)


class SegmentationGraph(nn.Module):
    """`images` uint8 (N, 3, H, W) -> `mask` (N, H, W) class indices at the input size (argmax of the FCN logits)."""

    def __init__(self, task: SegmentationTask, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = eager(task.model)
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
        self.model = eager(task.model)
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


# ---------------------------------------------------------------------------------------------- preprocessing
def preprocessing_of(task: TaskBase, data: Mapping[str, Any] | None = None, data_class: type | None = None) -> dict:
    """The evaluation preprocessing `predict` applies for `task`, from the data module's init arguments.

    Keys: `resize` (shorter side to this many pixels, the other side floor(side * resize / shorter side); None:
    as is), `crop` (centre crop of this square size, top = (H - crop) // 2; None: none), `interpolation`,
    `mean`/`std` (applied inside the model to pixels / 255), `model_resize` (detection: the model's own
    `min_size`/`max_size` resize, inside the graph), `output` (what the output means).
    """
    from resnet_tasks.data import transforms as presets

    data = dict(data or {})
    result: dict[str, Any] = {
        "input": "images: uint8 RGB (N, 3, H, W), 0..255",
        "resize": None,
        "crop": None,
        "interpolation": "bilinear (OpenCV cv2.resize INTER_LINEAR: no antialiasing)",
        "mean": list(data.get("mean") or presets.IMAGENET_MEAN),
        "std": list(data.get("std") or presets.IMAGENET_STD),
        "normalized_in_model": True,
        "model_resize": None,
    }
    if isinstance(task, ClassificationTask):
        from resnet_tasks.data.classification import CIFARDataModule

        if data_class is not None and issubclass(data_class, CIFARDataModule):
            cifar100 = int(data.get("variant") or 10) == 100
            result.update(resize=32, crop=32)
            result["mean"] = list(presets.CIFAR100_MEAN if cifar100 else presets.CIFAR10_MEAN)
            result["std"] = list(presets.CIFAR100_STD if cifar100 else presets.CIFAR10_STD)
        elif "resize_size" in data:
            result["resize"] = int(data["resize_size"])
            result["crop"] = int(data.get("eval_crop_size") or data.get("crop_size") or data["resize_size"])
        result["output"] = "probs: (N, C) float32 softmax probabilities, C = len(class_names)"
    elif isinstance(task, SegmentationTask):
        eval_size = data.get("eval_size", 520 if data_class is not None else None)
        result["resize"] = None if eval_size is None else int(eval_size)
        result["output"] = (
            "mask: (N, H, W) class indices at the input size. predict resizes the logits back to the original "
            "size before the argmax; resizing this mask with nearest neighbour differs only along class borders."
        )
    elif isinstance(task, DetectionTask):
        transform = task.model.transform
        result["mean"] = [float(m) for m in transform.image_mean]
        result["std"] = [float(s) for s in transform.image_std]
        min_size = transform.min_size[-1] if isinstance(transform.min_size, (list, tuple)) else transform.min_size
        result["model_resize"] = {"min_size": int(min_size), "max_size": int(transform.max_size)}
        result["output"] = (
            "boxes: (K, 4) float32 XYXY in input pixels; scores: (K,) float32; labels: (K,) int64 dataset "
            "category ids (see category_ids); batch of 1 image, any height and width"
        )
    return result


# ---------------------------------------------------------------------------------------------- export
def require_onnx() -> Any:
    """The `onnx` package, or a UserError naming the extra to install."""
    try:
        return importlib.import_module("onnx")
    except ImportError:
        raise UserError(f"Exporting to ONNX needs the onnx package: {EXPORT_EXTRA}") from None


def require_torchscript_exporter() -> None:
    """Stop with a clear message when this torch no longer has the TorchScript-based ONNX exporter."""
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise _exporter_gone(None)


def _exporter_gone(error: BaseException | None) -> UserError:
    detail = f" ({type(error).__name__}: {str(error).splitlines()[0]})" if error is not None else ""
    return UserError(
        f"torch {torch.__version__} has no TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False))"
        f"{detail}; resnet-tasks export needs it for torchvision's detection models. Install the torch it was "
        f'tested with: pip install "torch=={TESTED_TORCH}.*".'
    )


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the tracer's and the legacy exporter's warnings: both are expected for these models."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated.*")
        # torchvision's tracing branches build tensors from traced sizes (harmless: the sizes stay dynamic).
        warnings.filterwarnings("ignore", message="To copy construct from a tensor.*")
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing.*")
        yield


@contextlib.contextmanager
def _eager_modules(module: nn.Module) -> Iterator[None]:
    """Run `module` eagerly while exporting: the `compile` option's in-place `nn.Module.compile()` is undone (the
    tracer cannot trace a dynamo-optimised call) and restored afterwards."""
    compiled = [(m, m._compiled_call_impl) for m in module.modules() if getattr(m, "_compiled_call_impl", None)]
    for submodule, _ in compiled:
        submodule._compiled_call_impl = None
    try:
        yield
    finally:
        for submodule, call in compiled:
            submodule._compiled_call_impl = call


def export_onnx(
    task: TaskBase,
    path: str | Path,
    preprocessing: Mapping[str, Any] | None = None,
    *,
    opset: int = ONNX_OPSET,
    source: str | None = None,
) -> Path:
    """Write `task` as ONNX to `path` (metadata included) and the sidecar `<path>.json`; returns `path`.

    `preprocessing` is `preprocessing_of(task, ...)` (computed from the task alone when None); `source` names the
    checkpoint or weights in the sidecar. The task is exported on CPU in fp32, in evaluation mode.
    """
    onnx = require_onnx()
    require_torchscript_exporter()
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise UserError(f"--opset must be in {OPSET_RANGE[0]}..{OPSET_RANGE[1]}, got {opset}.")
    preprocessing = dict(preprocessing or preprocessing_of(task))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    task = task.to("cpu", torch.float32).eval()
    spec = graph_spec(task, preprocessing)
    spec.module.eval()
    with _quiet_export(), _eager_modules(spec.module), torch.no_grad():
        try:
            torch.onnx.export(
                spec.module,
                (spec.example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as error:  # a torch whose exporter no longer has the TorchScript path: one clear line
            if "dynamo" in str(error).lower() or "torchscript" in str(error).lower():
                raise _exporter_gone(error) from None
            raise
    space = task.label_space
    info = sidecar(task, preprocessing, spec.output_names, opset=opset, source=source)
    model = onnx.load(str(path))
    metadata = {
        "class_names": json.dumps(list(space.class_names)),
        "category_ids": json.dumps(info["category_ids"]),
        "preprocessing": json.dumps(preprocessing),
        "task": task.task_name,
        "background": json.dumps(space.background),
    }
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "resnet-tasks"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # by path: also for files over protobuf's 2 GB
    Path(f"{path}.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def sidecar(
    task: TaskBase, preprocessing: Mapping[str, Any], outputs: Sequence[str], *, opset: int, source: str | None
) -> dict[str, Any]:
    """The sidecar `<file>.json`: everything a user needs to reproduce `predict` with onnxruntime alone."""
    from resnet_tasks import __version__

    space: LabelSpace = task.label_space
    return {
        "task": task.task_name,
        "format": "onnx",
        "opset": opset,
        "input": "images",
        "outputs": list(outputs),
        "class_names": list(space.class_names),
        # The dataset's id of each output (detection `labels` are these); the output index when there are none.
        "category_ids": [space.category_id(i) for i in range(space.num_classes)],
        "background": space.background,
        "preprocessing": dict(preprocessing),
        "source": source,
        "resnet_tasks": __version__,
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------- the command
def _parse(args: list[str]) -> Any:
    """The parsed config: config files and overrides read exactly as `fit` reads them, nothing instantiated."""
    from resnet_tasks.cli import ResNetTasksCLI, _import_components

    class ExportCLI(ResNetTasksCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint written by fit")
            parser.add_argument("--format", type=str, default="onnx", help="export format: onnx (the only one)")
            parser.add_argument("--out", type=str | None, default=None, help="output file (default: run dir)")
            parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset version")

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass  # the model is built below (from the checkpoint or the weights), the data is never needed

    _import_components()
    with warnings.catch_warnings():
        # Lightning warns when `args` is given while sys.argv has arguments too: here both are this command's.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = ExportCLI(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": "resnet-tasks export",
                "description": "Export a trained model to ONNX (see the README's 'Export (ONNX)').",
            },
        )
    return cli.config


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module or "resnet_tasks"), name)


def _as_dict(namespace: Any) -> dict[str, Any]:
    if namespace is None:
        return {}
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def checkpoint_task(path: str | Path) -> str | None:
    """The task that wrote a `resnet-tasks fit` checkpoint (None for other files)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return (checkpoint.get(CHECKPOINT_KEY) or {}).get("task") if isinstance(checkpoint, Mapping) else None


def _check_task(path: str | Path, task_class: type[TaskBase], flag: str) -> None:
    written_by = checkpoint_task(path)
    if written_by and written_by != task_class.task_name:
        raise UserError(
            f"{flag} {path} was written by the {written_by} task but the config builds a {task_class.__name__} "
            f"({task_class.task_name}); export it with a {written_by} config, e.g. "
            f"configs/quickstart/{written_by}.yaml."
        )


def _data_label_space(data_class: type | None, data_args: Mapping[str, Any]) -> LabelSpace | None:
    """The data module's label space when it can be built here (else None: the weights' count then names classes)."""
    if data_class is None:
        return None
    try:
        return getattr(data_class(**data_args), "label_space", None)
    except UserError:
        return None


def build_task(config: Any) -> tuple[TaskBase, str]:
    """The model to export: from `--ckpt_path` (its stored hyper-parameters) or the config + `--model.weights`."""
    task_class = _import_class(config.model.class_path)
    if not (isinstance(task_class, type) and issubclass(task_class, TaskBase)):
        raise UserError(f"--model.class_path {config.model.class_path} is not a resnet-tasks task.")
    init_args = _as_dict(config.model.init_args)
    init_args.update(_as_dict(config.model.get("dict_kwargs")))
    if config.ckpt_path:
        path = Path(config.ckpt_path).expanduser()
        if not path.is_file():
            raise UserError(f"Checkpoint not found: {path}. Check --ckpt_path.")
        _check_task(path, task_class, "--ckpt_path")
        try:
            task = task_class.load_from_checkpoint(path, map_location="cpu")
        except UserError:
            raise
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise UserError(
                f"Cannot load checkpoint {path} ({type(error).__name__}: {first_line}); pass a .ckpt written by "
                "resnet-tasks fit (--ckpt_path), or whole-model weights with --model.weights."
            ) from None
        return task, str(path)
    weights = init_args.get("weights")
    if no_weights(weights):
        raise UserError(
            "resnet-tasks export needs the weights to export: --ckpt_path CKPT (a checkpoint written by fit) or "
            "--model.weights SPEC (whole-model weights: a torchvision weights name, a .pth or a .ckpt)."
        )
    if Path(str(weights)).expanduser().is_file():
        _check_task(Path(str(weights)).expanduser(), task_class, "--model.weights")
    if init_args.get("label_space") is None:
        from resnet_tasks.backbones import label_space_of

        if not isinstance(label_space_of(str(weights), task_class.head_key, task_class.task_name), LabelSpace):
            data = config.get("data")
            data_class = _import_class(data.class_path) if data is not None else None
            init_args["label_space"] = _data_label_space(data_class, _as_dict(data.init_args) if data else {})
    task = task_class(**init_args)
    task.load_pretrained()
    return task, str(weights)


def default_output(config: Any) -> Path:
    """`<default_root_dir>/lightning_logs/version_N/model.onnx`, N the next free version (as a new run's)."""
    from lightning.pytorch.loggers import CSVLogger

    root = (config.get("trainer") or {}).get("default_root_dir") or "."
    logger = CSVLogger(root, name="lightning_logs")
    return Path(logger.log_dir) / DEFAULT_FILE_NAME


def main(args: list[str]) -> None:
    """`resnet-tasks export --config FILE (--ckpt_path CKPT | --model.weights SPEC) [--format onnx] [--out FILE]`."""
    words = [arg.split("=", 1)[0] for arg in args]
    if not {"-h", "--help", "-c", "--config", "--model", "--print_config"} & set(words):
        raise UserError(
            "resnet-tasks export needs --config FILE, e.g. resnet-tasks export --config "
            "configs/quickstart/classification.yaml --ckpt_path runs/.../checkpoints/last.ckpt"
        )
    config = _parse(args)
    if config.format not in FORMATS:
        raise UserError(
            f"Unknown --format {config.format!r}; resnet-tasks export writes: {', '.join(FORMATS)} "
            "(TorchScript is deprecated in torch 2.14 and not offered)."
        )
    require_onnx()
    require_torchscript_exporter()
    task, source = build_task(config)
    data = config.get("data")
    data_class = _import_class(data.class_path) if data is not None else None
    preprocessing = preprocessing_of(task, _as_dict(data.init_args) if data is not None else {}, data_class)
    out = Path(config.out).expanduser() if config.out else default_output(config)
    path = export_onnx(task, out, preprocessing, opset=config.opset, source=source)
    print(f"model written: {path}")
    print(f"sidecar written: {path}.json")
