"""Classification's device decode path (`--data.decode_device cuda`), run here with the CPU as the device: one crop
sampler for both paths (torchvision's RandomResizedCrop distribution, the same boxes per seed), the same pixels,
the Lightning hook, corrupt files, and the error without a GPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_tasks.data.classification import ImageFolderDataModule
from resnet_tasks.data.gpu_decode import EncodedImages, read_encoded
from resnet_tasks.data.transforms import ResizedCropSampler
from resnet_tasks.errors import UserError
from tests.conftest import COMMON_TRAINER_ARGS, make_image_folder

OPTIONS = dict(crop_size=40, resize_size=48, train_scale=(0.08, 1.0), batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JPEGs of two sizes (75x100 and 90x60) so crops, resizes and the eval path's rounding all vary."""
    root = make_image_folder(tmp_path_factory.mktemp("gpu_decode"), per_class=3, size=(75, 100))
    return make_image_folder(root, classes=("blue", "green", "red"), per_class=2, size=(90, 60), seed=1)


def device_module(monkeypatch: pytest.MonkeyPatch, root: Path, **options: Any) -> ImageFolderDataModule:
    """A data module on the device path; the CPU stands in for the GPU (only the constructor's check is patched)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        return ImageFolderDataModule(root=str(root), decode_device="cuda", **{**OPTIONS, **options})


@pytest.fixture
def recorded_boxes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, ...]]]:
    """Every (height, width, seed, box) the crop sampler hands out, whichever path asks."""
    calls: list[tuple[Any, ...]] = []
    original = ResizedCropSampler.__call__

    def spy(self: ResizedCropSampler, height: int, width: int, seed: int) -> Any:
        box = original(self, height, width, seed)
        calls.append((height, width, seed, box))
        return box

    monkeypatch.setattr(ResizedCropSampler, "__call__", spy)
    yield calls


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("height,width,scale", [(375, 500, (0.08, 1.0)), (64, 400, (0.08, 1.0)), (90, 60, (0.8, 1.0))])
def test_crop_sampler_draws_torchvision_random_resized_crop_distribution(
    height: int, width: int, scale: tuple[float, float]
) -> None:
    from torchvision.transforms import RandomResizedCrop

    draws = 3000
    sampler = ResizedCropSampler(scale)
    ours = [sampler(height, width, seed) for seed in range(draws)]
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    theirs = [RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(draws)]

    def features(boxes: list[tuple[int, int, int, int]]) -> dict[str, np.ndarray]:
        top, left, h, w = (np.array(column, dtype=float) for column in zip(*boxes))
        return {
            "area_fraction": h * w / (height * width),
            "log_aspect": np.log(w / h),
            "centre_y": (top + h / 2) / height,
            "centre_x": (left + w / 2) / width,
        }

    ours_f = features([(b.top, b.left, b.height, b.width) for b in ours])
    theirs_f = features(theirs)
    # 3,000 draws each: the KS statistic of two samples of one distribution stays below 0.05 (p ~ 0.001).
    for name in ours_f:
        assert ks_statistic(ours_f[name], theirs_f[name]) < 0.05, name
    assert all(0 < b.height <= height and 0 < b.width <= width for b in ours)
    assert abs(np.mean([b.flip for b in ours]) - 0.5) < 0.03
    assert sampler(height, width, 7) == sampler(height, width, 7)  # a function of the seed alone
    assert not ResizedCropSampler(scale, hflip=False)(height, width, 7).flip


def test_cpu_and_device_paths_draw_the_same_boxes_and_pixels(
    folder: Path, monkeypatch: pytest.MonkeyPatch, recorded_boxes: list[tuple[Any, ...]]
) -> None:
    cpu = ImageFolderDataModule(root=str(folder), **OPTIONS)
    device = device_module(monkeypatch, folder)
    std = torch.tensor(cpu.std).view(1, 3, 1, 1) * 255
    for split in ("train", "val"):
        recorded_boxes.clear()
        cpu_loader = cpu.train_dataloader() if split == "train" else cpu.val_dataloader()
        cpu_batches = [cpu.on_after_batch_transfer(batch, 0) for batch in cpu_loader]  # uint8 -> normalised
        cpu_calls = list(recorded_boxes)
        recorded_boxes.clear()
        loader = device.train_dataloader() if split == "train" else device.val_dataloader()
        device_batches = [device.on_after_batch_transfer(batch, 0) for batch in loader]
        # Training: every sample's (size, seed) -> box is the same on both paths; evaluation draws none.
        assert recorded_boxes == cpu_calls and (len(cpu_calls) > 0) == (split == "train")
        for a, b in zip(cpu_batches, device_batches, strict=True):
            assert a["name"] == b["name"] and torch.equal(a["label"], b["label"])
            assert a["image"].shape == b["image"].shape and a["image"].shape[1:] == (3, 40, 40)
            # Same crop, bilinear resize on both sides: OpenCV rounds to uint8, torch does not: < 1 grey level.
            levels = ((a["image"] - b["image"]) * std).abs()
            assert levels.max() < 1.0, split


def test_device_path_trains_through_the_lightning_hook(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import lightning as L

    from resnet_tasks.tasks.classification import ClassificationTask

    data = device_module(monkeypatch, folder, crop_size=32, resize_size=32)
    task = ClassificationTask(label_space=data.label_space, backbone={"name": "resnet20"})
    seen: list[tuple[int, ...]] = []

    class Shapes(L.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            seen.append(tuple(batch["image"].shape))

    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Shapes()],
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert seen == [(4, 3, 32, 32)] * 2  # the task saw decoded, augmented tensors
    assert trainer.validate(task, datamodule=data, verbose=False)[0]["val/top1"] >= 0


def test_corrupt_jpeg_on_device_path_is_skipped_in_training_and_named_in_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    bad = root / "train" / "a" / "a_000.jpg"
    bad.write_bytes(b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9")  # a JPEG header, garbage, an end marker
    (root / "val" / "a" / "a_000.jpg").write_bytes(bad.read_bytes())
    data = device_module(monkeypatch, root, max_skipped_fraction=1.0)
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch["image"].shape[0] == 3 and len(batch["name"]) == 3 and "a/a_000.jpg" not in batch["name"]
    report = data.take_skip_report()
    assert report is not None and "skipped 1 unreadable" in report and str(bad) in report
    with pytest.raises(UserError, match="a_000.jpg"):
        for batch in data.val_dataloader():
            data.on_after_batch_transfer(batch, 0)


def test_worker_side_reads_bytes_and_decodes_only_what_the_gpu_decoder_cannot(tmp_path: Path) -> None:
    from resnet_tasks.data.io import read_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    plain, png, rotated = tmp_path / "plain.jpg", tmp_path / "image.png", tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(plain, quality=95)
    Image.fromarray(pixels).save(png)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(pixels).save(rotated, quality=95, exif=exif)
    assert torch.equal(read_encoded(plain), torch.from_numpy(np.fromfile(plain, dtype=np.uint8)))
    for path in (png, rotated):  # decoded upright in the worker, as the CPU path reads them
        decoded = read_encoded(path)
        assert torch.equal(decoded, torch.from_numpy(read_image(path).transpose(2, 0, 1).copy()))
    assert read_encoded(rotated).shape == (3, 32, 24)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(plain.read_bytes()[:200])
    with pytest.raises(UserError, match="Truncated JPEG"):
        read_encoded(truncated)
    assert "2 images" in repr(EncodedImages([torch.zeros(1)] * 2, ["x", "y"], None))


def test_decode_device_cuda_without_a_gpu_is_one_clear_error(
    run_cli: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch, image_folder: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(
        "fit", "--config", "configs/quickstart/classification.yaml", "--data.root", image_folder,
        "--data.decode_device", "cuda", "--trainer.default_root_dir", tmp_path, *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 2 and "--data.decode_device cuda" in err and "no CUDA GPU is visible" in err
    assert "Traceback" not in err
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(UserError, match="auto_augment"):
            ImageFolderDataModule(root=str(image_folder), decode_device="cuda", auto_augment="ta_wide")
