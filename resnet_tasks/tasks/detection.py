"""Object detection: the shared backbone + a feature pyramid (P2-P6) + torchvision's Faster R-CNN heads.

The module layout (`model.backbone.body`, `model.backbone.fpn`, `model.rpn`, `model.roi_heads`) is torchvision's
`fasterrcnn_resnet50_fpn`, so its COCO weights load unchanged and reproduce its detections.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from resnet_tasks.backbones import load_state_dict_into
from resnet_tasks.errors import UserError
from resnet_tasks.evaluation.detection import COCO_METRIC_NAMES, VOCDetectionAP, coco_map_metric
from resnet_tasks.tasks.base import BackboneConfig, OptimizerConfig, SchedulerConfig, TaskBase

CLASSIFIER_KEY = "roi_heads.box_predictor.cls_score.weight"
ENUM_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*_Weights\.[A-Za-z][A-Za-z0-9_]*$")
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


@dataclasses.dataclass
class LabelSpace:
    """What the model's classifier outputs mean: label -> class name / dataset category id (0 = background)."""

    num_outputs: int
    class_names: list[str]
    label_to_category_id: list[int] | None


def _peek_state_dict(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Open a .pth/.pt/.ckpt lazily (mmap) to read shapes and our checkpoint info without loading tensors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # Not a zip archive (mmap needs one) or refused: load_weights_spec will report it properly in setup.
        from resnet_tasks.backbones import load_weights_spec

        state_dict, meta = load_weights_spec(str(path))
        return state_dict, meta.get("resnet_tasks", {}) or {}
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info = obj.get("resnet_tasks", {}) or {}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict; expected a model.state_dict() or a resnet-tasks .ckpt.")
    return obj, info


def _coco_category_names() -> list[str]:
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def label_space_from_weights(weights: str, data_num_classes: int | None) -> LabelSpace:
    """The label space fixed by whole-model weights, read cheaply (enum metadata, or one tensor's shape).

    - a torchvision enum: its meta "categories" (COCO: 91 outputs, label == COCO category id);
    - our .ckpt: its class names and label -> category id mapping;
    - a .pth/.pt: the classifier's row count; when it matches the data, the data's label space, else 91 rows
      are read as torchvision's COCO layout, anything else as anonymous classes.
    """
    path = Path(weights).expanduser()
    if ENUM_PATTERN.match(weights) and not path.exists():
        from torchvision.models import get_weight

        try:
            enum = get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            raise UserError(
                f"Unknown torchvision weights {weights!r}; e.g. FasterRCNN_ResNet50_FPN_Weights.COCO_V1."
            ) from None
        categories = list(enum.meta.get("categories") or [])
        if not categories:
            raise UserError(f"torchvision weights {weights} carry no category list; they are not detection weights.")
        return LabelSpace(len(categories), categories, list(range(len(categories))))
    if not path.is_file():
        raise UserError(
            f"Weights file not found: {path}. Pass a .pth/.pt/.ckpt file or a torchvision weights name such as "
            "FasterRCNN_ResNet50_FPN_Weights.COCO_V1."
        )
    state_dict, info = _peek_state_dict(path)
    keys = [key for key in state_dict if key.endswith(CLASSIFIER_KEY)]
    if not keys:
        raise UserError(
            f"{path} has no {CLASSIFIER_KEY!r}: it is not a whole Faster R-CNN model. For backbone-only weights "
            "use --model.backbone.weights instead of --model.weights."
        )
    outputs = int(state_dict[keys[0]].shape[0])
    names = list(info.get("class_names") or [])
    if len(names) == outputs:
        return LabelSpace(outputs, names, info.get("label_to_category_id"))
    if data_num_classes is not None and data_num_classes + 1 == outputs:
        return LabelSpace(outputs, [], None)  # the data module's names and ids are filled in at setup
    if outputs == 91:
        return LabelSpace(91, _coco_category_names(), list(range(91)))
    if data_num_classes is not None:
        raise UserError(
            f"{path} predicts {outputs - 1} classes but the data has {data_num_classes}. Use "
            "--model.backbone.weights to take only the backbone, or weights trained on this label space."
        )
    return LabelSpace(outputs, ["__background__", *[f"class_{i}" for i in range(1, outputs)]], None)


class DetectionTask(TaskBase):
    """Faster R-CNN + FPN on the shared backbone (torchvision's machinery, our backbone and training loop).

    `num_classes` counts object classes (from the data); the classifier has num_classes + 1 outputs with
    background 0. Whole-model `weights` fix the label space instead (torchvision's COCO weights: 91 outputs,
    label == COCO category id). `trainable_backbone_layers` None follows torchvision: 3 with pretrained
    weights, 5 (all) otherwise; an explicit `backbone.frozen_stages` is respected when it is None.
    Pretrained weights also switch `backbone.norm` "bn" to "frozen_bn" (as torchvision does).
    """

    task_name: ClassVar[str] = "detection"
    main_metric: ClassVar[str] = "val/map"

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: BackboneConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        weights: str | None = None,
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
    ) -> None:
        if optimizer is None:
            # torchvision's detection recipe: lr 0.02 per 16 images, weight decay on every parameter.
            optimizer = OptimizerConfig(lr=0.02, weight_decay=1e-4, norm_weight_decay=None)
        super().__init__(
            num_classes=num_classes, backbone=backbone, optimizer=optimizer, scheduler=scheduler, weights=weights
        )
        self.save_task_hyperparameters()

        if weights:
            space = label_space_from_weights(str(weights), num_classes)
            if num_classes is not None and num_classes + 1 != space.num_outputs:
                rank_zero_warn(
                    f"--model.weights {weights} fix the label space to {space.num_outputs - 1} classes; the "
                    f"data's {num_classes} classes are ignored by the model (predictions use the weights' labels)."
                )
            self.num_classes = space.num_outputs - 1
            if space.class_names:
                self.class_names = list(space.class_names)
                self.label_to_category_id = space.label_to_category_id
        elif num_classes is None:
            raise UserError(
                "DetectionTask needs the number of classes: it follows the data (--data.root), or comes from "
                "whole-model weights (--model.weights file.ckpt|file.pth|FasterRCNN_ResNet50_FPN_Weights.COCO_V1)."
            )
        elif num_classes < 1:
            raise UserError(
                f"--model.num_classes must be >= 1 (object classes, background excluded), got {num_classes}."
            )

        # The effective backbone options; the hyper-parameters above keep what the user asked for.
        pretrained = bool(weights or self.backbone_config.weights)
        config = self.backbone_config
        if pretrained and config.norm == "bn":
            config = dataclasses.replace(config, norm="frozen_bn")
        if trainable_backbone_layers is None and config.frozen_stages == 0:
            trainable_backbone_layers = 3 if pretrained else 5
        self.backbone_config = config
        body = self.build_backbone(output_stride=32)
        if trainable_backbone_layers is not None:
            stages = len(body.stage_names)
            if not 0 <= trainable_backbone_layers <= stages + 1:
                raise UserError(
                    f"--model.trainable_backbone_layers must be in [0, {stages + 1}] for {config.name} (its "
                    f"{stages} stages + the stem), got {trainable_backbone_layers}."
                )
            # torchvision counts trainable layers from the top (layer4, layer3, ..., conv1); we freeze from the
            # bottom: k trainable stages out of n leave the stem and the first n - k stages frozen.
            frozen = max(0, stages - trainable_backbone_layers)
            body.freeze(frozen)
            self.backbone_config = dataclasses.replace(config, frozen_stages=frozen)

        pyramid = BackboneWithFeaturePyramid(body, fpn_channels)
        levels = len(pyramid.feature_names) + 1
        sizes = tuple(tuple(int(s) for s in level) for level in (anchor_sizes or DEFAULT_ANCHOR_SIZES))
        if len(sizes) != levels:
            raise UserError(
                f"--model.anchor_sizes needs one entry per pyramid level: {levels} for {config.name} "
                f"({levels - 1} stages + the pooled level), got {len(sizes)}."
            )
        ratios = tuple(float(r) for r in (aspect_ratios or DEFAULT_ASPECT_RATIOS))
        self.model = FasterRCNN(
            pyramid,
            num_classes=self.num_classes + 1,
            min_size=tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size,
            max_size=max_size,
            rpn_anchor_generator=AnchorGenerator(sizes, (ratios,) * levels),
            box_roi_pool=MultiScaleRoIAlign(featmap_names=pyramid.feature_names, output_size=7, sampling_ratio=2),
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
        self.evaluation_style = "coco"
        # Dataset label -> category id of the evaluated data (targets); the model's own mapping is
        # self.label_to_category_id (the same unless whole-model weights brought another label space).
        self.data_label_to_category_id: list[int] | None = None

    # ----------------------------------------------------------------- TaskBase hooks
    def backbone_module(self) -> nn.Module:
        return self.model.backbone.body

    def load_model_weights(self, state_dict: dict[str, Tensor], meta: dict[str, Any], source: str) -> None:
        """Whole-model weights: torchvision's layout (rpn.*, roi_heads.*, backbone.*) or our .ckpt ("model.")."""
        if any(key.startswith("model.") for key in state_dict):
            state_dict = {key[len("model.") :]: value for key, value in state_dict.items() if key.startswith("model.")}
        load_state_dict_into(self.model, state_dict, source=source, what="Faster R-CNN model")
        if source in ZERO_EPS_WEIGHTS:
            for module in self.model.modules():
                if type(module).__name__ == "FrozenBatchNorm2d":
                    module.eps = 0.0

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.label_to_category_id is None and self.class_names == []:
            self.class_names = ["__background__", *[f"class_{i}" for i in range(1, self.num_classes + 1)]]
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            mapping = getattr(datamodule, "label_to_category_id", None)
            self.data_label_to_category_id = list(mapping) if mapping is not None else None
            self.evaluation_style = getattr(datamodule, "evaluation_style", "coco")

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

    @staticmethod
    def _map_labels(labels: Tensor, mapping: list[int] | None) -> Tensor:
        if mapping is None:
            return labels
        table = torch.as_tensor(mapping, dtype=torch.int64, device=labels.device)
        return table[labels]

    def _update_metrics(self, detections: list[dict[str, Tensor]], targets: list[dict[str, Any]]) -> None:
        """Feed both sides in the dataset's category-id space (model labels and data labels may differ)."""
        preds, truths = [], []
        for detection, target in zip(detections, targets):
            preds.append(
                {
                    "boxes": detection["boxes"].float(),
                    "scores": detection["scores"].float(),
                    "labels": self._map_labels(detection["labels"], self.label_to_category_id),
                }
            )
            # COCO-style numbers on VOC treat `difficult` objects as COCOeval's ignore (crowd) regions.
            ignore = target["iscrowd"].bool() | target["difficult"].bool()
            truths.append(
                {
                    "boxes": target["boxes"],
                    "labels": self._map_labels(target["labels"], self.data_label_to_category_id),
                    "iscrowd": ignore.to(torch.int64),
                    "area": target["area"],
                    "difficult": target["difficult"],
                }
            )
        self.coco_metric.update(preds, truths)
        if self.evaluation_style == "voc":
            self.voc_metric.update(preds, truths)

    def _evaluation_step(self, batch: Any) -> None:
        images, targets = batch
        self._update_metrics(self.model(images), targets)

    def _log_metrics(self, prefix: str) -> None:
        results = self.coco_metric.compute()
        values = {name: float(results[name]) for name in COCO_METRIC_NAMES}
        if self.evaluation_style == "voc":
            values.update({name: float(value) for name, value in self.voc_metric.compute().items()})
        for name, value in values.items():
            # -1 means "undefined" (e.g. no large objects at all): not logged, except the headline numbers.
            if value >= 0 or name in ("map", "map_50", "map_75"):
                self.log(f"{prefix}/{name}", value, batch_size=1, sync_dist=False)
        self.coco_metric.reset()
        self.voc_metric.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Tensor]]:
        images, _ = batch
        return [{key: value.detach().cpu() for key, value in d.items()} for d in self.model(images)]
