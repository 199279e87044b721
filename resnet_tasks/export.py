"""`resnet-tasks export`: a trained model as an ONNX file that runs without this package (onnxruntime + numpy).

The file takes `images`, uint8 RGB (N, 3, H, W), and normalises inside. Its class names and the evaluation
preprocessing `predict` applies travel in the ONNX metadata (`class_names`, `preprocessing`, JSON strings) and in
a sidecar `<file>.json`. That preprocessing is the one `fit` stored in the checkpoint (the data module's
`eval_preprocessing()`), so a checkpoint exports without its dataset; with `--model.weights` (or a checkpoint
that stores none) it comes from the config's data module. Export uses torch's TorchScript-based ONNX exporter
(`dynamo=False`): torch's default (dynamo) exporter cannot export torchvision's Faster R-CNN (data-dependent
shapes in `batched_nms`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from resnet_tasks.backbones import label_space_of, preprocessing_of
from resnet_tasks.callbacks import stored_preprocessing
from resnet_tasks.checkpoint_io import read_checkpoint
from resnet_tasks.compat import compiled_calls_disabled, module_from_checkpoint
from resnet_tasks.errors import UserError
from resnet_tasks.export_graphs import default_preprocessing, graph_spec, model_preprocessing
from resnet_tasks.labels import LabelSpace, upgrade_hyperparameters
from resnet_tasks.lightning_cli import (
    config_dict,
    import_class,
    parse_config,
    require_config,
    run_directory,
)
from resnet_tasks.tasks.base import CHECKPOINT_KEY, TaskBase, no_weights

FORMATS = ("onnx",)
# The opset every export is written with unless --opset says otherwise (tested; onnxruntime >= 1.18 runs it).
ONNX_OPSET = 17
# torchvision's detection ops (RoIAlign, NonMaxSuppression) need 11; the TorchScript-based exporter stops at 20.
OPSET_RANGE = (11, 20)
EXPORT_EXTRA = 'pip install "resnet-tasks[export]"'
# The torch release this exporter was tested with (named in the error if a later torch drops dynamo=False).
TESTED_TORCH = "2.14"
DEFAULT_FILE_NAME = "model.onnx"
# The config's data module and why it cannot be built here (None, None: the config names none), built on first use.
DataModuleOf = Callable[[], tuple[Any, UserError | None]]


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


def export_onnx(
    task: TaskBase,
    path: str | Path,
    preprocessing: Mapping[str, Any] | None = None,
    *,
    opset: int = ONNX_OPSET,
    source: str | None = None,
) -> Path:
    """Write `task` as ONNX to `path` (metadata included) and the sidecar `<path>.json`; returns `path`.

    `preprocessing` is the data module's `eval_preprocessing()` with the model's own part (`model_preprocessing`);
    None: `default_preprocessing(task)`. `source` names the checkpoint or weights in the sidecar. The task is
    exported on CPU in fp32, in evaluation mode.
    """
    onnx = require_onnx()
    require_torchscript_exporter()
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise UserError(f"--opset must be in {OPSET_RANGE[0]}..{OPSET_RANGE[1]}, got {opset}.")
    preprocessing = dict(preprocessing or default_preprocessing(task))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    task = task.to("cpu", torch.float32).eval()
    spec = graph_spec(task, preprocessing)
    spec.module.eval()
    with _quiet_export(), compiled_calls_disabled(spec.module), torch.no_grad():
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
def add_export_arguments(parser: Any) -> None:
    """`resnet-tasks export`'s own keys beside the config's."""
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint written by fit")
    parser.add_argument("--format", type=str, default="onnx", help="export format: onnx (the only one)")
    parser.add_argument("--out", type=str | None, default=None, help="output file (default: run dir)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset version")


def checkpoint_task(path: str | Path) -> str | None:
    """The task that wrote a `resnet-tasks fit` checkpoint (None for other files)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return (checkpoint.get(CHECKPOINT_KEY) or {}).get("task") if isinstance(checkpoint, Mapping) else None


def _check_task(written_by: str | None, path: str | Path, task_class: type[TaskBase], flag: str) -> None:
    if written_by and written_by != task_class.task_name:
        raise UserError(
            f"{flag} {path} was written by the {written_by} task but the config builds a {task_class.__name__} "
            f"({task_class.task_name}); export it with a {written_by} config, e.g. "
            f"configs/quickstart/{written_by}.yaml."
        )


def build_datamodule(config: Any) -> tuple[Any, UserError | None]:
    """The config's data module, or None and why it cannot be built here (e.g. its dataset is elsewhere)."""
    data = config.get("data")
    if data is None:
        return None, None
    try:
        return import_class(data.class_path)(**config_dict(data.init_args)), None
    except UserError as error:
        return None, error


