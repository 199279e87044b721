"""fit / validate / test / predict through Lightning's CLI: the project's links and defaults, `--ckpt_path` read
once, the evaluation preprocessing stored in every checkpoint, metrics.json and the run's report after an
evaluation; and the config reading of the commands that build their own objects (export, inspect)."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from resnet_tasks.argument_parser import StrictArgumentParser
from resnet_tasks.callbacks import (
    InterruptCheckpoint,
    LastCheckpoint,
    RNGState,
    SkipReport,
    StoreEvalPreprocessing,
    find_resume_checkpoint,
    requeued_slurm_job,
)
from resnet_tasks.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from resnet_tasks.compat import CheckpointHyperparametersHook, parser_has_argument
from resnet_tasks.config import QUICKSTART_HINT, run_dir
from resnet_tasks.errors import UserError, find_user_error, user_message
from resnet_tasks.labels import LabelSpace, upgrade_hyperparameters

METRIC_PREFIXES = {"validate": "val/", "test": "test/", "fit": "val/"}
# Model keys that say how to evaluate (not what was trained): with --ckpt_path, the command's values apply.
EVALUATION_KEYS = ("tta", "log_images", "confusion_iou", "confusion_score")
# Any of these on a command line brings (or asks about) a config.
CONFIG_WORDS = frozenset({"-h", "--help", "-c", "--config", "--model", "--print_config"})


def require_config(command: str, args: Sequence[str], hint: str) -> None:
    """Stop with one line when `resnet-tasks COMMAND` is given no config (`hint` says where to find one)."""
    if not CONFIG_WORDS & {arg.split("=", 1)[0] for arg in args}:
        raise UserError(f"resnet-tasks {command} needs --config FILE{hint}")


def import_components() -> None:
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
    """Write `metrics.json` into the run directory (rank 0 only) and print its path."""
    metrics = collect_metrics(trainer, prefix)
    directory = run_dir(trainer)  # every rank asks (a collective under DDP)
    if not trainer.is_global_zero or not metrics:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    shown = {k: round(v, 4) for k, v in metrics.items() if "/" not in k}
    print(f"metrics: {json.dumps(shown)}")
    print(f"metrics written: {path}")
    return path


def trainer_plugins(given: Any, preloaded: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """The user's `trainer.plugins` plus ours: atomic checkpoint writes (handing the Trainer the `preloaded`
    checkpoints) and, on SLURM, its environment without Lightning's auto-requeue (InterruptCheckpoint owns SIGUSR1:
    one checkpoint, taken at a step boundary)."""
    plugins = list(given) if isinstance(given, (list, tuple)) else ([] if given is None else [given])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO(preloaded))
    if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


class ResNetTasksCLI(CheckpointHyperparametersHook, LightningCLI):
    """LightningCLI with the project's links and defaults (checkpoint on the main metric, loggers, writers), whole
    keys only (a mistyped key is one line), and `--ckpt_path` read once for the config, the label space and the
    Trainer."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = StrictArgumentParser, **kwargs: Any):
        self.checkpoint: dict[str, Any] | None = None
        self.checkpoint_label_space: LabelSpace | None = None
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Facts about the data reach the model here, once, at instantiation (never read back at run time).
        parser.link_arguments("data", "model.init_args.label_space", self._label_space_of, apply_on="instantiate")
        parser.link_arguments("data.evaluation_style", "model.init_args.evaluation_style", apply_on="instantiate")
        parser.link_arguments("data.batch_size", "model.init_args.batch_size", apply_on="instantiate")
        # Our data modules build DDP-aware samplers themselves (no padded duplicates in evaluation).
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        if parser_has_argument(parser, "return_predictions"):
            parser.set_defaults({"return_predictions": False})

    def _label_space_of(self, datamodule: L.LightningDataModule) -> LabelSpace | None:
        """The data's label space; with none (a folder of images to predict), the one of `--ckpt_path`'s model."""
        space = getattr(datamodule, "label_space", None)
        return space if space is not None else self.checkpoint_label_space

    def instantiate_classes(self) -> None:
        # `fit` (or no subcommand: the caller runs the Trainer) builds the model for the data's classes when
        # whole-model weights were made for others (new class layers); validate / test / predict keep the weights'.
        from resnet_tasks.tasks.weights import built_for_fit

        with built_for_fit(self.subcommand in ("fit", None)):
            super().instantiate_classes()

    def config_value(self, key: str, default: Any = None) -> Any:
        """A value of the instantiated config (the subcommand's part of it)."""
        config = self.config_init.get(str(self.subcommand), self.config_init)
        return config.get(key, default)

    def apply_checkpoint_hyperparameters(self) -> None:
        """With `--ckpt_path`: read the file (once), take its model hyper-parameters as the model's config (brought
        up to date when written before the label space existed) except the evaluation options (`EVALUATION_KEYS`,
        the command's: they say how to evaluate, not what was trained), and keep its label space (for a folder of
        images, the data has none)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        self.checkpoint = read_checkpoint(ckpt_path)  # damage: one UserError; content torch refuses: None
        if self.checkpoint is None:
            return
        model = self.config[subcommand].get("model")
        chosen = {key: (model.get("init_args") or {}).get(key) for key in EVALUATION_KEYS} if model else {}
        saved = dict(self.checkpoint.get("hyper_parameters") or {})
        saved.pop("_instantiator", None)
        if saved:
            given = dict(saved)
            if "_class_path" in given:
                given = {"class_path": given.pop("_class_path"), "dict_kwargs": given}
            try:
                self.config = self.parser.parse_object({subcommand: {"model": given}}, self.config)
            except SystemExit:
                sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                raise
        model = self.config[subcommand].get("model")
        if model is None or model.get("init_args") is None:
            return
        for key, value in chosen.items():
            if value is not None:
                model["init_args"][key] = value
                (model.get("dict_kwargs") or {}).pop(key, None)
        info = self.checkpoint.get("resnet_tasks") or {}
        upgraded = upgrade_hyperparameters(info.get("task", ""), saved, info)
        for key in set(saved) - set(upgraded):  # retired keys (segmentation's ignore_index)
            (model.get("dict_kwargs") or {}).pop(key, None)
        for key, value in upgraded.items():
            if saved.get(key) != value:
                model["init_args"][key] = LabelSpace.coerce(value) if key == "label_space" else value
        self.checkpoint_label_space = LabelSpace.coerce(upgraded.get("label_space"))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_value("trainer", default={})
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
            tensorboard = TensorBoardLogger(root, name="tensorboard", version=csv_logger.version)
            kwargs["logger"] = [csv_logger, tensorboard]
            has_logger = True
        else:
            has_logger = logger_setting is not False
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            if self.subcommand == "fit":
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        if config.get("enable_progress_bar", True) is not False:
            if not any(isinstance(c, (RichProgressBar, TQDMProgressBar)) for c in callbacks):
                callbacks.append(RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=50))
        # RNG streams and the evaluation preprocessing in checkpoints, the per-epoch report of skipped images
        ours = (RNGState, StoreEvalPreprocessing, SkipReport)
        callbacks += [cls() for cls in ours if not any(isinstance(c, cls) for c in callbacks)]
        if self.subcommand in ("fit", None) and not any(isinstance(c, InterruptCheckpoint) for c in callbacks):
            callbacks.append(InterruptCheckpoint())
        if enable_checkpointing and not any(isinstance(c, LastCheckpoint) for c in callbacks):
            callbacks.append(LastCheckpoint())
        if self.subcommand == "predict":
            from resnet_tasks.writers import PredictionWriter

            if not any(isinstance(c, PredictionWriter) for c in callbacks):
                callbacks.append(self.model.writer_class())
        kwargs["callbacks"] = callbacks
        ckpt_path = self.config_value("ckpt_path") if self.subcommand else None
        preloaded = {str(ckpt_path): self.checkpoint} if ckpt_path and self.checkpoint is not None else None
        self.checkpoint = None  # the Trainer's checkpoint IO holds it until it restores from it
        kwargs["plugins"] = trainer_plugins(config.get("plugins"), preloaded)
        return super().instantiate_trainer(**kwargs)

    def _prepare_model(self) -> None:
        """Before a run: a resumed checkpoint supersedes pretrained weights; model and data must agree on classes."""
        if self.config_value("ckpt_path") and hasattr(self.model, "skip_pretrained_weights"):
            self.model.skip_pretrained_weights = True
        model_space = getattr(self.model, "label_space", None)
        data_space = getattr(self.datamodule, "label_space", None)
        if self.subcommand == "predict" or model_space is None or data_space is None:
            return
        if model_space.num_classes != data_space.num_classes and not self.model.evaluates_across_label_spaces:
            raise UserError(
                f"The model predicts {model_space.num_classes} classes but the data has {data_space.num_classes}; "
                "use weights made for this label space, or --model.backbone.weights to reuse only a backbone."
            )

    def before_fit(self) -> None:
        if not self.config_value("ckpt_path") and requeued_slurm_job():
            # A requeued SLURM job runs its script again: it continues from the newest checkpoint of its runs.
            found = find_resume_checkpoint(self.trainer.default_root_dir)
            if found is not None:
                self.config_init[f"{self.subcommand}.ckpt_path"] = str(found)
                if rank_zero_only.rank == 0:
                    print(f"requeued SLURM job: resuming from {found}", flush=True)
        self._prepare_model()

    before_validate = before_test = before_predict = _prepare_model

    def after_fit(self) -> None:
        self.write_report(write_metrics_json(self.trainer, METRIC_PREFIXES["fit"]))
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if self.trainer.is_global_zero and best:
            print(f"best checkpoint: {best}")

    def after_validate(self) -> None:
        self.write_report(write_metrics_json(self.trainer, METRIC_PREFIXES["validate"]))

    def after_test(self) -> None:
        self.write_report(write_metrics_json(self.trainer, METRIC_PREFIXES["test"]))

    def write_report(self, metrics_path: Path | None) -> None:
        """per_class.csv, pictures and report.html beside metrics.json (rank 0: the only one with a path)."""
        from resnet_tasks.report.run import write_run_report
        from resnet_tasks.tasks.summary import latest_summary

        write_run_report(metrics_path, latest_summary(self.trainer))


def import_class(class_path: str) -> Any:
    """A config's `class_path` (`resnet_tasks.ClassificationTask`, or the short `ClassificationTask`) as a class."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module or "resnet_tasks"), name)


