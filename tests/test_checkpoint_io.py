"""Checkpoints that survive any crash: a SIGKILL in the middle of writing a ~256 MB checkpoint (with $TMPDIR on
another filesystem, /dev/shm, where Lightning's own writer would stage the file and then copy it over the target)
leaves the previous checkpoint intact and resumable; a full disk during a save and a truncated or damaged
`--ckpt_path` are each one clear error."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from resnet_tasks.checkpoint_io import TMP_SUFFIX, AtomicCheckpointIO, atomic_torch_save
from tests.conftest import COMMON_TRAINER_ARGS, assert_one_clear_error, clean_environment

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
BALLAST_MB = 256
TINY = [
    "--config", "configs/classification/imagenet_resnet50.yaml", "--model.backbone.name", "resnet20",
    "--data.crop_size", "32", "--data.resize_size", "36", "--data.batch_size", "8", "--data.num_workers", "0",
    "--model.optimizer.lr", "0.01", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
]  # fmt: skip


class Ballast(L.Callback):
    """Makes every checkpoint `megabytes` larger (a stand-in for a large model's weights and optimizer state)."""

    def __init__(self, megabytes: int) -> None:
        self.megabytes = megabytes

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["ballast"] = torch.ones(self.megabytes * 2**20 // 4)


def test_sigkill_while_saving_keeps_the_previous_checkpoint(image_folder: Path, tmp_path: Path, run_cli) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the run folder")
    scratch = shm / f"resnet-tasks-test-{uuid.uuid4().hex}"
    scratch.mkdir()
    root = tmp_path / "run"
    ballast = json.dumps({"class_path": "tests.test_checkpoint_io.Ballast", "init_args": {"megabytes": BALLAST_MB}})
    no_best = json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_top_k": 0}})
    # 1 step per epoch, a validation and a save of last.ckpt (only) after each: its 2nd save is killed.
    args = ["fit", *TINY, "--data.root", str(image_folder), "--trainer.max_steps", "5",
            "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "-1", "--trainer.default_root_dir", str(root),
            f"--trainer.callbacks+={ballast}", f"--trainer.callbacks+={no_best}", *COMMON_TRAINER_ARGS]  # fmt: skip
    env = {**clean_environment(), "TMPDIR": str(scratch)}
    log = tmp_path / "output.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "tests.test_checkpoint_io", *args], cwd=REPO, env=env,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    last = root / "lightning_logs/version_0/checkpoints/last.ckpt"
    staging = last.with_name(last.name + TMP_SUFFIX)
    try:
        deadline = time.monotonic() + 120
        while not (last.exists() and staging.exists() and staging.stat().st_size > 16 * 2**20):
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the second save of last.ckpt never started"
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)  # mid-write: the staged file is part-written
        process.wait()
        partial = staging.stat().st_size
        assert 0 < partial < last.stat().st_size
        # Nothing was staged in $TMPDIR; the target is the previous, complete checkpoint.
        assert not any(scratch.iterdir())
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()
    checkpoint = torch.load(last, weights_only=True, mmap=True)
    assert checkpoint["global_step"] == 1 and checkpoint["ballast"].numel() * 4 == BALLAST_MB * 2**20

    # Resume from what is there: the run goes on from step 1.
    code, out, err = run_cli("fit", *TINY, "--data.root", image_folder, "--trainer.max_steps", "2",
                             "--trainer.max_epochs", "-1", "--ckpt_path", last, "--trainer.default_root_dir",
                             tmp_path / "resumed", *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err[-3000:]
    (resumed,) = (tmp_path / "resumed").rglob("last.ckpt")
    assert torch.load(resumed, weights_only=True)["global_step"] == 2


def test_full_disk_during_a_save_is_one_clear_error(
    image_folder: Path, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save

    def save_until_the_disk_is_full(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("global_step", 0) >= 2:
            handle.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    root = tmp_path / "run"
    code, out, err = run_cli("fit", *TINY, "--data.root", image_folder, "--trainer.max_steps", "3",
                             "--trainer.val_check_interval", "1", "--trainer.default_root_dir", root,
                             *COMMON_TRAINER_ARGS)  # fmt: skip
    folder = root / "lightning_logs/version_0/checkpoints"
    line = assert_one_clear_error(code, err, "no space left on the device", str(folder), "are kept", "--ckpt_path")
    assert "last.ckpt" in line or "epoch" in line
    # Step 1's checkpoints are intact; nothing half-written is left.
    saved = sorted(folder.iterdir())
    assert saved and all(p.suffix == ".ckpt" for p in saved), saved
    assert all(torch.load(p, weights_only=True)["global_step"] == 1 for p in saved)


def test_corrupt_ckpt_path_names_it_and_the_last_good_checkpoint(image_folder: Path, tmp_path: Path, run_cli) -> None:
    folder = tmp_path / "run/lightning_logs/version_0/checkpoints"
    good = folder / "epoch0-step3.ckpt"
    atomic_torch_save({"global_step": 3, "state_dict": {"w": torch.ones(1000)}}, good)
    os.utime(good, (time.time() - 60, time.time() - 60))
    data = good.read_bytes()
    truncated = folder / "last.ckpt"  # newer than the good one, cut short by a crash
    truncated.write_bytes(data[: len(data) // 2])
    flipped = folder / "interrupted.ckpt"
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would not notice
    flipped.write_bytes(bytes(damaged))
    common = [*TINY, "--data.root", image_folder, "--trainer.default_root_dir", tmp_path / "v", *COMMON_TRAINER_ARGS]
    for path, problem in ((truncated, "truncated"), (flipped, "fails its checksum")):
        code, out, err = run_cli("validate", *common, "--ckpt_path", path)
        assert_one_clear_error(code, err, str(path), problem, f"--ckpt_path {good}")
    good.unlink()
    code, out, err = run_cli("fit", *common, "--ckpt_path", truncated)
    assert_one_clear_error(code, err, str(truncated), "no readable checkpoint is beside it")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    code, out, err = run_cli("validate", *common, "--ckpt_path", text)
    assert_one_clear_error(code, err, str(text), "not a checkpoint file")


def test_validate_reads_the_checkpoint_once(image_folder: Path, tmp_path: Path, run_cli, monkeypatch) -> None:
    """`validate --ckpt_path`: the damage check, the model's config, the label space and the Trainer's restore
    all come from one read of the file."""
    import builtins
    import io

    common = [*TINY, "--data.root", image_folder, "--trainer.default_root_dir", tmp_path, *COMMON_TRAINER_ARGS]
    code, out, err = run_cli("fit", *common, "--trainer.max_steps", "2")
    assert code == 0, err
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    reads: list[str] = []
    real_open, real_load = builtins.open, torch.load

    def spy_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode and Path(str(file)).name == checkpoint.name:
            reads.append(f"open {file}")
        return real_open(file, mode, *args, **kwargs)

    def spy_load(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and Path(file).name == checkpoint.name:
            reads.append(f"torch.load {file}")
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(torch, "load", spy_load)
    code, out, err = run_cli("validate", *common, "--ckpt_path", checkpoint)
    assert code == 0, err
    assert len(reads) == 1, reads


def test_checkpoint_io_writes_through_a_staged_file(tmp_path: Path, monkeypatch) -> None:
    """The rename is what makes it atomic: the target is never opened for writing."""
    opened: list[str] = []
    real_open = open

    def spy_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            opened.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    target = tmp_path / "a" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 7}, target)
    assert opened == [str(target) + TMP_SUFFIX]
    assert torch.load(target, weights_only=True) == {"global_step": 7} and not list(target.parent.glob("*.tmp"))


def _run_cli_here(args: list[str]) -> None:
    from resnet_tasks.cli import main

    torch.set_num_threads(1)
    main(args)


if __name__ == "__main__":
    _run_cli_here(sys.argv[1:])
