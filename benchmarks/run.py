"""The benchmark suite: Lightning overhead, data pipeline, decode, COCO eval, worker memory, metrics, backbone, GPU.

    python benchmarks/run.py [--quick | --tiny] [--only NAME ...] [--out results.json] [--device cpu|cuda]

Every figure compares two implementations side by side in one process, alternating (A, B, A, B, ...) so
that load drift on a shared machine hits both alike, and reports medians. One file per benchmark next to this
one; the shared timer in `timing.py`. Not part of the test run (`tests/test_bench.py` only smoke-tests the
smallest sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import FULL, QUICK, TINY, Sizes, write_report

# Each benchmark's module (a file next to this one) and entry function, imported when it runs: a benchmark that
# cannot even import records its error and the others still run.
RUNNERS: dict[str, tuple[str, str]] = {
    "lightning": ("lightning_overhead", "bench_lightning"),
    "data": ("data_pipeline", "bench_data"),
    "decode": ("decode", "bench_decode"),
    "coco_eval": ("coco_eval", "bench_coco_eval"),
    "memory": ("worker_memory", "bench_memory"),
    "segmentation_metric": ("segmentation_metric", "bench_segmentation_metric"),
    "backbone": ("backbone_speed", "bench_backbone"),
    "gpu": ("gpu", "bench_gpu"),
    "streaming": ("streaming", "bench_streaming"),
}
BENCHMARKS = tuple(RUNNERS)


def runner(name: str) -> Callable[[Sizes, torch.device], dict[str, Any]]:
    """The entry function of the benchmark `name`."""
    module, function = RUNNERS[name]
    return getattr(importlib.import_module(module), function)


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, value, goal) rows of the headline numbers."""
    rows: list[tuple[str, str, str, str]] = []
    for name, result in results.items():
        if "error" in result or "skipped" in result:
            rows.append((name, "-", result.get("error") or result.get("skipped"), ""))
            continue
        if name == "lightning":
            for task, figures in result.items():
                if not isinstance(figures, dict):
                    continue
                rows.append(
                    (f"lightning/{task}", f"t_loop/t_trainer ({figures['model']}; step "
                     f"{figures['step_s_loop'] * 1000:.0f} vs {figures['step_s_trainer'] * 1000:.0f} ms)",
                     _fmt(figures["ratio_loop_over_trainer"]), ">= 0.98")
                )  # fmt: skip
        elif name == "data":
            rows.append(
                ("data", f"images/s/core ours {result['images_per_s_per_core_ours']:.0f} vs torchvision "
                 f"{result['images_per_s_per_core_torchvision']:.0f}", _fmt(result["ratio_ours_over_torchvision"]),
                 "")
            )  # fmt: skip
        elif name == "decode":
            rates = result["images_per_s"]
            rows.append(
                ("decode", "images/s " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
                 + f"; pixels equal to PIL: opencv {result['pixel_equal_opencv_pil']}, "
                 f"torchvision {result['pixel_equal_torchvision_pil']}",
                 _fmt(result["speed_ratio_opencv_over_pil"]), "")
            )  # fmt: skip
        elif name == "coco_eval":
            for key in ("backend_faster_coco_eval", "backend_pycocotools"):
                if key in result:
                    figures = result[key]
                    rows.append(
                        (f"coco_eval/{key[8:]}", f"speedup vs COCOeval ({result['images']} images; |dAP| "
                         f"{figures['max_abs_ap_difference']:.1e})", _fmt(figures["speedup_over_pycocotools"], 2),
                         ">= 4x, dAP <= 1e-4")
                    )  # fmt: skip
        elif name == "memory":
            ours = result["ours"]
            rows.append(
                ("memory/ours", f"worker USS {ours['uss_mib_first']:.0f} / {ours['uss_mib_at_10pct']:.0f} -> "
                 f"{ours['uss_mib_last']:.0f} MiB (start / 10% -> end; {result['images']} images, "
                 f"{result['workers']} workers; growth from start {ours['uss_growth']:+.1%})",
                 f"{ours['uss_growth_from_10pct']:+.1%}", "within 5%")
            )  # fmt: skip
            if "python_dicts" in result:
                dicts = result["python_dicts"]
                rows.append(
                    ("memory/python_dicts", f"worker USS {dicts['uss_mib_first']:.0f} / {dicts['uss_mib_at_10pct']:.0f}"
                     f" -> {dicts['uss_mib_last']:.0f} MiB (growth from start {dicts['uss_growth']:+.1%})",
                     f"{dicts['uss_growth_from_10pct']:+.1%}", "(counterfactual)")
                )  # fmt: skip
        elif name == "segmentation_metric":
            for mode in ("normal", "deterministic"):
                figures = result[mode]
                rows.append(
                    (f"segmentation_metric/{mode}", f"update {figures['seconds_ours'] * 1000:.1f} ms vs numpy "
                     f"{figures['seconds_numpy'] * 1000:.1f} ms", _fmt(figures["speedup_over_numpy"], 2), "")
                )  # fmt: skip
        elif name == "backbone":
            rows.append(
                ("backbone", f"t_torchvision/t_ours {result['name']} fwd+bwd batch {result['batch_size']}x"
                 f"{result['size']}", _fmt(result["speed_ratio_ours_over_torchvision"]), ">= 0.98")
            )  # fmt: skip
        elif name == "streaming":
            rows.append(
                ("streaming", f"images/s/core chunks {result['images_per_s_per_core_chunks']:.0f} vs files "
                 f"{result['images_per_s_per_core_files']:.0f} ({result['images']} images)",
                 _fmt(result["ratio_chunks_over_files"]), "")
            )  # fmt: skip
        elif name == "gpu":
            for cell in result.get("cells", []):
                figures = ("train_images_per_s", "infer_images_per_s", "data_images_per_s")
                figure = next((key for key in figures if key in cell), None)
                what = f"{cell['path']}, {cell['variant']}, {cell['data']}: {figure or 'no figure'}"
                value = _fmt(cell[figure], 0) if figure else cell.get("error") or cell.get("skipped") or ""
                rows.append((f"gpu/{cell['task']}", what, value, ""))
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)] if rows else [0] * 4
    header = ("benchmark", "what", "value", "goal")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def run_suite(names: list[str], sizes: Sizes, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Run the named benchmarks; a failing one records its error and the others still run."""
    results: dict[str, Any] = {}
    for name in names:
        log(f"[bench] {name} ...")
        start = time.perf_counter()
        try:
            results[name] = runner(name)(sizes, device)
        except Exception as error:  # one broken benchmark must not lose the others' figures
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name]["wall_s"] = round(time.perf_counter() - start, 1)
        log(f"[bench] {name} done in {results[name]['wall_s']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """The suite's command line; exit status 1 when a benchmark recorded an error."""
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute or two)")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes, for the smoke test (figures meaningless)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, metavar="NAME",
                        help=f"run only these: {' '.join(BENCHMARKS)}")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"), help="JSON output file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on CPU, where a shared machine's competing processes make "
                        "multi-threaded OpenMP steps stall unpredictably; torch's default on CUDA)")  # fmt: skip
    parser.add_argument("--coco-images", type=int, default=None, help="override the COCO evaluation image count")
    parser.add_argument("--memory-images", type=int, default=None, help="override the memory benchmark's images")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    if args.coco_images:
        sizes = dataclasses.replace(sizes, coco_images=args.coco_images)
    if args.memory_images:
        sizes = dataclasses.replace(sizes, memory_images=args.memory_images)
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    names = list(args.only or BENCHMARKS)
    start = time.perf_counter()
    try:
        results = run_suite(names, sizes, device)
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "meta": {
            "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "faster_coco_eval": importlib.util.find_spec("faster_coco_eval") is not None,
            "sizes": dataclasses.asdict(sizes),
            "wall_s": round(time.perf_counter() - start, 1),
        },
        **results,
    }
    write_report(args.out, report)
    print()
    print_table(summary_rows(results))
    print(f"\n{report['meta']['wall_s']:.0f} s in all")
    return 1 if any("error" in result for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
