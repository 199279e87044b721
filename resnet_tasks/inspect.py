"""`resnet-tasks inspect --config FILE [--data.* ...]`: look at a dataset before training. Builds the config's data
module as `fit` does, prints per split the images, negatives and per-class counts and every problem found, writes
`dataset.json` and `class_histogram.png` into a new run directory, and exits non-zero when training would fail."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from resnet_tasks.data.inspection import AnchorGeometry, DatasetReport, Problem, inspect_data
from resnet_tasks.errors import UserError
from resnet_tasks.lightning_cli import config_dict, import_class, parse_config, require_config, run_directory

EXAMPLES_PER_KIND = 5  # problems printed per kind (dataset.json has them all)
MAX_PRINTED_CLASSES = 40
MAX_BARS = 60
RPN_BACKGROUND_IOU = 0.3  # torchvision's rpn_bg_iou_thresh default
HINT = ", e.g. resnet-tasks inspect --config configs/quickstart/detection.yaml"


def anchor_geometry(model_args: dict[str, Any]) -> AnchorGeometry:
    """The detector's resize and smallest anchors from its config (torchvision's defaults where unset); the
    evaluation scale (the last `min_size`) decides an object's size."""
    from resnet_tasks.tasks.detection import DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS

    min_size = model_args.get("min_size") or 800
    sizes = model_args.get("anchor_sizes") or DEFAULT_ANCHOR_SIZES
    return AnchorGeometry(
        min_size=int(min_size[-1] if isinstance(min_size, (list, tuple)) else min_size),
        max_size=int(model_args.get("max_size") or 1333),
        anchor_size=float(min(min(level) for level in sizes)),
        aspect_ratios=tuple(float(r) for r in (model_args.get("aspect_ratios") or DEFAULT_ASPECT_RATIOS)),
        min_iou=float(model_args.get("rpn_bg_iou_thresh") or RPN_BACKGROUND_IOU),
    )


# ---------------------------------------------------------------------------------------------- output
def described(problem: Problem) -> str:
    """`file: problem`, or the problem alone where it names its file already."""
    return problem.problem if problem.file in problem.problem else f"{problem.file}: {problem.problem}"


def summary_lines(report: DatasetReport, source: str) -> list[str]:
    """The printed summary: splits, classes, unused classes, notes and problems (a few of each kind)."""
    splits = list(report.splits)
    objects = len(report.classes)
    lines = [f"inspect: {report.task} data from {source}, {objects} classes", ""]
    lines.append(f"{'split':<8}{'images':>9}{'negatives':>11}{'instances':>11}  image sizes (WxH)")
    for name, split in report.splits.items():
        sizes = "-"
        if split.smallest and split.largest:
            low, high = "x".join(map(str, split.smallest)), "x".join(map(str, split.largest))
            sizes = low if low == high else f"{low} .. {high}"
        lines.append(f"{name:<8}{split.images:>9}{split.negatives:>11}{split.instances:>11}  {sizes}")
    what = {"detection": "boxes", "segmentation": "images containing it"}.get(report.task, "images")
    lines += ["", f"{'class':<24}{'id':>6}" + "".join(f"{name:>9}" for name in splits) + f"   ({what})"]
    shown = report.classes
    if len(shown) > MAX_PRINTED_CLASSES and "train" in report.splits:
        counts = report.splits["train"].counts
        shown = sorted(shown, key=lambda entry: counts[entry[0]])[: MAX_PRINTED_CLASSES // 2]
        lines.append(f"(the {len(shown)} rarest in train of {objects}; all in dataset.json)")
    for label, ident, name in shown:
        counts = "".join(f"{int(report.splits[s].counts[label]):>9}" for s in splits)
        lines.append(f"{name[:23]:<24}{ident:>6}{counts}")
    for name in splits:
        unused = report.unused(name)
        if unused:
            listed = ", ".join(unused[:10]) + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
            lines.append(f"unused in {name}: {listed}")
    lines += [f"note: {note}" for note in report.notes]
    kinds = Counter(problem.kind for problem in report.problems)
    listing = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
    lines += ["", f"problems: {len(report.problems)}" + (f" ({listing})" if listing else "")]
    for kind in kinds:
        of_kind = [problem for problem in report.problems if problem.kind == kind]
        for problem in of_kind[:EXAMPLES_PER_KIND]:
            lines.append(f"  [{kind}] {described(problem)}")
        if len(of_kind) > EXAMPLES_PER_KIND:
            lines.append(f"  [{kind}] ... and {len(of_kind) - EXAMPLES_PER_KIND} more (in dataset.json)")
    return lines


def class_histogram(report: DatasetReport, path: Path) -> Path:
    """Horizontal bars of each class's count per split (the most and the fewest in train when there are many)."""
    import numpy as np

    from resnet_tasks.report.pictures import pyplot, save_figure

    plt = pyplot()
    classes = report.classes
    first = next(iter(report.splits.values()), None)
    if len(classes) > MAX_BARS and first is not None:
        ranked = sorted(classes, key=lambda entry: -first.counts[entry[0]])
        classes = ranked[: MAX_BARS // 2] + ranked[-MAX_BARS // 2 :]
    figure, axes = plt.subplots(figsize=(7.5, 1.6 + 0.28 * max(1, len(classes))), layout="constrained")
    positions = np.arange(len(classes))
    height = 0.8 / max(1, len(report.splits))
    for offset, (name, split) in enumerate(report.splits.items()):
        values = [int(split.counts[label]) for label, _, _ in classes]
        axes.barh(positions + offset * height, values, height=height, label=name)
    axes.set_yticks(positions + height * (len(report.splits) - 1) / 2, [name for _, _, name in classes], fontsize=8)
    axes.invert_yaxis()
    what = {"detection": "boxes", "segmentation": "images containing the class"}.get(report.task, "images")
    axes.set_xlabel(what)
    axes.set_title(f"{report.task} data: {what} per class and split", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    if report.splits:
        axes.legend(fontsize=8)
    return save_figure(figure, path)


def main(args: list[str]) -> None:
    """`resnet-tasks inspect --config FILE [--data.* ...]`."""
    require_config("inspect", args, HINT)
    config = parse_config(args, prog="resnet-tasks inspect", description="Look at a dataset before training.")
    data = config.get("data")
    if data is None or not data.get("class_path"):
        raise UserError(f"The config names no data module (a data: section with a class_path){HINT}")
    datamodule = import_class(data.class_path)(**config_dict(data.init_args))
    model = config.get("model")
    task, anchors = None, None
    if model is not None and model.get("class_path"):
        task = getattr(import_class(model.class_path), "task_name", None) or None
        if task == "detection":
            anchors = anchor_geometry(config_dict(model.init_args))
    report = inspect_data(datamodule, task=task, anchors=anchors)
    for line in summary_lines(report, type(datamodule).__name__):
        print(line)
    out_dir = run_directory(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset_json = out_dir / "dataset.json"
    dataset_json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    print(f"dataset written: {dataset_json}")
    print(f"class histogram written: {class_histogram(report, out_dir / 'class_histogram.png')}")
    blocking = report.blocking
    if blocking:
        first = blocking[0]
        raise UserError(
            f"training would fail: {described(first)}"
            + (f" (and {len(blocking) - 1} more such problem(s) in {dataset_json})" if len(blocking) > 1 else "")
        )
