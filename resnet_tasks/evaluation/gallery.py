"""Gallery samples kept during evaluation (rank 0 only): the first N images and the N with the highest error.

Memory is bounded: at most 2N items, each an image of at most `MAX_SIDE` pixels on its longer side with its
prediction and ground truth; an image is copied to the CPU only when it is kept. The error scores of a batch stay on
the device until the keeper reads them back, several batches at a time (`readback_every`).
"""

from __future__ import annotations

import functools
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from resnet_tasks.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Images are stored at most this large (longer side): enough for a gallery cell, bounded memory.
MAX_SIDE = 512
# Gallery images in the report (TensorBoard uses --model.log_images N).
GALLERY_SIZE = 16
# At most this many predicted boxes per gallery image (the highest scores): more are not legible.
MAX_BOXES = 25


@dataclass
class GalleryItem:
    """One evaluated image for the gallery: pixels (H, W, 3 uint8), what the model said and what is true.

    Classification: `truth` (class name) and `top` ((name, probability) pairs, best first). Detection: boxes
    XYXY in this image's pixels with their class names (and scores for predictions). Segmentation: class-index
    masks (H, W) at this image's size and the class names they index. `error` ranks the worst images.
    """

    title: str
    image: np.ndarray
    error: float = 0.0
    truth: str | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    truth_boxes: np.ndarray | None = None
    truth_names: list[str] = field(default_factory=list)
    pred_boxes: np.ndarray | None = None
    pred_names: list[str] = field(default_factory=list)
    pred_scores: list[float] = field(default_factory=list)
    truth_mask: np.ndarray | None = None
    pred_mask: np.ndarray | None = None
    mask_names: list[str] = field(default_factory=list)


class GalleryKeeper:
    """Keeps the first `size` images offered and, in a bounded min-heap, the `size` with the highest error.

    `offer(error, build)` calls `build()` (which copies the image) only when the item is kept. `offer_batch` queues a
    batch whose error scores are still on the device; the queue is read back in one transfer every `readback_every`
    batches (0: only at `flush`), so the host waits for the device once per that many batches, and the queued
    batches (what their `build` needs) stay in memory until then.
    """

    def __init__(self, size: int = GALLERY_SIZE, readback_every: int = 0) -> None:
        self.size = max(0, int(size))
        self.readback_every = max(0, int(readback_every))
        self.reset()

    def reset(self) -> None:
        self.first: list[GalleryItem] = []
        self._heap: list[tuple[float, int, GalleryItem]] = []
        self._counter = itertools.count()
        self._queued: list[tuple[torch.Tensor, Callable[[int], GalleryItem]]] = []

    def offer_batch(self, errors: torch.Tensor, build: Callable[[int], GalleryItem]) -> None:
        """Queue one batch: its per-image error scores (a tensor not read yet) and `build(i)` for image i."""
        if self.size == 0:
            return
        self._queued.append((errors.detach().reshape(-1), build))
        if self.readback_every and len(self._queued) >= self.readback_every:
            self.flush()

    def flush(self) -> None:
        """Read the queued batches' error scores back (one transfer) and offer their images in order."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        values = torch.cat([errors.to(torch.float64) for errors, _ in queued]).tolist()
        position = 0
        for errors, build in queued:
            for index in range(errors.numel()):
                self.offer(values[position], functools.partial(build, index))
                position += 1

    def offer(self, error: float, build: Callable[[], GalleryItem]) -> None:
        """Consider one image with error score `error` (higher = worse)."""
        if self.size == 0:
            return
        keep_first = len(self.first) < self.size
        keep_worst = len(self._heap) < self.size or error > self._heap[0][0]
        if not (keep_first or keep_worst):
            return
        item = build()
        item.error = float(error)
        if keep_first:
            self.first.append(item)
        if keep_worst:
            entry = (float(error), next(self._counter), item)
            if len(self._heap) < self.size:
                heapq.heappush(self._heap, entry)
            else:
                heapq.heapreplace(self._heap, entry)

    def worst(self) -> list[GalleryItem]:
        """The kept images, worst first."""
        return [item for _, _, item in sorted(self._heap, key=lambda entry: (-entry[0], entry[1]))]


def image_array(image: torch.Tensor, normalized: bool = False) -> tuple[np.ndarray, float]:
    """A (3, H, W) image tensor as an (H, W, 3) uint8 array of at most MAX_SIDE pixels, and the scale applied.

    `normalized` images are mapped back with the ImageNet mean/std (every data module's default; CIFAR's
    statistics differ slightly, which only tints its gallery); others are taken as pixels / 255.
    """
    pixels = image.detach().float().cpu()
    if normalized:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        pixels = pixels * std + mean
    scale = min(1.0, MAX_SIDE / max(pixels.shape[-2:]))
    if scale < 1.0:
        size = [max(1, round(side * scale)) for side in pixels.shape[-2:]]
        pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array), scale


def shrink_mask(mask: np.ndarray) -> np.ndarray:
    """A class-index mask reduced (nearest) like `image_array` reduces its image."""
    scale = min(1.0, MAX_SIDE / max(mask.shape))
    if scale >= 1.0:
        return np.ascontiguousarray(mask)
    size = [max(1, round(side * scale)) for side in mask.shape]
    tensor = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
    return F.interpolate(tensor, size=size, mode="nearest")[0, 0].to(torch.uint8).numpy()
