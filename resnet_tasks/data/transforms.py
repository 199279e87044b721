"""albumentations presets for classification (ImageNet and CIFAR recipes) and shared constants.

Detection and segmentation presets live beside their datasets (`coco.py`, `voc.py`, `voc_segmentation.py`)
because they carry boxes and masks along.
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWxC float32 array -> CxHxW tensor (no copy of the data beyond the transpose)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class AlbumentationsTransform:
    """An albumentations pipeline applied to an RGB uint8 array, returning a normalised CHW float tensor."""

    def __init__(self, steps: list[A.BasicTransform]) -> None:
        self.pipeline = A.Compose(steps)

    def __call__(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        if seed is not None:
            self.pipeline.set_random_seed(seed)
        return to_tensor(self.pipeline(image=image)["image"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline})"


def imagenet_train_transform(
    crop_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Callable[[np.ndarray], torch.Tensor]:
    """torchvision's ImageNet training preset: RandomResizedCrop (bilinear) + horizontal flip + normalise."""
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(crop_size, crop_size), scale=scale, interpolation=cv2.INTER_LINEAR)
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return AlbumentationsTransform(steps)


def imagenet_eval_transform(
    crop_size: int = 224,
    resize_size: int = 256,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Callable[[np.ndarray], torch.Tensor]:
    """torchvision's ImageNet evaluation preset: shorter side to `resize_size` (bilinear), centre crop."""
    return AlbumentationsTransform(
        [
            A.SmallestMaxSize(max_size=resize_size, interpolation=cv2.INTER_LINEAR),
            A.CenterCrop(height=crop_size, width=crop_size),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
        ]
    )


def cifar_train_transform(
    mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD, size: int = 32
) -> Callable[[np.ndarray], torch.Tensor]:
    """The ResNet paper's CIFAR augmentation: pad 4 with zeros, random 32x32 crop, flip, per-channel norm."""
    return AlbumentationsTransform(
        [
            A.PadIfNeeded(min_height=size + 8, min_width=size + 8, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(height=size, width=size),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
        ]
    )


def cifar_eval_transform(
    mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD
) -> Callable[[np.ndarray], torch.Tensor]:
    """CIFAR evaluation: per-channel normalisation only."""
    return AlbumentationsTransform([A.Normalize(mean=mean, std=std, max_pixel_value=255.0)])
