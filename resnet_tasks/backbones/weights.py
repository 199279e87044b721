"""Resolve weights specs (torchvision enum name from the offline hub cache, .pth/.pt, .ckpt); load it safely.

Generic over any ``nn.Module``: backbones, and whole models (Faster R-CNN, FCN) alike. Never downloads, and
always unpickles with ``weights_only=True`` so a weights file cannot run code.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import UserError
from ..labels import LabelSpace, upgrade_hyperparameters

logger = logging.getLogger(__name__)

# Wrappers that rename every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ENUM_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9_]*_Weights)\.([A-Za-z][A-Za-z0-9_]*)$")
# Buffers that BatchNorm recreates when a file lacks them (older torchvision files, FrozenBatchNorm2d models).
TOLERATED_MISSING_SUFFIXES = ("num_batches_tracked",)


@dataclass
class LoadReport:
    """What happened when a state dict was loaded into a module."""

    source: str
    what: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    tolerated_missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key of the module was found with the right shape."""
        return not self.missing and not self.shape_mismatched

    def counts(self) -> dict[str, int]:
        return {
            "matched": len(self.matched),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "shape_mismatched": len(self.shape_mismatched),
        }

    def summary(self, limit: int = 5) -> str:
        """One line per category, listing the first ``limit`` keys of each."""

        def some(keys: list[str]) -> str:
            shown = ", ".join(keys[:limit])
            return shown + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")

        lines = [
            f"{self.what} <- {self.source}: {len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.shape_mismatched)} shape-mismatched"
        ]
        if self.missing:
            lines.append(f"  missing in the file: {some(self.missing)}")
        if self.shape_mismatched:
            shown = [f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in self.shape_mismatched]
            lines.append(f"  shape mismatch: {some(shown)}")
        if self.unexpected:
            lines.append(f"  ignored (not in the {self.what}, e.g. a classifier head): {some(self.unexpected)}")
        return "\n".join(lines)


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DDP's ``module.`` and torch.compile's ``_orig_mod.`` from every key (leading or nested)."""
    cleaned: dict[str, Any] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        # torch.compile on a submodule leaves "_orig_mod." in the middle ("model._orig_mod.backbone...").
        key = key.replace("._orig_mod.", ".")
        cleaned[key] = value
    return cleaned


def torchvision_weight_names() -> list[str]:
    """Every torchvision weights enum name, e.g. ``ResNet50_Weights.IMAGENET1K_V2``."""
    import torchvision.models as tv_models

    names: set[str] = set()
    for model_name in tv_models.list_models():
        enum = tv_models.get_model_weights(model_name)
        names.update(f"{enum.__name__}.{member}" for member in enum.__members__)
    return sorted(names)


def is_torchvision_weights_name(spec: str) -> bool:
    """True when `spec` names torchvision weights (``Enum_Weights.MEMBER``) rather than a file on disk."""
    spec = str(spec)
    return bool(ENUM_PATTERN.match(spec)) and not Path(spec).expanduser().exists()


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub`` caches the file of ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _resolve_enum(spec: str) -> Any:
    import torchvision.models as tv_models

    try:
        return tv_models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        close = difflib.get_close_matches(spec, torchvision_weight_names(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise UserError(
            f"unknown torchvision weights {spec!r}; {hint} (or pass a path to a .pth/.pt/.ckpt file)"
        ) from None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only message that says what it refused (e.g. an unsupported GLOBAL)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else "rejected by the weights_only unpickler"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error)
        if "GLOBAL" in reason:
            raise UserError(
                f"refusing to load {path}: it holds pickled Python objects that would execute code on load "
                f"({reason}). Re-save only the tensors, e.g. torch.save(model.state_dict(), 'weights.pth'), "
                "in a trusted environment"
            ) from None
        raise UserError(
            f"refusing to load {path}: torch.load(weights_only=True) cannot read it ({reason}); the file is "
            "corrupt or uses pickle features that would execute code on load. Re-export it with "
            "torch.save(model.state_dict(), 'weights.pth') in a trusted environment"
        ) from None
    except Exception as error:  # any other failure here (EOFError, IndexError, ...) is an unreadable file
        raise UserError(
            f"cannot read weights file {path}: {first_line(error)}; "
            "is it a complete torch.save file? Re-download or re-export it"
        ) from None


def _as_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Take the state dict out of what torch.load returned (.ckpt, references checkpoint, or plain)."""
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # A Lightning checkpoint (resnet-tasks fit).
        meta = {
            "hyper_parameters": obj.get("hyper_parameters", {}),
            "resnet_tasks": obj.get("resnet_tasks", {}),
        }
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        # torchvision references/ checkpoints: {"model": ..., "optimizer": ..., "epoch": ...}.
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(
            f"{path} does not hold a state dict (got {type(obj).__name__}); expected a torch.save'd "
            "model.state_dict(), a torchvision weights file or a resnet-tasks .ckpt"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors; expected a model state dict")
    return tensors, meta


def load_weights_spec(spec: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights spec into ``(state_dict, meta)``; never downloads.

    ``spec``: a torchvision weights enum name (read from ``$TORCH_HOME/hub/checkpoints/<file>``; meta is the
    enum's ``meta``), a ``.pth``/``.pt`` state dict, or a ``.ckpt`` from ``resnet-tasks fit`` (returns
    ``ckpt["state_dict"]``; meta = ``{"hyper_parameters", "resnet_tasks"}``).
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if is_torchvision_weights_name(spec):
        weights = _resolve_enum(spec)
        file = hub_checkpoint_path(weights.url)
        if not file.is_file():
            raise UserError(
                f"torchvision weights {spec} are not in the local torch hub cache: expected file {file}. "
                f"Fetch it on a machine with network access from {weights.url} and place it there, e.g. "
                f"`mkdir -p {file.parent} && curl -L -o {file} {weights.url}` (or set TORCH_HOME)"
            )
        state_dict, _ = _as_state_dict(_torch_load(file), file)
        return state_dict, dict(weights.meta)
    if not path.exists():
        raise UserError(
            f"weights file not found: {path}. Pass an existing .pth/.pt/.ckpt file or a torchvision weights "
            "name such as ResNet50_Weights.IMAGENET1K_V2"
        )
    if path.is_dir():
        raise UserError(f"weights path {path} is a directory; pass the .pth/.pt/.ckpt file inside it")
    return _as_state_dict(_torch_load(path), path)


def _peek(path: Path) -> Any:
    """torch.load a file lazily (mmap: tensors are not read) for its metadata and shapes; None when unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # not a zip archive (mmap needs one), or refused: load_weights_spec reports it when loading


def label_space_of(spec: str, head_key: str, task: str) -> LabelSpace | int | None:
    """What whole-model weights `spec` predict, read without loading their tensors.

    A torchvision weights name answers from its metadata ("categories"); a `.ckpt` from `resnet-tasks fit` from
    its hyper-parameters; a `.pth`/`.pt` only with a count: the rows of the classifier `head_key` (an int).
    None when it cannot tell (the loading itself then reports what is wrong with the file).
    """
    spec = str(spec)
    if is_torchvision_weights_name(spec):
        categories = list(_resolve_enum(spec).meta.get("categories") or [])
        if not categories:
            raise UserError(f"torchvision weights {spec} carry no category list; they are not {task} weights.")
        return LabelSpace(tuple(categories), background=categories[0] == "__background__")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights file not found: {path}. Pass an existing .pth/.pt/.ckpt file or a torchvision weights "
            "name (check --model.weights)"
        )
    data = _peek(path)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        info = data.get("resnet_tasks") or {}
        hparams = upgrade_hyperparameters(info.get("task", task), data.get("hyper_parameters") or {}, info)
        if hparams.get("label_space") is not None:
            return LabelSpace.coerce(hparams["label_space"])
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if isinstance(data, Mapping):
        for key, value in data.items():
            if str(key).endswith(head_key) and isinstance(value, torch.Tensor):
                return int(value.shape[0])
    return None


def preprocessing_of(spec: str) -> dict[str, Any] | None:
    """The evaluation preprocessing torchvision weights `spec` were published with (their `transforms()`):
    `resize` (shorter side), `crop` (centre, square; None: none), `mean`, `std`. None for files and for weights
    whose model resizes and normalises itself (detection)."""
    if not is_torchvision_weights_name(str(spec)):
        return None
    transform = _resolve_enum(str(spec)).transforms()
    sizes = {name: getattr(transform, f"{name}_size", None) for name in ("resize", "crop")}
    if not hasattr(transform, "mean") or sizes["resize"] is None:
        return None
    first = {name: int(size[0] if isinstance(size, (list, tuple)) else size) for name, size in sizes.items() if size}
    return {
        "resize": first["resize"],
        "crop": first.get("crop"),
        "mean": [float(m) for m in transform.mean],
        "std": [float(s) for s in transform.std],
    }


def extract_backbone_state_dict(state_dict: Mapping[str, Any], backbone: nn.Module) -> dict[str, Any]:
    """The part of ``state_dict`` that belongs to ``backbone``, with its prefix removed.

    The prefix ("", "backbone.", "backbone.body.", "model.backbone.", ...) is the one under which most of the
    backbone's keys are found. With no match at all the (unwrapped) dict is returned unchanged, so that
    ``load_state_dict_into`` reports the mismatch.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    wanted = set(backbone.state_dict().keys())
    votes: Counter[str] = Counter()
    for key in state_dict:
        parts = key.split(".")
        for start in range(len(parts)):
            if ".".join(parts[start:]) in wanted:
                votes[".".join(parts[:start]) + "." if start else ""] += 1
    if not votes:
        return dict(state_dict)
    # Most keys wins; a tie goes to the shorter prefix (the outermost copy of the backbone).
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))
    if not prefix:
        return dict(state_dict)
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def compare_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], *, source: str, what: str = "model"
) -> tuple[LoadReport, dict[str, Any]]:
    """Match ``state_dict`` (wrapper prefixes stripped) against ``module``'s keys and shapes, loading nothing.

    Returns the report and the loadable part (the keys whose name and shape match).
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    own = module.state_dict()
    report = LoadReport(source=str(source), what=what)
    loadable: dict[str, Any] = {}
    for key, target in own.items():
        if key not in state_dict:
            if key.endswith(TOLERATED_MISSING_SUFFIXES):
                report.tolerated_missing.append(key)
            else:
                report.missing.append(key)
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
            file_shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
            report.shape_mismatched.append((key, file_shape, tuple(target.shape)))
            continue
        report.matched.append(key)
        loadable[key] = value
    report.unexpected = [key for key in state_dict if key not in own]
    return report, loadable


def load_state_dict_into(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    source: str,
    what: str = "model",
    explain: Callable[[Mapping[str, Any]], str] | None = None,
) -> LoadReport:
    """Load every key of ``state_dict`` whose name and shape match ``module``'s; return a ``LoadReport``.

    Strips ``module.`` / ``_orig_mod.`` prefixes. Raises UserError with the key-match summary when any key of
    ``module`` is missing from the file or has another shape (``explain`` may add what the file looks like);
    extra keys in the file are only reported.
    """
    report, loadable = compare_state_dict(module, state_dict, source=source, what=what)
    if not report.ok:
        raise UserError(
            f"weights {source} do not fit the {what}{explain(state_dict) if explain else ''}.\n{report.summary()}\n"
            f"Pass weights made for this {what} (or choose the architecture the file was trained with)."
        )
    # strict=False only because tolerated buffers (num_batches_tracked) may be absent; all else is checked.
    module.load_state_dict(loadable, strict=False)
    logger.debug("%s", report.summary())
    return report


__all__ = [
    "LoadReport",
    "compare_state_dict",
    "is_torchvision_weights_name",
    "label_space_of",
    "extract_backbone_state_dict",
    "hub_checkpoint_path",
    "load_state_dict_into",
    "load_weights_spec",
    "preprocessing_of",
    "strip_wrapper_prefixes",
    "torchvision_weight_names",
]
