"""Streaming data modules: train and evaluate from the LitData chunks `resnet-tasks optimize` writes, in a local folder
or an object store (`s3://...`), with the decoder and transforms of the file-based modules.

`root` holds one optimized folder per split (`ROOT/train`, `ROOT/val`, named by `train_split` / `val_split`).

How an epoch is split (LitData's rule, kept as is): training streams the chunks in a seeded order that changes every
epoch (`seed`, epoch) and deals them out in whole batches, rank by rank (worker by worker within a rank); each of the
W ranks gets floor(N / (W * batch_size)) batches, so an epoch trains on W * batch_size * floor(N / (W * batch_size))
samples and leaves out the N mod (W * batch_size) samples at the end of that epoch's order (a different few each
epoch). Evaluation never leaves one out: it reads the split by index through the file-based modules' evaluation
sampler (rank r takes samples r, r + W, ...; no padding), so metrics count every image exactly once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from resnet_tasks.data.chunk_metadata import read_metadata, require_litdata
from resnet_tasks.data.classification import ImageFolderDataModule
from resnet_tasks.data.detection import DetectionAnnotations, DetectionDataModule, DetectionDataset
from resnet_tasks.data.io import UnreadableImageError, decode_image, list_images
from resnet_tasks.data.sampling import sample_seed, worker_init
from resnet_tasks.data.skipping import CollateReadableItems, UnreadableItem
from resnet_tasks.data.transforms import detection_train_transform
from resnet_tasks.errors import UserError
from resnet_tasks.labels import LabelSpace


def split_location(root: str, split: str) -> str:
    """The optimized folder (or URI) of `split` under `root`."""
    return f"{root.rstrip('/')}/{split}"


class SampleDecoder:
    """A chunk sample -> the file-based dataset's item: decode the image bytes with the file-based decoder, then
    build the item with `make_item(image, sample, seed)`.

    Training seeds each sample's augmentation from (seed, epoch, the sample's index in its split), as the file-based
    `TrainSampler` does, so one sample gets the same pixels whether read from files or chunks. `stream` is the
    StreamingDataset this decoder runs in (its `current_epoch`, which LitData counts from 1).
    """

    def __init__(self, make_item: Callable[[np.ndarray, dict[str, Any], int | None], Any], seed: int, train: bool):
        self.make_item = make_item
        self.seed = seed
        self.train = train
        self.stream: Any = None

    def __call__(self, sample: dict[str, Any]) -> Any:
        name = str(sample.get("name") or sample.get("file_name"))
        seed = sample_seed(self.seed, int(self.stream.current_epoch) - 1, int(sample["index"])) if self.train else None
        try:
            image = decode_image(np.frombuffer(sample["image"], dtype=np.uint8), name)
        except UnreadableImageError as error:
            if self.train:  # training skips and counts it (CollateReadableItems), as the file-based modules do
                return UnreadableItem(str(error))
            raise
        return self.make_item(image, sample, seed)


class ClassificationItem:
    """The `{"image", "label", "name"}` item of the ImageFolder datasets, from a decoded chunk sample."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: np.ndarray, sample: dict[str, Any], seed: int | None) -> dict[str, Any]:
        # "image" uint8 CHW (+ "erase": random erasing's box), made the model's input after the transfer.
        return {**self.transform(image, seed), "label": int(sample["label"]), "name": str(sample["name"])}


