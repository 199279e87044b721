"""Which weights a task starts from: the label space whole-model weights fix, loading them (or the backbone's) once,
reading older checkpoints, and the check that a checkpoint fits the model it is loaded into."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

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

if TYPE_CHECKING:
    from resnet_tasks.tasks.base import TaskBase

# Our entry in every checkpoint: which task wrote it (the label space is in the hyper-parameters).
CHECKPOINT_KEY = "resnet_tasks"


def no_weights(spec: str | None) -> bool:
    """True for an unset weights spec (jsonargparse may hand `null` on the command line over as "None")."""
    return spec is None or str(spec).strip().lower() in ("", "none", "null")


def label_space_of_weights(task: TaskBase, known: bool) -> LabelSpace | int | None:
    """The label space (or only the output count) of the task's whole-model weights; None without weights, or when
    `known` classes come with a weights file that is gone (it is reported when the weights are loaded)."""
    if task.weights is None:
        return None
    if known and not is_torchvision_weights_name(task.weights) and not Path(task.weights).expanduser().exists():
        return None
    return label_space_of(task.weights, task.head_key, task.task_name)


def resolve_label_space(task: TaskBase, num_classes: int | None, data: LabelSpace | None) -> LabelSpace:
    """The model's label space: whole-model weights fix it; else the data's (the CLI link); else `num_classes`."""
    if data is not None and task.background and not data.background:
        raise UserError(f"The {task.task_name} task needs a label space with a background class at 0.")
    found = label_space_of_weights(task, known=data is not None or num_classes is not None)
    if isinstance(found, int):
        found = data if data is not None and data.num_classes == found else task.label_space_for_count(found)
    if found is not None:
        count = data.num_classes if data is not None else num_classes
        if count is not None and count != found.num_classes:
            message = f"--model.weights {task.weights} predict {found.num_classes} classes but the data has {count}."
            if not task.evaluates_across_label_spaces:
                raise UserError(
                    f"{message} To fine-tune on these classes, reuse only its backbone: --model.backbone.weights "
                    f"{task.weights} (and leave --model.weights unset)."
                )
            rank_zero_warn(
                f"{message} The model keeps the weights' label space: its predictions carry the weights' "
                "category ids, and evaluation compares them with the data's."
            )
        return found
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


def load_task_weights(task: TaskBase) -> None:
    """Load the task's `weights` (whole model) or else its `backbone.weights` (backbone only)."""
    if task.weights:
        state_dict, _ = load_weights_spec(task.weights)
        own_keys = task.model_state_dict(strip_wrapper_prefixes(state_dict))
        load_state_dict_into(task, own_keys, source=task.weights, what=f"{task.task_name} model", explain=layout_hint)
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


def check_checkpoint_fits(task: TaskBase, checkpoint: dict[str, Any]) -> None:
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
