"""Streaming data (LitData): `resnet-tasks optimize` writes chunks; the streaming data modules read them with the
file-based modules' decoder and transforms, split epochs across ranks by LitData's rule, evaluate every sample once
and resume mid-epoch exactly. All on local folders (object stores are documented, not tested)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("litdata")

from litdata.utilities.env import _DistributedEnv  # noqa: E402

from resnet_tasks.callbacks import INTERRUPTED_CHECKPOINT  # noqa: E402
from resnet_tasks.data import sampling  # noqa: E402
from resnet_tasks.data.classification import ImageFolderDataModule  # noqa: E402
from resnet_tasks.data.formats.coco import CocoDetectionDataModule  # noqa: E402
from resnet_tasks.data.streaming import StreamingClassificationDataModule, StreamingDetectionDataModule  # noqa: E402
from resnet_tasks.lightning_cli import ResNetTasksCLI, import_components  # noqa: E402
from tests.conftest import COMMON_TRAINER_ARGS, make_image_folder, read_metrics, sigterm_at  # noqa: E402

# 27 training images, batch 4: LitData's epoch is 24 samples on 1 rank, 2 x 12 on 2 ranks (3 left out).
CLASSIFICATION = {"crop_size": 32, "resize_size": 36, "batch_size": 4, "num_workers": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An ImageFolder dataset (train 27 images, val 9) and its optimized splits, written through the CLI."""
    from resnet_tasks.cli import main

    base = tmp_path_factory.mktemp("streaming")
    images = make_image_folder(base / "images", per_class=9, splits=("train",))
    make_image_folder(base / "images", per_class=3, splits=("val",), seed=1)
    chunks = base / "chunks"
    for split in ("train", "val"):
        # chunks of ~3 images: the epoch interleaves several chunks
        main(["optimize", "--data.root", str(images), "--split", split, "--out", str(chunks / split),
              "--workers", "2", "--chunk_bytes", "12KB"])  # fmt: skip
    assert len(list((chunks / "train").glob("*.bin"))) > 3
    return images, chunks


def _items(loader: torch.utils.data.DataLoader) -> dict[str, tuple[torch.Tensor, int]]:
    items: dict[str, tuple[torch.Tensor, int]] = {}
    for batch in loader:
        for image, label, name in zip(batch["image"], batch["label"], batch["name"]):
            assert name not in items, f"{name} twice in one epoch"
            items[name] = (image, int(label))
    return items


def test_streaming_epoch_has_the_file_based_samples_and_pixels(folders: tuple[Path, Path]) -> None:
    images, chunks = folders
    streaming = StreamingClassificationDataModule(root=str(chunks), **CLASSIFICATION)
    files = ImageFolderDataModule(root=str(images), **CLASSIFICATION)
    assert streaming.label_space == files.label_space
    streamed = _items(streaming.train_dataloader())
    assert len(streamed) == 24  # floor(27 / 4) batches of 4; 3 left out (LitData's drop_last)
    read = _items(files.train_dataloader())
    # The same per-sample seeds: every image streamed gets the pixels of its file-based twin (order differs).
    for name, (image, label) in streamed.items():
        if name in read:
            assert label == read[name][1]
            assert torch.equal(image, read[name][0]), name
    assert len(streamed.keys() & read.keys()) >= 21  # both leave out 3 of 27, not necessarily the same
    # Evaluation: every image once, in the file-based order, same pixels.
    for key in ("val", "test"):
        stream_batches = list(getattr(streaming, f"{key}_dataloader")())
        file_batches = list(getattr(files, f"{key}_dataloader")())
        assert [b["name"] for b in stream_batches] == [b["name"] for b in file_batches]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(stream_batches, file_batches))
        assert sum(len(b["name"]) for b in stream_batches) == 9


def test_two_ranks_split_the_epoch_by_litdata_rule(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r of W streams floor(N / (W * batch)) whole batches; together the ranks see distinct images and
    leave out N mod (W * batch) of them; each rank's evaluation share is exact (no padding, nothing dropped)."""
    _, chunks = folders
    seen: list[set[str]] = []
    for rank in range(2):
        module = StreamingClassificationDataModule(root=str(chunks), **CLASSIFICATION)
        stream = module.dataset("train")
        stream.distributed_env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)
        loader = module.train_dataloader()
        assert len(loader) == 3
        seen.append(set(_items(loader)))
    assert all(len(names) == 12 for names in seen)
    assert not seen[0] & seen[1]
    # evaluation under 2 ranks: the evaluation sampler's shards of the whole split
    shards = []
    for rank in range(2):
        monkeypatch.setattr(sampling, "distributed_rank_and_size", lambda rank=rank: (rank, 2))
        module = StreamingClassificationDataModule(root=str(chunks), **CLASSIFICATION)
        shards.append([name for batch in module.val_dataloader() for name in batch["name"]])
    assert len(shards[0]) == 5 and len(shards[1]) == 4 and len(set(shards[0] + shards[1])) == 9


class RecordBatches(L.Callback):
    """The names of the images of every training batch."""

    def __init__(self) -> None:
        self.names: list[list[str]] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, *args: object) -> None:
        self.names.append(list(batch["name"]))


