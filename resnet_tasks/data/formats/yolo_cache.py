"""The YOLO index cache: a split's parsed annotations stored as an .npz of their columns beside its labels folder
(`labels.resnet-tasks-<split>.cache`) or under a cache directory, valid while the files' fingerprint matches."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from resnet_tasks.data.detection_annotations import DetectionAnnotations

# Bump when what a cache holds, or how labels are read, changes: older caches are then rebuilt.
CACHE_VERSION = 2
STALE_BUILD_SECONDS = 600.0  # a `.building` marker older than this belongs to a process that died


@dataclass
class YoloIndex:
    """A split's annotations (labels 1..K = YOLO class + 1) and what the parse found along the way."""

    annotations: DetectionAnnotations
    counts: Counter = field(default_factory=Counter)  # missing / empty label files, polygon rows
    unreadable: list[str] = field(default_factory=list)  # images skipped because their header cannot be read

    def summary(self, split: str, origin: str, ignored: Counter) -> str:
        """One line: images, boxes, negatives, unreadable images, files `ignored` (per extension), `origin`."""
        ann, counts = self.annotations, self.counts
        negatives = int((np.diff(ann.offsets) == 0).sum())
        parts = [
            f"YOLO {split}: {len(ann)} images, {len(ann.labels)} boxes ({counts['polygons']} from polygons), "
            f"{negatives} negatives ({counts['missing']} without a label file, {counts['empty']} empty)"
        ]
        if self.unreadable:
            parts.append(f"skipped {len(self.unreadable)} unreadable image(s), e.g. {self.unreadable[0]}")
        if ignored:
            parts.append("ignored " + ", ".join(f"{n} {ext} file(s)" for ext, n in sorted(ignored.items())))
        return "; ".join([*parts, origin])


def fingerprint(images: list[str], labels: list[str], root: str, num_classes: int) -> str:
    """A hash of the split's image list (relative to `root`), the class count, and the sizes and mtimes of every
    image and label file (a missing label file counts as such)."""
    stats = np.full((len(images) + len(labels), 2), -1, dtype=np.int64)
    for row, path in enumerate([*images, *labels]):
        try:
            status = os.stat(path)
            stats[row] = status.st_size, status.st_mtime_ns
        except OSError:
            pass
    digest = hashlib.sha256(f"{CACHE_VERSION} {num_classes}\n".encode())
    digest.update("\n".join(relative_name(path, root) for path in images).encode("utf-8", "surrogateescape"))
    digest.update(stats.tobytes())
    return digest.hexdigest()


def relative_name(path: str, root: str) -> str:
    """`path` relative to `root` (a plain prefix cut when inside it: this runs once per image)."""
    prefix = root.rstrip(os.sep) + os.sep
    return path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)


def default_cache_dir() -> Path:
    """The user cache directory: $XDG_CACHE_HOME/resnet-tasks, else ~/.cache/resnet-tasks."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet-tasks"


def cache_locations(labels_folder: Path, split: str, cache_dir: str | Path | None) -> list[Path]:
    """Where a split's cache may live: beside its labels folder, then under `cache_dir` (default: the user's)."""
    key = hashlib.sha256(str(labels_folder.resolve()).encode()).hexdigest()[:16]
    user = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return [
        labels_folder.parent / f"{labels_folder.name}.resnet-tasks-{split}.cache",
        user / "yolo" / f"{key}-{split}.cache",
    ]


def read_cache(path: Path, expected: str, root: str, source: str) -> YoloIndex | None:
    """The index stored at `path` if it was built from the same files (same fingerprint), else None."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            if meta.get("fingerprint") != expected:
                return None
            arrays = {name: stored[name] for name in stored.files if name != "meta"}
        annotations = DetectionAnnotations(
            root=root,
            string_ids=True,
            clipped_boxes=meta["clipped"],
            dropped_boxes=meta["dropped"],
            source=source,
            **arrays,
        )
        return YoloIndex(annotations, Counter(meta["counts"]), list(meta["unreadable"]))
    except (OSError, ValueError, KeyError, TypeError, EOFError):  # absent, partial or foreign: rebuilt
        return None


def write_cache(path: Path, index: YoloIndex, stamp: str) -> None:
    """Store `index` at `path` atomically (a temporary file renamed over it: readers never see half a file)."""
    ann = index.annotations
    arrays = {f.name: getattr(ann, f.name) for f in fields(ann) if isinstance(getattr(ann, f.name), np.ndarray)}
    meta = {"fingerprint": stamp, "clipped": ann.clipped_boxes, "dropped": ann.dropped_boxes}
    meta.update(counts=dict(index.counts), unreadable=index.unreadable)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def writable(folder: Path) -> bool:
    """Whether this process may create files in the existing folder `folder`."""
    return folder.is_dir() and os.access(folder, os.W_OK)


def _wait_for_builder(path: Path, marker: Path, stamp: str, root: str, source: str) -> YoloIndex | None:
    """Another process is building `path`: its index once written; None when it stopped without one."""
    while marker.exists():
        try:
            if time.time() - marker.stat().st_mtime > STALE_BUILD_SECONDS:
                marker.unlink(missing_ok=True)  # its builder died: this process builds instead
                return None
        except FileNotFoundError:
            break
        time.sleep(0.2)
    return read_cache(path, stamp, root, source)


def cached_index(
    locations: list[Path], stamp: str, root: str, source: str, build: Callable[[], YoloIndex]
) -> tuple[YoloIndex, str]:
    """The index from the first cache in `locations` whose fingerprint is `stamp`, else `build()` written to the
    first writable location by one process (a `.building` marker claims it; the others wait for its file, or
    build in memory where no file can be written); with a phrase saying where it came from."""
    for path in locations:
        if (index := read_cache(path, stamp, root, source)) is not None:
            return index, f"read from the cache {path}"
    index = None
    for position, path in enumerate(locations):
        marker = path.with_name(path.name + ".building")
        if position > 0:  # a cache directory is ours to create; the dataset's folders are not
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
        if not writable(path.parent):
            continue
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if (waited := _wait_for_builder(path, marker, stamp, root, source)) is not None:
                return waited, f"read from the cache {path} (written by another process)"
            continue
        except OSError:
            continue
        try:
            started = time.perf_counter()
            if index is None:
                index = build()
            write_cache(path, index, stamp)
            return index, f"indexed in {time.perf_counter() - started:.1f} s, cached in {path}"
        except OSError:
            continue
        finally:
            marker.unlink(missing_ok=True)
    if index is None:
        index = build()
    return index, f"not cached (no writable folder among {', '.join(str(p.parent) for p in locations)})"
