"""The label space: what each output of a model means (class names, dataset category ids, background, ignore index).

One type for every task. A data module announces it, the CLI links it to the model, checkpoints store it in their
hyper-parameters, and whole-model weights can supply it (`backbones.weights.label_space_of`). Tasks, metrics and
writers read `task.label_space`.

Convention, the same in every task (torchvision's): `num_classes` counts every output of the model, background
included where the model has one. Detection always has one (output 0, never written to results); segmentation
has one when its masks label background pixels (VOC: class 0). Its name is `BACKGROUND` everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from resnet_tasks.config import as_config
from resnet_tasks.errors import UserError

BACKGROUND = "background"
# torchvision's name for class 0; read as BACKGROUND wherever it arrives (weights metadata, old checkpoints).
TORCHVISION_BACKGROUND = "__background__"
# The label-map value that marks pixels without a label (VOC's object borders); never a class.
IGNORE_INDEX = 255
# The background's entry in `category_ids`: it has no dataset id, so it never shares one with a category
# (Roboflow and YOLO number their categories from 0).
NO_CATEGORY_ID = -1


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """The meaning of a model's class outputs.

    - `class_names[i]`: the name of output i (`BACKGROUND` at 0 when `background` is True);
    - `category_ids[i]`: the dataset's own id of output i (COCO category ids; None when the output index is the
      id, e.g. classification, segmentation); a detector's background has no dataset id: `NO_CATEGORY_ID`
      (checkpoints written before that stored 0 there, which no COCO category uses);
    - `background`: output 0 is the background class;
    - `ignore_index`: the label value that marks unlabelled pixels/objects (segmentation masks).
    """

    class_names: tuple[str, ...]
    category_ids: tuple[int, ...] | None = None
    background: bool = False
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        names = tuple(BACKGROUND if name == TORCHVISION_BACKGROUND else str(name) for name in self.class_names)
        object.__setattr__(self, "class_names", names)
        if self.category_ids is not None:
            ids = tuple(int(i) for i in self.category_ids)
            if len(ids) != len(names):
                raise UserError(f"A label space needs one category id per class: {len(names)} names, {len(ids)} ids.")
            if len(set(ids)) != len(ids):
                raise UserError(f"A label space needs distinct category ids, got {list(ids)} for {list(names)}.")
            object.__setattr__(self, "category_ids", ids)
        if not names:
            raise UserError("A label space needs at least one class.")

    @property
    def num_classes(self) -> int:
        """Number of model outputs (background included when there is one)."""
        return len(self.class_names)

    @property
    def object_names(self) -> tuple[str, ...]:
        """The class names without the background."""
        return self.class_names[1:] if self.background else self.class_names

    def name(self, index: int) -> str:
        """Human-readable name of output `index` (the index itself when out of range)."""
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)

    def category_id(self, index: int) -> int:
        """The dataset's category id of output `index`."""
        return self.category_ids[index] if self.category_ids is not None else int(index)

    def to_category_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Map a tensor of output indices to the dataset's category ids (same device)."""
        if self.category_ids is None:
            return labels
        table = torch.as_tensor(self.category_ids, dtype=torch.int64, device=labels.device)
        return table[labels]

    @classmethod
    def anonymous(cls, num_classes: int, background: bool = False) -> LabelSpace:
        """`num_classes` outputs named `class_<i>` (output 0 is `BACKGROUND` when `background`)."""
        if num_classes < (2 if background else 1):
            least = "2 (the background and one object class)" if background else "1"
            raise UserError(f"--model.num_classes must be at least {least}, got {num_classes}.")
        first = 1 if background else 0
        names = ([BACKGROUND] if background else []) + [f"class_{i}" for i in range(first, num_classes)]
        return cls(tuple(names), background=background)

    @classmethod
    def with_background(cls, object_names: Sequence[str], category_ids: Sequence[int] | None = None) -> LabelSpace:
        """Background at output 0 (no dataset id), then `object_names` (with their dataset ids, if any)."""
        ids = None if category_ids is None else (NO_CATEGORY_ID, *[int(i) for i in category_ids])
        return cls((BACKGROUND, *object_names), ids, background=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints stay loadable with `torch.load(weights_only=True)`."""
        return {
            "class_names": list(self.class_names),
            "category_ids": None if self.category_ids is None else list(self.category_ids),
            "background": self.background,
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def coerce(cls, value: LabelSpace | Mapping[str, Any] | None) -> LabelSpace | None:
        """Accept a LabelSpace, its `to_dict()` form (hyper-parameters, YAML) or None."""
        return None if value is None else as_config(value, cls)


def upgrade_hyperparameters(task: str, hparams: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of a checkpoint written before the label space existed, in today's form.

    Those stored the class names and category ids beside the hyper-parameters (`info`: the checkpoint's
    "resnet_tasks" entry), and detection's `num_classes` excluded the background. Today's checkpoints pass
    through unchanged.
    """
    upgraded = dict(hparams)
    if "label_space" in upgraded or upgraded.get("num_classes") is None:
        return upgraded
    num_classes = int(upgraded["num_classes"]) + (1 if task == "detection" else 0)
    names = list(info.get("class_names") or [])
    ids = info.get("label_to_category_id")
    background = task == "detection" or (bool(names) and names[0] in (BACKGROUND, TORCHVISION_BACKGROUND))
    if len(names) == num_classes:
        space = LabelSpace(tuple(names), tuple(ids) if ids is not None else None, background=background)
    else:
        space = LabelSpace.anonymous(num_classes, background=task == "detection")
    if "ignore_index" in upgraded:  # segmentation's own key then; the label space's now
        space = dataclasses.replace(space, ignore_index=int(upgraded.pop("ignore_index")))
    upgraded["num_classes"] = num_classes
    upgraded["label_space"] = space.to_dict()
    return upgraded
