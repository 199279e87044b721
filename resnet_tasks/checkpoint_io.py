"""Checkpoints that survive a crash at any moment, and a clear word about a checkpoint file that does not.

Every checkpoint is written as `<target>.tmp` beside its target, flushed to disk and renamed over the target,
so a kill mid-write leaves the previous checkpoint intact on any filesystem (Lightning's own writer stages the
file in `$TMPDIR` and copies it over when that is another filesystem, e.g. /scratch or NFS).
"""

from __future__ import annotations

import errno
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from resnet_tasks.compat import is_local_path
from resnet_tasks.errors import UserError

TMP_SUFFIX = ".tmp"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_torch_save(obj: Any, target: str | os.PathLike[str]) -> None:
    """`torch.save` to `target` through `<target>.tmp` + fsync + rename: `target` is the old file or the new one.

    A full disk (or quota) is a UserError naming the file; the previous `target` is kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + TMP_SUFFIX)
    try:
        with open(staging, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    except BaseException as error:
        staging.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            kept = f"the previous {target.name} and the" if target.exists() else "the"
            raise UserError(
                f"no space left on the device while writing the checkpoint {target} ({error.strerror}): nothing "
                f"was written to it; {kept} other checkpoints saved before are kept. Free space there (or point "
                "--trainer.default_root_dir at a larger disk) and resume with --ckpt_path."
            ) from None
        raise
    _fsync_directory(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with atomic, durable local writes (`<target>.tmp`, fsync, `os.replace`).

    Remote URLs (s3://, gs://, ...) keep Lightning's writer: an object store replaces an object in one piece.
    `preloaded` maps a checkpoint path to its content already read by the command (`read_checkpoint`): the Trainer
    gets that content instead of reading the file a second time (once; a later load reads the file).
    """

    def __init__(self, preloaded: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.preloaded = {os.path.abspath(path): checkpoint for path, checkpoint in (preloaded or {}).items()}

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = self.preloaded.pop(os.path.abspath(path), None) if is_local_path(path) else None
        if checkpoint is not None:
            return checkpoint
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)


def checkpoint_problem(source: str | os.PathLike[str] | bytes) -> str | None:
    """Why a checkpoint file (a path, or its bytes already read) is not readable (truncated, damaged, not a
    checkpoint), or None if it is.

    Every entry's checksum is verified (a flipped byte in a tensor would otherwise load silently). Only damage is
    judged: an intact file that `torch.load(weights_only=True)` refuses for its content is left to Lightning's
    loader, which explains that itself.
    """
    opened: Any = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    if not zipfile.is_zipfile(opened):
        if isinstance(source, bytes):
            head = source[:4]
        else:
            with open(opened, "rb") as handle:
                head = handle.read(4)
        if head.startswith(b"PK"):
            return "it is truncated (its end is missing: the write that made it was cut short)"
        if head[:1] == b"\x80":  # a pickle: torch's legacy (non-zip) format
            return None
        return "it is not a checkpoint file (neither torch's zip format nor its legacy one)"
    try:
        with zipfile.ZipFile(opened) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"it is damaged ({error})"
    if damaged is not None:
        return f"it is damaged (its entry {damaged} fails its checksum)"
    if not any(name.endswith("/data.pkl") for name in names):
        return "it is a zip archive but not a torch checkpoint (it has no data.pkl)"
    return None


def last_good_checkpoint(folder: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None) -> Path | None:
    """The newest readable `*.ckpt` in `folder` (other than `exclude`), or None."""
    folder = Path(folder)
    excluded = Path(exclude).resolve() if exclude is not None else None
    candidates = [p for p in folder.glob("*.ckpt") if p.is_file() and p.resolve() != excluded]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(candidate) is None:
            return candidate
    return None


def check_checkpoint_file(path: str | os.PathLike[str], data: bytes | None = None) -> None:
    """Raise one clear UserError if `--ckpt_path` names a truncated or damaged file (naming the run's last good one);
    `data` is the file's content when it was already read."""
    problem = checkpoint_problem(path if data is None else data)
    if problem is None:
        return
    good = last_good_checkpoint(Path(path).parent, exclude=path)
    hint = (
        f"the newest readable checkpoint beside it is {good}: resume with --ckpt_path {good}"
        if good is not None
        else "no readable checkpoint is beside it: pass another --ckpt_path, or start without one"
    )
    raise UserError(f"cannot read the checkpoint --ckpt_path {path}: {problem}; {hint}.")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A `--ckpt_path` file read once: its bytes checked for damage (a UserError, as `check_checkpoint_file`) and
    loaded with `torch.load(weights_only=True)` on the CPU. None when torch refuses its content: Lightning's own
    loading then reports that."""
    data = Path(path).read_bytes()
    check_checkpoint_file(path, data)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        return None
    return checkpoint if isinstance(checkpoint, dict) else None
