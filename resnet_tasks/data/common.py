"""What every data module shares: image/mask reading, DDP-aware samplers and the data module base."""

from __future__ import annotations

import io
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# OpenCV's own thread pool fights the DataLoader's worker processes for the same cores.
cv2.setNumThreads(0)


class UnreadableImageError(UserError):
    """An image file that is missing, corrupt or truncated (training skips and counts these)."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array; a missing, corrupt or truncated file raises an error.

    OpenCV decodes JPEGs with libjpeg-turbo and gives the same pixels as PIL and torchvision.io at a lower
    cost (see the decode benchmark in the README); PIL is the fallback for formats OpenCV rejects. OpenCV silently
    decodes a truncated JPEG with a grey bottom, so the end-of-image marker is checked first.
    """
    path = Path(path)
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UnreadableImageError(
            f"Cannot read image {path}: {error.strerror or error}. Check that the file exists."
        ) from None
    return decode_image(buffer, path)


def jpeg_state(data: bytes) -> str:
    """ "complete", "truncated" (a JPEG without its end-of-image marker FFD9 near the end) or "other" (not JPEG)."""
    if len(data) < 4 or not data.startswith(b"\xff\xd8"):
        return "other"
    return "complete" if b"\xff\xd9" in data[-32:] else "truncated"


def decode_image(buffer: np.ndarray, path: str | Path) -> np.ndarray:
    """Decode an image file's bytes (uint8 array) like `read_image`; `path` names the image in errors."""
    head_and_tail = buffer[:2].tobytes() + buffer[2:][-32:].tobytes()  # (no copy of the whole file)
    if jpeg_state(head_and_tail) == "truncated":
        raise UnreadableImageError(f"Truncated JPEG {path} (no end-of-image marker). Re-download or remove it.")
    data = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if data is None:
        try:
            with Image.open(io.BytesIO(buffer.tobytes())) as image:
                image.load()
                return np.asarray(image.convert("RGB"))
        except Exception as error:  # PIL raises many types for broken files
            raise UnreadableImageError(
                f"Corrupt or unreadable image {path} ({type(error).__name__}: {error}). Re-download or remove the file."
            ) from None
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def image_size_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as the decoder will return it, from the header only (EXIF rotation too)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # OpenCV's decoder applies the EXIF orientation; orientations 5-8 swap the axes.
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as error:
        raise UserError(f"Corrupt or unreadable image {path} ({type(error).__name__}: {error}).") from None
    return height, width


def list_images(folder: str | Path) -> list[Path]:
    """All image files directly inside `folder`, sorted; UserError when the folder is missing or empty, or when
    two files share a stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Image folder {folder} does not exist. Point --data.predict_path at a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}.")
    # Predictions are keyed by file stem (masks/<stem>.png, image_id): two files with one stem would overwrite.
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise UserError(
                f"{by_stem[path.stem]} and {path} share the stem {path.stem!r}; predictions are keyed by file stem, "
                "so one would overwrite the other. Rename or move one of them."
            )
        by_stem[path.stem] = path
    return files


class Skipped:
    """Stands in for a training item whose image could not be read (what went wrong, for the report)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class SkipUnreadable(torch.utils.data.Dataset):
    """Training-time wrapper: an unreadable image becomes a `Skipped` marker instead of killing the run."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Any:
        try:
            return self.dataset[item]
        except UnreadableImageError as error:
            return Skipped(str(error))

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SkippedBatch:
    """A collated batch plus the reasons for the items dropped from it (unwrapped in the main process)."""

    def __init__(self, batch: Any, skipped: list[str]) -> None:
        self.batch = batch
        self.skipped = skipped


class SkippingCollate:
    """Collate the readable items; carry the skipped ones' reasons along so the main process can count them."""

    def __init__(self, collate_fn: Any = None) -> None:
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, items: list[Any]) -> Any:
        kept = [item for item in items if not isinstance(item, Skipped)]
        if len(kept) == len(items):
            return self.collate_fn(items)
        reasons = [item.reason for item in items if isinstance(item, Skipped)]
        return SkippedBatch(self.collate_fn(kept) if kept else None, reasons)


