"""Image classification: shared backbone -> global average pool -> linear head, top-1/top-5 metrics."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from resnet_tasks.evaluation.confusion import ConfusionMatrix
from resnet_tasks.evaluation.gallery import GalleryItem, image_array
from resnet_tasks.evaluation.mean import WeightedMean
from resnet_tasks.evaluation.summary import EvaluationResult, confusion_summary, per_class_entries
from resnet_tasks.tasks.base import TaskBase
from resnet_tasks.tasks.tta import classification_logits
from resnet_tasks.writers import PredictionWriter
from resnet_tasks.writers.classification import ClassificationWriter


class ClassificationTask(TaskBase):
    """Classifier on the shared backbone; `fc` keeps torchvision's name so its ImageNet heads load unchanged.

    Whole-model `weights` (e.g. `ResNet50_Weights.IMAGENET1K_V2`, a torchvision `.pth`, a `.ckpt`) fix the
    label space; `backbone.weights` reuses only the backbone and trains a new head for the data's classes.
    """

    task_name: ClassVar[str] = "classification"
    main_metric: ClassVar[str] = "val/top1"
    head_key: ClassVar[str] = "fc.weight"
    writer_class: ClassVar[type[PredictionWriter]] = ClassificationWriter

    def __init__(
        self,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_task_hyperparameters()
        num_classes = self.num_classes
        self.label_smoothing = label_smoothing
        self.backbone = self.backbone_config.build()
        features = list(self.backbone.channels.values())[-1]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(features, num_classes)
        self.batch_mix = self._batch_mix(mixup_alpha, cutmix_alpha, num_classes)
        top5 = min(5, num_classes)
        # No argument checks: torchmetrics' checks read the labels back to the host on every batch.
        self.metrics = nn.ModuleDict(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False),
                "top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro", validate_args=False),
            }
        )
        # Float sums synced with "sum": exact under DDP with uneven shards, unlike self.log(sync_dist=True), whose
        # mean floors an integer batch count (Lightning issue #21838).
        self.mean_loss = WeightedMean()
        # Per-class accuracy / precision / recall and the confusion matrix: counts summed across ranks.
        self.confusion = ConfusionMatrix(num_classes)

    @staticmethod
    def _batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
        options: list[v2.Transform] = []
        if mixup_alpha > 0:
            options.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            options.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not options:
            return None
        return options[0] if len(options) == 1 else v2.RandomChoice(options)

    def backbone_module(self) -> nn.Module:
        return self.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for a batch of normalised images."""
        features = list(self.backbone(self.in_memory_format(images)).values())[-1]
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return self.fc(self.dropout(pooled))

    def model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's classifier layout (conv1.*, layer*.*, fc.*) or our .ckpt (backbone.*, fc.*)."""
        if not any(k.startswith("backbone.") for k in state_dict):
            state_dict = {(k if k.startswith("fc.") else f"backbone.{k}"): v for k, v in state_dict.items()}
        return {k: v for k, v in state_dict.items() if k.startswith(("backbone.", "fc."))}

    # ------------------------------------------------------------------ steps
    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["image"].shape[0])

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        if self.batch_mix is not None:
            images, labels = self.batch_mix(images, labels)
        logits = self(images)
        if labels.ndim == 1 and self.attached_trainer() is not None:  # hard labels: the paper's training error curve
            error = (logits.detach().argmax(dim=1) != labels).float().mean()
            self.log("train/error", error, batch_size=len(labels))
        return {"loss_cls": F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)}

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for validate/test/predict: with `--model.tta`, averaged over flips (and scales)."""
        return classification_logits(self, images, self.tta)

    # ------------------------------------------------------------------ evaluation
    def evaluation_outputs(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.evaluation_logits(batch["image"]).detach()

    def evaluation_update(self, stage: str, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        """Loss, top-1/top-5 and the confusion matrix; the gallery ranks images by their cross-entropy."""
        labels = batch["label"]
        self.mean_loss.update(F.cross_entropy(logits, labels), weight=self.batch_size_of(batch))
        for metric in self.metrics.values():
            metric.update(logits, labels)
        self.confusion.update(logits.argmax(dim=1), labels)
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def gallery_item(self, batch: dict[str, Any], logits: torch.Tensor, index: int) -> GalleryItem:
        """The image with its true class and the three most probable ones."""
        names = self.label_space.class_names
        probs = logits[index].float().softmax(dim=0)
        top = probs.topk(min(3, len(probs)))
        return GalleryItem(
            title=str(batch["name"][index]) if "name" in batch else f"image {index}",
            image=image_array(batch["image"][index], normalized=True)[0],
            truth=names[int(batch["label"][index])],
            top=[(names[int(k)], float(p)) for p, k in zip(top.values, top.indices)],
        )

    def evaluation_compute(self, stage: str) -> EvaluationResult:
        """Loss, top-1, top-5; per-class accuracy (`acc/<class>`), precision and recall from the confusion matrix."""
        metrics = {"loss": self.mean_loss.compute()}
        metrics.update({name: metric.compute() for name, metric in self.metrics.items()})
        confusion = self.confusion.compute()
        for metric in (self.mean_loss, *self.metrics.values(), self.confusion):
            metric.reset()
        names = self.label_space.class_names
        columns = {"acc": "recall", "precision": "precision", "recall": "recall", "support": "support"}
        summary = confusion_summary(self.task_name, names, confusion, columns)
        return EvaluationResult(metrics, per_class_entries(names, {"acc": summary.per_class["acc"]}), summary)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self.evaluation_logits(batch["image"]).float().softmax(dim=1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        return {
            "name": list(batch["name"]),
            "label": batch["label"].cpu(),
            "probs": top.values.cpu(),
            "indices": top.indices.cpu(),
        }
