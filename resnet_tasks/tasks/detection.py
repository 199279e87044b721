"""Object detection: the shared backbone + a feature pyramid (P2-P6) + torchvision's Faster R-CNN heads.

The module layout (`model.backbone.body`, `model.backbone.fpn`, `model.rpn`, `model.roi_heads`) is torchvision's
`fasterrcnn_resnet50_fpn`, so its COCO weights load unchanged and reproduce its detections.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from resnet_tasks.errors import UserError
from resnet_tasks.evaluation.confusion import DetectionConfusionMatrix
from resnet_tasks.evaluation.detection import COCO_METRIC_NAMES, coco_map_metric, per_class_ap
from resnet_tasks.evaluation.gallery import MAX_BOXES, GalleryItem, image_array
from resnet_tasks.evaluation.summary import EvaluationResult, EvaluationSummary, confusion_table, per_class_entries
from resnet_tasks.evaluation.voc import VOCDetectionAP
from resnet_tasks.labels import BACKGROUND, LabelSpace
from resnet_tasks.tasks.base import TaskBase
from resnet_tasks.tasks.optim import OptimizerConfig
from resnet_tasks.tasks.tta import detection_flip
from resnet_tasks.writers import PredictionWriter
from resnet_tasks.writers.detection import DetectionWriter

CLASSIFIER_KEY = "roi_heads.box_predictor.cls_score.weight"
# torchvision builds this model with FrozenBatchNorm2d eps=0 ("overwrite_eps"): its numbers need the same.
ZERO_EPS_WEIGHTS = ("FasterRCNN_ResNet50_FPN_Weights.COCO_V1",)
DEFAULT_ANCHOR_SIZES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)


class BackboneWithFeaturePyramid(nn.Module):
    """`.body` = our ResNet backbone, `.fpn` = torchvision's FeaturePyramidNetwork sized from `body.channels`.

    Returns the pyramid as {"0": P2, ..., "3": P5, "pool": P6} like torchvision's BackboneWithFPN (so its
    RoI pooler names and state-dict keys apply); `out_channels` is what FasterRCNN reads.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.stage_names = tuple(body.stage_names)
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=[body.channels[name] for name in self.stage_names],
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    @property
    def feature_names(self) -> list[str]:
        """Names of the pyramid levels the RoI heads pool from (P2..P5; P6 only feeds the RPN)."""
        return [str(index) for index in range(len(self.stage_names))]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        stages = self.body(images)
        features = OrderedDict((str(i), stages[name]) for i, name in enumerate(self.stage_names))
        return self.fpn(features)


def build_faster_rcnn(
    body: nn.Module,
    num_classes: int,
    *,
    fpn_channels: int = 256,
    min_size: int | list[int] = 800,
    max_size: int = 1333,
    anchor_sizes: list[list[int]] | None = None,
    aspect_ratios: list[float] | None = None,
    frozen_bn_eps: float | None = None,
    **detection_options: Any,
) -> FasterRCNN:
    """torchvision's Faster R-CNN on `body` (our backbone) with a feature pyramid sized from its stage channels.

    `num_classes` counts every output, background included (torchvision's convention). One anchor size tuple
    per pyramid level; `frozen_bn_eps` overrides the FrozenBatchNorm eps (torchvision's COCO weights need 0).
    `detection_options` are FasterRCNN's own keyword arguments (RPN / box head sampling, NMS, thresholds).
    """
    pyramid = BackboneWithFeaturePyramid(body, fpn_channels)
    levels = len(pyramid.feature_names) + 1
    sizes = tuple(tuple(int(s) for s in level) for level in (anchor_sizes or DEFAULT_ANCHOR_SIZES))
    if len(sizes) != levels:
        raise UserError(
            f"--model.anchor_sizes needs one entry per pyramid level: {levels} for this backbone "
            f"({levels - 1} stages + the pooled level), got {len(sizes)}."
        )
    ratios = tuple(float(r) for r in (aspect_ratios or DEFAULT_ASPECT_RATIOS))
    model = FasterRCNN(
        pyramid,
        num_classes=num_classes,
        min_size=tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size,
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(sizes, (ratios,) * levels),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=pyramid.feature_names, output_size=7, sampling_ratio=2),
        **detection_options,
    )
    if frozen_bn_eps is not None:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = frozen_bn_eps
    return model


