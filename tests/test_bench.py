"""Smoke test of the benchmark suite (`python benchmarks/run.py`) at its smallest sizes: every benchmark runs
and the JSON report has every figure; the figures themselves are measured by hand, not here."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"

EXPECTED_KEYS = {
    "lightning": {"classification", "detection", "segmentation"},
    "data": {"images_per_s_per_core_ours", "images_per_s_per_core_torchvision", "ratio_ours_over_torchvision"},
    "decode": {"images_per_s", "pixel_equal_opencv_pil", "pixel_equal_torchvision_pil"},
    "coco_eval": {"seconds_pycocotools", "ap_pycocotools", "met"},
    "memory": {"ours", "python_dicts", "met"},
    "segmentation_metric": {"normal", "deterministic", "confusion_equal"},
    "backbone": {"speed_ratio_ours_over_torchvision", "median_step_s_ours", "median_step_s_torchvision"},
    "gpu": {"skipped"},
}
LIGHTNING_KEYS = {"step_s_trainer", "step_s_loop", "ratio_loop_over_trainer", "ratio_per_round"}


@pytest.fixture
def import_benchmark(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Imports a module of benchmarks/ as `python benchmarks/NAME.py` would: that folder first on sys.path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    return importlib.import_module


def test_suite_tiny_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], import_benchmark: Callable[[str], ModuleType]
) -> None:
    bench = import_benchmark("run")
    out = tmp_path / "results.json"
    code = bench.main(["--tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    errors = {name: result["error"] for name, result in report.items() if "error" in result}
    assert errors == {} and code == 0
    assert set(report) == {"meta", *bench.BENCHMARKS}
    for name, keys in EXPECTED_KEYS.items():
        assert keys <= set(report[name]), f"{name} lacks {keys - set(report[name])}"
    for task in ("classification", "detection", "segmentation"):
        figures = report["lightning"][task]
        assert LIGHTNING_KEYS <= set(figures)
        assert figures["step_s_trainer"] > 0 and figures["step_s_loop"] > 0
    backend = "backend_faster_coco_eval" if report["meta"]["faster_coco_eval"] else "backend_pycocotools"
    # Equal AP is a property, not a timing: it must hold at any size.
    assert report["coco_eval"][backend]["ap_equal_1e-4"]
    assert report["decode"]["pixel_equal_opencv_pil"]
    assert report["memory"]["ours"]["samples"] >= 2
    printed = capsys.readouterr().out
    assert "lightning/detection" in printed and "coco_eval/" in printed


def test_gpu_benchmark_cpu_fallback_prints_the_table_and_says_what_it_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], import_benchmark: Callable[[str], ModuleType]
) -> None:
    """`python benchmarks/gpu.py` without CUDA: the same table at tiny sizes, every skipped cell with its reason."""
    gpu = import_benchmark("gpu")
    out = tmp_path / "gpu"
    assert gpu.main(["--device", "cpu", "--out", str(out)]) == 0  # no cell failed
    report = json.loads(out.with_suffix(".json").read_text())
    cells = report["cells"]
    assert {(c["task"], c["path"]) for c in cells} >= {(t, p) for t in gpu.TASKS for p in gpu.PATHS[:3]}
    for task in gpu.TASKS:
        measured = {
            c["path"]: c for c in cells if c["task"] == task and c["variant"] == "eager" and c["data"] == "memory"
        }
        assert measured["loop (torchvision)"]["train_images_per_s"] > 0
        assert measured["Trainer (ours)"]["train_images_per_s"] > 0
        assert measured["inference (ours)"]["infer_images_per_s"] > 0
        jpeg = [c for c in cells if c["task"] == task and c["data"] == "jpeg" and c["path"] == "Trainer (ours)"]
        assert jpeg and jpeg[0]["train_images_per_s"] > 0
        data = [c for c in cells if c["task"] == task and c["path"] == "data path alone" and "workers" in c["variant"]]
        assert len(data) == len(gpu.CPU_PLAN.workers) and all(c["data_images_per_s"] > 0 for c in data)
    skipped = [c for c in cells if "skipped" in c]
    assert {c["variant"] for c in skipped} >= {"channels_last+compile"} and all(c["skipped"] for c in skipped)
    assert any(c["data"] == "jpeg, GPU decode" and "needs CUDA" in c["skipped"] for c in skipped)
    assert set(report["profiles"]) == {"detection", "segmentation"}
    printed = capsys.readouterr().out
    assert "CPU fallback" in printed and "skipped classification / Trainer (ours) / eager / jpeg, GPU decode" in printed
    assert "top ops by self CPU time" in printed and "## backbone" in printed
    markdown = out.with_suffix(".md").read_text()
    assert markdown.count("| classification |") >= 10 and "Skipped:" in markdown


def test_documented_gpu_wheels_are_the_versions_the_tests_run_with() -> None:
    """docs/performance.md's `pip download` for the GPU machine pins every package to the version installed here."""
    import re
    from importlib.metadata import version

    page = (BENCHMARKS_DIR.parent / "docs" / "performance.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", page, flags=re.S) if "pip download" in b)
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\\]*)", block))
    assert {"jsonargparse", "albumentations", "pydantic-core", "pycocotools", "faster-coco-eval"} <= set(pins)
    assert {name: version(name) for name in pins} == pins
