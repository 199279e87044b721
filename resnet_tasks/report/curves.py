"""Training curves from a run's CSV log (`metrics.csv`): reading them and drawing a run's training and validation
curves (the report's training_curves.png); `resnet-tasks plot` draws several runs with the same pieces."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from resnet_tasks.report.pictures import pyplot, save_figure


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of a CSV log as (step, value) pairs, in step order."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                number = float(value)
                if math.isfinite(number):
                    curves.setdefault(key, []).append((step, number))
    return {key: sorted(points) for key, points in curves.items()}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (training curves are per-batch and noisy)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_run_curves(metrics_csv: Path, out: Path, window: int = 20) -> Path | None:
    """One run's training curves from its CSV log: the training loss terms (smoothed) and the validation numbers
    without a per-class part (e.g. val/map, val/loss), side by side. None when the run logged no training."""
    curves = read_curves(metrics_csv)
    train = {name: points for name, points in curves.items() if name.startswith("train/")}
    val = {name: points for name, points in curves.items() if name.startswith("val/") and name.count("/") == 1}
    if not train:
        return None
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    for name, points in sorted(train.items()):
        steps, values = zip(*points)
        left.plot(steps, smooth(list(values), window), lw=1.0, label=name)
    left.set_title("training (moving average)", fontsize=10)
    for name, points in sorted(val.items()):
        steps, values = zip(*points)
        right.plot(steps, values, marker="o", ms=3, label=name)
    right.set_title("validation", fontsize=10)
    for axes in (left, right):
        axes.set_xlabel("iteration")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)
