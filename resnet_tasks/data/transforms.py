"""The albumentations presets of the three tasks (classification's ImageNet and CIFAR recipes, detection's flip and
large-scale jitter, segmentation's scaled crops), which keep images uint8, the normalisation constants, and what
makes the model's input from a batch after its transfer to the device (`model_input`, `unit_range_images`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
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
    """An albumentations pipeline applied to an RGB uint8 array, giving the item's {"image": CHW uint8 tensor}.

    Optionally a `SeededResizedCrop` before the albumentations steps, torchvision's TrivialAugment (wide) on the
    uint8 image after the spatial steps, and random erasing (the ImageNet V2 recipe's pieces). Erasing acts on the
    normalised image, which exists only after the transfer (`model_input`): here its box is drawn as torchvision's
    `RandomErasing` draws it and travels as the item's "erase" (`erase_box`). With a `seed`, every random choice
    (the crop's, albumentations' and torch's) is a function of it, and the caller's torch RNG stream is untouched.
    """

    def __init__(
        self,
        steps: list[A.BasicTransform],
        trivial_augment: bool = False,
        random_erase: float = 0.0,
        crop: SeededResizedCrop | None = None,
    ) -> None:
        self.crop = crop
        self.pipeline = A.Compose(steps)
        self.policy = self.erase = None
        if trivial_augment or random_erase > 0:
            from torchvision.transforms import v2

            self.policy = v2.TrivialAugmentWide() if trivial_augment else None
            self.erase = v2.RandomErasing(p=random_erase, value=0) if random_erase > 0 else None

    def __call__(self, image: np.ndarray, seed: int | None = None) -> dict[str, torch.Tensor]:
        if self.crop is not None:
            # Without a per-sample seed (no TrainSampler), the crop's seed comes from torch's (per-worker) stream.
            image = self.crop(image, int(torch.randint(2**31, ())) if seed is None else seed)
        if seed is not None:
            self.pipeline.set_random_seed(seed)
        pixels = image_to_tensor(self.pipeline(image=image)["image"])  # uint8 CHW
        if self.policy is None and self.erase is None:
            return {"image": pixels}
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if self.policy is not None:
                pixels = self.policy(pixels)
            if self.erase is None:
                return {"image": pixels}
            return {"image": pixels, "erase": erase_box(self.erase, pixels)}

    def __repr__(self) -> str:
        crop = f"{self.crop!r}, " if self.crop is not None else ""
        return f"{type(self).__name__}({crop}{self.pipeline})"


def erase_box(erase: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The rectangle torchvision's `RandomErasing` (`erase`, value 0) would erase in an image of `pixels`' shape,
    drawn with the same calls on torch's RNG (its probability, then its box), as int64 (top, left, height, width);
    zeros when it erases nothing. The box depends on the shape only, so drawing it on the uint8 image leaves the
    draws as they were on the normalised one."""
    if torch.rand(1) < erase.p:
        params = erase.make_params([pixels])
        if params["v"] is not None:
            return torch.tensor([params["i"], params["j"], params["h"], params["w"]], dtype=torch.int64)
    return torch.zeros(4, dtype=torch.int64)


def imagenet_train_transform(
    crop_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    *,
    trivial_augment: bool = False,
    random_erase: float = 0.0,
) -> Callable[[np.ndarray, int | None], dict[str, torch.Tensor]]:
    """torchvision's ImageNet training preset on uint8: RandomResizedCrop (bilinear) + horizontal flip (+ TrivialAugment
    wide) (+ the box of random erasing with probability `random_erase`); the crop and flip come from
    `ResizedCropSampler`, as on the GPU decode path. Normalising and erasing follow on the device (`model_input`)."""
    crop = SeededResizedCrop(crop_size, ResizedCropSampler(scale, RESIZED_CROP_RATIO, hflip))
    return AlbumentationsTransform([], trivial_augment=trivial_augment, random_erase=random_erase, crop=crop)


def imagenet_eval_transform(
    crop_size: int = 224, resize_size: int = 256
) -> Callable[[np.ndarray, int | None], dict[str, torch.Tensor]]:
    """torchvision's ImageNet evaluation preset on uint8: shorter side to `resize_size` (bilinear), centre crop."""
    return AlbumentationsTransform(
        [
            A.SmallestMaxSize(max_size=resize_size, interpolation=cv2.INTER_LINEAR),
            A.CenterCrop(height=crop_size, width=crop_size),
        ]
    )


def cifar_train_transform(size: int = 32) -> Callable[[np.ndarray, int | None], dict[str, torch.Tensor]]:
    """The ResNet paper's CIFAR augmentation on uint8: pad 4 with zeros, random 32x32 crop, flip (the per-channel
    normalisation follows on the device)."""
    return AlbumentationsTransform(
        [
            A.PadIfNeeded(min_height=size + 8, min_width=size + 8, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(height=size, width=size),
            A.HorizontalFlip(p=0.5),
        ]
    )


def cifar_eval_transform() -> Callable[[np.ndarray, int | None], dict[str, torch.Tensor]]:
    """CIFAR evaluation: the image as it is (the per-channel normalisation follows on the device)."""
    return AlbumentationsTransform([])


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
    base_size: int | None = None,
) -> A.Compose:
    """Random scale, pad to the crop (image 0, mask 255), random crop, flip; the image stays uint8 (normalised after
    the transfer, `model_input`).

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
    return A.Compose(steps)


def segmentation_eval_transform(eval_size: int | None = 520) -> A.Compose:
    """Image only: shorter side to `eval_size` (bilinear; None keeps the size); uint8 (normalised after the transfer,
    `model_input`)."""
    steps: list[A.BasicTransform] = []
    if eval_size is not None:
        steps.append(A.SmallestMaxSize(max_size=eval_size, interpolation=cv2.INTER_LINEAR))
    return A.Compose(steps)


# ----------------------------------------------------------------------------------------------- on the device
# Items cross the DataLoader workers as uint8 (a quarter of float32's bytes through shared memory and the host to
# device copy); the data module's `on_after_batch_transfer` makes the model's input on the device with these.
@functools.lru_cache(maxsize=16)
def _scaled_mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """255 x mean and 255 x std as (1, C, 1, 1) float32 tensors on `device` (made once per device)."""
    shape = (1, len(mean), 1, 1)
    scaled_mean = torch.tensor([255.0 * m for m in mean], dtype=torch.float32).view(shape)
    scaled_std = torch.tensor([255.0 * s for s in std], dtype=torch.float32).view(shape)
    return scaled_mean.to(device), scaled_std.to(device)


def normalize_pixels_(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) float pixels in 0..255, in place: (pixels - 255 mean) / (255 std), albumentations' `Normalize`."""
    scaled_mean, scaled_std = _scaled_mean_std(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    return images.sub_(scaled_mean).div_(scaled_std)


def _inside(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 1, height, width) bool: True inside each row's box (top, left, box height, box width) of `boxes` (N, 4)."""
    top, left, box_height, box_width = boxes.to(torch.int64).unbind(1)
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_width)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def model_input(
    batch: dict[str, Any], mean: Sequence[float], std: Sequence[float], *, channels_last: bool = False
) -> dict[str, Any]:
    """A moved batch's uint8 "image" (N, C, H, W) as the model takes it, made on its device: float32, normalised
    (`normalize_pixels_`), NHWC in memory with `channels_last` (the model's layout).

    The items' "erase" boxes (`erase_box`, random erasing) are set to 0 on the normalised image, as torchvision's
    `RandomErasing(value=0)` did, and leave the batch. With an "input_size" (per image (height, width) host pairs:
    evaluation images of different sizes, padded by the collate), the padding beyond each image's input is 0 after
    normalisation (the mean). A batch whose "image" is not uint8 is returned as it is. No value is read back to the
    host.
    """
    images = batch.get("image")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return batch
    layout = torch.channels_last if channels_last and images.ndim == 4 else torch.contiguous_format
    pixels = normalize_pixels_(images.to(dtype=torch.float32, memory_format=layout), mean, std)
    height, width = pixels.shape[-2:]
    out = dict(batch)
    erase = out.pop("erase", None)
    if erase is not None:
        pixels.masked_fill_(_inside(erase, height, width), 0.0)
    if pixels.ndim == 4:
        for k, (valid_h, valid_w) in enumerate(out.get("input_size") or ()):
            if (valid_h, valid_w) == (height, width):
                continue  # not padded (the size-grouped batches never are): no kernel to launch
            pixels[k, :, valid_h:, :] = 0.0
            pixels[k, :, :valid_h, valid_w:] = 0.0
    out["image"] = pixels
    return out


def unit_range_images(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detection's moved uint8 images (C, H, W each, any size) as float32 pixels / 255 on their device (the detector
    resizes and normalises them itself); images that are not uint8 are kept as they are."""
    return [image.float().div_(255.0) if image.dtype == torch.uint8 else image for image in images]
