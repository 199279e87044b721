"""The order of items: seeded, DDP-aware training samplers whose batches resume exactly, evaluation shards that
count every image once, and the per-sample augmentation seeds."""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Sampler


def distributed_rank_and_size() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """A 32-bit augmentation seed that depends only on the run seed, the epoch, the dataset index (and which
    repetition of it, for repeated augmentation)."""
    key = [seed, epoch, index] if copy == 0 else [seed, epoch, index, copy]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def item_and_seed(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """A dataset item key: `index` (evaluation) or `(index, seed)` (training, from TrainSampler)."""
    return item if isinstance(item, tuple) else (item, None)


def worker_init(worker_id: int) -> None:
    """Per-worker setup: keep OpenCV single-threaded inside DataLoader workers."""
    cv2.setNumThreads(0)


def default_num_workers() -> int:
    """A sensible DataLoader worker count for this machine (cores - 1, at most 8)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------------------------- evaluation
class EvalShardSampler(Sampler[int]):
    """Evaluation order: rank r takes indices r, r+W, r+2W, ... with no padding, so every image counts once."""

    def __init__(self, dataset_len: int) -> None:
        self.dataset_len = dataset_len
        self.rank, self.world_size = distributed_rank_and_size()

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))


class SizeGroupedEvalBatchSampler(Sampler[list[int]]):
    """Evaluation batches of images sharing one original size, over this rank's `EvalShardSampler` shard.

    Results equal per-image evaluation (nothing is padded) while same-size images (most of VOC is 500x375 or
    375x500) still run in batches. Every image is evaluated exactly once across ranks.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.sizes = [tuple(s) for s in sizes]
        self.batch_size = max(1, batch_size)
        self.shard = EvalShardSampler(len(self.sizes))

    def _batches(self) -> list[list[int]]:
        open_batches: dict[tuple[int, int], list[int]] = {}
        batches: list[list[int]] = []
        for index in self.shard:
            group = open_batches.setdefault(self.sizes[index], [])
            group.append(index)
            if len(group) == self.batch_size:
                batches.append(group)
                open_batches[self.sizes[index]] = []
        batches.extend(group for group in open_batches.values() if group)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


# ----------------------------------------------------------------------------------------------- training
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

    def order(self) -> list[int]:
        """The whole dataset's order for the current epoch (before it is split across ranks)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.dataset_len, generator=generator).tolist()
        return list(range(self.dataset_len))

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch."""
        order = self.order()
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
        copies = [(index, copy) for index in self.order() for copy in range(self.repetitions)]
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


def aspect_ratio_groups(widths: np.ndarray, heights: np.ndarray, group_factor: int) -> np.ndarray:
    """Group id per image from width/height quantised on 2k+1 log-spaced bin edges in [1/2, 2] (k = factor).

    The same bins as torchvision's references (`_quantize(aspect_ratios, 2 ** linspace(-1, 1, 2k+1))`).
    """
    ratios = widths.astype(np.float64) / np.maximum(heights.astype(np.float64), 1.0)
    edges = 2.0 ** np.linspace(-1, 1, 2 * group_factor + 1)
    return np.digitize(ratios, edges)


class AspectRatioBatchSampler(ResumableBatchSampler):
    """Training batches of images from one aspect-ratio group (less padding when the model batches them).

    Draws `(index, seed)` items from `sampler` (this rank's shard of a `TrainSampler` under DDP), fills one
    bucket per group and emits a bucket when it holds `batch_size` items. At the end the fullest unfinished
    buckets are topped up with earlier items of their own group, so every rank yields exactly
    `len(sampler) // batch_size` batches (equal counts keep DDP ranks in step).
    """

    def __init__(self, sampler: TrainSampler, group_ids: np.ndarray, batch_size: int) -> None:
        super().__init__(sampler, batch_size)
        self.group_ids = np.asarray(group_ids)

    def epoch_batches(self) -> Iterator[list[tuple[int, int]]]:
        buckets: dict[int, list[tuple[int, int]]] = defaultdict(list)
        seen: dict[int, list[tuple[int, int]]] = defaultdict(list)
        emitted = 0
        for item in self.sampler:
            group = int(self.group_ids[item[0]])
            buckets[group].append(item)
            seen[group].append(item)
            if len(buckets[group]) == self.batch_size:
                yield buckets.pop(group)
                emitted += 1
        wanted = len(self)
        for group, bucket in sorted(buckets.items(), key=lambda entry: (-len(entry[1]), entry[0])):
            if emitted >= wanted:
                break
            pool = seen[group]
            missing = self.batch_size - len(bucket)
            filler = (pool * math.ceil(missing / len(pool) + 1))[:missing]
            yield bucket + filler
            emitted += 1
