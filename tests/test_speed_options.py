"""Speed options on every task: channels_last and torch.compile (a CPU backend here) train, and checkpoints
load both ways (nn.Module.compile keeps the state-dict keys)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.detection import DetectionTask
from resnet_tasks.tasks.segmentation import SegmentationTask
from tests.conftest import COMMON_TRAINER_ARGS

TASKS: dict[str, tuple[type, list[str]]] = {
    "classification": (ClassificationTask, ["--config", "configs/quickstart/classification.yaml",
                                            "--data.crop_size", "32", "--data.resize_size", "32"]),
    "detection": (DetectionTask, ["--config", "configs/quickstart/detection.yaml", "--model.min_size", "64",
                                  "--model.max_size", "64"]),
    "segmentation": (SegmentationTask, ["--config", "configs/quickstart/segmentation.yaml", "--data.crop_size", "48"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=64)


@pytest.mark.parametrize("task", list(TASKS))
def test_channels_last_and_compile_train_and_checkpoints_load_both_ways(
    task: str, tiny_shapes: Path, tmp_path: Path, run_cli: Callable
) -> None:
    cls, args = TASKS[task]
    layout = {"classification": "imagefolder", "detection": "coco", "segmentation": "voc"}[task]
    code, out, err = run_cli(
        "fit", *args, "--data.root", tiny_shapes / layout, "--data.batch_size", "4", "--data.num_workers", "0",
        "--model.channels_last", "true", "--model.compile", "true", "--model.compile_backend", "aot_eager",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", tmp_path, *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["hyper_parameters"]["compile"] is True and saved["hyper_parameters"]["channels_last"] is True
    assert not any("_orig_mod" in key for key in saved["state_dict"])
    # Compiled -> eager: the same keys load into a model without the speed options, and back.
    eager = cls.load_from_checkpoint(checkpoint, compile=False, channels_last=False)
    compiled = cls.load_from_checkpoint(checkpoint)
    compiled.apply_speed_options()
    compiled.load_state_dict(eager.state_dict())
    assert compiled.backbone_module()._compiled_call_impl is not None
    if task != "detection":
        images = torch.rand(2, 3, 32, 32)
        eager.eval(), compiled.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-4)
