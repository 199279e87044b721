"""predictions.csv for classification: one row per image with its top-5 classes and probabilities."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L

from resnet_tasks.labels import LabelSpace
from resnet_tasks.writers import PredictionWriter, gather_objects


class ClassificationWriter(PredictionWriter):
    """Collects top-5 predictions per image and writes `predictions.csv` (rows sorted by image name)."""

    def start(self, out_dir: Path, label_space: LabelSpace) -> None:
        super().start(out_dir, label_space)
        self.path = self.out_dir / "predictions.csv"
        self.rows: list[list[Any]] = []
        self.k = 0

    def write_batch(self, outputs: dict[str, Any], batch: Any) -> None:
        for name, label, probs, indices in zip(
            outputs["name"], outputs["label"].tolist(), outputs["probs"].tolist(), outputs["indices"].tolist()
        ):
            self.k = max(self.k, len(indices))
            target = self.class_name(label) if label >= 0 else ""
            row: list[Any] = [name, target]
            for index, prob in zip(indices, probs):
                row += [self.class_name(index), f"{prob:.6f}"]
            self.rows.append(row)

    def finish(self, trainer: L.Trainer) -> list[Path]:
        parts = gather_objects(trainer, (self.k, self.rows))
        if not trainer.is_global_zero:
            return []
        k = max(part[0] for part in parts)
        rows = sorted((row for part in parts for row in part[1]), key=lambda row: row[0])
        header = ["image", "target"]
        for i in range(1, k + 1):
            header += [f"top{i}_class", f"top{i}_prob"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        return [self.path]
