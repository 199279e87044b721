"""Semantic segmentation: dilated shared backbone -> torchvision FCNHead (+ auxiliary head), mean-IoU metrics."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from resnet_tasks.data.io import read_image
from resnet_tasks.errors import UserError
from resnet_tasks.evaluation.gallery import GalleryItem, image_array, shrink_mask
from resnet_tasks.evaluation.segmentation import SegmentationMetrics, class_map
from resnet_tasks.evaluation.summary import EvaluationResult, confusion_summary
from resnet_tasks.tasks.base import TaskBase
from resnet_tasks.tasks.tta import segmentation_logits
from resnet_tasks.writers import PredictionWriter
from resnet_tasks.writers.segmentation import SegmentationWriter


class FCN(nn.Module):
    """torchvision's FCN on our backbone: `backbone.*`, `classifier.*`, `aux_classifier.*` as in `fcn_resnet50`.

    The main head reads the last stage, the auxiliary head the one before (layer4 / layer3 on ImageNet
    ResNets); both predict at the backbone's output stride and are upsampled bilinearly to the input size.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, aux_loss: bool = True) -> None:
        super().__init__()
        stages = list(backbone.stage_names)
        if len(stages) < 2:
            raise UserError(f"FCN needs a backbone with at least two stages; got {stages}.")
        self.out_stage, self.aux_stage = stages[-1], stages[-2]
        self.backbone = backbone
        self.classifier = FCNHead(backbone.channels[self.out_stage], num_classes)
        self.aux_classifier = FCNHead(backbone.channels[self.aux_stage], num_classes) if aux_loss else None

    def forward(self, images: torch.Tensor, with_aux: bool = True) -> dict[str, torch.Tensor]:
        """{"out": (N, C, H, W) logits at the input size, "aux": same from the auxiliary head (if asked)}."""
        size = images.shape[-2:]
        features = self.backbone(images)
        logits = self.classifier(features[self.out_stage])
        result = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if with_aux and self.aux_classifier is not None:
            aux = self.aux_classifier(features[self.aux_stage])
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return result


def host_sizes(sizes: Any) -> list[tuple[int, int]]:
    """Per-image (height, width) pairs as host integers, from a (N, 2) tensor or a sequence of pairs."""
    rows = sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes
    return [(int(height), int(width)) for height, width in rows]


