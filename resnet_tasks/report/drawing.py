"""The colours every picture of the package uses: one per class for boxes, the VOC palette for masks, and the
mask overlay (the report's gallery and the prediction writers' pictures draw with these)."""

from __future__ import annotations

import numpy as np

from resnet_tasks.data.masks import VOC_PALETTE
from resnet_tasks.labels import IGNORE_INDEX

# One colour per class (label modulo the list): well-separated hues that stay visible on photos.
BOX_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip
WHITE = (255, 255, 255)


def box_colour(label: int) -> tuple[int, int, int]:
    """The box colour of a class label (label 1, the first class after the background, gets the first colour)."""
    return BOX_COLOURS[(int(label) - 1) % len(BOX_COLOURS)]


def mask_colour(index: int) -> tuple[int, int, int]:
    """The colour of class index `index` in a mask: its VOC palette entry (what viewers show for our PNGs)."""
    return (VOC_PALETTE[3 * index], VOC_PALETTE[3 * index + 1], VOC_PALETTE[3 * index + 2])


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, ignore_colour: tuple[int, int, int] | None = None
) -> np.ndarray:
    """`image` (H, W, 3 uint8) with each non-background class of `mask` (H, W class indices) blended in at `alpha`
    in its palette colour; ignored pixels (255) painted `ignore_colour`, or left as they are when None."""
    painted = image.astype(np.float32)
    palette = np.asarray(VOC_PALETTE, dtype=np.float32).reshape(-1, 3)
    classes = (mask > 0) & (mask < IGNORE_INDEX)
    painted[classes] = (1 - alpha) * painted[classes] + alpha * palette[mask[classes]]
    if ignore_colour is not None:
        painted[mask == IGNORE_INDEX] = ignore_colour
    return painted.round().clip(0, 255).astype(np.uint8)
