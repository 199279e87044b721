"""Test-time augmentation (`--model.tta none|flip|flip_scales`, evaluation only): the network's outputs over
horizontal flips (and rescaled copies) of a batch, mapped back to the input's frame and averaged at the logit
level; for detection, the flipped image's boxes mirrored back and merged with class-wise NMS."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

# Input scales of `flip_scales` (MMSegmentation's multi-scale test uses 0.5..1.75 of the test size).
SEGMENTATION_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CLASSIFICATION_SCALES = (0.875, 1.0, 1.125)


def _rescaled(images: Tensor, scale: float) -> Tensor:
    if scale == 1.0:
        return images
    return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=True)


def classification_logits(
    forward: Callable[[Tensor], Tensor], images: Tensor, mode: str, scales: Sequence[float] = CLASSIFICATION_SCALES
) -> Tensor:
    """(N, C) logits averaged over the image and its mirror (and `scales` with `flip_scales`)."""
    if mode == "none":
        return forward(images)
    outputs = []
    for scale in scales if mode == "flip_scales" else (1.0,):
        view = _rescaled(images, scale)
        outputs += [forward(view), forward(view.flip(-1))]
    return torch.stack(outputs).mean(dim=0)


def segmentation_logits(
    forward: Callable[[Tensor], Tensor], images: Tensor, mode: str, scales: Sequence[float] = SEGMENTATION_SCALES
) -> Tensor:
    """(N, C, H, W) logits at the input size, averaged over the mirror (and `scales` with `flip_scales`)."""
    if mode == "none":
        return forward(images)
    size = tuple(images.shape[-2:])
    outputs = []
    for scale in scales if mode == "flip_scales" else (1.0,):
        view = _rescaled(images, scale)
        for logits in (forward(view), forward(view.flip(-1)).flip(-1)):
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            outputs.append(logits)
    return torch.stack(outputs).mean(dim=0)


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """XYXY boxes of a horizontally flipped image of `width` pixels, in the unflipped image's frame."""
    mirrored = boxes.clone()
    mirrored[:, 0] = width - boxes[:, 2]
    mirrored[:, 2] = width - boxes[:, 0]
    return mirrored


def detection_flip(
    forward: Callable[[list[Tensor]], list[dict[str, Tensor]]],
    images: list[Tensor],
    nms_iou: float,
    max_detections: int,
) -> list[dict[str, Tensor]]:
    """Detections of each image and of its mirror (boxes mirrored back), merged per class by NMS at `nms_iou`."""
    plain = forward(images)
    flipped = forward([image.flip(-1) for image in images])
    merged = []
    for image, one, other in zip(images, plain, flipped):
        boxes = torch.cat([one["boxes"], mirror_boxes(other["boxes"], int(image.shape[-1]))])
        scores = torch.cat([one["scores"], other["scores"]])
        labels = torch.cat([one["labels"], other["labels"]])
        keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
        merged.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return merged