def distributed_rank_and_size() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EvalShardSampler(Sampler[int]):
    """Evaluation order: rank r takes indices r, r+W, r+2W, ... with no padding, so every image counts once."""

    def __init__(self, dataset_len: int) -> None:
        self.dataset_len = dataset_len
        self.rank, self.world_size = distributed_rank_and_size()

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """A 32-bit augmentation seed that depends only on the run seed, the epoch, the dataset index (and which
    repetition of it, for repeated augmentation)."""
    key = [seed, epoch, index] if copy == 0 else [seed, epoch, index, copy]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class TrainSampler(Sampler[tuple[int, int]]):
    """Training order: a seeded permutation per epoch, split evenly across DDP ranks (padded by wrap-around).

    Yields `(index, seed)` pairs: datasets seed their augmentation per sample, so the pixels a step sees depend
    neither on worker count nor on worker restarts or resumption. Lightning calls `set_epoch` (through the batch
    sampler) at each epoch start, so every epoch sees a new, reproducible order.
    """

    def __init__(self, dataset_len: int, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = distributed_rank_and_size()
        self.num_samples = math.ceil(dataset_len / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in self.indices()])

    def __len__(self) -> int:
        return self.num_samples


class RepeatedAugmentationSampler(TrainSampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's and torchvision's `RASampler`): each chosen image is seen
    `repetitions` times per epoch, each copy on a different rank with its own augmentation seed.

    The epoch keeps the dataset's length (each rank takes about N / world items, not `repetitions` x that), so
    an epoch shows N / `repetitions` distinct images, each `repetitions` times. Unlike torchvision's sampler,
    the per-rank count is not rounded down to a multiple of 256 (tiny datasets keep their items).
    """

    def __init__(self, dataset_len: int, shuffle: bool = True, seed: int = 0, repetitions: int = 4) -> None:
        super().__init__(dataset_len, shuffle=shuffle, seed=seed)
        self.repetitions = repetitions
        self.num_samples = max(1, dataset_len // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        copies = [(index, copy) for index in order for copy in range(self.repetitions)]
        total = math.ceil(len(copies) / self.world_size) * self.world_size
        copies += copies[: total - len(copies)]
        mine = copies[self.rank : total : self.world_size][: self.num_samples]
        return iter([(i, sample_seed(self.seed, self.epoch, i, copy)) for i, copy in mine])


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Training batches of `(index, seed)` items; an epoch's batches are a fixed function of (seed, epoch).

    The one resume interface of every training sampler, in Lightning's form: `state_dict()` says where the
    sampler stands (`epoch`, `batches_done`: batches handed out this epoch, which runs ahead of training by
    the loader's prefetch) and `load_state_dict(state)` makes the next pass start at batch `batches_done` of
    `epoch`. The data module saves the loop's own count and loads it here on resume. Subclasses define how an
    epoch's items are grouped (`epoch_batches`); every rank yields `len(self)` batches (DDP stays in step).
    """

    def __init__(self, sampler: TrainSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.batches_done = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def epoch_batches(self) -> Iterator[list[tuple[int, int]]]:
        """This epoch's batches, from the first."""
        raise NotImplementedError(f"{type(self).__name__} must implement epoch_batches()")

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip, self._skip = self._skip, 0
        self.batches_done = skip
        for batch in itertools.islice(self.epoch_batches(), skip, len(self)):
            self.batches_done += 1
            yield batch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self):  # saved at an epoch's end: the next epoch starts from its beginning
            epoch, done = epoch + 1, 0
        self.set_epoch(epoch)
        self._skip = done


class TrainBatchSampler(ResumableBatchSampler):
    """Consecutive items of the epoch's order, `batch_size` at a time (the incomplete last batch is dropped)."""

    def epoch_batches(self) -> Iterator[list[tuple[int, int]]]:
        items = list(self.sampler)
        for start in range(0, len(items) - self.batch_size + 1, self.batch_size):
            yield items[start : start + self.batch_size]


