"""Backbone names -> architectures; ``build_backbone``, ``list_backbones``, ``backbone_table``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import UserError
from .blocks import BLOCKS
from .resnet import ResNetBackbone, count_parameters
from .weights import LoadReport, extract_backbone_state_dict, load_state_dict_into, load_weights_spec

IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


@dataclass(frozen=True)
class BackboneSpec:
    """The architecture behind one backbone name."""

    name: str
    block: str  # a key of blocks.BLOCKS
    layers: tuple[int, ...]
    stem: str = "imagenet"  # "imagenet" (7x7/2 conv + max pool) or "cifar" (3x3 conv, 16 channels)
    widths: tuple[int, ...] = IMAGENET_WIDTHS
    groups: int = 1
    width_per_group: int = 64
    shortcut: bool = True
    shortcut_type: str = "B"  # "A": parameter-free zero padding (CIFAR), "B": projection

    def conv2_shape(self) -> tuple[int, int]:
        """(out, in) channels of ``layer1.0.conv2``: identifies width and groups in a state dict."""
        if "bottleneck" in self.block:
            width = int(self.widths[0] * (self.width_per_group / 64.0)) * self.groups
            return width, width // self.groups
        return self.widths[0], self.widths[0]


def _specs() -> dict[str, BackboneSpec]:
    specs: list[BackboneSpec] = []
    imagenet = {
        18: ("basic", (2, 2, 2, 2)),
        34: ("basic", (3, 4, 6, 3)),
        50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)),
        152: ("bottleneck", (3, 8, 36, 3)),
        200: ("bottleneck", (3, 24, 36, 3)),
    }
    for depth, (block, layers) in imagenet.items():
        specs.append(BackboneSpec(f"resnet{depth}", block, layers))
    # ResNeXt and Wide ResNets: (name, the ImageNet depth whose layers they take, groups, width per group).
    for name, depth, groups, width_per_group in (
        ("resnext50_32x4d", 50, 32, 4),
        ("resnext101_32x8d", 101, 32, 8),
        ("resnext101_64x4d", 101, 64, 4),
        ("wide_resnet50_2", 50, 1, 128),
        ("wide_resnet101_2", 101, 1, 128),
    ):
        specs.append(
            BackboneSpec(name, "bottleneck", imagenet[depth][1], groups=groups, width_per_group=width_per_group)
        )
    for depth, (block, layers) in imagenet.items():
        specs.append(BackboneSpec(f"resnet{depth}_v2", f"preact_{block}", layers))
    # CIFAR nets of He et al. 2015, section 4.2: 6n+2 layers, option-A shortcuts.
    for depth in (20, 32, 44, 56, 110, 1202):
        n = (depth - 2) // 6
        specs.append(
            BackboneSpec(f"resnet{depth}", "basic", (n, n, n), stem="cifar", widths=CIFAR_WIDTHS, shortcut_type="A")
        )
    # Pre-activation CIFAR bottleneck nets of He et al. 2016: 9n+2 layers, projection shortcuts.
    for depth in (164, 1001):
        n = (depth - 2) // 9
        specs.append(
            BackboneSpec(f"resnet{depth}_v2", "preact_bottleneck", (n, n, n), stem="cifar", widths=CIFAR_WIDTHS)
        )
    by_name = {spec.name: spec for spec in specs}
    # The "plain" counterparts of the paper: same layers, no shortcut additions.
    for depth in (18, 34, 20, 32, 44, 56, 110):
        base = by_name[f"resnet{depth}"]
        specs.append(
            BackboneSpec(
                f"plain{depth}",
                base.block,
                base.layers,
                stem=base.stem,
                widths=base.widths,
                shortcut=False,
                shortcut_type=base.shortcut_type,
            )
        )
    return {spec.name: spec for spec in specs}


BACKBONE_SPECS: dict[str, BackboneSpec] = _specs()


def list_backbones() -> list[str]:
    """Every registered backbone name, in registry order (ImageNet, ResNeXt/Wide, v2, CIFAR, plain)."""
    return list(BACKBONE_SPECS)


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; an unknown name raises UserError listing the closest names."""
    if name in BACKBONE_SPECS:
        return BACKBONE_SPECS[name]
    close = difflib.get_close_matches(str(name), list(BACKBONE_SPECS), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(BACKBONE_SPECS)}"
    raise UserError(f"unknown backbone {name!r}; {hint} (resnet_tasks.list_backbones() lists them all)")


