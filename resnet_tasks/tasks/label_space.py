"""The label space (class count and names) that whole-model weights fix, read without loading tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from resnet_tasks.errors import UserError


def label_space_of_weights(spec: str, head_key: str) -> tuple[int, list[str]] | None:
    """(num_classes, class names) of whole-model weights `spec`; None when it cannot tell.

    A torchvision enum name answers from its metadata; a `.pth`/`.pt` from the shape of `head_key`
    (its output rows); a `.ckpt` from the hyper-parameters and class names stored by `resnet-tasks fit`.
    """
    path = Path(spec)
    if not path.suffix or (not path.exists() and "_Weights." in spec):
        import torchvision

        try:
            enum = torchvision.models.get_weight(spec)
        except (ValueError, KeyError, AttributeError):
            return None  # load_weights_spec reports unknown names with the closest matches
        categories = list(enum.meta.get("categories") or [])
        return (len(categories), categories) if categories else None
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist. Check --model.weights.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # load_weights_spec gives the precise error later
    if isinstance(data, dict) and "state_dict" in data:
        info = data.get("resnet_tasks") or {}
        hparams = data.get("hyper_parameters") or {}
        names = list(info.get("class_names") or [])
        num = hparams.get("num_classes")
        if num is not None:
            return int(num), names
        data = data["state_dict"]
    if isinstance(data, dict):
        for key, value in data.items():
            if key.endswith(head_key) and isinstance(value, torch.Tensor):
                return int(value.shape[0]), []
    return None
