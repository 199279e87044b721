"""Detection predictions: `predictions.json` in COCO results format and rendered pictures of the first images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from resnet_tasks.labels import LabelSpace
from resnet_tasks.writers import PredictionWriter, gather_objects

# One colour per class (label modulo the list): well-separated hues that stay visible on photos.
BOX_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip


def box_colour(label: int) -> tuple[int, int, int]:
    """The picture colour of a class label (label 1 gets the first colour)."""
    return BOX_COLOURS[(int(label) - 1) % len(BOX_COLOURS)]


def to_coco_results(detections: dict[str, Any], image_id: int | str, label_space: LabelSpace) -> list[dict[str, Any]]:
    """One image's detections as COCO results: XYXY -> XYWH (pixels), label -> the dataset's category id."""
    boxes = detections["boxes"].detach().cpu().double().reshape(-1, 4)
    labels = detections["labels"].detach().cpu().tolist()
    scores = detections["scores"].detach().cpu().tolist()
    results = []
    for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels, scores):
        results.append(
            {
                "image_id": image_id,
                "category_id": label_space.category_id(label),
                # 3 decimals (a thousandth of a pixel) keep the file small without moving any IoU noticeably.
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "score": round(float(score), 6),
            }
        )
    return results


class DetectionWriter(PredictionWriter):
    """Collects COCO results per image (in dataset order) and draws boxes on the first `picture_count` images.

    Each prediction names its image (`index` in the dataset, `image_key`, `file_name`): `image_id` is the dataset's
    image id (COCO), or the file stem (VOC, a predict folder). Pictures show
    detections scoring at least `picture_score_threshold` (at most `picture_max_boxes`), labelled
    "<class name> <score>" in one colour per class, saved as `pictures/<stem>.jpg`.
    """

    picture_count = 16
    picture_score_threshold = 0.5
    picture_max_boxes = 50

    def start(self, out_dir: Path, label_space: LabelSpace) -> None:
        super().start(out_dir, label_space)
        self.path = self.out_dir / "predictions.json"
        self.picture_dir = self.out_dir / "pictures"
        self.results: list[tuple[int, list[dict[str, Any]]]] = []
        self.pictures: list[Path] = []

    def write_batch(self, outputs: list[dict[str, Any]], batch: Any) -> None:
        """`outputs`: the task's per-image predictions, each with its dataset `index`, `image_key` and `file_name`;
        the pictures are drawn on the batch's images (`batch[0]`, pixels in [0, 1])."""
        images = batch[0]
        for image, detections in zip(images, outputs):
            index = int(detections["index"])
            self.results.append((index, to_coco_results(detections, detections["image_key"], self.label_space)))
            if index < self.picture_count:
                self.pictures.append(self.draw(image, detections, Path(str(detections["file_name"])).stem))

    def draw(self, image: torch.Tensor, detections: dict[str, Any], stem: str) -> Path:
        pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        keep = detections["scores"] >= self.picture_score_threshold
        boxes = detections["boxes"][keep][: self.picture_max_boxes].float()
        scores = detections["scores"][keep][: self.picture_max_boxes].tolist()
        labels = detections["labels"][keep][: self.picture_max_boxes].tolist()
        if len(boxes):
            captions = [f"{self.class_name(label)} {score:.2f}" for label, score in zip(labels, scores)]
            colours = [box_colour(label) for label in labels]
            pixels = draw_bounding_boxes(pixels, boxes, labels=captions, colors=colours, width=2)
        self.picture_dir.mkdir(parents=True, exist_ok=True)
        path = self.picture_dir / f"{stem}.jpg"
        Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())).save(path, quality=90)
        return path

    def finish(self, trainer: L.Trainer) -> list[Path]:
        parts = gather_objects(trainer, (self.results, [str(p) for p in self.pictures]))
        if not trainer.is_global_zero:
            return []
        ordered = sorted((item for part in parts for item in part[0]), key=lambda item: item[0])
        results = [entry for _, entries in ordered for entry in entries]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(results))
        pictures = sorted(Path(p) for part in parts for p in part[1])
        return [self.path, *([self.picture_dir] if pictures else [])]
