"""Residual blocks of the ResNet family: basic, bottleneck, their pre-activation (v2) forms, and shortcuts.

Every block takes ``shortcut``: with ``False`` it is the "plain" block of He et al. (no addition at all).
Submodule names follow torchvision so that its state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias; padding equals dilation so the map size only changes with stride."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        dilation=dilation,
        bias=False,
    )


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (bottleneck reductions and projection shortcuts)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of the CIFAR ResNets: subsample by ``stride`` and zero-pad the new channels.

    It has no parameters, so the CIFAR nets keep the paper's parameter counts.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"zero-padding shortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            # Pad symmetrically on the channel axis (F.pad pads the last dims first: W, H, then C).
            front = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, front, self.extra - front))
        return x


@dataclass(frozen=True)
class BranchShape:
    """Channels, stride, groups and dilation of one block's residual branch."""

    in_channels: int
    width: int  # channels inside the branch
    out_channels: int
    stride: int
    groups: int
    dilation: int


class ResidualBlock(nn.Module):
    """What every residual block shares: the constructor, the shortcut addition and ``zero_init_last``.

    A subclass builds its branch's layers in ``build`` under torchvision's submodule names (``conv1``, ``bn1``, ...)
    and runs them in ``branch``. Post-activation (v1) blocks add the shortcut to the branch and apply ReLU after;
    pre-activation (v2) blocks normalise the input first, feed that to the branch and to a projection shortcut, and
    add the untouched input on the identity path.
    """

    expansion = 1
    preactivated = False
    grouped = True  # False: the block only supports groups=1 and base_width=64
    last_layer = ""  # the layer that ends the residual branch, zeroed by ``zero_init_last``

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormFactory = nn.BatchNorm2d,
        shortcut: bool = True,
    ) -> None:
        super().__init__()
        if not self.grouped and (groups != 1 or base_width != 64):
            raise ValueError(f"{type(self).__name__} supports only groups=1 and base_width=64")
        width = int(planes * (base_width / 64.0)) * groups
        self.build(BranchShape(in_channels, width, planes * self.expansion, stride, groups, dilation), norm_layer)
        self.downsample = downsample
        self.stride = stride
        self.shortcut = shortcut

    def build(self, shape: BranchShape, norm: NormFactory) -> None:
        """Create the branch's layers, under torchvision's names."""
        raise NotImplementedError

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch (of the pre-activated input in a v2 block)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLU is safe: it acts on the norm's fresh output, the identity ``x`` stays untouched.
        pre = self.relu(self.bn1(x)) if self.preactivated else x
        out = self.branch(pre)
        if self.shortcut:
            # In-place add (like torchvision): the branch's last output is not needed for its backward.
            out += x if self.downsample is None else self.downsample(pre)
        return out if self.preactivated else self.relu(out)

    def zero_init_last(self) -> None:
        """Zero the layer that ends the residual branch (its last norm; in a v2 block its last convolution): the
        block starts as the identity (``zero_init_residual``)."""
        nn.init.zeros_(getattr(self, self.last_layer).weight)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (post-activation, ResNet v1), torchvision's layout.

    Both convolutions use the block's dilation (unlike torchvision, which refuses dilation here), so a ResNet-18/34
    can run at output stride 8/16 with a receptive field that keeps pace.
    """

    grouped = False
    last_layer = "bn2"

    def build(self, shape: BranchShape, norm: NormFactory) -> None:
        self.conv1 = conv3x3(shape.in_channels, shape.width, shape.stride, dilation=shape.dilation)
        self.bn1 = norm(shape.width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(shape.width, shape.out_channels, dilation=shape.dilation)
        self.bn2 = norm(shape.out_channels)

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (carries the stride: ResNet v1.5), 1x1 expand; torchvision's layout."""

    expansion = 4
    last_layer = "bn3"

    def build(self, shape: BranchShape, norm: NormFactory) -> None:
        self.conv1 = conv1x1(shape.in_channels, shape.width)
        self.bn1 = norm(shape.width)
        self.conv2 = conv3x3(shape.width, shape.width, shape.stride, shape.groups, shape.dilation)
        self.bn2 = norm(shape.width)
        self.conv3 = conv1x1(shape.width, shape.out_channels)
        self.bn3 = norm(shape.out_channels)
        self.relu = nn.ReLU(inplace=True)

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PreActBasicBlock(ResidualBlock):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): BN-ReLU-conv twice, clean identity.

    A projection shortcut, when present, is applied to the pre-activated input, as in the paper.
    """

    preactivated = True
    grouped = False
    last_layer = "conv2"

    def build(self, shape: BranchShape, norm: NormFactory) -> None:
        self.bn1 = norm(shape.in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(shape.in_channels, shape.width, shape.stride, dilation=shape.dilation)
        self.bn2 = norm(shape.width)
        self.conv2 = conv3x3(shape.width, shape.out_channels, dilation=shape.dilation)

    def branch(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu(self.bn2(self.conv1(x))))


class PreActBottleneck(ResidualBlock):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (strided), BN-ReLU-1x1; clean identity path."""

    expansion = 4
    preactivated = True
    last_layer = "conv3"

    def build(self, shape: BranchShape, norm: NormFactory) -> None:
        self.bn1 = norm(shape.in_channels)
        self.conv1 = conv1x1(shape.in_channels, shape.width)
        self.bn2 = norm(shape.width)
        self.conv2 = conv3x3(shape.width, shape.width, shape.stride, shape.groups, shape.dilation)
        self.bn3 = norm(shape.width)
        self.conv3 = conv1x1(shape.width, shape.out_channels)
        self.relu = nn.ReLU(inplace=True)

    def branch(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu(self.bn2(self.conv1(x))))
        return self.conv3(self.relu(self.bn3(out)))


BLOCKS: dict[str, type[ResidualBlock]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}


def is_preact(block: type[nn.Module]) -> bool:
    """True for the pre-activation (v2) blocks."""
    return bool(getattr(block, "preactivated", False))


__all__ = [
    "BLOCKS",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResidualBlock",
    "ZeroPadShortcut",
    "conv1x1",
    "conv3x3",
    "is_preact",
]
