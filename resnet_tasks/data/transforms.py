"""The albumentations presets of the three tasks (classification's ImageNet and CIFAR recipes, detection's flip and
large-scale jitter, segmentation's scaled crops) and the normalisation constants."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from resnet_tasks.data.io import image_to_tensor
from resnet_tasks.errors import UserError
from resnet_tasks.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision's default)


@dataclasses.dataclass(frozen=True)
class CropBox:
    """One training image's crop (pixels of the decoded image) and whether it is flipped horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class ResizedCropSampler:
    """RandomResizedCrop's box and the horizontal flip of one training image, drawn from its per-sample seed.

    torchvision's algorithm (`RandomResizedCrop.get_params`): an area fraction uniform in `scale` and an aspect
    ratio log-uniform in `ratio`, up to 10 tries for a box that fits, else a centre crop of the clamped ratio. The
    one sampler of both classification paths: the workers' (decode on CPU, `imagenet_train_transform`) and the
    device's (`--data.decode_device cuda`, `resnet_tasks.data.gpu_decode`), so both crop the same box for a seed.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = RESIZED_CROP_RATIO,
        hflip: bool = True,
    ) -> None:
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip

    def __call__(self, height: int, width: int, seed: int) -> CropBox:
        """The box for an image of `height` x `width` pixels and the sample's `seed` (a 32-bit integer)."""
        rng = np.random.default_rng(seed)
        flip = self.hflip and bool(rng.random() < 0.5)  # first, so the number of crop tries cannot shift it
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return CropBox(top, left, h, w, flip)
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            h, w = height, width
        return CropBox((height - h) // 2, (width - w) // 2, h, w, flip)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


class SeededResizedCrop:
    """The CPU side of `ResizedCropSampler`: crop its box, resize to `size` x `size` (bilinear, OpenCV) and flip."""

    def __init__(self, size: int, sampler: ResizedCropSampler) -> None:
        self.size = size
        self.sampler = sampler

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        box = self.sampler(image.shape[0], image.shape[1], seed)
        crop = image[box.top : box.top + box.height, box.left : box.left + box.width]
        out = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(out[:, ::-1]) if box.flip else out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, {self.sampler!r})"


class AlbumentationsTransform:
    """An albumentations pipeline applied to an RGB uint8 array, returning a normalised CHW float tensor.

    Optionally a `SeededResizedCrop` before the albumentations steps, torchvision's TrivialAugment (wide) on the
    uint8 image after the spatial steps and random erasing on the normalised tensor (the ImageNet V2 recipe's
    pieces); with a `seed`, every random choice (the crop's, albumentations' and torch's) is a function of it, and
    the caller's torch RNG stream is left untouched.
    """

    def __init__(
        self,
        steps: list[A.BasicTransform],
        normalize: A.Normalize | None = None,
        trivial_augment: bool = False,
        random_erase: float = 0.0,
        crop: SeededResizedCrop | None = None,
    ) -> None:
        self.crop = crop
        self.pipeline = A.Compose(steps if normalize is None else [*steps, normalize])
        self.policy = self.normalize = self.erase = None
        if normalize is not None and (trivial_augment or random_erase > 0):
            from torchvision.transforms import v2

            self.pipeline = A.Compose(steps)
            self.policy = v2.TrivialAugmentWide() if trivial_augment else None
            self.normalize = v2.Normalize(mean=list(normalize.mean), std=list(normalize.std))
            self.erase = v2.RandomErasing(p=random_erase, value=0) if random_erase > 0 else None

    def __call__(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        if self.crop is not None:
            # Without a per-sample seed (no TrainSampler), the crop's seed comes from torch's (per-worker) stream.
            image = self.crop(image, int(torch.randint(2**31, ())) if seed is None else seed)
        if seed is not None:
            self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=image)["image"]
        if self.normalize is None:
            return image_to_tensor(out)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            pixels = image_to_tensor(out)  # uint8 CHW
            if self.policy is not None:
                pixels = self.policy(pixels)
            tensor = self.normalize(pixels.float().div_(255.0))
            return self.erase(tensor) if self.erase is not None else tensor

    def __repr__(self) -> str:
        crop = f"{self.crop!r}, " if self.crop is not None else ""
        return f"{type(self).__name__}({crop}{self.pipeline})"