def build_backbone(
    name: str,
    weights: str | None = None,
    *,
    output_stride: int = 32,
    frozen_stages: int = 0,
    norm: str = "bn",
    shortcut: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNetBackbone:
    """Build the backbone ``name`` and optionally load ``weights`` into it.

    ``weights``: a torchvision weights enum name read from the local hub cache (e.g.
    ``ResNet50_Weights.IMAGENET1K_V2``, or a whole-model one such as
    ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``), a ``.pth``/``.pt`` state dict in torchvision's layout, or a
    ``.ckpt`` from ``resnet-tasks fit``. The backbone part is found and loaded; the rest (``fc.*``, heads) is
    reported and ignored.
    ``shortcut=None`` keeps the variant's default (False for the ``plain*`` names).
    """
    spec = get_spec(name)
    model = ResNetBackbone(
        BLOCKS[spec.block],
        spec.layers,
        stem=spec.stem,
        widths=spec.widths,
        groups=spec.groups,
        width_per_group=spec.width_per_group,
        output_stride=output_stride,
        norm=norm,
        shortcut=spec.shortcut if shortcut is None else shortcut,
        shortcut_type=spec.shortcut_type,
        frozen_stages=frozen_stages,
        zero_init_residual=zero_init_residual,
    )
    model.name = name
    if weights:
        model.weights_report = load_backbone_weights(model, weights, what=f"backbone {name}")
    return model


@dataclass
class BackboneConfig:
    """The `backbone` config group, the same for every task (`--model.backbone.name resnet18`).

    `output_stride` / `shortcut` None keep the task's or the variant's default.
    """

    name: str = "resnet50"
    weights: str | None = None
    frozen_stages: int = 0
    norm: Literal["bn", "frozen_bn", "sync_bn", "gn"] = "bn"
    output_stride: int | None = None
    shortcut: bool | None = None
    zero_init_residual: bool = False

    def build(self, **task_defaults: Any) -> ResNetBackbone:
        """The backbone these settings describe, without weights; `task_defaults` fill the unset options."""
        options: dict[str, Any] = dict(task_defaults)
        options.update(frozen_stages=self.frozen_stages, norm=self.norm, zero_init_residual=self.zero_init_residual)
        if self.output_stride is not None:
            options["output_stride"] = self.output_stride
        if self.shortcut is not None:
            options["shortcut"] = self.shortcut
        return build_backbone(self.name, None, **options)


def guess_backbone(keys_and_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Name the registered backbone whose layout a state dict (key -> shape, no prefix) seems to hold."""
    layers: dict[int, int] = {}
    for key in keys_and_shapes:
        parts = key.split(".")
        if len(parts) > 2 and parts[0].startswith("layer") and parts[0][5:].isdigit() and parts[1].isdigit():
            stage = int(parts[0][5:])
            layers[stage] = max(layers.get(stage, 0), int(parts[1]) + 1)
    if not layers or "layer1.0.conv2.weight" not in keys_and_shapes:
        return None
    found = tuple(layers[i] for i in sorted(layers))
    bottleneck = "layer1.0.conv3.weight" in keys_and_shapes
    preact = any(key.startswith("final_norm.") for key in keys_and_shapes)
    conv2 = tuple(keys_and_shapes["layer1.0.conv2.weight"][:2])
    has_projection = any(".downsample." in key for key in keys_and_shapes)
    for spec in BACKBONE_SPECS.values():
        if (
            spec.layers == found
            and ("bottleneck" in spec.block) == bottleneck
            and spec.block.startswith("preact") == preact
            and spec.conv2_shape() == conv2
            # plain twins differ from their residual nets only by the missing projection weights
            and (spec.shortcut and spec.shortcut_type == "B") == has_projection
        ):
            return spec.name
    return None


def layout_hint(state_dict: Mapping[str, Any]) -> str:
    """'; the file looks like resnet18 weights' when a registered backbone's layout is recognised, else ''."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    guess = guess_backbone(shapes)
    if guess is None:
        # Whole-model files: look under the prefix of the first ResNet stem we find.
        for key in shapes:
            if key.endswith("layer1.0.conv1.weight"):
                prefix = key[: -len("layer1.0.conv1.weight")]
                guess = guess_backbone({k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)})
                break
    return f"; the file looks like {guess} weights" if guess else ""


def load_backbone_weights(backbone: torch.nn.Module, spec: str, what: str = "backbone") -> LoadReport:
    """Load the backbone part of weights `spec` (any layout: torchvision classifier or detector, our .ckpt)."""
    state_dict, _ = load_weights_spec(spec)
    part = extract_backbone_state_dict(state_dict, backbone)
    return load_state_dict_into(backbone, part, source=spec, what=what, explain=layout_hint)


def backbone_table() -> list[dict]:
    """One row per backbone: name, parameters in millions, per-stage channels and strides (at stride 32)."""
    rows = []
    for name in BACKBONE_SPECS:
        # The meta device allocates nothing, so even ResNet-1202 is described in milliseconds per block.
        with torch.device("meta"):
            model = build_backbone(name)
        rows.append(
            {
                "name": name,
                "params_m": round(count_parameters(model) / 1e6, 2),
                "channels": list(model.channels.values()),
                "strides": list(model.strides.values()),
            }
        )
    return rows


__all__ = [
    "BACKBONE_SPECS",
    "BackboneConfig",
    "BackboneSpec",
    "backbone_table",
    "build_backbone",
    "get_spec",
    "guess_backbone",
    "layout_hint",
    "load_backbone_weights",
    "list_backbones",
]
