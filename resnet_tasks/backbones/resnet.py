"""The one ResNet body behind every backbone name: generic over block, depth, groups, width, stem, dilation.

Its state dict matches torchvision's ``ResNet`` minus ``fc.*``; ``forward`` returns every stage's feature map.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from ..compat import batch_norm_base
from ..errors import UserError
from .blocks import NormFactory, ResidualBlock, ZeroPadShortcut, conv1x1, conv3x3, is_preact
from .weights import LoadReport

NORMS = ("bn", "frozen_bn", "sync_bn", "gn")


def group_norm(num_channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups; narrower layers (16-channel CIFAR stages) use the largest divisor of 32."""
    return nn.GroupNorm(math.gcd(groups, num_channels), num_channels)


def norm_factory(norm: str) -> NormFactory:
    """Map a norm name ("bn", "frozen_bn", "sync_bn", "gn") to a ``channels -> nn.Module`` factory."""
    factories: dict[str, NormFactory] = {
        "bn": nn.BatchNorm2d,
        "frozen_bn": FrozenBatchNorm2d,
        "sync_bn": nn.SyncBatchNorm,
        "gn": partial(group_norm, groups=32),
    }
    if norm not in factories:
        raise UserError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    return factories[norm]


class ResNetBackbone(nn.Module):
    """A ResNet without its classifier: ``forward(x)`` returns ``OrderedDict(stage name -> feature map)``.

    ``channels`` and ``strides`` (ordered, per stage) let necks and heads size themselves.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        *,
        stem: str = "imagenet",
        widths: Sequence[int] = (64, 128, 256, 512),
        groups: int = 1,
        width_per_group: int = 64,
        output_stride: int = 32,
        norm: str = "bn",
        shortcut: bool = True,
        shortcut_type: str = "B",
        frozen_stages: int = 0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(widths) != len(layers):
            raise ValueError("widths and layers must have the same length")
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' (zero padding) or 'B' (projection), got {shortcut_type!r}")
        if zero_init_residual and not shortcut:
            raise UserError(
                "zero_init_residual=True with shortcut=False would make every block output zero; "
                "drop zero_init_residual for plain networks"
            )
        self.name = ""  # the registry name, set by build_backbone
        self.weights_report: LoadReport | None = None  # what build_backbone(weights=...) loaded
        self.preact = is_preact(block)
        self.shortcut = shortcut
        self.shortcut_type = shortcut_type
        self._norm_layer = norm_factory(norm)
        self.norm = norm
        self.groups = groups
        self.base_width = width_per_group
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(layers)))

        stem_stride = 4 if stem == "imagenet" else 1
        stage_strides = [1] + [2] * (len(layers) - 1)
        dilate = self._dilated_stages(output_stride, stem_stride, stage_strides, stem)

        self.inplanes = widths[0]
        self.dilation = 1
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(3, self.inplanes)
        if self.preact:
            # Pre-activation nets normalise at the start of every block, so the stem is a bare convolution
            # (the first block's BN-ReLU is the paper's "activation right after conv1").
            self.bn1: nn.Module = nn.Identity()
            self.relu: nn.Module = nn.Identity()
        else:
            self.bn1 = self._norm_layer(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        )

        channels: OrderedDict[str, int] = OrderedDict()
        strides: OrderedDict[str, int] = OrderedDict()
        current_stride = stem_stride
        for index, (name, planes, depth, stride) in enumerate(zip(self.stage_names, widths, layers, stage_strides)):
            layer = self._make_layer(block, planes, depth, stride=stride, dilate=dilate[index])
            self.add_module(name, layer)
            if not dilate[index]:
                current_stride *= stride
            channels[name] = planes * block.expansion  # type: ignore[attr-defined]
            strides[name] = current_stride
        self.channels: OrderedDict[str, int] = channels
        self.strides: OrderedDict[str, int] = strides

        if self.preact:
            # The paper's extra activation after the last addition: the last stage's map is post BN-ReLU.
            self.final_norm: nn.Module | None = self._norm_layer(channels[self.stage_names[-1]])
            self.final_relu: nn.Module | None = nn.ReLU(inplace=True)
        else:
            self.final_norm = None
            self.final_relu = None

        self._initialise(zero_init_residual)
        del self._norm_layer  # a factory, not state: keep the module picklable and deepcopy-cheap
        self.frozen_stages = 0
        self.freeze(frozen_stages)

    @staticmethod
    def _dilated_stages(output_stride: int, stem_stride: int, stage_strides: list[int], stem: str) -> list[bool]:
        """Which stages trade their stride for dilation (torchvision's ``replace_stride_with_dilation``)."""
        native = stem_stride
        for s in stage_strides:
            native *= s
        if stem == "imagenet":
            allowed = (8, 16, 32)
        else:
            # CIFAR nets reach stride 4 only: 8/16/32 (what a task asks an ImageNet net for) need no dilation,
            # 2 and 1 dilate the last one or two stages.
            allowed = (1, 2, 4, 8, 16, 32)
        if output_stride not in allowed:
            raise UserError(
                f"output_stride={output_stride} is not supported for this {stem}-style backbone; "
                f"use one of {', '.join(map(str, allowed))}"
            )
        dilate = [False] * len(stage_strides)
        current = native
        # Walk back from the last stage, replacing strides until the total fits the requested output stride.
        for index in range(len(stage_strides) - 1, 0, -1):
            if current <= output_stride:
                break
            dilate[index] = True
            current //= stage_strides[index]
        return dilate

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        expansion: int = block.expansion  # type: ignore[attr-defined]
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out_channels = planes * expansion
        downsample: nn.Module | None = None
        if self.shortcut and (stride != 1 or self.inplanes != out_channels):
            if self.shortcut_type == "A":
                downsample = ZeroPadShortcut(self.inplanes, out_channels, stride)
            elif self.preact:
                # The input is already normalised by the block's pre-activation: a bare projection.
                downsample = nn.Sequential(conv1x1(self.inplanes, out_channels, stride))
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, out_channels, stride), self._norm_layer(out_channels))
        common = dict(
            groups=self.groups,
            base_width=self.base_width,
            norm_layer=self._norm_layer,
            shortcut=self.shortcut,
        )
        # Like torchvision, the first block of a dilated stage keeps the previous dilation.
        modules = [block(self.inplanes, planes, stride, downsample, dilation=previous_dilation, **common)]
        self.inplanes = out_channels
        for _ in range(1, blocks):
            modules.append(block(self.inplanes, planes, dilation=self.dilation, **common))
        return nn.Sequential(*modules)

    def _initialise(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (batch_norm_base(), nn.GroupNorm, FrozenBatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # Each residual branch starts at zero, so every block starts as the identity (Goyal et al. 2017).
            for module in self.modules():
                if isinstance(module, ResidualBlock):
                    module.zero_init_last()  # timm's protocol: each block zeroes the end of its own branch

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first ``frozen_stages`` stages (and the final norm when all stages are frozen)."""
        if self.frozen_stages <= 0:
            return []
        modules: list[nn.Module] = [self.conv1, self.bn1]
        modules += [getattr(self, name) for name in self.stage_names[: self.frozen_stages]]
        if self.frozen_stages == len(self.stage_names) and self.final_norm is not None:
            modules.append(self.final_norm)
        return modules

    def freeze(self, frozen_stages: int) -> None:
        """Freeze the stem and the first ``frozen_stages`` stages: no gradients, norm statistics fixed.

        0 or -1 freezes nothing. Freezing is one-way: already frozen parameters are not unfrozen.
        """
        if not -1 <= frozen_stages <= len(self.stage_names):
            raise UserError(
                f"frozen_stages={frozen_stages} is out of range for {len(self.stage_names)}-stage backbone; "
                f"use -1/0 (none) up to {len(self.stage_names)} (stem + all stages)"
            )
        self.frozen_stages = max(self.frozen_stages, frozen_stages)
        for module in self.frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            module.train(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Switch train/eval mode; frozen stages stay in eval so their BN running statistics never move."""
        super().train(mode)
        for module in self.frozen_modules():
            module.train(False)
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features: OrderedDict[str, Tensor] = OrderedDict()
        last = self.stage_names[-1]
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name == last and self.final_norm is not None:
                x = self.final_relu(self.final_norm(x))  # type: ignore[misc]
            features[name] = x
        return features

    def extra_repr(self) -> str:
        frozen = self.frozen_stages
        return f"channels={dict(self.channels)}, strides={dict(self.strides)}, frozen_stages={frozen}"


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["NORMS", "ResNetBackbone", "count_parameters", "group_norm", "norm_factory"]
