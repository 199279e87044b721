"""Shared fixtures: tiny real-format datasets and an in-process runner for the CLI."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

COMMON_TRAINER_ARGS = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def make_image_folder(root: Path, classes: tuple[str, ...] = ("blue", "green", "red"), per_class: int = 8,
                      size: tuple[int, int] = (40, 48), splits: tuple[str, ...] = ("train", "val"),
                      seed: int = 0) -> Path:
    """A learnable ImageFolder: each class is a noisy image whose dominant channel is the class colour."""
    rng = np.random.default_rng(seed)
    channel = {"red": 0, "green": 1, "blue": 2}
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = (rng.random((*size, 3)) * 120).astype(np.uint8)
                image[..., channel.get(name, index % 3)] += 120
                Image.fromarray(image).save(folder / f"{name}_{i:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `resnet-tasks ARGS` in this process; returns (exit code, stdout, stderr)."""
    from resnet_tasks.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        # Lightning's log handlers keep the stream they first saw; point them at this test's capture.
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.stream = sys.stderr  # not setStream(): it flushes the old, closed stream
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def read_metrics(out: str) -> dict[str, float]:
    """The metrics.json whose path the CLI printed in `out`."""
    for line in out.splitlines():
        if line.startswith("metrics written: "):
            return json.loads(Path(line.split(": ", 1)[1]).read_text())
    raise AssertionError(f"no metrics.json path printed in:\n{out}")


def printed_path(out: str, prefix: str) -> Path:
    """The path the CLI printed after `prefix` (e.g. 'predictions written: ')."""
    for line in out.splitlines():
        if line.startswith(prefix):
            return Path(line[len(prefix):].strip())
    raise AssertionError(f"no line starting with {prefix!r} in:\n{out}")
