"""Image classification: shared backbone -> global average pool -> linear head, top-1/top-5 metrics."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.transforms import v2

from resnet_tasks.evaluation.gallery import GalleryItem, image_array
from resnet_tasks.evaluation.summary import confusion_table, per_class_entries
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
        self.metrics = nn.ModuleDict(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro"),
            }
        )
        # Float sums synced with "sum": exact under DDP with uneven shards, unlike self.log(sync_dist=True), whose
        # mean floors an integer batch count (Lightning issue #21838).
        self.mean_loss = MeanMetric()
        # Per-class accuracy / precision / recall and the confusion matrix: counts summed across ranks.
        self.confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)

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
        if labels.ndim == 1 and self._trainer is not None:  # hard labels: the paper's training error curve
            error = (logits.detach().argmax(dim=1) != labels).float().mean()
            self.log("train/error", error, batch_size=len(labels))
        return {"loss_cls": F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)}

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for validate/test/predict: with `--model.tta`, averaged over flips (and scales)."""
        return classification_logits(self, images, self.tta)

    def _evaluate(self, batch: dict[str, Any], prefix: str) -> None:
        logits = self.evaluation_logits(batch["image"])
        labels = batch["label"]
        size = self.batch_size_of(batch)
        self.mean_loss.update(F.cross_entropy(logits, labels), weight=size)
        self.log(f"{prefix}/loss", self.mean_loss, batch_size=size)
        for name, metric in self.metrics.items():
            metric.update(logits, labels)
            self.log(f"{prefix}/{name}", metric, batch_size=size, prog_bar=name == "top1")
        self.confusion.update(logits.argmax(dim=1), labels)
        if self._trainer is None or self.trainer.is_global_zero:
            self._offer_to_gallery(batch, logits.detach(), labels)

    def _offer_to_gallery(self, batch: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the first images and the worst ones (highest cross-entropy) for the gallery."""
        losses = F.cross_entropy(logits.float(), labels, reduction="none").tolist()
        names = self.label_space.class_names
        for i, loss in enumerate(losses):

            def build(i: int = i) -> GalleryItem:
                probs = logits[i].float().softmax(dim=0)
                top = probs.topk(min(3, len(probs)))
                return GalleryItem(
                    title=str(batch["name"][i]) if "name" in batch else f"image {i}",
                    image=image_array(batch["image"][i], normalized=True)[0],
                    truth=names[int(labels[i])],
                    top=[(names[int(k)], float(p)) for p, k in zip(top.values, top.indices)],
                )

            self.gallery.offer(loss, build)

    def _finish_evaluation(self, prefix: str) -> None:
        """Per-class accuracy (`acc/<class>`), precision and recall from the summed confusion matrix."""
        confusion = self.confusion.compute().cpu()
        self.confusion.reset()
        table = confusion_table(confusion)
        names = list(self.label_space.class_names)
        columns = {
            "acc": table["recall"].tolist(),
            "precision": table["precision"].tolist(),
            "recall": table["recall"].tolist(),
            "support": table["support"].tolist(),
        }
        self.publish_summary(
            prefix,
            per_class_entries(names, {"acc": columns["acc"]}),
            class_names=names,
            per_class=columns,
            main_column="acc",
            confusion=confusion.numpy(),
            confusion_names=names,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self.evaluation_logits(batch["image"]).float().softmax(dim=1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        return {
            "name": list(batch["name"]),
            "label": batch["label"].cpu(),
            "probs": top.values.cpu(),
            "indices": top.indices.cpu(),
        }
