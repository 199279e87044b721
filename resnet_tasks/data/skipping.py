"""Training goes on past an unreadable image: the dataset wrapper turns its error into a marker, the collate drops
the markers and carries their reasons to the main process, which counts them (`BaseDataModule.take_skip_report`)."""

from __future__ import annotations

from typing import Any

import torch

from resnet_tasks.data.io import UnreadableImageError


class UnreadableItem:
    """Stands in for a training item whose image could not be read (what went wrong, for the report)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MarkUnreadableItems(torch.utils.data.Dataset):
    """Training-time dataset wrapper: an unreadable image becomes an `UnreadableItem` instead of killing the run."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Any:
        try:
            return self.dataset[item]
        except UnreadableImageError as error:
            return UnreadableItem(str(error))

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class BatchWithSkips:
    """A collated batch plus the reasons for the items dropped from it (unwrapped in the main process)."""

    def __init__(self, batch: Any, skipped: list[str]) -> None:
        self.batch = batch
        self.skipped = skipped


class CollateReadableItems:
    """Collate the readable items; carry the unreadable ones' reasons along so the main process can count them."""

    def __init__(self, collate_fn: Any = None) -> None:
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, items: list[Any]) -> Any:
        kept = [item for item in items if not isinstance(item, UnreadableItem)]
        if len(kept) == len(items):
            return self.collate_fn(items)
        reasons = [item.reason for item in items if isinstance(item, UnreadableItem)]
        return BatchWithSkips(self.collate_fn(kept) if kept else None, reasons)
