"""report.html: one static page (no script, no server) for one run or several side by side.

The page links the pictures beside each run's metrics.json by relative paths. Everything taken from the data
or the run (class names, file names, config values, metric names) is HTML-escaped.
"""

from __future__ import annotations

import csv
import json
import math
import os
from html import escape
from pathlib import Path
from urllib.parse import quote

# The pictures a run directory may hold, in page order, with their captions.
PICTURES: tuple[tuple[str, str], ...] = (
    ("pr_curve.png", "Precision-recall curves (COCO: IoU 0.5 and 0.5:0.95)"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("per_class.png", "Per-class scores"),
    ("gallery.jpg", "Gallery: the first validation images, ground truth beside the prediction"),
    ("gallery_worst.jpg", "Gallery: the images with the highest error first"),
    ("training_curves.png", "Training curves (metrics.csv)"),
)
MAIN_COLUMNS = ("ap", "iou", "acc")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
figure { margin: 0 0 1.5em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.runs { display: flex; gap: 1.5em; align-items: flex-start; }
.runs > div { flex: 1; min-width: 0; }
"""


def read_per_class(path: Path) -> list[dict[str, str]]:
    """per_class.csv rows (empty when absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(value: object) -> str:
    """A metric value for the tables: 4 decimals, integers as they are, empty when undefined."""
    try:
        figure = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return escape(str(value))
    if not math.isfinite(figure):
        return ""
    return str(int(figure)) if figure.is_integer() and abs(figure) >= 1 else f"{figure:.4f}"


def link(target: Path, page_dir: Path) -> str:
    """The escaped relative URL of `target` from the page's folder."""
    relative = os.path.relpath(target.resolve(), page_dir.resolve())
    return escape(quote(Path(relative).as_posix()), quote=True)


def metrics_table(runs: list[Path], labels: list[str], metrics: list[dict[str, float]]) -> str:
    """Headline metrics (names without a per-class part): one row per metric, one column per run."""
    names = sorted({name for run in metrics for name in run if "/" not in name})
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    rows = [f"<tr><th>metric</th>{head}</tr>"]
    for name in names:
        cells = "".join(f"<td>{number(run.get(name, float('nan')))}</td>" for run in metrics)
        rows.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
    return f'<table id="metrics">{"".join(rows)}</table>'


def per_class_table(labels: list[str], tables: list[list[dict[str, str]]]) -> str:
    """One run: its whole per_class.csv. Several: the main per-class score (ap / iou / acc) of each run."""
    present = [rows for rows in tables if rows]
    if not present:
        return "<p>No per-class table (per_class.csv) in these runs.</p>"
    if len(tables) == 1:
        rows = tables[0]
        columns = list(rows[0].keys())
        head = "".join(f"<th>{escape(column)}</th>" for column in columns)
        body = [
            "<tr>"
            + "".join(f"<td>{escape(row[c]) if c == 'class' else number(row[c])}</td>" for c in columns)
            + "</tr>"
            for row in rows
        ]
        return f'<table id="per-class"><tr>{head}</tr>{"".join(body)}</table>'
    main = next((c for c in MAIN_COLUMNS if all(c in rows[0] for rows in present)), None)
    if main is None:
        return "<p>The runs have no per-class score in common.</p>"
    classes: list[str] = []
    for rows in present:
        classes.extend(row["class"] for row in rows if row["class"] not in classes)
    lookup = [{row["class"]: row.get(main, "") for row in rows} for rows in tables]
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    body = [
        f"<tr><td>{escape(name)}</td>"
        + "".join(f"<td>{number(values.get(name, ''))}</td>" for values in lookup)
        + "</tr>"
        for name in classes
    ]
    return f'<p>Per-class {escape(main)}</p><table id="per-class"><tr><th>class</th>{head}</tr>{"".join(body)}</table>'


def pictures_section(runs: list[Path], labels: list[str], page_dir: Path) -> str:
    """Each picture kind once per run; several runs side by side."""
    parts = []
    for file_name, caption in PICTURES:
        present = [run / file_name for run in runs if (run / file_name).is_file()]
        if not present:
            continue
        cells = []
        for run, label in zip(runs, labels):
            path = run / file_name
            if path.is_file():
                alt = escape(f"{file_name} of {label}", quote=True)
                cells.append(
                    f'<div><figure><img src="{link(path, page_dir)}" alt="{alt}" loading="eager">'
                    f"<figcaption>{escape(label)}: {escape(file_name)}</figcaption></figure></div>"
                )
            else:
                cells.append(f"<div><p>{escape(label)}: no {escape(file_name)}</p></div>")
        parts.append(f'<h3>{escape(caption)}</h3><div class="runs">{"".join(cells)}</div>')
    return "".join(parts) or "<p>No pictures in these runs.</p>"


def config_section(runs: list[Path], labels: list[str]) -> str:
    """Each run's config.yaml (as Lightning saved it), folded."""
    parts = []
    for run, label in zip(runs, labels):
        config = run / "config.yaml"
        if config.is_file():
            parts.append(
                f"<details><summary>{escape(label)}: config.yaml</summary>"
                f"<pre>{escape(config.read_text(errors='replace'))}</pre></details>"
            )
    return "".join(parts) or "<p>No config.yaml in these runs.</p>"


def render_page(runs: list[Path], page: Path, labels: list[str] | None = None) -> str:
    """The HTML of the report on `runs` (directories holding metrics.json) for a page written at `page`."""
    labels = labels or [run.name for run in runs]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    tables = [read_per_class(run / "per_class.csv") for run in runs]
    title = "resnet-tasks report: " + ", ".join(labels)
    locations = "".join(
        f"<li>{escape(label)}: <code>{escape(str(run))}</code></li>" for run, label in zip(runs, labels)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1><ul>{locations}</ul>"
        f"<h2>Metrics</h2>{metrics_table(runs, labels, metrics)}"
        f"<h2>Per class</h2>{per_class_table(labels, tables)}"
        f"<h2>Pictures</h2>{pictures_section(runs, labels, page.parent)}"
        f"<h2>Configuration</h2>{config_section(runs, labels)}"
        "</body></html>\n"
    )


def write_page(runs: list[Path], page: Path, labels: list[str] | None = None) -> Path:
    """Write report.html for `runs` at `page`."""
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_page(runs, page, labels), encoding="utf-8")
    return page