def item_and_seed(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """A dataset item key: `index` (evaluation) or `(index, seed)` (training, from TrainSampler)."""
    return item if isinstance(item, tuple) else (item, None)


def worker_init(worker_id: int) -> None:
    """Per-worker setup: keep OpenCV single-threaded inside DataLoader workers."""
    cv2.setNumThreads(0)


def default_num_workers() -> int:
    """A sensible DataLoader worker count for this machine (cores - 1, at most 8)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class BaseDataModule(L.LightningDataModule):
    """Fields and loader plumbing shared by the classification, detection and segmentation data modules.

    Subclasses set `label_space` in `__init__` (the CLI links `data.label_space` to `model.label_space` right
    after instantiation; None when only a folder of images is predicted: the model's weights then decide).
    """

    label_space: LabelSpace | None = None

    @property
    def num_classes(self) -> int | None:
        """The number of classes of the data's label space (background included where it has one)."""
        return None if self.label_space is None else self.label_space.num_classes

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        predict_path: str | None = None,
        pin_memory: bool = True,
        seed: int = 0,
        max_skipped_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.root = Path(root) if root is not None else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predict_path = predict_path
        self.pin_memory = pin_memory
        self.seed = seed
        self._resume: dict[str, int] | None = None
        # Training skips unreadable images; a share above this fails the epoch (a metric over a different
        # image set would be a wrong number, and so would a model trained on a silently shrunk dataset).
        self.max_skipped_fraction = max_skipped_fraction
        self.skipped: list[str] = []
        self.seen_in_epoch = 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        skipped: list[str] = []
        if isinstance(batch, SkippedBatch):
            skipped, batch = batch.skipped, batch.batch
            self.skipped.extend(skipped)
        if self.trainer is not None and self.trainer.training:
            # Every training batch asks for batch_size items (drop_last, or full aspect-ratio groups).
            self.seen_in_epoch += self.batch_size - len(skipped)
        return batch

    def take_skip_report(self) -> str | None:
        """A one-line report of the training images skipped since the last call (None when none).

        UserError when they exceed `max_skipped_fraction` of the images the epoch asked for.
        """
        skipped, self.skipped = self.skipped, []
        seen, self.seen_in_epoch = self.seen_in_epoch, 0
        if not skipped:
            return None
        fraction = len(skipped) / max(1, seen + len(skipped))
        examples = "; ".join(skipped[:3])
        if fraction > self.max_skipped_fraction:
            raise UserError(
                f"{len(skipped)} unreadable training images ({fraction:.1%} > {self.max_skipped_fraction:.1%} "
                f"allowed) this epoch, e.g. {examples}. Fix or remove them, or raise the limit "
                "(--data.max_skipped_fraction)."
            )
        return f"skipped {len(skipped)} unreadable training image(s) this epoch ({fraction:.2%}): {examples}"

    def state_dict(self) -> dict[str, Any]:
        """Where training stands (epoch, batches done), from the loop: saved in checkpoints for an exact resume."""
        if self.trainer is None or not self.trainer.training:
            return {}
        loop = self.trainer.fit_loop
        return {
            "epoch": int(loop.epoch_progress.current.processed),
            "batches_done": int(loop.epoch_loop.batch_progress.current.completed),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the saved position; the next training loader's batch sampler starts there."""
        self._resume = dict(state_dict) or None

    def train_sampler(self, dataset_len: int) -> TrainSampler:
        """The order of training items over an epoch (a seeded shuffle, split across ranks)."""
        return TrainSampler(dataset_len, seed=self.seed)

    def dataset(self, key: str) -> torch.utils.data.Dataset:
        """The dataset for `key` ("train", "val", "test", "predict"), built on first use."""
        raise NotImplementedError(f"{type(self).__name__} must implement dataset()")

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.dataset("train"), train=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.dataset("val"), train=False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.dataset("test"), train=False)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.dataset("predict"), train=False)

    def require_root(self) -> Path:
        """The dataset root; UserError when it was not given or does not exist."""
        if self.root is None:
            raise UserError(
                f"{type(self).__name__} needs a dataset: pass --data.root DIR (or --data.predict_path DIR to "
                "predict on a folder of images)."
            )
        if not self.root.is_dir():
            raise UserError(f"Dataset root {self.root} does not exist. Check --data.root.")
        return self.root

    def loader(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        train: bool,
        collate_fn: Any = None,
        batch_sampler: Sampler | None = None,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader with our DDP-aware samplers (the CLI turns off Lightning's sampler replacement).

        Training always goes through a `ResumableBatchSampler` (default: shuffled batches of `batch_size`),
        positioned where a restored checkpoint left off.
        """
        if train:
            dataset = SkipUnreadable(dataset)
            collate_fn = SkippingCollate(collate_fn)
            if batch_sampler is None:
                batch_sampler = TrainBatchSampler(self.train_sampler(len(dataset)), self.batch_size)
            if self._resume:
                batch_sampler.load_state_dict(self._resume)
                self._resume = None
        common = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=collate_fn,
            worker_init_fn=worker_init,
            persistent_workers=self.num_workers > 0 and train,
        )
        # A private generator: creating a loader's iterator must not draw from the global RNG, or a resumed
        # run's dropout/mixup draws would shift against the uninterrupted run.
        common["generator"] = torch.Generator().manual_seed(self.seed)
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **common)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.eval_batch_size, sampler=EvalShardSampler(len(dataset)), **common
        )


def check_file(path: Path, what: str, hint: str) -> Path:
    """Return `path` if it exists, else raise UserError naming it, what it is and how to fix it."""
    if not path.exists():
        raise UserError(f"Missing {what}: {path}. {hint}")
    return path


def stems_from_list(path: Path) -> Sequence[str]:
    """Non-empty stripped lines of an ImageSets-style list file."""
    check_file(path, "image list", "Check the dataset layout (see data/README.md).")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
