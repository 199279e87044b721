"""The one data module pattern: a subclass parses its format into datasets and declares how their items are
collated and batched; `BaseDataModule` builds every loader (train, val, test, predict) from that."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset, Sampler

from resnet_tasks.compat import fit_batches_done, fit_epochs_processed
from resnet_tasks.data.sampling import (
    EvalShardSampler,
    ResumableBatchSampler,
    TrainBatchSampler,
    TrainSampler,
    worker_init,
)
from resnet_tasks.data.skipping import BatchWithSkips, CollateReadableItems, MarkUnreadableItems
from resnet_tasks.data.transforms import IMAGENET_MEAN, IMAGENET_STD, model_input
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace

# The datasets each Lightning stage reads (built in `setup`, so that a bad layout fails before training starts).
STAGE_DATASETS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class BaseDataModule(L.LightningDataModule):
    """Builds the train/val/test/predict loaders of every data module from what its subclass declares.

    A subclass parses its format and declares:
    - `build_dataset(key)`: the dataset of "train", "val", "test" or "predict" (`dataset(key)` builds each once);
    - `collate(train)`: how items become a batch (None: torch's default collate);
    - `train_batch_sampler(dataset)`: how training items are grouped (default: shuffled batches of `batch_size`
      in the order of `train_sampler`), a `ResumableBatchSampler` so that a resumed run continues exactly;
    - `eval_batch_sampler(dataset)`: how evaluation items are grouped (None: `eval_batch_size` items at a time of
      this rank's shard, every image once across ranks);
    - `eval_preprocessing()`: the evaluation preprocessing of its images, which `export` and `predict` read.
    It sets `label_space` in `__init__` (the CLI links `data.label_space` to `model.label_space` right after
    instantiation; None when only a folder of images is predicted: the model's weights then decide).

    Training wraps the dataset so that unreadable images are skipped and counted (`take_skip_report`) rather
    than ending the run, and builds its batch sampler at the position a restored checkpoint saved.
    """

    label_space: LabelSpace | None = None

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
        self.datasets: dict[str, Dataset] = {}

    def __repr__(self) -> str:
        # LightningDataModule's own string builds every loader (and so every dataset); jsonargparse logs it.
        return f"{type(self).__name__}(root={str(self.root) if self.root is not None else None!r})"

    __str__ = __repr__

    @property
    def num_classes(self) -> int | None:
        """The number of classes of the data's label space (background included where it has one)."""
        return None if self.label_space is None else self.label_space.num_classes

    # ------------------------------------------------------------------ what a subclass declares
    def build_dataset(self, key: str) -> Dataset:
        """The dataset of `key` ("train", "val", "test", "predict"), parsed from the data's format."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_dataset()")

    def collate(self, train: bool) -> Callable | None:
        """How training (`train`) or evaluation items become a batch; None: torch's default collate."""
        return None

    def train_sampler(self, dataset_len: int) -> TrainSampler:
        """The order of training items over an epoch (a seeded shuffle, split across ranks)."""
        return TrainSampler(dataset_len, seed=self.seed)

    def train_batch_sampler(self, dataset: Dataset) -> ResumableBatchSampler:
        """How training items are grouped into batches: consecutive items of `train_sampler`'s order."""
        return TrainBatchSampler(self.train_sampler(len(dataset)), self.batch_size)  # type: ignore[arg-type]

    def eval_batch_sampler(self, dataset: Dataset) -> Sampler | None:
        """How evaluation items are grouped; None: `eval_batch_size` at a time of this rank's `EvalShardSampler`."""
        return None

    def eval_preprocessing(self) -> dict[str, Any]:
        """The evaluation preprocessing `predict` applies and an exported model expects, in the exported sidecar's
        form: `resize` (shorter side to this many pixels, the other side floor(side * resize / shorter side);
        None: as is), `crop` (centre crop of this square size, top = (H - crop) // 2; None: none), `interpolation`,
        `mean`/`std` (applied inside the model to pixels / 255), `model_resize` (a resize the model does itself;
        None here: it is the model's setting) and, from the task-level modules, `output` (what the output means)."""
        return {
            "input": "images: uint8 RGB (N, 3, H, W), 0..255",
            "resize": None,
            "crop": None,
            "interpolation": "bilinear (OpenCV cv2.resize INTER_LINEAR: no antialiasing)",
            "mean": [float(m) for m in getattr(self, "mean", None) or IMAGENET_MEAN],
            "std": [float(s) for s in getattr(self, "std", None) or IMAGENET_STD],
            "normalized_in_model": True,
            "model_resize": None,
        }

    # ------------------------------------------------------------------ datasets
    def dataset(self, key: str) -> Dataset:
        """The dataset for `key` ("train", "val", "test", "predict"), built on first use."""
        if key not in self.datasets:
            self.datasets[key] = self.build_dataset(key)
        return self.datasets[key]

    def setup(self, stage: str | None = None) -> None:
        for key in STAGE_DATASETS.get(stage or "fit", ()):
            self.dataset(key)

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

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> Any:
        return self.train_loader(self.dataset("train"))

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.eval_loader(self.dataset("val"))

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.eval_loader(self.dataset("test"))

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.eval_loader(self.dataset("predict"))

    def train_loader(self, dataset: Dataset) -> Any:
        """The training loader: unreadable images skipped and counted, batches from `train_batch_sampler`,
        positioned where a restored checkpoint left off (the streaming modules read a stream instead)."""
        batch_sampler = self.train_batch_sampler(dataset)
        if hasattr(batch_sampler, "__len__") and len(batch_sampler) == 0:
            raise UserError(
                f"The training split's {len(dataset)} images make no full batch of --data.batch_size "  # type: ignore[arg-type]
                f"{self.batch_size} (per device): lower --data.batch_size, or add images."
            )
        resume, self._resume = self._resume, None
        if resume:
            batch_sampler.load_state_dict(resume)
        collate_fn = CollateReadableItems(self.collate(train=True))
        return self.data_loader(MarkUnreadableItems(dataset), collate_fn, batch_sampler=batch_sampler, train=True)

    def eval_loader(self, dataset: Dataset) -> torch.utils.data.DataLoader:
        """An evaluation loader: every image once across ranks, grouped by `eval_batch_sampler`."""
        batch_sampler = self.eval_batch_sampler(dataset)
        if batch_sampler is not None:
            return self.data_loader(dataset, self.collate(train=False), batch_sampler=batch_sampler)
        sampler = EvalShardSampler(len(dataset))  # type: ignore[arg-type]
        return self.data_loader(dataset, self.collate(train=False), batch_size=self.eval_batch_size, sampler=sampler)

    def data_loader(
        self, dataset: Dataset, collate_fn: Callable | None, *, train: bool = False, **sampling: Any
    ) -> torch.utils.data.DataLoader:
        """A DataLoader with our DDP-aware samplers (the CLI turns off Lightning's sampler replacement)."""
        return torch.utils.data.DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=collate_fn,
            worker_init_fn=worker_init,
            persistent_workers=self.num_workers > 0 and train,
            # A private generator: creating a loader's iterator must not draw from the global RNG, or a resumed
            # run's dropout/mixup draws would shift against the uninterrupted run.
            generator=torch.Generator().manual_seed(self.seed),
            **sampling,
        )

    # ------------------------------------------------------------------ the model's input, on the device
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Items cross the workers with uint8 images (a quarter of float32's bytes); the moved batch becomes the
        model's input here, on its device (`to_model_input`)."""
        return self.to_model_input(batch)

    def to_model_input(self, batch: Any) -> Any:
        """A moved batch {"image": uint8 (N, C, H, W), ...} as the model takes it: float, normalised with the module's
        `mean`/`std` (ImageNet's when it has none), random erasing and padding applied, in the model's memory format
        (`resnet_tasks.data.transforms.model_input`). A module whose batches differ overrides it (detection)."""
        if not isinstance(batch, dict):
            return batch
        mean = getattr(self, "mean", None) or IMAGENET_MEAN
        std = getattr(self, "std", None) or IMAGENET_STD
        return model_input(batch, mean, std, channels_last=self.model_channels_last())

    def model_channels_last(self) -> bool:
        """Whether the model this module feeds takes NHWC batches (its `channels_last`; False without a Trainer)."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(model, "channels_last", False))

    # ------------------------------------------------------------------ skipped images and resuming
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        skipped: list[str] = []
        if isinstance(batch, BatchWithSkips):
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
        return {"epoch": fit_epochs_processed(self.trainer), "batches_done": fit_batches_done(self.trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the saved position; the next training loader's batch sampler starts there."""
        self._resume = dict(state_dict) or None