def _cli(chunks: Path, root: Path) -> ResNetTasksCLI:
    import_components()
    args = [
        "--config", "configs/classification/imagenet_resnet50.yaml",
        "--config", "configs/classification/imagenet_resnet50_streaming.yaml",
        "--data.root", str(chunks), "--data.crop_size", "32", "--data.resize_size", "36", "--data.batch_size", "4",
        "--data.num_workers", "2", "--model.backbone.name", "resnet18", "--model.optimizer.lr", "0.01",
        "--trainer.max_steps", "8", "--trainer.max_epochs", "-1", "--trainer.deterministic", "true",
        "--trainer.num_sanity_val_steps", "0", "--trainer.check_val_every_n_epoch", "100",
        "--trainer.default_root_dir", str(root), *COMMON_TRAINER_ARGS,
    ]  # fmt: skip
    return ResNetTasksCLI(
        model_class=L.LightningModule, datamodule_class=L.LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args, run=False,
        auto_configure_optimizers=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[list, dict]:
    """The uninterrupted run: its batches (image names) and final weights."""
    L.seed_everything(0)
    straight = _cli(folders[1], tmp_path_factory.mktemp("straight"))
    record = RecordBatches()
    straight.trainer.callbacks.append(record)
    straight.trainer.fit(straight.model, straight.datamodule)
    assert straight.trainer.global_step == 8
    return record.names, straight.model.state_dict()


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch (6 batches per epoch), and at an epoch's end
def test_resume_continues_the_stream_exactly(
    folders: tuple[Path, Path], straight_run: tuple[list, dict], tmp_path: Path, stop_at: int
) -> None:
    """Stopped by SIGTERM, then resumed: the same batches (2 LitData workers) and bitwise the same weights."""
    L.seed_everything(0)
    stopped = _cli(folders[1], tmp_path / "stopped")
    stopped.trainer.callbacks.append(sigterm_at(stop_at))
    with pytest.raises(SystemExit):
        stopped.trainer.fit(stopped.model, stopped.datamodule)
    checkpoint = next((tmp_path / "stopped").rglob(INTERRUPTED_CHECKPOINT))

    L.seed_everything(0)
    resumed = _cli(folders[1], tmp_path / "resumed")
    resumed.model.skip_pretrained_weights = True
    record = RecordBatches()
    resumed.trainer.callbacks.append(record)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(checkpoint))
    names, weights = straight_run
    assert record.names == names[stop_at:]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_fit_from_chunks_through_the_cli(folders: tuple[Path, Path], tmp_path: Path, run_cli: Callable) -> None:
    """One epoch (6 steps) then validation: metrics.json from the streamed val split."""
    _, chunks = folders
    code, out, err = run_cli(
        "fit", "--config", "configs/classification/imagenet_resnet50.yaml",
        "--config", "configs/classification/imagenet_resnet50_streaming.yaml", "--data.root", chunks,
        "--data.crop_size", "32", "--data.resize_size", "36", "--data.batch_size", "4", "--data.num_workers", "1",
        "--model.backbone.name", "resnet18", "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", tmp_path, *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    metrics = read_metrics(out)
    assert 0.0 <= metrics["top1"] <= 1.0 and "acc/red" in metrics


def test_optimize_reports_bad_input(tmp_path: Path, run_cli: Callable) -> None:
    code, _, err = run_cli("optimize", "--data.root", tmp_path / "missing", "--out", tmp_path / "out")
    assert code == 2
    assert err.strip() == f"error: Dataset root {tmp_path / 'missing'} does not exist. Check --data.root."
    code, out, _ = run_cli("optimize", "--help")
    assert code == 0 and "--chunk_bytes" in out
    code, _, err = run_cli("fit", "--config", "configs/quickstart/classification.yaml", "--data.class_path",
                           "resnet_tasks.StreamingClassificationDataModule", "--data.root", tmp_path)  # fmt: skip
    assert code == 2 and "is not an optimized split" in err and "resnet-tasks optimize" in err


def test_streaming_detection_matches_coco_files(tmp_path: Path) -> None:
    """COCO through chunks: the same evaluation targets and pixels, category ids kept; training leaves out images
    without objects, like the file-based module."""
    from resnet_tasks.data.shapes import generate_shapes
    from resnet_tasks.optimize import optimize_split

    shapes = generate_shapes(tmp_path / "shapes", num_train=10, num_val=4, image_size=64) / "coco"
    for split in ("train2017", "val2017"):
        optimize_split(shapes, split, str(tmp_path / "chunks" / split), "coco", workers=1, chunk_bytes="16KB")
    options = {"train_split": "train2017", "val_split": "val2017", "test_split": "val2017", "num_workers": 0}
    streaming = StreamingDetectionDataModule(root=str(tmp_path / "chunks"), batch_size=2, **options)
    files = CocoDetectionDataModule(root=str(shapes), batch_size=2, **options)
    assert streaming.label_space == files.label_space
    streaming.setup("fit")
    files.setup("fit")
    for (image_a, target_a), (image_b, target_b) in zip(streaming.dataset("val"), files.dataset("val")):
        assert torch.equal(image_a, image_b)
        assert target_a.keys() == target_b.keys()
        for key, value in target_a.items():
            assert torch.equal(value, target_b[key]) if isinstance(value, torch.Tensor) else value == target_b[key]
    usable = len(files.dataset("train"))
    trained = [target["index"] for _, targets in streaming.train_dataloader() for target in targets]
    assert len(trained) == usable - usable % 2 and len(set(trained)) == len(trained)
