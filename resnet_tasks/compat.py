"""The one door to private internals of Lightning, torch, torchmetrics, jsonargparse and LitData.

Each function reaches exactly one private name so that an upgrade that moves it breaks here, in one place, and in
its test (tests/test_compat.py), instead of somewhere in the package. Nothing else in resnet_tasks names a private
attribute of these projects.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------- Lightning


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer `module` is attached to, or None (`module.trainer` raises when there is none)."""
    return module._trainer


def stop_after_this_step(trainer: L.Trainer, stop: bool = True) -> None:
    """Ask Lightning to stop training at the next step boundary (as its own SIGTERM handler does); `stop=False`
    withdraws the request."""
    trainer._signal_connector.received_sigterm = stop


def fit_epochs_processed(trainer: L.Trainer) -> int:
    """Training epochs Lightning has processed in this fit (the epoch a resumed run continues in)."""
    return int(trainer.fit_loop.epoch_progress.current.processed)


def fit_batches_done(trainer: L.Trainer) -> int:
    """Training batches completed in the current epoch (where a mid-epoch resume starts)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)


def fit_between_epochs(trainer: L.Trainer) -> bool:
    """True when the last training epoch has finished and the next one has not started yet."""
    epochs = trainer.fit_loop.epoch_progress.current
    return epochs.completed == epochs.ready


def reset_epoch_batch_progress(trainer: L.Trainer) -> None:
    """Zero the current epoch's batch counters (a checkpoint taken between epochs then resumes at batch 0)."""
    trainer.fit_loop.epoch_loop.batch_progress.reset_on_run()


def update_saved_hyperparameters(module: L.LightningModule, values: Mapping[str, Any]) -> None:
    """Update `module.hparams` and the copy Lightning saves in checkpoints and logs (`save_hyperparameters`'s
    initial values) with `values`."""
    for store in (module.hparams, module._hparams_initial):
        store.update(values)


def module_from_checkpoint(cls: type[L.LightningModule], checkpoint: dict[str, Any]) -> L.LightningModule:
    """`cls.load_from_checkpoint` for a checkpoint already in memory: Lightning's format migration, the module built
    from its hyper-parameters, `on_load_checkpoint`, then its state dict (strict unless the module says otherwise)."""
    from lightning.pytorch.core.saving import _load_state
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

    checkpoint = _pl_migrate_checkpoint(checkpoint)
    checkpoint.setdefault("hyper_parameters", {})
    return _load_state(cls, checkpoint)


def is_local_path(path: Any) -> bool:
    """True for a path on a local file system (not s3://, gs://, ...), as Lightning's checkpoint IO decides it."""
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

    return bool(_is_local_file_protocol(path))


def set_ema_average_function(callback: Any, multi_average_fn: Any) -> None:
    """Give Lightning's `EMAWeightAveraging` callback the (multi-tensor) averaging function its averaged model is
    built with, in place of its own per-tensor one (set before the callback's `setup` builds that model)."""
    callback._kwargs.pop("avg_fn", None)
    callback._kwargs["multi_avg_fn"] = multi_average_fn


class CheckpointHyperparametersHook:
    """A LightningCLI mixin: the step where Lightning reads `--ckpt_path`'s hyper-parameters into the model's config
    (`_parse_ckpt_path`, between parsing and `before_instantiate_classes`) calls the subclass's
    `apply_checkpoint_hyperparameters()` instead, which reads the file itself (once per command)."""

    def apply_checkpoint_hyperparameters(self) -> None:
        raise NotImplementedError

    def _parse_ckpt_path(self) -> None:
        self.apply_checkpoint_hyperparameters()


# ---------------------------------------------------------------------------------------------- torch


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The eager module behind a `torch.compile(module)` wrapper (the module itself when it is not one)."""
    return getattr(module, "_orig_mod", module)


@contextlib.contextmanager
def compiled_calls_disabled(module: nn.Module) -> Iterator[None]:
    """Run `module` and its children eagerly inside the block: an in-place `nn.Module.compile()` is undone (the
    ONNX tracer cannot trace a dynamo-optimised call) and restored afterwards."""
    compiled = [(m, m._compiled_call_impl) for m in module.modules() if getattr(m, "_compiled_call_impl", None)]
    for submodule, _ in compiled:
        submodule._compiled_call_impl = None
    try:
        yield
    finally:
        for submodule, call in compiled:
            submodule._compiled_call_impl = call


def optimizer_honours_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer whose `step` takes GradScaler's `found_inf` itself (torch's amp-scaling flag)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def momentum_prepared(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `mark_momentum_prepared` was called on this optimizer object."""
    return bool(getattr(optimizer, "_momentum_prepared", False))


def mark_momentum_prepared(optimizer: torch.optim.Optimizer) -> None:
    """Remember on the optimizer object that its momentum buffers were initialised (once per optimizer)."""
    optimizer._momentum_prepared = True  # type: ignore[attr-defined]


def batch_norm_base() -> type[nn.Module]:
    """torch's common base class of BatchNorm1d/2d/3d and SyncBatchNorm (not of the lazy or instance norms)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return _BatchNorm


def instance_norm_base() -> type[nn.Module]:
    """torch's common base class of InstanceNorm1d/2d/3d and their lazy variants."""
    from torch.nn.modules.instancenorm import _InstanceNorm

    return _InstanceNorm


# ---------------------------------------------------------------------------------------------- torchmetrics


def metric_state_names(metric: Any) -> list[str]:
    """The names of a torchmetrics `Metric`'s states (those `add_state` registered), in registration order."""
    return list(metric._reductions)


class OwnStateSync:
    """A torchmetrics `Metric` mixin (listed before `Metric`): the step where torchmetrics synchronises the states
    across processes before `compute` (`_sync_dist`: one all-gather per state, per element for list states) calls
    the subclass's `sync_states(process_group)` instead."""

    def sync_states(self, process_group: Any) -> None:
        raise NotImplementedError

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        self.sync_states(process_group)


# ---------------------------------------------------------------------------------------------- argparse / jsonargparse


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every argument a parser (argparse or jsonargparse) defines, subcommand parsers not included."""
    return list(parser._actions)


def parser_has_argument(parser: argparse.ArgumentParser, dest: str) -> bool:
    """True when `parser` defines an argument stored under `dest`."""
    return any(action.dest == dest for action in parser_actions(parser))


def action_typehint(action: argparse.Action) -> Any:
    """The type a jsonargparse argument was declared with (None for plain argparse actions and groups)."""
    return getattr(action, "_typehint", None)


# ---------------------------------------------------------------------------------------------- LitData


def litdata_file_system(url: str) -> Any:
    """LitData's file-system provider for an object-store `url` (s3://, gs://, ...), credentials from the
    environment."""
    from litdata.streaming.fs_provider import _get_fs_provider

    return _get_fs_provider(url)