def resize_logits_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) logits to `size` (no-op when it already has that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationTask(TaskBase):
    """FCN semantic segmentation on the shared backbone, scored at each image's original resolution.

    The backbone runs at output stride 8 (dilated last stages, as torchvision's FCN) unless
    `backbone.output_stride` says otherwise. `num_classes` includes the background (VOC: 21). Whole-model
    `weights` (e.g. `FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1`, a torchvision-layout `.pth`, a `.ckpt`
    from `fit`) fix the label space; `backbone.weights` reuses only the backbone.

    Batches are dicts: training {"image": (N,3,H,W) float, "mask": (N,H,W) uint8}; evaluation additionally
    carries per-image "input_size" (network input, before padding) and "size" (original) as host (height, width)
    pairs, with "mask" at the original size (padded with 255 when sizes differ in a batch).
    """

    task_name: ClassVar[str] = "segmentation"
    main_metric: ClassVar[str] = "val/miou"
    head_key: ClassVar[str] = "classifier.4.weight"
    writer_class: ClassVar[type[PredictionWriter]] = SegmentationWriter

    def __init__(
        self,
        aux_loss: bool = True,
        aux_weight: float = 0.5,
        aux_lr_mult: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_task_hyperparameters()
        self.aux_loss = aux_loss
        self.aux_weight = aux_weight
        self.aux_lr_mult = aux_lr_mult
        self.ignore_index = self.label_space.ignore_index
        self.model = FCN(self.backbone_config.build(output_stride=8), self.num_classes, aux_loss=aux_loss)
        if self.backbone_config.norm == "sync_bn":
            # The heads' BatchNorm follows the backbone's choice (statistics across GPUs at small batch sizes).
            self.model.classifier = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.classifier)
            if self.model.aux_classifier is not None:
                self.model.aux_classifier = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.aux_classifier)
        names = list(self.label_space.class_names)
        self.val_metrics = SegmentationMetrics(self.num_classes, ignore_index=self.ignore_index, class_names=names)
        self.test_metrics = SegmentationMetrics(self.num_classes, ignore_index=self.ignore_index, class_names=names)

    # ------------------------------------------------------------------ model and weights
    def backbone_module(self) -> nn.Module:
        return self.model.backbone

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The base groups, with the auxiliary head's parameters split off at `aux_lr_mult` x the LR.

        torchvision's FCN recipe trains the auxiliary head at 10x the base LR.
        """
        groups = super().parameter_groups()
        if self.model.aux_classifier is None or self.aux_lr_mult == 1.0:
            return groups
        aux_ids = {id(p) for p in self.model.aux_classifier.parameters()}
        result = []
        for group in groups:
            own = [p for p in group["params"] if id(p) not in aux_ids]
            aux = [p for p in group["params"] if id(p) in aux_ids]
            if own:
                result.append({**group, "params": own})
            if aux:
                name = group["name"].replace("head", "aux_head", 1)
                result.append({**group, "params": aux, "lr": group["lr"] * self.aux_lr_mult, "name": name})
        return result

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes, H, W) at the input size for a batch of normalised images."""
        return self.model(self.in_memory_format(images), with_aux=False)["out"]

    def model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's FCN layout (backbone.*, classifier.*, aux_classifier.*) or our .ckpt ("model.*")."""
        if any(key.startswith("model.backbone.") for key in state_dict):
            return {key: value for key, value in state_dict.items() if key.startswith("model.")}
        return {f"model.{key}": value for key, value in state_dict.items()}

    # ------------------------------------------------------------------ training
    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["image"].shape[0])

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        target = batch["mask"].long()
        outputs = self.model(self.in_memory_format(batch["image"]), with_aux=self.aux_loss)
        losses = {"loss_seg": F.cross_entropy(outputs["out"], target, ignore_index=self.ignore_index)}
        if "aux" in outputs:
            aux = F.cross_entropy(outputs["aux"], target, ignore_index=self.ignore_index)
            losses["loss_aux"] = self.aux_weight * aux
        return losses

    # ------------------------------------------------------------------ evaluation and prediction
    def predict_masks(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per-image class maps (H, W) at each image's original size.

        The network sees the (resized, possibly padded) batch; each image's logits are cropped to its valid
        input region and resized bilinearly to its original size before the argmax.
        """
        logits = segmentation_logits(self, batch["image"], self.tta)
        input_sizes, sizes = host_sizes(batch["input_size"]), host_sizes(batch["size"])
        padded = tuple(logits.shape[-2:])
        if all(s == padded for s in input_sizes) and all(s == sizes[0] for s in sizes):
            return list(class_map(resize_logits_to(logits, sizes[0])))
        masks = []
        for i, ((in_h, in_w), (height, width)) in enumerate(zip(input_sizes, sizes)):
            one = logits[i : i + 1, :, :in_h, :in_w]
            masks.append(class_map(resize_logits_to(one, (height, width)))[0])
        return masks

    def evaluation_outputs(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        return self.predict_masks(batch)

    def evaluation_update(
        self, stage: str, batch: dict[str, Any], predictions: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """The confusion matrix over each image's original pixels; the gallery ranks images by their share of wrong
        labelled pixels (only where it can read the image's file again)."""
        metric = self.test_metrics if stage == "test" else self.val_metrics
        shown = "path" in batch
        errors = []
        for prediction, truth in zip(predictions, self.true_masks(batch)):
            metric.update(prediction, truth)
            if shown:
                valid = truth != self.ignore_index
                errors.append(((prediction != truth) & valid).sum().double() / valid.sum().clamp(min=1).double())
        return torch.stack(errors) if errors else None

    def true_masks(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each image's labels at its original size (the batch pads them to a common size)."""
        return [truth[:height, :width] for truth, (height, width) in zip(batch["mask"], host_sizes(batch["size"]))]

    def gallery_item(self, batch: dict[str, Any], predictions: list[torch.Tensor], index: int) -> GalleryItem:
        """The original image (read again from its file) with the true and the predicted class maps."""
        pixels = torch.from_numpy(read_image(batch["path"][index])).permute(2, 0, 1).float() / 255.0
        image, _ = image_array(pixels)
        truth = self.true_masks(batch)[index]
        return GalleryItem(
            title=str(batch["stem"][index]),
            image=image,
            truth_mask=shrink_mask(truth.to(torch.uint8).cpu().numpy()),
            pred_mask=shrink_mask(predictions[index].to(torch.uint8).cpu().numpy()),
            mask_names=list(self.label_space.class_names),
        )

    def evaluation_compute(self, stage: str) -> EvaluationResult:
        """Mean IoU and pixel accuracy; per-class IoU (`iou/<class>`), accuracy and precision from the confusion."""
        metric = self.test_metrics if stage == "test" else self.val_metrics
        metrics, entries = {}, {}
        for name, value in metric.compute().items():
            if name.startswith("iou/"):
                entries[name] = float(value)
            else:
                metrics[name] = value
        confusion = metric.last_confusion
        metric.reset()
        columns = {"iou": "iou", "acc": "recall", "precision": "precision", "pixels": "support"}
        return EvaluationResult(
            metrics, entries, confusion_summary(self.task_name, self.label_space.class_names, confusion, columns)
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """{"stem", "path": lists of str; "mask": list of (H, W) uint8 CPU tensors at original size}."""
        masks = [mask.to(torch.uint8).cpu() for mask in self.predict_masks(batch)]
        return {"stem": list(batch["stem"]), "path": list(batch["path"]), "mask": masks}
