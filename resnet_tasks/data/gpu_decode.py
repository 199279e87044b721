"""Classification's device decode path (`--data.decode_device cuda`): workers read JPEG bytes, the device decodes a
batch with torchvision's decoder (nvJPEG on a GPU) and crops, flips and normalises it there.

Training crops come from the same `ResizedCropSampler` as the CPU path's, so a sample's seed gives the same box on
both paths; evaluation resizes the shorter side and centre-crops as `imagenet_eval_transform` does. Resizing is
bilinear without antialiasing on both paths (OpenCV's INTER_LINEAR on CPU), so their pixels agree to rounding.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from resnet_tasks.data.io import EXIF_ORIENTATION_TAG, image_to_tensor, jpeg_state, read_image, read_image_bytes
from resnet_tasks.data.transforms import ResizedCropSampler, normalize_pixels_


def read_encoded(path: str | Path) -> torch.Tensor:
    """A file as the device path's worker hands it on: a JPEG's bytes (1-D uint8), anything else decoded (CHW uint8).

    Checks what `read_image` checks without decoding: a missing, empty or truncated file raises
    `UnreadableImageError`. A JPEG whose EXIF orientation rotates it is decoded here (the batched GPU decoder
    ignores EXIF), so both paths see the same upright pixels.
    """
    path = Path(path)
    data = read_image_bytes(path)
    if jpeg_state(data) == "complete" and not _rotated(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # Not a JPEG, a truncated one (read_image names it) or an EXIF-rotated one: decode on CPU as the workers' path.
    return image_to_tensor(read_image(path))


def _rotated(data: bytes) -> bool:
    """Whether a JPEG carries an EXIF orientation other than upright (header only; most files have no EXIF)."""
    if b"Exif" not in data[:65536]:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.getexif().get(EXIF_ORIENTATION_TAG, 1) not in (1, 0)
    except Exception:  # a broken header: let the decoder report the file
        return False


class EncodedImages:
    """A batch of undecoded images (CPU tensors from `read_encoded`), their files and per-sample seeds.

    A plain object on purpose: Lightning moves only tensors (and objects with `.to`) to the device and the
    DataLoader pins only tensors, while torchvision's decoder wants the bytes on CPU.
    """

    def __init__(self, data: list[torch.Tensor], paths: list[str], seeds: list[int] | None) -> None:
        self.data = data
        self.paths = paths
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.data)} images, seeds={'yes' if self.seeds is not None else 'no'})"


def collate_encoded(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate device-path items ({"image", "path", "seed", "label", "name"}) into {"image": EncodedImages, ...}."""
    seeds = [item["seed"] for item in items]
    return {
        "image": EncodedImages(
            [item["image"] for item in items],
            [item["path"] for item in items],
            None if any(seed is None for seed in seeds) else seeds,
        ),
        "label": torch.tensor([item["label"] for item in items], dtype=torch.int64),
        "name": [item["name"] for item in items],
    }


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, with a warning on every call.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_batch(encoded: EncodedImages, device: torch.device) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Decode a batch on `device` (one batched call for its JPEGs): the CHW uint8 images, None where a file is
    corrupt, and the reason per failed position (naming the file)."""
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded.data) if data.ndim == 1]
    for i, data in enumerate(encoded.data):
        if data.ndim == 3:
            images[i] = data.to(device, non_blocking=True)
    failures: dict[int, str] = {}
    if not jpegs:
        return images, failures
    try:
        for i, image in zip(jpegs, _decode_jpegs([encoded.data[i] for i in jpegs], device)):
            images[i] = image
    except RuntimeError:
        # The batched call fails as a whole: find the culprit(s) one by one; OpenCV gets a last try at what the
        # device decoder rejects (e.g. CMYK for nvJPEG), as the CPU path would have decoded it.
        import cv2

        for i in jpegs:
            try:
                images[i] = _decode_jpegs([encoded.data[i]], device)[0]
            except RuntimeError as error:
                array = cv2.imdecode(encoded.data[i].numpy(), cv2.IMREAD_COLOR)
                if array is None:
                    # torchvision's message starts with its C++ source location; the decoder's reason comes last.
                    reason = str(error).splitlines()[0].rsplit(", ", 1)[-1]
                    failures[i] = (
                        f"Corrupt or unreadable image {encoded.paths[i]} ({reason}). Re-download or remove the file."
                    )
                else:
                    images[i] = image_to_tensor(cv2.cvtColor(array, cv2.COLOR_BGR2RGB)).to(device)
    return images, failures


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, height, width) float in 0..255, bilinear without antialiasing (as INTER_LINEAR)."""
    image = image.float().unsqueeze(0)
    if image.shape[-2:] != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return image[0]


class DeviceImagePipeline:
    """Decode + RandomResizedCrop/flip (training, per-sample seeds) or resize + centre crop (evaluation) + normalise,
    on the device a batch was moved to."""

    def __init__(
        self,
        crop_size: int,
        resize_size: int,
        eval_crop_size: int,
        sampler: ResizedCropSampler,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.eval_crop_size = eval_crop_size
        self.sampler = sampler
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, encoded: EncodedImages, device: torch.device, channels_last: bool = False
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """The normalised (N', 3, S, S) float batch of the decodable images (in order; NHWC in memory with
        `channels_last`, the model's layout) and the failures by position."""
        images, failures = decode_batch(encoded, device)
        size = self.crop_size if encoded.seeds is not None else self.eval_crop_size
        kept = [i for i in range(len(images)) if i not in failures]
        layout = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((len(kept), 3, size, size), dtype=torch.float32, device=device, memory_format=layout)
        for row, i in enumerate(kept):
            image = images[i]
            assert image is not None
            height, width = image.shape[-2:]
            if encoded.seeds is not None:
                box = self.sampler(height, width, encoded.seeds[i])
                crop = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
                resized = _resize(crop, size, size)
                out[row] = resized.flip(-1) if box.flip else resized
            else:
                # albumentations' SmallestMaxSize + CenterCrop arithmetic, so both paths keep the same pixels.
                scale = self.resize_size / min(height, width)
                new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
                top, left = (new_h - size) // 2, (new_w - size) // 2
                out[row] = _resize(image, new_h, new_w)[:, top : top + size, left : left + size]
        return normalize_pixels_(out, self.mean, self.std), failures
