"""Residual blocks of the ResNet family: basic, bottleneck, their pre-activation (v2) forms, and shortcuts.

Every block takes ``shortcut``: with ``False`` it is the "plain" block of He et al. (no addition at all).
Submodule names follow torchvision so that its state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]


def conv3x3(
    in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
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
            raise ValueError(
                f"zero-padding shortcut cannot reduce channels ({in_channels} -> {out_channels})"
            )
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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (post-activation, ResNet v1), torchvision's layout."""

    expansion = 1

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
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        # Both convolutions use the block's dilation (unlike torchvision, which refuses dilation here), so a
        # ResNet-18/34 can run at output stride 8/16 with a receptive field that keeps pace.
        self.conv1 = conv3x3(in_channels, planes, stride, dilation=dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut:
            # In-place add (like torchvision): the norm's output is not needed for its backward.
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)

    def zero_init_last(self) -> None:
        """Zero the norm that ends the residual branch: the block starts as the identity (``zero_init_residual``)."""
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: ResNet v1.5), 1x1 expand; torchvision's layout."""

    expansion = 4

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
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut:
            # In-place add (like torchvision): the norm's output is not needed for its backward.
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)

    def zero_init_last(self) -> None:
        """Zero the norm that ends the residual branch: the block starts as the identity (``zero_init_residual``)."""
        nn.init.zeros_(self.bn3.weight)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): BN-ReLU-conv twice, clean identity.

    A projection shortcut, when present, is applied to the pre-activated input, as in the paper.
    """

    expansion = 1

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
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock supports only groups=1 and base_width=64")
        self.bn1 = norm_layer(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, planes, stride, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.downsample = downsample
        self.stride = stride
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLU is safe: it acts on the norm's fresh output, the identity ``x`` stays untouched.
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        if self.shortcut:
            out += x if self.downsample is None else self.downsample(pre)
        return out

    def zero_init_last(self) -> None:
        """Zero the convolution that ends the residual branch (no norm follows it in a pre-activation block)."""
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (strided), BN-ReLU-1x1; clean identity path."""

    expansion = 4

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
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = norm_layer(in_channels)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn3 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if self.shortcut:
            out += x if self.downsample is None else self.downsample(pre)
        return out

    def zero_init_last(self) -> None:
        """Zero the convolution that ends the residual branch (no norm follows it in a pre-activation block)."""
        nn.init.zeros_(self.conv3.weight)


BLOCKS: dict[str, type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}


def is_preact(block: type[nn.Module]) -> bool:
    """True for the pre-activation (v2) blocks."""
    return block in (PreActBasicBlock, PreActBottleneck)


__all__ = [
    "BLOCKS",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ZeroPadShortcut",
    "conv1x1",
    "conv3x3",
    "is_preact",
]
