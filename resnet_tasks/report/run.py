"""Writing a run's results beside its metrics.json (per_class.csv, pictures, report.html) and the
`resnet-tasks report RUN_DIR...` command for finished runs."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path

from resnet_tasks.errors import UserError
from resnet_tasks.evaluation.summary import EvaluationSummary
from resnet_tasks.report.curves import draw_run_curves
from resnet_tasks.report.page import MAIN_COLUMNS, read_per_class, write_page


def write_per_class_csv(summary: EvaluationSummary, path: Path) -> Path:
    """per_class.csv: one row per class, the summary's columns (empty where a value is undefined)."""

    def cell(value: str | float) -> str:
        if isinstance(value, str):
            return value
        return repr(float(value)) if math.isfinite(value) else ""

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["class", *summary.per_class])
        writer.writeheader()
        writer.writerows({key: cell(value) for key, value in row.items()} for row in summary.rows())
    return path


def draw_training_curves(run_dir: Path) -> Path | None:
    """training_curves.png from the run's metrics.csv (CSV logger), when the run trained."""
    metrics_csv = run_dir / "metrics.csv"
    if not metrics_csv.is_file():
        return None
    return draw_run_curves(metrics_csv, run_dir / "training_curves.png")


def write_run_report(metrics_path: Path | None, summary: EvaluationSummary | None) -> Path | None:
    """After validate/test/fit on rank 0 (`metrics_path` None elsewhere): per_class.csv, the pictures and
    report.html beside metrics.json, from the last evaluation's `summary` (None: no evaluation ran); prints the
    page's path."""
    if metrics_path is None:
        return None
    from resnet_tasks.report.gallery import write_gallery
    from resnet_tasks.report.pictures import draw_pictures

    run_dir = Path(metrics_path).parent
    if summary is not None:
        write_per_class_csv(summary, run_dir / "per_class.csv")
        draw_pictures(summary, run_dir)
        write_gallery(summary.gallery, run_dir / "gallery.jpg")
        write_gallery(summary.gallery_worst, run_dir / "gallery_worst.jpg")
    draw_training_curves(run_dir)
    page = write_page([run_dir], run_dir / "report.html", run_labels([run_dir]))
    print(f"report written: {page}")
    return page


def find_run(path: str | Path) -> Path:
    """The run directory of `path`: a folder holding metrics.json, a metrics.json, or a --trainer.default_root_dir
    (its newest run with a metrics.json)."""
    path = Path(path)
    if path.is_file() and path.name == "metrics.json":
        return path.parent
    if (path / "metrics.json").is_file():
        return path
    if path.is_dir():
        found = sorted(path.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1].parent
    raise UserError(
        f"No metrics.json under {path}. Point `resnet-tasks report` at a run's log directory (or its "
        "--trainer.default_root_dir) after `resnet-tasks validate` or `test` wrote its metrics there."
    )


def redraw_from_files(run_dir: Path) -> None:
    """Pictures a finished run can still get from its files: per_class.png from per_class.csv, training curves."""
    if not (run_dir / "per_class.png").is_file():
        rows = read_per_class(run_dir / "per_class.csv")
        main = next((c for c in MAIN_COLUMNS if rows and c in rows[0]), None)
        if main is not None:
            from resnet_tasks.report.pictures import per_class_figure, save_figure

            values = [float(row[main]) if row[main] not in ("", None) else math.nan for row in rows]
            summary = EvaluationSummary(
                task="", class_names=[row["class"] for row in rows], per_class={main: values}, main_column=main,
                confusion=None, confusion_names=[],  # type: ignore[arg-type]
            )  # fmt: skip
            save_figure(per_class_figure(summary), run_dir / "per_class.png")
    if not (run_dir / "training_curves.png").is_file():
        draw_training_curves(run_dir)


def run_labels(runs: list[Path]) -> list[str]:
    """Short names of the runs: their paths below the folder they share (or their folder names)."""
    if len(runs) == 1:
        return ["/".join(runs[0].resolve().parts[-3:])]  # e.g. quickstart_detection/lightning_logs/version_0
    try:
        common = Path(os.path.commonpath([str(run.resolve()) for run in runs]))
        labels = [str(run.resolve().relative_to(common)) or run.name for run in runs]
    except ValueError:
        labels = [run.name for run in runs]
    return labels if len(set(labels)) == len(labels) else [str(run) for run in runs]


def main(argv: list[str]) -> None:
    """`resnet-tasks report RUN_DIR [RUN_DIR ...] [--out FILE]`."""
    parser = argparse.ArgumentParser(
        prog="resnet-tasks report",
        allow_abbrev=False,
        description="Build report.html for finished runs (metrics, per-class table, pictures, config); several "
        "runs go side by side on one page.",
    )
    parser.add_argument("runs", nargs="+", help="run log directories (or their --trainer.default_root_dir)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="the page to write (default: report.html in the run's folder; for several runs, in their common folder)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    runs = [find_run(run) for run in args.runs]
    for run in runs:
        try:
            json.loads((run / "metrics.json").read_text())
        except ValueError as error:
            raise UserError(
                f"{run / 'metrics.json'} is not valid JSON ({error}); run `resnet-tasks validate` or `test` again "
                "to rewrite it."
            ) from None
        redraw_from_files(run)
    out = args.out
    if out is None:
        if len(runs) == 1:
            out = runs[0] / "report.html"
        else:
            out = Path(os.path.commonpath([str(run.resolve()) for run in runs])) / "report.html"
    page = write_page(runs, out, run_labels(runs))
    print(f"report written: {page}")