def config_dict(section: Any) -> dict[str, Any]:
    """A parsed config's section (e.g. `init_args`: a jsonargparse Namespace, a mapping or None) as a dict."""
    if section is None:
        return {}
    return section.as_dict() if hasattr(section, "as_dict") else dict(section)


def run_directory(config: Any) -> Path:
    """`<trainer.default_root_dir>/lightning_logs/version_N` of a parsed config, N the next free version (a new
    run's directory, as `fit` would make it)."""
    root = (config.get("trainer") or {}).get("default_root_dir") or "."
    return Path(CSVLogger(root, name="lightning_logs").log_dir)


def parse_config(
    args: list[str],
    *,
    prog: str,
    description: str,
    add_arguments: Callable[[LightningArgumentParser], None] | None = None,
) -> Any:
    """The config of a command that builds its own objects from it (export, inspect): config files and overrides
    read exactly as `fit` reads them (`add_arguments` adds the command's own keys), nothing instantiated."""

    class ConfigOnlyCLI(ResNetTasksCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            super().add_arguments_to_parser(parser)
            if add_arguments is not None:
                add_arguments(parser)

        def instantiate_classes(self) -> None:
            pass

    import_components()
    with quiet_lightning():
        cli = ConfigOnlyCLI(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": prog, "description": description},
        )
    return cli.config


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without Lightning's notes that are not about the run: its warning that `args` is given while sys.argv has
    arguments too (both are this command's), its tips advertising other packages and a deprecation inside it."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tips.addFilter(_not_a_tip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            yield
    finally:
        tips.removeFilter(_not_a_tip)


def _close_process_group() -> None:
    """Destroy a torch.distributed process group left open at interpreter exit.

    Lightning keeps the group for reuse; left to the interpreter's teardown, gloo's worker threads are destroyed
    while joinable and the process aborts ("terminate called without an active exception", exit -6) after all
    its work is done, which a scheduler would read as a failed job.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(_close_process_group)


def run_lightning(command: str, args: list[str]) -> None:
    """`resnet-tasks COMMAND ARGS` for fit / validate / test / predict; user errors become one UserError."""
    require_config(command, args, f": {QUICKSTART_HINT}")
    import_components()
    torch.set_float32_matmul_precision("high")
    UserError.last = None
    try:
        with quiet_lightning():
            ResNetTasksCLI(
                model_class=L.LightningModule,
                datamodule_class=L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                args=[command, *args],
                auto_configure_optimizers=False,
            )
    except torch.OutOfMemoryError:
        print(
            "error: out of GPU memory during a step. Lower --data.batch_size, or use --trainer.precision "
            "bf16-mixed; checkpoints already written are kept.",
            file=sys.stderr,
        )
        raise SystemExit(3) from None
    except UserError:
        raise
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        raise UserError(user_message(user_error)) from None
