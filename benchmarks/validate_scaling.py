"""Scaling of `validate` from 1 to N processes (DDP, gloo on CPU): wall time of the whole command and the
evaluation's images/s, and whether every process count gives the same metrics.json (exact evaluation).

    python benchmarks/validate_scaling.py --task segmentation --processes 1 2 --images 200

Each run is `resnet-tasks validate` of the quickstart config on generated shapes data, as a user starts it (a
fresh process; start-up, import and data setup included in the wall time; the evaluation alone is timed from
Lightning's validation start to end). One torch thread per process, so N processes use N cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

CONFIGS = {
    "segmentation": "configs/quickstart/segmentation.yaml",
    "detection": "configs/quickstart/detection.yaml",
    "classification": "configs/quickstart/classification.yaml",
}
SUBDIRS = {"segmentation": "voc", "detection": "coco", "classification": "imagefolder"}
REPO = Path(__file__).resolve().parent.parent


def run_validate(task: str, root: Path, processes: int, out: Path) -> dict[str, float]:
    """One `resnet-tasks validate` with `processes` DDP processes; its wall time, evaluation time and metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "benchmarks")}
    command = [
        sys.executable, "-m", "resnet_tasks", "validate", "--config", CONFIGS[task], "--data.root", str(root),
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", str(processes),
        "--trainer.strategy", "ddp" if processes > 1 else "auto", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out), "--trainer.callbacks+=validate_scaling.EvaluationClock",
        "--seed_everything", "0",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"validate with {processes} process(es) failed:\n{result.stderr[-3000:]}")
    (metrics_path,) = out.glob("lightning_logs/version_*/metrics.json")
    (clock_path,) = out.glob("evaluation_seconds.json")
    return {"wall_s": wall, "eval_s": json.loads(clock_path.read_text())["seconds"],
            "metrics": json.loads(metrics_path.read_text())}  # fmt: skip


class EvaluationClock(L.Callback):
    """Writes the validation loop's wall time (rank 0) to `default_root_dir/evaluation_seconds.json`."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            seconds = time.perf_counter() - self.start
            Path(trainer.default_root_dir, "evaluation_seconds.json").write_text(json.dumps({"seconds": seconds}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(CONFIGS), default="segmentation")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=200, help="validation images generated")
    args = parser.parse_args(argv)
    from resnet_tasks.data.shapes import generate_shapes

    with tempfile.TemporaryDirectory(prefix="validate_scaling_") as folder:
        shapes = generate_shapes(Path(folder) / "shapes", num_train=4, num_val=args.images, image_size=128)
        root = shapes / SUBDIRS[args.task]
        rows = {n: run_validate(args.task, root, n, Path(folder) / f"run{n}") for n in args.processes}
    base = rows[args.processes[0]]
    print(f"validate scaling, {args.task}, {args.images} images, {os.cpu_count()} cores")
    print("processes | wall s | evaluation s | eval images/s | speed-up (eval) | metrics equal to 1st")
    for n, row in rows.items():
        speedup = base["eval_s"] / row["eval_s"]
        same = row["metrics"] == base["metrics"]
        rate = args.images / row["eval_s"]
        print(f"{n} | {row['wall_s']:.1f} | {row['eval_s']:.2f} | {rate:.1f} | {speedup:.2f}x | {same}")


if __name__ == "__main__":
    main()
