"""The report's charts with matplotlib (Agg, no display): PR curves, the confusion matrix and per-class bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_tasks.evaluation.summary import EvaluationSummary

# At most this many classes on the confusion matrix's axes (the most confused ones) and per-class bars (the best
# and the worst halves) when there are more.
MAX_CONFUSION_CLASSES = 30
MAX_BARS = 60
DPI = 100


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only; works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int = DPI) -> Path:
    """Write `figure` as PNG and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path


def most_confused(confusion: np.ndarray, limit: int = MAX_CONFUSION_CLASSES) -> list[int]:
    """Indices of at most `limit` classes with the most off-diagonal counts (wrong as truth or as prediction), in
    their original order; all of them when there are no more than `limit`."""
    count = len(confusion)
    if count <= limit:
        return list(range(count))
    off = confusion.astype(np.float64).copy()
    np.fill_diagonal(off, 0)
    mass = off.sum(axis=0) + off.sum(axis=1)
    chosen = np.argsort(-mass, kind="stable")[:limit]
    return sorted(int(i) for i in chosen)


def normalise_rows(confusion: np.ndarray) -> np.ndarray:
    """Each row (a true class) divided by its total: the share of that class predicted as each column."""
    counts = confusion.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_figure(confusion: np.ndarray, names: Sequence[str]) -> Any:
    """The row-normalised confusion matrix (rows = truth), class names on both axes."""
    plt = pyplot()
    keep = most_confused(confusion)
    matrix = normalise_rows(confusion)[np.ix_(keep, keep)]
    labels = [str(names[i]) for i in keep]
    side = min(14.0, 3.5 + 0.38 * len(keep))
    figure, axes = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = axes.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(keep)), labels, rotation=90, fontsize=8)
    axes.set_yticks(range(len(keep)), labels, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    shown = "" if len(keep) == len(names) else f" ({len(keep)} most confused of {len(names)} classes)"
    axes.set_title(f"Confusion matrix, normalised per true class{shown}", fontsize=10)
    if len(keep) <= 20:
        for row in range(len(keep)):
            for column in range(len(keep)):
                value = matrix[row, column]
                if value >= 0.005:
                    colour = "white" if value > 0.5 else "black"
                    axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def per_class_figure(summary: EvaluationSummary) -> Any:
    """Horizontal bars of the main per-class score, best first (the best and worst halves when many)."""
    plt = pyplot()
    column = summary.main_column
    values = summary.per_class.get(column, [])
    pairs = [(name, float(v)) for name, v in zip(summary.class_names, values) if v is not None and math.isfinite(v)]
    pairs.sort(key=lambda pair: -pair[1])
    gap = len(pairs) > MAX_BARS
    if gap:
        pairs = pairs[: MAX_BARS // 2] + [("...", math.nan)] + pairs[-MAX_BARS // 2 :]
    height = 1.6 + 0.24 * max(1, len(pairs))
    figure, axes = plt.subplots(figsize=(7.0, height), layout="constrained")
    names = [name for name, _ in pairs]
    scores = [0.0 if math.isnan(v) else v for _, v in pairs]
    positions = np.arange(len(pairs))
    axes.barh(positions, scores, color="#3b75af")
    axes.set_yticks(positions, names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    for position, (_, value) in zip(positions, pairs):
        if not math.isnan(value):
            axes.text(min(value + 0.01, 0.9), position, f"{value:.3f}", va="center", fontsize=7)
    axes.set_xlabel(column)
    total = len(summary.class_names)
    title = f"Per-class {column}, sorted" + (f" (best and worst {MAX_BARS // 2} of {total})" if gap else "")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    return figure


def pr_curves(summary: EvaluationSummary) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """{"IoU 0.50": (overall, per-class curves), "IoU 0.50:0.95": ...}: precision at each recall threshold.

    Per class: precision at IoU 0.5, and its mean over the IoU thresholds; overall: the mean over the classes
    with ground truth (whose mean over recall is AP50 / AP).
    """
    precision = np.asarray(summary.precision, dtype=np.float64)  # (T, R, K)
    thresholds = np.asarray(summary.iou_thresholds, dtype=np.float64)
    index50 = np.flatnonzero(np.isclose(thresholds, 0.5))
    defined = (precision > -1).all(axis=(0, 1))  # classes with ground truth
    curves: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    for label, selected in (("IoU 0.50", precision[index50[:1]]), ("IoU 0.50:0.95", precision)):
        if selected.shape[0] == 0:
            continue
        per_class = selected.mean(axis=0)  # (R, K)
        classes = [per_class[:, k] for k in range(per_class.shape[1])]
        overall = per_class[:, defined].mean(axis=1) if defined.any() else np.zeros(per_class.shape[0])
        curves[label] = (overall, classes)
    return curves


def pr_figure(summary: EvaluationSummary) -> Any:
    """Precision-recall curves per class and overall at IoU 0.5 and averaged over IoU 0.5:0.95 (COCO)."""
    plt = pyplot()
    recall = np.asarray(summary.recall_thresholds, dtype=np.float64)
    curves = pr_curves(summary)
    defined = (np.asarray(summary.precision) > -1).all(axis=(0, 1))
    figure, all_axes = plt.subplots(1, max(1, len(curves)), figsize=(12.0, 5.2), squeeze=False, layout="constrained")
    named = defined.sum() <= 10
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, (label, (overall, classes)) in zip(all_axes[0], curves.items()):
        drawn = 0
        for k, curve in enumerate(classes):
            if not defined[k]:
                continue
            name = summary.precision_names[k]
            if named:
                colour = colours[drawn % len(colours)]
                axes.plot(recall, curve, lw=1.2, color=colour, label=f"{name} {curve.mean():.3f}")
            else:
                axes.plot(recall, curve, lw=0.6, color="0.7")
            drawn += 1
        axes.plot(recall, overall, lw=2.6, color="#1f3a93", label=f"all classes {overall.mean():.3f}")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_title(f"Precision-recall, {label} (legend: AP)", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left")
    return figure


def draw_pictures(summary: EvaluationSummary, run_dir: Path) -> list[Path]:
    """Write pr_curve.png (detection), confusion_matrix.png and per_class.png into the run directory."""
    written = []
    if summary.precision is not None and np.asarray(summary.precision).size:
        written.append(save_figure(pr_figure(summary), run_dir / "pr_curve.png"))
    if summary.confusion is not None and np.asarray(summary.confusion).size:
        figure = confusion_figure(np.asarray(summary.confusion), summary.confusion_names)
        written.append(save_figure(figure, run_dir / "confusion_matrix.png"))
    if summary.class_names:
        written.append(save_figure(per_class_figure(summary), run_dir / "per_class.png"))
    return written
