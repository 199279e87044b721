"""The `resnet-tasks` command: Lightning CLI with our defaults, argument links and metrics.json."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from resnet_tasks.callbacks import InterruptCheckpoint, LastCheckpoint
from resnet_tasks.errors import UserError, find_user_error

METRIC_PREFIXES = {"validate": "val/", "test": "test/", "fit": "val/"}


def _import_components() -> None:
    """Import every task and data module so `class_path` short names (e.g. `DetectionTask`) resolve."""
    import resnet_tasks

    for name in resnet_tasks.__all__:
        getattr(resnet_tasks, name)


def collect_metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    """Logged metrics under `prefix` ("val/" or "test/"), prefix stripped: `val/iou/cat` -> `iou/cat`."""
    metrics: dict[str, float] = {}
    for name, value in trainer.callback_metrics.items():
        if name.startswith(prefix):
            number = float(value.item() if isinstance(value, torch.Tensor) else value)
            metrics[name[len(prefix) :]] = number if math.isfinite(number) else float("nan")
    return dict(sorted(metrics.items()))


def write_metrics_json(trainer: L.Trainer, prefix: str) -> Path | None:
    """Write `metrics.json` into the run's log directory (rank 0 only) and print its path."""
    metrics = collect_metrics(trainer, prefix)
    # `trainer.log_dir` is a collective (a broadcast) under DDP: every rank must ask for it.
    out_dir = Path(trainer.log_dir or trainer.default_root_dir)
    if not trainer.is_global_zero or not metrics:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    shown = {k: round(v, 4) for k, v in metrics.items() if "/" not in k}
    print(f"metrics: {json.dumps(shown)}")
    print(f"metrics written: {path}")
    return path


class ResNetTasksCLI(LightningCLI):
    """LightningCLI with the project's links and defaults (checkpoint on the main metric, loggers, writers)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # Our data modules build DDP-aware samplers themselves (no padded duplicates in evaluation).
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        if "return_predictions" in {action.dest for action in parser._actions}:
            parser.set_defaults({"return_predictions": False})

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        main_metric = getattr(self.model, "main_metric", "")
        enable_checkpointing = config.get("enable_checkpointing", True) is not False
        if enable_checkpointing and main_metric and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            metric_name = main_metric.replace("/", "_")
            callbacks.append(
                ModelCheckpoint(
                    monitor=main_metric,
                    mode="max",
                    save_last=False,  # LastCheckpoint keeps last.ckpt at the latest state instead
                    filename=f"epoch{{epoch}}-step{{step}}-{metric_name}{{{main_metric}:.4f}}",
                    auto_insert_metric_name=False,
                )
            )
        logger_setting = config.get("logger")
        if logger_setting is None or logger_setting is True:
            root = config.get("default_root_dir") or os.getcwd()
            csv_logger = CSVLogger(root, name="lightning_logs")
            loggers: list[Any] = [csv_logger]
            try:
                loggers.append(TensorBoardLogger(root, name="tensorboard", version=csv_logger.version))
            except ModuleNotFoundError:  # tensorboard is optional at run time
                pass
            kwargs["logger"] = loggers
            has_logger = True
        else:
            has_logger = logger_setting is not False
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            if self.subcommand == "fit":
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        if config.get("enable_progress_bar", True) is not False:
            if not any(isinstance(c, (RichProgressBar, TQDMProgressBar)) for c in callbacks):
                callbacks.append(RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=50))
        if self.subcommand in ("fit", None) and not any(isinstance(c, InterruptCheckpoint) for c in callbacks):
            callbacks.append(InterruptCheckpoint())
        if enable_checkpointing and not any(isinstance(c, LastCheckpoint) for c in callbacks):
            callbacks.append(LastCheckpoint())
        if self.subcommand == "predict":
            from resnet_tasks.writers import PredictionWriter

            if not any(isinstance(c, PredictionWriter) for c in callbacks):
                callbacks.append(PredictionWriter())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _skip_pretrained_when_resuming(self) -> None:
        ckpt_path = self._get(self.config_init, "ckpt_path", default=None) if self.subcommand else None
        if ckpt_path and hasattr(self.model, "skip_pretrained_weights"):
            self.model.skip_pretrained_weights = True

    def before_fit(self) -> None:
        self._skip_pretrained_when_resuming()

    def before_validate(self) -> None:
        self._skip_pretrained_when_resuming()

    def before_test(self) -> None:
        self._skip_pretrained_when_resuming()

    def before_predict(self) -> None:
        self._skip_pretrained_when_resuming()

    def after_fit(self) -> None:
        write_metrics_json(self.trainer, METRIC_PREFIXES["fit"])
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if self.trainer.is_global_zero and best:
            print(f"best checkpoint: {best}")

    def after_validate(self) -> None:
        write_metrics_json(self.trainer, METRIC_PREFIXES["validate"])

    def after_test(self) -> None:
        write_metrics_json(self.trainer, METRIC_PREFIXES["test"])


def _user_message(error: BaseException) -> str:
    """The user-facing text of a UserError, also when it was re-raised from a DataLoader worker."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text


def print_backbones() -> None:
    """`resnet-tasks backbones`: every backbone name with its size, stage channels and strides."""
    from resnet_tasks.backbones import backbone_table

    print(f"{'backbone':<18} {'params (M)':>10}  stage channels -> strides")
    for row in backbone_table():
        channels = "/".join(str(c) for c in row["channels"])
        strides = "/".join(str(s) for s in row["strides"])
        print(f"{row['name']:<18} {row['params_m']:>10.2f}  {channels} -> {strides}")


def main(args: list[str] | None = None) -> None:
    """Entry point of `resnet-tasks` and `python -m resnet_tasks`.

    Besides Lightning's fit/validate/test/predict: `backbones` lists the backbones and `plot` draws
    training curves from runs' logs.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["backbones"]:
        print_backbones()
        return
    if argv[:1] == ["plot"]:
        from resnet_tasks.plot import main as plot_main

        try:
            plot_main(argv[1:])
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    _import_components()
    torch.set_float32_matmul_precision("high")
    UserError.last = None
    try:
        ResNetTasksCLI(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
        )
    except torch.OutOfMemoryError:
        print(
            "error: out of GPU memory during a step. Lower --data.batch_size, or use --trainer.precision "
            "bf16-mixed; checkpoints already written are kept.",
            file=sys.stderr,
        )
        raise SystemExit(3) from None
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"error: {_user_message(user_error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
