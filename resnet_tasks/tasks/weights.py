"""Which weights a task starts from: the label space whole-model weights fix, loading them (or the backbone's) once,
new class layers when `fit` starts from weights made for other classes, reading older checkpoints, and the check that
a checkpoint fits the model it is loaded into."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import io
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from resnet_tasks.backbones import (
    compare_state_dict,
    is_torchvision_weights_name,
    label_space_of,
    layout_hint,
    load_backbone_weights,
    load_state_dict_into,
    load_weights_spec,
    strip_wrapper_prefixes,
)
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace, upgrade_hyperparameters


class WeightsTask(Protocol):
    """What of a task (tasks.base.TaskBase, which imports this module) its weights are chosen and loaded with."""

    task_name: ClassVar[str]
    head_key: ClassVar[str]
    background: ClassVar[bool]
    evaluates_across_label_spaces: ClassVar[bool]
    weights: str | None
    num_classes: int
    backbone_config: Any

    def label_space_for_count(self, count: int) -> LabelSpace: ...
    def model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def backbone_module(self) -> nn.Module: ...
    def is_global_zero(self) -> bool: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


# Our entry in every checkpoint: which task wrote it (the label space is in the hyper-parameters).
CHECKPOINT_KEY = "resnet_tasks"

# The class-specific layers of each task, as the tasks' own state-dict keys (torchvision's, under "model."): what
# `fit` re-initialises when whole-model weights were made for another class count.
CLASS_LAYERS: dict[str, tuple[str, ...]] = {
    "classification": ("fc",),
    "detection": ("model.roi_heads.box_predictor.cls_score", "model.roi_heads.box_predictor.bbox_pred"),
    "segmentation": ("model.classifier.4", "model.aux_classifier.4"),
}

_FITTING: contextvars.ContextVar[bool] = contextvars.ContextVar("resnet_tasks_fitting", default=False)


@contextlib.contextmanager
def built_for_fit(active: bool = True) -> Iterator[None]:
    """Tasks built inside take the data's classes when their whole-model weights were made for another class count:
    `fit` then loads every other tensor and trains new class layers. The CLI builds `fit`'s model in here; outside,
    such weights keep today's rule (refused, or detection keeps the weights' classes)."""
    token = _FITTING.set(active)
    try:
        yield
    finally:
        _FITTING.reset(token)


def no_weights(spec: str | None) -> bool:
    """True for an unset weights spec (jsonargparse may hand `null` on the command line over as "None")."""
    return spec is None or str(spec).strip().lower() in ("", "none", "null")


def label_space_of_weights(task: WeightsTask, known: bool) -> LabelSpace | int | None:
    """The label space (or only the output count) of the task's whole-model weights; None without weights, or when
    `known` classes come with a weights file that is gone (it is reported when the weights are loaded)."""
    if task.weights is None:
        return None
    if known and not is_torchvision_weights_name(task.weights) and not Path(task.weights).expanduser().exists():
        return None
    return label_space_of(task.weights, task.head_key, task.task_name)


def with_data_names(found: LabelSpace, data: LabelSpace) -> LabelSpace:
    """`found` (the weights' label space) with the data's class names wherever both name the same dataset id
    differently (one warning lists them): reports speak the data's language. Output indices count as ids when
    both have the same classes; for another count only the data's own category ids do."""
    if found.num_classes != data.num_classes and data.category_ids is None:
        return found
    names = {data.category_id(i): name for i, name in enumerate(data.class_names) if not (data.background and i == 0)}
    renamed = list(found.class_names)
    differ = []
    for index, name in enumerate(found.class_names):
        wanted = names.get(found.category_id(index))
        if wanted is not None and wanted != name and not (found.background and index == 0):
            renamed[index] = wanted
            differ.append(f"{found.category_id(index)}: {name!r} -> {wanted!r}")
    if not differ:
        return found
    shown = ", ".join(differ[:5]) + (f", ... ({len(differ)} in all)" if len(differ) > 5 else "")
    rank_zero_warn(
        f"The whole-model weights name some classes differently from the data (id: weights -> data: "
        f"{shown}); reports use the data's names."
    )
    return dataclasses.replace(found, class_names=tuple(renamed))


def resolve_label_space(task: WeightsTask, num_classes: int | None, data: LabelSpace | None) -> LabelSpace:
    """The model's label space: whole-model weights fix it; else the data's (the CLI link); else `num_classes`.

    Weights made for another class count give way to the data's classes when the task is built for `fit`
    (`built_for_fit`; the class layers then start anew) and `num_classes` is not set, or when `num_classes` agrees with
    the data (the hyper-parameters of a model fitted to these classes from such weights). A `num_classes` equal to the
    weights' (a run that kept their classes, resumed) keeps the rule outside `fit`.
    """
    if data is not None and task.background and not data.background:
        raise UserError(f"The {task.task_name} task needs a label space with a background class at 0.")
    found = label_space_of_weights(task, known=data is not None or num_classes is not None)
    if isinstance(found, int):
        found = data if data is not None and data.num_classes == found else task.label_space_for_count(found)
    if found is not None:
        count = data.num_classes if data is not None else num_classes
        if count is None or count == found.num_classes:
            return found if data is None else with_data_names(found, data)
        if data is None and _FITTING.get():
            return LabelSpace.anonymous(count, background=task.background)
        if data is not None and (num_classes == data.num_classes or (num_classes is None and _FITTING.get())):
            return data
        message = f"--model.weights {task.weights} predict {found.num_classes} classes but the data has {count}."
        if not task.evaluates_across_label_spaces:
            raise UserError(
                f"{message} To fine-tune on these classes: resnet-tasks fit (it trains new class layers), or reuse "
                f"only its backbone: --model.backbone.weights {task.weights} (and leave --model.weights unset)."
            )
        rank_zero_warn(
            f"{message} The model keeps the weights' label space: its predictions carry the weights' "
            "category ids, and evaluation compares them with the data's."
        )
        return found if data is None else with_data_names(found, data)
    if data is not None:
        if num_classes is not None and num_classes != data.num_classes:
            shown = ", ".join(data.class_names[:5]) + (", ..." if data.num_classes > 5 else "")
            raise UserError(
                f"The model is set up for {num_classes} classes (--model.num_classes, or the hyper-parameters of "
                f"the checkpoint given to --ckpt_path) but the data has {data.num_classes} ({shown}). Use a "
                "checkpoint trained on these classes (or reuse only its backbone with --model.backbone.weights), "
                "or leave --model.num_classes unset: it follows the data."
            )
        return data
    if num_classes is not None:
        return LabelSpace.anonymous(num_classes, background=task.background)
    raise UserError(
        f"{type(task).__name__} needs its classes: they follow the data (--data.root), come from whole-model "
        "weights (--model.weights file.ckpt|file.pth|a torchvision weights name), or --model.num_classes N "
        "(the number of classes, background included where the task has one)."
    )


def load_with_new_classes(
    module: nn.Module, state_dict: Mapping[str, Any], class_layers: Sequence[str], *, source: str, what: str
) -> list[str]:
    """Load whole-model weights trained for another class count: every tensor except the `class_layers` whose
    shapes differ, which keep their fresh initialisation for this model's classes. Returns those layers' names.

    Anything else missing or of another shape is refused (UserError), as for any weights.
    """
    report, loadable = compare_state_dict(module, state_dict, source=source, what=what)

    def is_class_key(key: str) -> bool:
        return any(key.startswith(layer + ".") for layer in class_layers)

    renewed = sorted({key.rsplit(".", 1)[0] for key, _, _ in report.shape_mismatched if is_class_key(key)})
    report.shape_mismatched = [item for item in report.shape_mismatched if not is_class_key(item[0])]
    if not report.ok:
        raise UserError(
            f"weights {source} do not fit the {what}{layout_hint(state_dict)}.\n{report.summary()}\n"
            f"Pass weights made for this {what} (or choose the architecture the file was trained with)."
        )
    module.load_state_dict(loadable, strict=False)
    return renewed


def load_task_weights(task: WeightsTask, fit: bool = False) -> None:
    """Load the task's `weights` (whole model) or else its `backbone.weights` (backbone only).

    `fit`: whole-model weights made for another class count load all but the class layers (`CLASS_LAYERS`), which
    keep their initialisation for the data's classes; one line (rank 0) names them.
    """
    if task.weights:
        state_dict, _ = load_weights_spec(task.weights)
        own_keys = task.model_state_dict(strip_wrapper_prefixes(state_dict))
        what = f"{task.task_name} model"
        if not fit:
            load_state_dict_into(task, own_keys, source=task.weights, what=what, explain=layout_hint)
            return
        renewed = load_with_new_classes(task, own_keys, CLASS_LAYERS[task.task_name], source=task.weights, what=what)
        if renewed and task.is_global_zero():
            made_for = next((v.shape[0] for k, v in own_keys.items() if k.endswith(task.head_key)), "other")
            print(
                f"--model.weights {task.weights}: loaded every tensor except the class layers {', '.join(renewed)} "
                f"(made for {made_for} classes), re-initialised for the data's {task.num_classes}",
                flush=True,
            )
    elif task.backbone_config.weights:
        load_backbone_weights(task.backbone_module(), task.backbone_config.weights)


def upgraded_checkpoint(checkpoint_path: Any, task_name: str) -> io.BytesIO | None:
    """A checkpoint written before the label space existed (or with retired keys such as segmentation's
    ignore_index), upgraded, as a file Lightning can load; None when the file needs no upgrade or is not a local
    file we can read (Lightning's own loading then reads it, or reports what is wrong)."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    hparams = checkpoint.get("hyper_parameters") or {}
    upgraded = upgrade_hyperparameters(task_name, hparams, checkpoint.get(CHECKPOINT_KEY) or {})
    if upgraded == hparams:
        return None
    checkpoint["hyper_parameters"] = upgraded
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def check_checkpoint_fits(task: WeightsTask, checkpoint: dict[str, Any]) -> None:
    """Stop with one line when `checkpoint` was written by another task or its weights do not fit `task`."""
    written_by = (checkpoint.get(CHECKPOINT_KEY) or {}).get("task")
    if written_by and written_by != task.task_name:
        raise UserError(
            f"This checkpoint was written by the {written_by} task; load it with its own task class, or use it "
            f"as backbone weights (--model.backbone.weights) for {task.task_name}."
        )
    report, _ = compare_state_dict(task, checkpoint.get("state_dict") or {}, source="checkpoint")
    if report.ok and not report.unexpected:
        return
    hparams = checkpoint.get("hyper_parameters") or {}
    trained = (hparams.get("backbone") or {}).get("name")
    counts = report.counts()
    parts = [f"{counts['matched']}/{len(task.state_dict())} model keys match"]
    if report.missing:
        parts.append(f"{counts['missing']} missing (e.g. {', '.join(report.missing[:3])})")
    if report.unexpected:
        parts.append(f"{counts['unexpected']} unexpected (e.g. {', '.join(report.unexpected[:3])})")
    if report.shape_mismatched:
        shown = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in report.shape_mismatched[:2]]
        parts.append(f"{counts['shape_mismatched']} with other shapes (e.g. {'; '.join(shown)})")
    raise UserError(
        f"The checkpoint does not fit this {task.task_name} model: {'; '.join(parts)}. It was trained with "
        f"--model.backbone.name {trained} and num_classes {hparams.get('num_classes')}; use the same values "
        "(num_classes follows the data), or reuse only its backbone with --model.backbone.weights."
    )