class DetectionItem:
    """The `(image, target)` item of `DetectionDataset`, from a decoded chunk sample (its boxes and category ids)."""

    def __init__(self, label_space: LabelSpace, train: bool, transform: Any = None) -> None:
        assert label_space.category_ids is not None
        self.category_ids = label_space.category_ids
        self.label_of = {category_id: label for label, category_id in enumerate(self.category_ids) if label > 0}
        self.train = train
        self.transform = transform

    def __call__(self, image: np.ndarray, sample: dict[str, Any], seed: int | None) -> tuple[torch.Tensor, dict]:
        ids = np.asarray(sample["category_ids"], dtype=np.int64).reshape(-1)
        count = len(ids)
        annotations = DetectionAnnotations(
            root="",
            file_names=np.array([str(sample["file_name"]).encode("utf-8")], dtype=np.bytes_),
            image_ids=np.array([int(sample["image_id"])], dtype=np.int64),
            heights=np.array([int(sample["height"])], dtype=np.int32),
            widths=np.array([int(sample["width"])], dtype=np.int32),
            offsets=np.array([0, count], dtype=np.int64),
            boxes=np.asarray(sample["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.array([self.label_of[int(i)] for i in ids], dtype=np.int64),
            crowd=np.asarray(sample["iscrowd"], dtype=np.uint8).reshape(-1),
            difficult=np.zeros(count, dtype=np.uint8),
            areas=np.asarray(sample["area"], dtype=np.float32).reshape(-1),
        )
        dataset = DetectionDataset(
            annotations, train=self.train, transform=self.transform, category_ids=self.category_ids
        )
        tensor, target = dataset.item(image, 0, seed)
        target["index"] = int(sample["index"])
        return tensor, target


class StreamingEvalDataset(Dataset):
    """An optimized split read by index (every sample once, in the file-based order), for evaluation and predict."""

    def __init__(self, location: str, make_item: Callable, num_samples: int) -> None:
        litdata = require_litdata()
        self.decoder = SampleDecoder(make_item, seed=0, train=False)
        self.stream = litdata.StreamingDataset(location, transform=self.decoder)
        self.decoder.stream = self.stream
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples  # the whole split (LitData's own length is this rank's share)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} of a split of {self.num_samples}")
        return self.stream[int(index)]


@functools.cache
def streaming_train_loader_class() -> type:
    """LitData's StreamingDataLoader with its position kept by the data module (one owner, as for the file-based
    samplers), defined on first use so that LitData stays optional."""
    litdata = require_litdata()

    class StreamingTrainLoader(litdata.StreamingDataLoader):
        """`position()` / `restore_position(state)` are LitData's own state (samples yielded per worker, epoch).

        Lightning saves and restores a loader's `state_dict()` by itself; here that is empty, so the position is
        saved once, by the data module, beside the loop's count. LitData leaves a restored position armed until an
        epoch is read to its end, which Lightning never does (it stops at `len()`): the next pass clears it.
        """

        _restored = False

        def position(self) -> dict[str, Any]:
            return super().state_dict()

        def restore_position(self, state: dict[str, Any]) -> None:
            super().load_state_dict(state)
            self._restored = True

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            if state:
                self.restore_position(state)

        def __iter__(self) -> Any:
            if self.restore and not self._restored:
                self.restore = False  # the restored epoch is over: this pass starts the next one
            self._restored = False
            yield from super().__iter__()

    return StreamingTrainLoader


class StreamingTraining:
    """What both streaming data modules add to `BaseDataModule`: the LitData training loader and its exact resume.

    The checkpoint holds the loop's position (epoch, batches done; `BaseDataModule.state_dict`) and the loader's
    (`StreamingDataLoader.state_dict()`: samples yielded per worker, epoch); a resumed run's loader continues from
    it, or starts the next epoch when the checkpoint was written at an epoch's end.
    """

    _train_loader: Any = None

    def train_loader(self, dataset: Any) -> Any:
        """A StreamingDataLoader over the training stream (a shuffled StreamingDataset), positioned at the restored
        state."""
        loader = streaming_train_loader_class()(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=CollateReadableItems(self.collate(train=True)),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            worker_init_fn=worker_init,
        )
        resume, self._resume = self._resume, None
        if resume and resume.get("loader"):
            if int(resume["batches_done"]) < len(loader):
                loader.restore_position(resume["loader"])
            else:  # written at an epoch's end: the next pass is the next epoch, from its start
                loader.current_epoch = int(resume["loader"]["current_epoch"])
        self._train_loader = loader
        return loader

    def training_stream(self, location: str, make_item: Callable, exclude: list[int] | None = None) -> Any:
        """The shuffled StreamingDataset of a training split (leftovers dropped, see the module docstring)."""
        litdata = require_litdata()
        decoder = SampleDecoder(make_item, seed=self.seed, train=True)
        stream = litdata.StreamingDataset(location, shuffle=True, drop_last=True, seed=self.seed, transform=decoder)
        if exclude:
            left_out = set(exclude)
            stream = stream.subset([i for i in range(stream_length(stream)) if i not in left_out])
            decoder = stream.transform[0]  # the subset is a copy: bind the copy's decoder to it
        decoder.stream = stream
        if stream_length(stream) < self.batch_size:
            raise UserError(
                f"{location} has {stream_length(stream)} training sample(s), fewer than --data.batch_size "
                f"{self.batch_size}."
            )
        return stream

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        if state and self._train_loader is not None:
            state["loader"] = self._train_loader.position()
        return state


def stream_length(stream: Any) -> int:
    """The number of samples of a StreamingDataset (all ranks together)."""
    return sum(end - start for start, end in stream.region_of_interest)


def check_label_space(location: str, metadata: dict[str, Any], names: list[str]) -> None:
    """UserError when a split was optimized with other classes than the module's label space."""
    if list(metadata["class_names"]) != list(names):
        raise UserError(
            f"{location} was optimized with classes {metadata['class_names'][:5]}... but the data module's label "
            f"space has {names[:5]}...; optimize every split of one dataset (same root) into --data.root."
        )


class StreamingClassificationDataModule(StreamingTraining, ImageFolderDataModule):
    """ImageFolder / ImageNet classification from optimized chunks (`resnet-tasks optimize --format imagefolder`).

    Same options, transforms and items as `ImageFolderDataModule`; `root` is a folder or an object-store URI
    (`s3://bucket/imagenet`) holding the optimized splits. Repeated augmentation is not available here.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.location = str(root).rstrip("/")
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split or val_split
        if kwargs.get("repeated_augmentations", 1) > 1:
            raise UserError("--data.repeated_augmentations is not available for streaming data; leave it at 1.")
        if kwargs.get("decode_device", "cpu") != "cpu":
            raise UserError("--data.decode_device cuda is not available for streaming data; use cpu.")
        super().__init__(root=root, **kwargs)

    def _discover_classes(self) -> list[str]:
        """The class names the chunks were written with (the train split's, else the val split's)."""
        local = "://" not in self.location
        split = self.train_split
        if local and not Path(split_location(self.location, split), "index.json").is_file():
            split = self.val_split
        return list(read_metadata(split_location(self.location, split))["class_names"])

    def split_metadata(self, split: str) -> tuple[str, dict[str, Any]]:
        location = split_location(self.location, split)
        metadata = read_metadata(location)
        check_label_space(location, metadata, self.folder_names)
        return location, metadata

    def build_dataset(self, key: str) -> Dataset:
        """train as a LitData stream; val, test and predict (without `predict_path`) read by index."""
        if key == "train":
            location, _ = self.split_metadata(self.train_split)
            return self.training_stream(location, ClassificationItem(self.train_transform()))
        if key == "predict" and self.predict_path is not None:
            folder = Path(self.predict_path)
            files = list_images(folder)
            return self.image_list(files, [-1] * len(files), folder, train=False)
        split = {"val": self.val_split, "test": self.test_split, "predict": self.val_split}[key]
        location, metadata = self.split_metadata(split)
        item = ClassificationItem(self.eval_transform())
        return StreamingEvalDataset(location, item, int(metadata["num_samples"]))


class StreamingDetectionDataModule(StreamingTraining, DetectionDataModule):
    """COCO-style detection from optimized chunks (`resnet-tasks optimize --format coco`).

    Same options, transforms and targets as `CocoDetectionDataModule`, except that training batches are not
    grouped by aspect ratio (LitData batches consecutive samples of its stream). `train_split` / `val_split` /
    `test_split` name the optimized folders under `root` (a folder or an object-store URI).
    """

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.location = None if root is None else str(root).rstrip("/")
        if self.location is None:
            if self.predict_path is None:
                raise UserError("StreamingDetectionDataModule needs --data.root (the folder of optimized splits).")
            return
        local = "://" not in self.location
        split = self.train_split
        if local and not Path(split_location(self.location, split), "index.json").is_file():
            split = self.val_split
        metadata = read_metadata(split_location(self.location, split))
        if metadata.get("format") != "coco":
            raise UserError(f"{split_location(self.location, split)} holds {metadata.get('format')} data, not coco.")
        self.set_label_space(metadata["class_names"], metadata["category_ids"])

    def split_metadata(self, split: str) -> tuple[str, dict[str, Any]]:
        assert self.location is not None and self.label_space is not None
        location = split_location(self.location, split)
        metadata = read_metadata(location)
        check_label_space(location, metadata, list(self.label_space.object_names))
        return location, metadata

    def eval_dataset(self, split: str) -> StreamingEvalDataset:  # type: ignore[override]
        """An evaluation split read by index (the file-based module's setup and exact evaluation sampler)."""
        location, metadata = self.split_metadata(split)
        assert self.label_space is not None
        return StreamingEvalDataset(
            location, DetectionItem(self.label_space, train=False), int(metadata["num_samples"])
        )

    def train_dataset(self) -> Any:
        """The training split as a LitData stream, with the file-based module's training transform."""
        location, metadata = self.split_metadata(self.train_split)
        assert self.label_space is not None
        transform = detection_train_transform(self.hflip_prob, self.large_scale_jitter, self.crop_size)
        exclude = metadata.get("images_without_objects") if self.remove_images_without_annotations else None
        item = DetectionItem(self.label_space, train=True, transform=transform)
        return self.training_stream(location, item, exclude)
