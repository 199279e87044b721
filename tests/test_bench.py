"""Smoke test of the benchmark suite (`python benchmarks/run.py`) at its smallest sizes: every benchmark runs
and the JSON report has every figure; the figures themselves are measured by hand, not here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

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


def test_suite_tiny_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In process, as `python benchmarks/run.py` would run it: the benchmarks' folder first on sys.path.
    monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
    bench = importlib.import_module("run")
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
