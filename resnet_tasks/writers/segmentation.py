"""Segmentation predictions: `masks/<stem>.png` palette PNGs (pixel = class index) and overlay pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_segmentation_masks

from resnet_tasks.data.io import read_image
from resnet_tasks.data.masks import VOC_PALETTE, save_palette_mask
from resnet_tasks.data.sampling import distributed_rank_and_size
from resnet_tasks.labels import IGNORE_INDEX, LabelSpace
from resnet_tasks.writers import PredictionWriter, gather_objects


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each predicted non-background class painted in its VOC colour."""
    labels = torch.from_numpy(mask.astype(np.int64))
    classes = [int(c) for c in torch.unique(labels) if 0 < int(c) < IGNORE_INDEX]
    picture = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if not classes:
        return image
    boolean = torch.stack([labels == c for c in classes])
    colours = [tuple(VOC_PALETTE[3 * c : 3 * c + 3]) for c in classes]
    drawn = draw_segmentation_masks(picture, boolean, alpha=alpha, colors=colours)
    return drawn.permute(1, 2, 0).numpy()


class SegmentationWriter(PredictionWriter):
    """Writes one palette PNG per image at its original size, and overlays for the first `num_overlays` images.

    Every rank writes the images of its own shard (file names are the image stems, so ranks never collide);
    `finish` gathers the counts. Under DDP each rank draws overlays for its first num_overlays / world_size
    images, which are the globally first ones because evaluation shards are interleaved.
    """

    def __init__(self, output_dir: str | None = None, num_overlays: int = 16) -> None:
        super().__init__(output_dir)
        self.num_overlays = num_overlays

    def start(self, out_dir: Path, label_space: LabelSpace) -> None:
        super().start(out_dir, label_space)
        self.mask_dir = self.out_dir / "masks"
        self.overlay_dir = self.out_dir / "overlays"
        _, world_size = distributed_rank_and_size()
        self.overlays_left = -(-self.num_overlays // world_size)
        self.count = 0

    def write_batch(self, outputs: dict[str, Any], batch: Any) -> None:
        for stem, path, mask in zip(outputs["stem"], outputs["path"], outputs["mask"]):
            array = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            save_palette_mask(array, self.mask_dir / f"{stem}.png")
            self.count += 1
            if self.overlays_left > 0:
                self.overlays_left -= 1
                self.overlay_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(overlay(read_image(path), array)).save(self.overlay_dir / f"{stem}.jpg", quality=90)

    def finish(self, trainer: L.Trainer) -> list[Path]:
        counts = gather_objects(trainer, self.count)
        if not trainer.is_global_zero:
            return []
        paths = [self.mask_dir]
        if self.overlay_dir.is_dir():
            paths.append(self.overlay_dir)
        print(f"segmentation masks: {sum(counts)} palette PNGs (pixel = class index) in {self.mask_dir}")
        return paths