class DetectionTask(TaskBase):
    """Faster R-CNN + FPN on the shared backbone (torchvision's machinery, our backbone and training loop).

    The label space follows the data (background at output 0, then the object classes); whole-model `weights`
    fix it instead (torchvision's COCO weights: 91 outputs, output == COCO category id). Evaluation compares
    predictions and targets as dataset category ids, so such weights evaluate on any COCO-id data.
    `trainable_backbone_layers` None follows torchvision: 3 with pretrained weights, 5 (all) otherwise; an
    explicit `backbone.frozen_stages` is respected when it is None. Pretrained weights also switch
    `backbone.norm` "bn" to "frozen_bn" (as torchvision does). `evaluation_style` "voc" adds VOC07/VOC12 AP
    (the data module announces it). The confusion matrix (and the gallery's boxes) count detections scoring at
    least `confusion_score` matched to objects at IoU above `confusion_iou` (Ultralytics' defaults).
    """

    task_name: ClassVar[str] = "detection"
    main_metric: ClassVar[str] = "val/map"
    head_key: ClassVar[str] = CLASSIFIER_KEY
    background: ClassVar[bool] = True
    evaluates_across_label_spaces: ClassVar[bool] = True
    writer_class: ClassVar[type[PredictionWriter]] = DetectionWriter

    def __init__(
        self,
        # torchvision's detection recipe: lr 0.02 per 16 images, weight decay on every parameter.
        optimizer: OptimizerConfig = OptimizerConfig(lr=0.02, weight_decay=1e-4, norm_weight_decay=None),
        evaluation_style: Literal["coco", "voc"] = "coco",
        trainable_backbone_layers: int | None = None,
        fpn_channels: int = 256,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        anchor_sizes: list[list[int]] | None = None,
        aspect_ratios: list[float] | None = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        confusion_iou: float = 0.45,
        confusion_score: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer=optimizer, **kwargs)
        if self.tta == "flip_scales":
            raise UserError(
                "--model.tta flip_scales is for classification and segmentation; detection supports --model.tta flip "
                "(the model resizes each image itself: set --model.min_size for another test scale)."
            )
        self.save_task_hyperparameters()
        self.evaluation_style = evaluation_style

        # The effective backbone options; the hyper-parameters above keep what the user asked for.
        pretrained = bool(self.weights or self.backbone_config.weights)
        config = self.backbone_config
        if pretrained and config.norm == "bn":
            config = dataclasses.replace(config, norm="frozen_bn")
        body = config.build(output_stride=32)
        stages = len(body.stage_names)
        if trainable_backbone_layers is None and config.frozen_stages == 0:
            trainable_backbone_layers = min(3, stages + 1) if pretrained else stages + 1  # + 1: the stem
        if trainable_backbone_layers is not None:
            if not 0 <= trainable_backbone_layers <= stages + 1:
                raise UserError(
                    f"--model.trainable_backbone_layers must be in [0, {stages + 1}] for {config.name} (its "
                    f"{stages} stages + the stem), got {trainable_backbone_layers}."
                )
            # torchvision counts trainable layers from the top (layer4, layer3, ..., conv1); we freeze from the
            # bottom: k trainable stages out of n leave the stem and the first n - k stages frozen.
            frozen = max(0, stages - trainable_backbone_layers)
            body.freeze(frozen)
            config = dataclasses.replace(config, frozen_stages=frozen)
        self.backbone_config = config
        self.model = build_faster_rcnn(
            body,
            self.num_classes,
            fpn_channels=fpn_channels,
            min_size=min_size,
            max_size=max_size,
            anchor_sizes=anchor_sizes,
            aspect_ratios=aspect_ratios,
            frozen_bn_eps=0.0 if self.weights in ZERO_EPS_WEIGHTS else None,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_batch_size_per_image=box_batch_size_per_image,
            box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
        )
        self.coco_metric = coco_map_metric()
        self.voc_metric = VOCDetectionAP()
        object_ids = [self.label_space.category_id(i) for i in range(1, self.num_classes)]
        self.confusion_metric = DetectionConfusionMatrix(object_ids, confusion_iou, confusion_score)
        # Category id -> class name, for ground truth and predictions alike (evaluation works in category ids).
        self.category_names = {
            self.label_space.category_id(i): self.label_space.name(i) for i in range(self.num_classes)
        }
        self._category_tables: dict[torch.device, Tensor] = {}

    # ----------------------------------------------------------------- TaskBase hooks
    def label_space_for_count(self, count: int) -> LabelSpace:
        """A `.pth` with 91 outputs is torchvision's COCO layout (output == COCO category id); others are numbered."""
        if count == 91:
            from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

            return LabelSpace(tuple(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]), background=True)
        return super().label_space_for_count(count)

    def backbone_module(self) -> nn.Module:
        return self.model.backbone.body

    def model_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's layout (backbone.*, rpn.*, roi_heads.*) or our .ckpt ("model.*") -> this module's keys."""
        if any(key.startswith("model.") for key in state_dict):
            return {key: value for key, value in state_dict.items() if key.startswith("model.")}
        return {f"model.{key}": value for key, value in state_dict.items()}

    def batch_size_of(self, batch: Any) -> int:
        return len(batch[0])

    # ----------------------------------------------------------------- steps
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image (boxes XYXY in the input image's pixels, labels, scores); eval mode."""
        return self.model(images)

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        images, targets = batch
        model_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        return self.model(images, model_targets)

    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections for validate/test/predict: with `--model.tta flip`, the image's and its mirror's, merged by
        class-wise NMS at the model's own threshold and capped at its detections per image."""
        if self.tta == "none":
            return self.model(images)
        heads = self.model.roi_heads
        return detection_flip(self.model, images, heads.nms_thresh, heads.detections_per_img)

    def category_ids_of(self, labels: Tensor) -> Tensor:
        """Model outputs -> the dataset's category ids, on the labels' device (the table is copied there once)."""
        if self.label_space.category_ids is None:
            return labels
        table = self._category_tables.get(labels.device)
        if table is None:
            table = torch.tensor(self.label_space.category_ids, dtype=torch.int64, device=labels.device)
            self._category_tables[labels.device] = table
        return table[labels]

    # ----------------------------------------------------------------- evaluation
    def evaluation_outputs(self, batch: Any) -> list[dict[str, Tensor]]:
        images, _ = batch
        return self.detect(images)

    def evaluation_update(self, stage: str, batch: Any, detections: list[dict[str, Tensor]]) -> Tensor:
        """COCO (and VOC) AP and the confusion matrix, both sides as dataset category ids (the model's label space
        may be its weights', not the data's); the gallery ranks images by their share of confusion errors."""
        _, targets = batch
        preds, truths = [], []
        for detection, target in zip(detections, targets):
            preds.append(
                {
                    "boxes": detection["boxes"].float(),
                    "scores": detection["scores"].float(),
                    "labels": self.category_ids_of(detection["labels"]),
                }
            )
            # COCO-style numbers on VOC treat `difficult` objects as COCOeval's ignore (crowd) regions.
            ignore = target["iscrowd"].bool() | target["difficult"].bool()
            truths.append(
                {
                    "boxes": target["boxes"],
                    "labels": target["category_ids"],
                    "iscrowd": ignore.to(torch.int64),
                    "area": target["area"],
                    "difficult": target["difficult"],
                }
            )
        self.coco_metric.update(preds, truths)
        if self.evaluation_style == "voc":
            self.voc_metric.update(preds, truths)
        self.confusion_metric.update(preds, truths)
        return self.confusion_metric.last_image_errors

    def gallery_item(self, batch: Any, detections: list[dict[str, Tensor]], index: int) -> GalleryItem:
        """The image with its objects and the detections the confusion matrix counts (score threshold)."""
        images, targets = batch
        detection, target = detections[index], targets[index]
        pixels, scale = image_array(images[index])
        keep = (detection["scores"] >= self.confusion_metric.score_threshold).nonzero().flatten()
        keep = keep[detection["scores"][keep].argsort(descending=True)[:MAX_BOXES]]
        truth_ids = target["category_ids"].tolist()
        return GalleryItem(
            title=str(target.get("file_name", target.get("image_key", ""))),
            image=pixels,
            truth_boxes=target["boxes"].detach().cpu().numpy() * scale,
            truth_names=[self.category_names.get(int(i), str(i)) for i in truth_ids],
            pred_boxes=detection["boxes"][keep].detach().float().cpu().numpy() * scale,
            pred_names=[self.label_space.name(int(i)) for i in detection["labels"][keep].tolist()],
            pred_scores=detection["scores"][keep].float().tolist(),
        )

    def evaluation_compute(self, stage: str) -> EvaluationResult:
        """COCO's summary numbers (and VOC's), per-class APs (`ap/<class>`, `ap50/<class>`), the confusion matrix."""
        results = self.coco_metric.compute()
        values = {name: float(results[name]) for name in COCO_METRIC_NAMES}
        if self.evaluation_style == "voc":
            values.update({name: float(value) for name, value in self.voc_metric.compute().items()})
        # -1 means "undefined" (e.g. no large objects at all): not logged, except the headline numbers.
        metrics = {name: value for name, value in values.items() if value >= 0 or name in ("map", "map_50", "map_75")}
        summary = self._summary(results, self.confusion_metric.compute().cpu())
        for metric in (self.coco_metric, self.voc_metric, self.confusion_metric):
            metric.reset()
        names, columns = summary.class_names, summary.per_class
        published = [key for key in ("ap", "ap50", "voc07_ap50") if key in columns]
        return EvaluationResult(metrics, per_class_entries(names, {key: columns[key] for key in published}), summary)

    def _summary(self, results: dict[str, Any], confusion: Tensor) -> EvaluationSummary:
        """The report's summary: per-class table (COCO AP, AP50, AP75 from the one COCO evaluation; VOC AP;
        precision, recall and object count at the confusion thresholds), confusion matrix and PR curves."""
        coco = per_class_ap(results, self.coco_metric.iou_thresholds)
        position = {category_id: k for k, category_id in enumerate(coco.category_ids)}
        ids = self.confusion_metric.category_ids
        names = [self.category_names.get(i, str(i)) for i in ids]
        nan = float("nan")

        def column(values: Any) -> list[float]:
            return [float(values[position[i]]) if i in position else nan for i in ids]

        table = confusion_table(confusion)
        columns = {"ap": column(coco.ap), "ap50": column(coco.ap50), "ap75": column(coco.ap75)}
        if self.evaluation_style == "voc":
            voc = self.voc_metric.last_per_class
            columns["voc07_ap50"] = [voc[i][0] if i in voc else nan for i in ids]
            columns["voc12_ap50"] = [voc[i][1] if i in voc else nan for i in ids]
        columns["precision"] = table["precision"][:-1].tolist()
        columns["recall"] = table["recall"][:-1].tolist()
        columns["objects"] = table["support"][:-1].tolist()
        return EvaluationSummary(
            task=self.task_name,
            class_names=names,
            per_class=columns,
            main_column="ap",
            confusion=confusion.numpy(),
            confusion_names=[*names, BACKGROUND],
            precision=coco.precision,
            precision_names=[self.category_names.get(i, str(i)) for i in coco.category_ids],
            iou_thresholds=[float(t) for t in self.coco_metric.iou_thresholds],
            recall_thresholds=[float(r) for r in self.coco_metric.rec_thresholds],
        )

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image: "boxes", "labels", "scores" (CPU tensors) and the image's "index" in the dataset, "image_key"
        (its id in COCO results) and "file_name"."""
        images, targets = batch
        return [
            {
                **{key: value.detach().cpu() for key, value in detection.items()},
                **{key: target[key] for key in ("index", "image_key", "file_name")},
            }
            for detection, target in zip(self.detect(images), targets)
        ]