def load_task(path: Path, task_class: type[TaskBase]) -> tuple[TaskBase, dict[str, Any] | None]:
    """The task of a `resnet-tasks fit` checkpoint, the file read once (hyper-parameters brought up to date), and
    the evaluation preprocessing stored with it (None: written before checkpoints stored it)."""
    if not path.is_file():
        raise UserError(f"Checkpoint not found: {path}. Check --ckpt_path.")
    checkpoint = read_checkpoint(path)
    try:
        if checkpoint is None:
            raise ValueError("torch.load(weights_only=True) refuses its content")
        info = checkpoint.get(CHECKPOINT_KEY) or {}
        _check_task(info.get("task"), path, task_class, "--ckpt_path")
        saved = checkpoint.get("hyper_parameters") or {}
        checkpoint["hyper_parameters"] = upgrade_hyperparameters(task_class.task_name, saved, info)
        task: TaskBase = module_from_checkpoint(task_class, checkpoint)  # type: ignore[assignment]
        return task, stored_preprocessing(checkpoint)
    except UserError:
        raise
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise UserError(
            f"Cannot load checkpoint {path} ({type(error).__name__}: {first_line}); pass a .ckpt written by "
            "resnet-tasks fit (--ckpt_path), or whole-model weights with --model.weights."
        ) from None


def build_task(config: Any, data: DataModuleOf) -> tuple[TaskBase, str, dict[str, Any] | None]:
    """The model to export, where it comes from and the preprocessing stored with it: from `--ckpt_path` (its
    stored hyper-parameters and preprocessing) or the config + `--model.weights` (none stored; the data module
    names the classes when the weights do not)."""
    task_class = import_class(config.model.class_path)
    if not (isinstance(task_class, type) and issubclass(task_class, TaskBase)):
        raise UserError(f"--model.class_path {config.model.class_path} is not a resnet-tasks task.")
    init_args = config_dict(config.model.init_args)
    init_args.update(config_dict(config.model.get("dict_kwargs")))
    if config.ckpt_path:
        path = Path(config.ckpt_path).expanduser()
        task, stored = load_task(path, task_class)
        return task, str(path), stored
    weights = init_args.get("weights")
    if no_weights(weights):
        raise UserError(
            "resnet-tasks export needs the weights to export: --ckpt_path CKPT (a checkpoint written by fit) or "
            "--model.weights SPEC (whole-model weights: a torchvision weights name, a .pth or a .ckpt)."
        )
    if Path(str(weights)).expanduser().is_file():
        path = Path(str(weights)).expanduser()
        _check_task(checkpoint_task(path), path, task_class, "--model.weights")
    if init_args.get("label_space") is None:
        if not isinstance(label_space_of(str(weights), task_class.head_key, task_class.task_name), LabelSpace):
            init_args["label_space"] = getattr(data()[0], "label_space", None)
    task = task_class(**init_args)
    task.load_pretrained()
    return task, str(weights), None


def export_preprocessing(
    task: TaskBase, stored: Mapping[str, Any] | None, data: DataModuleOf, source: str
) -> dict[str, Any]:
    """What `predict` does to an image before the model and what the model does itself (`model_preprocessing`).
    The first is the checkpoint's `stored` preprocessing; without it (weights, or a checkpoint written before
    checkpoints stored it), the config's data module's `eval_preprocessing()`; without the data module's dataset,
    the preprocessing torchvision weights were published with."""
    if stored is not None:
        return {**stored, **model_preprocessing(task)}
    datamodule, problem = data()
    if datamodule is not None:
        return {**datamodule.eval_preprocessing(), **model_preprocessing(task)}
    published = preprocessing_of(source)
    if published is not None:
        return {**default_preprocessing(task), **published}
    if problem is not None and not model_preprocessing(task):
        raise UserError(
            f"resnet-tasks export needs the evaluation preprocessing (resize, crop, mean/std): {source} stores none "
            f"and the config's data module, which gives it, cannot be built here: {problem}"
        )
    return default_preprocessing(task)  # the model resizes and normalises itself (detection)


def main(args: list[str]) -> None:
    """`resnet-tasks export --config FILE (--ckpt_path CKPT | --model.weights SPEC) [--format onnx] [--out FILE]`."""
    require_config(
        "export",
        args,
        ", e.g. resnet-tasks export --config configs/quickstart/classification.yaml --ckpt_path "
        "runs/.../checkpoints/last.ckpt",
    )
    config = parse_config(
        args,
        prog="resnet-tasks export",
        description="Export a trained model to ONNX (see docs/export.md).",
        add_arguments=add_export_arguments,
    )
    if config.format not in FORMATS:
        raise UserError(
            f"Unknown --format {config.format!r}; resnet-tasks export writes: {', '.join(FORMATS)} "
            "(TorchScript is deprecated in torch 2.14 and not offered)."
        )
    require_onnx()
    require_torchscript_exporter()
    data = functools.cache(lambda: build_datamodule(config))  # built only when needed, then once
    task, source, stored = build_task(config, data)
    preprocessing = export_preprocessing(task, stored, data, source)
    out = Path(config.out).expanduser() if config.out else run_directory(config) / DEFAULT_FILE_NAME
    path = export_onnx(task, out, preprocessing, opset=config.opset, source=source)
    print(f"model written: {path}")
    print(f"sidecar written: {path}.json")
