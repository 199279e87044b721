"""Each private internal reached through resnet_tasks.compat still behaves as compat expects on the installed
Lightning / torch / torchmetrics / jsonargparse: a test here fails when an upgrade moves one."""

from __future__ import annotations

import argparse

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resnet_tasks import compat


class TinyModule(L.LightningModule):
    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(batches, 2)), batch_size=1)


def _trainer(**kwargs: object) -> L.Trainer:
    options = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "max_epochs": 1}  # fmt: skip
    options.update(kwargs)
    return L.Trainer(**options)


class Recorder(L.Callback):
    """Records compat's view of the fit loop, and asks for a stop after `stop_at` batches."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.seen: list[tuple[int, int, bool]] = []
        self.at_epoch_end: tuple[int, int, bool] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        state = (
            compat.fit_epochs_processed(trainer),
            compat.fit_batches_done(trainer),
            compat.fit_between_epochs(trainer),
        )
        self.seen.append(state)
        if self.stop_at is not None and len(self.seen) == self.stop_at:
            compat.stop_after_this_step(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
        compat.reset_epoch_batch_progress(trainer)
        self.at_epoch_end = (compat.fit_epochs_processed(trainer), compat.fit_batches_done(trainer), False)


def test_attached_trainer() -> None:
    module = TinyModule()
    assert compat.attached_trainer(module) is None
    trainer = _trainer()
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer


def test_fit_progress_and_batch_reset() -> None:
    recorder = Recorder()
    trainer = _trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(TinyModule(), _loader(3))
    # At a batch's end the batches before it count as done (Lightning marks this one completed just after).
    assert recorder.seen[:3] == [(0, 0, False), (0, 1, False), (0, 2, False)]
    assert recorder.seen[3] == (1, 0, False)
    assert recorder.at_epoch_end is not None and recorder.at_epoch_end[1] == 0  # the reset zeroed the count
    assert compat.fit_between_epochs(trainer)
    assert compat.fit_epochs_processed(trainer) == 2


def test_stop_after_this_step_and_withdraw() -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    recorder = Recorder(stop_at=2)
    with pytest.raises(SIGTERMException):
        _trainer(callbacks=[recorder]).fit(TinyModule(), _loader(5))
    assert len(recorder.seen) == 2

    class Withdraw(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            compat.stop_after_this_step(trainer)
            compat.stop_after_this_step(trainer, False)

    recorder = Recorder()
    _trainer(callbacks=[Withdraw(), recorder]).fit(TinyModule(), _loader(3))
    assert len(recorder.seen) == 3


def test_update_saved_hyperparameters_and_module_from_checkpoint() -> None:
    module = TinyModule(width=2)
    compat.update_saved_hyperparameters(module, {"extra": "resolved"})
    assert module.hparams["extra"] == "resolved"
    assert module.hparams_initial["extra"] == "resolved"  # what the loggers record
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {"width": 2},
                  "pytorch-lightning_version": L.__version__}  # fmt: skip
    rebuilt = compat.module_from_checkpoint(TinyModule, checkpoint)
    assert isinstance(rebuilt, TinyModule)
    assert torch.equal(rebuilt.layer.weight, module.layer.weight)


def test_is_local_path() -> None:
    assert compat.is_local_path("/tmp/x.ckpt")
    assert compat.is_local_path("relative/x.ckpt")
    assert not compat.is_local_path("s3://bucket/x.ckpt")


def test_set_ema_average_function() -> None:
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    callback = EMAWeightAveraging(decay=0.9)
    average = get_ema_multi_avg_fn(decay=0.5)
    compat.set_ema_average_function(callback, average)
    callback.setup(_trainer(), TinyModule(), "fit")
    averaged = callback._average_model
    assert averaged.multi_avg_fn is average and averaged.avg_fn is None


def test_unwrap_compiled_and_compiled_calls_disabled() -> None:
    layer = nn.Linear(2, 2)
    assert compat.unwrap_compiled(torch.compile(layer)) is layer
    assert compat.unwrap_compiled(layer) is layer
    outer = nn.Sequential(nn.Linear(2, 2))
    outer[0].compile()
    assert outer[0]._compiled_call_impl is not None
    with compat.compiled_calls_disabled(outer):
        assert outer[0]._compiled_call_impl is None
    assert outer[0]._compiled_call_impl is not None


def test_optimizer_honours_found_inf() -> None:
    param = nn.Parameter(torch.zeros(2))
    assert compat.optimizer_honours_found_inf(torch.optim.SGD([param], lr=0.1, fused=True))
    assert not compat.optimizer_honours_found_inf(torch.optim.SGD([param], lr=0.1, foreach=False))


def test_momentum_prepared_is_ours_alone() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    assert not compat.momentum_prepared(optimizer)  # torch does not use the name itself
    compat.mark_momentum_prepared(optimizer)
    assert compat.momentum_prepared(optimizer)
    assert "_momentum_prepared" not in optimizer.state_dict()


def test_batch_norm_base() -> None:
    base = compat.batch_norm_base()
    for norm in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.SyncBatchNorm(2)):
        assert isinstance(norm, base)
    assert not isinstance(nn.GroupNorm(1, 2), base)


def test_metric_state_names() -> None:
    from torchmetrics import MeanMetric
    from torchmetrics.detection import MeanAveragePrecision

    assert compat.metric_state_names(MeanMetric()) == ["mean_value", "weight"]
    names = compat.metric_state_names(MeanAveragePrecision())
    assert {"detection_box", "detection_scores", "groundtruth_box"} <= set(names)


def test_parser_actions() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--return_predictions")
    assert compat.parser_has_argument(parser, "return_predictions")
    assert not compat.parser_has_argument(parser, "missing")
    from jsonargparse import ArgumentParser

    nested = ArgumentParser()
    nested.add_argument("--a.b", type=int, default=1)
    assert "a.b" in {action.dest for action in compat.parser_actions(nested)}


def test_action_typehint() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--a", type=int | None, default=None)
    parser.add_argument("--plain", action="store_true")
    hints = {action.dest: compat.action_typehint(action) for action in compat.parser_actions(parser)}
    assert hints["a"] == int | None
    assert hints["plain"] is None


def test_litdata_file_system() -> None:
    pytest.importorskip("litdata")
    from litdata.streaming import fs_provider

    assert callable(fs_provider._get_fs_provider)


def test_instance_norm_base() -> None:
    base = compat.instance_norm_base()
    assert all(isinstance(cls(4), base) for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))
    assert not isinstance(nn.BatchNorm2d(4), base)


def test_own_state_sync_replaces_torchmetrics_sync() -> None:
    from torchmetrics import Metric

    class Counted(compat.OwnStateSync, Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("items", default=[], dist_reduce_fx="cat")
            self.synced: list[object] = []

        def sync_states(self, process_group: object) -> None:
            self.synced.append(process_group)

        def update(self, value: torch.Tensor) -> None:
            self.items.append(value)

        def compute(self) -> torch.Tensor:
            return torch.cat(self.items)

    metric = Counted()
    metric.update(torch.ones(2))
    # torchmetrics' sync before compute, as under DDP (forced here: no process group in this test).
    metric.sync(process_group="group", distributed_available=lambda: True)
    assert metric.synced == ["group"]
    metric.unsync()


def test_checkpoint_hyperparameters_hook_replaces_lightnings_step() -> None:
    from lightning.pytorch.cli import LightningCLI

    seen: list[object] = []

    class CLI(compat.CheckpointHyperparametersHook, LightningCLI):
        def apply_checkpoint_hyperparameters(self) -> None:
            seen.append(self.config)  # parsed already, nothing instantiated yet
            assert not hasattr(self, "model")

    cli = CLI(TinyModule, run=False, args=["--model.width", "3"], save_config_callback=None)
    assert len(seen) == 1 and cli.model.layer.in_features == 3
