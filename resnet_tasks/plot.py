"""`resnet-tasks plot`: training curves from runs' CSV logs, including the paper's Figure-6 error plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet_tasks.errors import UserError
from resnet_tasks.report.curves import read_curves, smooth
from resnet_tasks.report.pictures import pyplot, save_figure


def find_metrics_csv(run: str | Path) -> Path:
    """The newest `metrics.csv` under a run directory (a default_root_dir, a version dir or the file itself)."""
    run = Path(run)
    if run.is_file():
        return run
    candidates = sorted(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"No metrics.csv under {run}. Point `resnet-tasks plot` at a run's --trainer.default_root_dir.")
    return candidates[-1]


def label_of(run: str | Path, path: Path) -> str:
    """A run's legend label: its backbone name from config.yaml when present, else its folder name."""
    config = path.parent / "config.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        name = (((data.get("model") or {}).get("init_args") or {}).get("backbone") or {}).get("name")
        if name:
            return str(name)
    return Path(run).name


def plot_runs(runs: list[str], metrics: list[str], out: Path, error: bool = False, window: int = 20) -> Path:
    """Draw `metrics` of every run into one PNG; `error=True` draws the paper's train/val error curves."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for index, run in enumerate(runs):
        path = find_metrics_csv(run)
        curves = read_curves(path)
        label = label_of(run, path)
        color = colors[index % len(colors)]
        if error:
            train = curves.get("train/error", [])
            val = curves.get("val/top1", [])
            if train:
                steps, values = zip(*train)
                ax.plot(steps, [100 * v for v in smooth(list(values), window)], color=color, lw=0.8, alpha=0.8,
                        label=f"{label} train")  # fmt: skip
                drawn += 1
            if val:
                steps, values = zip(*val)
                ax.plot(steps, [100 * (1 - v) for v in values], color=color, lw=2.2, label=f"{label} val")
                drawn += 1
        else:
            for metric in metrics:
                if metric in curves:
                    steps, values = zip(*curves[metric])
                    if metric.startswith("train/"):
                        values = tuple(smooth(list(values), window))
                    ax.plot(steps, values, color=color, label=f"{label} {metric}")
                    drawn += 1
    if not drawn:
        wanted = "train/error and val/top1" if error else ", ".join(metrics)
        raise UserError(f"None of the runs logged {wanted}; check the metric names in their metrics.csv.")
    ax.set_xlabel("iteration")
    ax.set_ylabel("error (%)" if error else ", ".join(metrics))
    if error:
        ax.set_title("Training (thin) and validation (bold) error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def main(argv: list[str]) -> None:
    """Parse `resnet-tasks plot ...` arguments and write the PNG."""
    parser = argparse.ArgumentParser(
        prog="resnet-tasks plot",
        allow_abbrev=False,
        description="Plot training curves from one or more runs' metrics.csv (CSV logger).",
    )
    parser.add_argument("runs", nargs="+", help="run directories (--trainer.default_root_dir) or metrics.csv files")
    parser.add_argument("--metric", action="append", default=None, help="metric to draw (repeatable)")
    parser.add_argument(
        "--error", action="store_true", help="the ResNet paper's Figure 6: training (thin) / validation (bold) error"
    )
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window for train/* curves")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="output PNG")
    args = parser.parse_args(argv)
    metrics = args.metric or ["train/loss"]
    path = plot_runs(args.runs, metrics, args.out, error=args.error, window=args.smooth)
    print(f"plot written: {path}")