def imagenet_train_transform(
    crop_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    *,
    trivial_augment: bool = False,
    random_erase: float = 0.0,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Callable[[np.ndarray], torch.Tensor]:
    """torchvision's ImageNet training preset: RandomResizedCrop (bilinear) + horizontal flip (+ TrivialAugment
    wide) + normalise (+ random erasing with probability `random_erase`); the crop and flip come from
    `ResizedCropSampler`, as on the GPU decode path."""
    crop = SeededResizedCrop(crop_size, ResizedCropSampler(scale, RESIZED_CROP_RATIO, hflip))
    normalize = A.Normalize(mean=mean, std=std, max_pixel_value=255.0)
    return AlbumentationsTransform([], normalize, trivial_augment=trivial_augment, random_erase=random_erase, crop=crop)


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


# ----------------------------------------------------------------------------------------------- detection
def detection_train_transform(
    hflip_prob: float = 0.5, large_scale_jitter: tuple[float, float] | None = None, crop_size: int | None = None
) -> A.Compose:
    """Training augmentation: horizontal flip, optionally large-scale jitter; boxes follow and stay inside.

    Multi-scale training is the model's job (`--model.min_size [480, ..., 800]`): its transform resizes every
    image, so a resize here would be undone. Large-scale jitter (Ghiasi et al. 2021, torchvision's `ScaleJitter`
    + `FixedSizeCrop`) is the exception: the longer side is scaled to `crop_size` x r (r drawn in
    `large_scale_jitter`), then the image is padded / randomly cropped to `crop_size` x `crop_size`; use it with
    `--model.min_size crop_size --model.max_size crop_size` so the model's resize leaves it alone.
    """
    steps: list[Any] = []
    if large_scale_jitter is not None:
        if crop_size is None:
            raise UserError("--data.large_scale_jitter needs --data.crop_size (the fixed training size, e.g. 1024).")
        low, high = large_scale_jitter
        steps += [
            A.LongestMaxSize(max_size=crop_size),
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0),
            A.PadIfNeeded(min_height=crop_size, min_width=crop_size, position="top_left", fill=0),
            A.RandomCrop(height=crop_size, width=crop_size),
        ]
    steps.append(A.HorizontalFlip(p=hflip_prob))
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True),
    )


# ----------------------------------------------------------------------------------------------- segmentation
def segmentation_train_transform(
    crop_size: int = 480,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    base_size: int | None = None,
) -> A.Compose:
    """Random scale, pad to the crop (image 0, mask 255), random crop, flip, normalise.

    The scale is a factor of the image drawn in `scale_range`, or, with `base_size` (torchvision's preset), the
    shorter side is resized to a random integer in `scale_range` x `base_size`. Masks are only ever resized
    with nearest neighbour and padded with 255, so they hold class ids and 255.
    """
    low, high = scale_range
    if base_size is None:
        resize: A.BasicTransform = A.RandomScale(
            scale_limit=(low - 1.0, high - 1.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        )
    else:
        resize = A.SmallestMaxSize(
            max_size=list(range(int(low * base_size), int(high * base_size) + 1)),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            area_for_downscale="image",
        )
    steps: list[A.BasicTransform] = [
        resize,
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return A.Compose(steps)


def segmentation_eval_transform(
    eval_size: int | None = 520, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> A.Compose:
    """Image only: shorter side to `eval_size` (bilinear; None keeps the size), then normalise."""
    steps: list[A.BasicTransform] = []
    if eval_size is not None:
        steps.append(A.SmallestMaxSize(max_size=eval_size, interpolation=cv2.INTER_LINEAR))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    return A.Compose(steps)
