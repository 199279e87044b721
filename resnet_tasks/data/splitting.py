"""Holding out a validation split from the training data (`--data.val_fraction`, `--data.split_seed`).

The split is a pure function of the training file names, their labels, the fraction and the seed: `fit`,
`validate` and `test` each recompute the same one, and `fit` saves it in the run directory (`val_split.txt`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from resnet_tasks.errors import UserError

# The share held out when the data has no val split and --data.val_fraction is not given.
DEFAULT_VAL_FRACTION = 0.1
VAL_SPLIT_FILE = "val_split.txt"


def tell(message: str) -> None:
    """Print a one-line notice for the user (once: on the first process only)."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)


def choose_val_fraction(val_fraction: float | None, has_val_split: bool, source: str) -> float | None:
    """The share of the training data to hold out as val, or None to use the data's own val split.

    None (the default) holds out nothing where `source` has a val split and `DEFAULT_VAL_FRACTION` where it has
    none (saying so in one line); a given fraction always holds out that share of the training data.
    """
    if val_fraction is None:
        if has_val_split:
            return None
        tell(
            f"{source} has no val split: holding out {DEFAULT_VAL_FRACTION:.0%} of the training data as val "
            "(--data.val_fraction, --data.split_seed)"
        )
        return DEFAULT_VAL_FRACTION
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"--data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    return float(val_fraction)


def stratified_split(
    files: Sequence[str | Path], labels: Sequence[int] | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) into `files`, each sorted: a seeded, class-stratified hold-out.

    Every class (`labels`; None: one class for all) gives `round(fraction * n)` of its n items to val, at least one
    where it has two or more items and never all of them. The result depends only on the set of (file, label)
    pairs, the fraction and the seed, not on the order `files` come in.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    names = [str(f) for f in files]
    classes = np.zeros(len(names), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(classes) != len(names):
        raise ValueError("one label per file expected")
    order = sorted(range(len(names)), key=names.__getitem__)
    val: list[int] = []
    for label in np.unique(classes):
        members = [i for i in order if classes[i] == label]
        count = round(fraction * len(members))
        count = min(max(count, 1 if len(members) >= 2 else 0), len(members) - 1)
        rng = np.random.default_rng([seed, int(label) & 0xFFFFFFFF])
        val.extend(members[i] for i in rng.permutation(len(members))[:count])
    is_val = np.zeros(len(names), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def hold_out(
    files: Sequence[str], labels: Sequence[int] | None, fraction: float, seed: int, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """`stratified_split`, with a UserError naming `source` when it has too few items to hold any out."""
    train, val = stratified_split(files, labels, fraction, seed)
    if not len(val):
        raise UserError(f"{source} has {len(files)} item(s): too few to hold out a val split. Add a val split.")
    return train, val


def write_val_split(directory: str | Path, names: Sequence[str]) -> Path:
    """Write the val split's file names (one relative path per line) as `val_split.txt` into `directory`."""
    path = Path(directory) / VAL_SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names))
    return path


def save_val_split(trainer: Any, names: Callable[[], Sequence[str]]) -> None:
    """Write the held-out val split into the run directory of `fit` (`trainer.log_dir`) and say where; call it
    on every process (`log_dir` is a collective under DDP), only the first one writes."""
    directory = trainer.log_dir or trainer.default_root_dir
    if trainer.is_global_zero:
        tell(f"val split written: {write_val_split(directory, names())}")
