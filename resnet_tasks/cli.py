"""The `resnet-tasks` command: one registry of subcommands; Lightning's CLI (links, defaults, metrics.json) for
fit/validate/test/predict."""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
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

from resnet_tasks.callbacks import InterruptCheckpoint, LastCheckpoint, find_resume_checkpoint, requeued_slurm_job
from resnet_tasks.checkpoint_io import AtomicCheckpointIO, check_checkpoint_file
from resnet_tasks.errors import UserError, find_user_error
from resnet_tasks.labels import LabelSpace, upgrade_hyperparameters

METRIC_PREFIXES = {"validate": "val/", "test": "test/", "fit": "val/"}
# Model keys that say how to evaluate (not what was trained): with --ckpt_path, the command's values apply.
EVALUATION_KEYS = ("tta", "log_images", "confusion_iou", "confusion_score")


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


def trainer_plugins(given: Any) -> list[Any]:
    """The user's `trainer.plugins` plus ours: atomic checkpoint writes and, on SLURM, its environment without
    Lightning's auto-requeue (InterruptCheckpoint owns SIGUSR1: one checkpoint, taken at a step boundary)."""
    plugins = list(given) if isinstance(given, (list, tuple)) else ([] if given is None else [given])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


class ResNetTasksCLI(LightningCLI):
    """LightningCLI with the project's links and defaults (checkpoint on the main metric, loggers, writers)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Facts about the data reach the model here, once, at instantiation (never read back at run time).
        parser.link_arguments("data", "model.init_args.label_space", self._label_space_of, apply_on="instantiate")
        parser.link_arguments("data.evaluation_style", "model.init_args.evaluation_style", apply_on="instantiate")
        parser.link_arguments("data.batch_size", "model.init_args.batch_size", apply_on="instantiate")
        # Our data modules build DDP-aware samplers themselves (no padded duplicates in evaluation).
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        if "return_predictions" in {action.dest for action in parser._actions}:
            parser.set_defaults({"return_predictions": False})

    def _label_space_of(self, datamodule: L.LightningDataModule) -> LabelSpace | None:
        """The data's label space; with none (a folder of images to predict), the one of `--ckpt_path`'s model."""
        space = getattr(datamodule, "label_space", None)
        return space if space is not None else getattr(self, "checkpoint_label_space", None)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's config with `--ckpt_path`'s hyper-parameters; the evaluation options
        (`EVALUATION_KEYS`) stay the command's: they say how to evaluate, not what was trained."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        chosen = {key: (model.get("init_args") or {}).get(key) for key in EVALUATION_KEYS} if model else {}
        super()._parse_ckpt_path()
        model = self.config[subcommand].get("model") if subcommand else None
        if model is None or model.get("init_args") is None:
            return
        for key, value in chosen.items():
            if value is not None:
                model["init_args"][key] = value
                (model.get("dict_kwargs") or {}).pop(key, None)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse a truncated or damaged `--ckpt_path` with one clear error (before Lightning reads it)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """With `--ckpt_path`: keep its label space (for a folder of images, the data has none) and bring the
        hyper-parameters of a checkpoint from before the label space (now the model's config) up to date."""
        config = self.config.get(self.config.get("subcommand") or "", None)
        ckpt_path = config.get("ckpt_path") if config is not None else None
        model = config.get("model") if config is not None else None
        if not ckpt_path or not Path(ckpt_path).is_file() or model is None or model.get("init_args") is None:
            return
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return  # unreadable here: Lightning's own loading reports it
        info = checkpoint.get("resnet_tasks") or {}
        saved = checkpoint.get("hyper_parameters") or {}
        upgraded = upgrade_hyperparameters(info.get("task", ""), saved, info)
        for key in set(saved) - set(upgraded):  # retired keys (segmentation's ignore_index)
            (model.get("dict_kwargs") or {}).pop(key, None)
        for key, value in upgraded.items():
            if saved.get(key) != value:
                model["init_args"][key] = LabelSpace.coerce(value) if key == "label_space" else value
        self.checkpoint_label_space = LabelSpace.coerce(upgraded.get("label_space"))

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
        if self.subcommand in ("fit", None) and not any(isinstance(c, InterruptCheckpoint) for c in callbacks):
            callbacks.append(InterruptCheckpoint())
        if enable_checkpointing and not any(isinstance(c, LastCheckpoint) for c in callbacks):
            callbacks.append(LastCheckpoint())
        if self.subcommand == "predict":
            from resnet_tasks.writers import PredictionWriter

            if not any(isinstance(c, PredictionWriter) for c in callbacks):
                callbacks.append(self.model.writer_class())
        kwargs["callbacks"] = callbacks
        kwargs["plugins"] = trainer_plugins(config.get("plugins"))
        return super().instantiate_trainer(**kwargs)

    def _prepare_model(self) -> None:
        """Before a run: a resumed checkpoint supersedes pretrained weights; model and data must agree on classes."""
        ckpt_path = self._get(self.config_init, "ckpt_path", default=None) if self.subcommand else None
        if ckpt_path and hasattr(self.model, "skip_pretrained_weights"):
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
        if not self._get(self.config_init, "ckpt_path", default=None) and requeued_slurm_job():
            # A requeued SLURM job runs its script again: it continues from the newest checkpoint of its runs.
            found = find_resume_checkpoint(self.trainer.default_root_dir)
            if found is not None:
                self.config_init[f"{self.subcommand}.ckpt_path"] = str(found)
                if rank_zero_only.rank == 0:
                    print(f"requeued SLURM job: resuming from {found}", flush=True)
        self._prepare_model()

    def before_validate(self) -> None:
        self._prepare_model()

    def before_test(self) -> None:
        self._prepare_model()

    def before_predict(self) -> None:
        self._prepare_model()

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

        write_run_report(metrics_path, self.model)


def _user_message(error: BaseException) -> str:
    """The user-facing text of a UserError, also when it was re-raised from a DataLoader worker."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return text


@dataclass(frozen=True)
class Command:
    """One `resnet-tasks` subcommand: its name, a one-line summary for the command list, and what runs it."""

    name: str
    summary: str
    run: Callable[[list[str]], None]


COMMANDS: dict[str, Command] = {}


def register(name: str, summary: str) -> Callable[[Callable[[list[str]], None]], Callable[[list[str]], None]]:
    """Add a subcommand to `resnet-tasks` (its function takes the arguments after the command name)."""

    def add(run: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
        COMMANDS[name] = Command(name, summary, run)
        return run

    return add


QUICKSTART_HINT = (
    "start from a config in configs/quickstart/ (classification.yaml, detection.yaml, segmentation.yaml), e.g. "
    "resnet-tasks fit --config configs/quickstart/detection.yaml"
)


def _close_process_group() -> None:
    """Destroy a torch.distributed process group left open at interpreter exit.

    Lightning keeps the group for reuse; left to the interpreter's teardown, gloo's worker threads are destroyed
    while joinable and the process aborts ("terminate called without an active exception", exit -6) after all
    its work is done, which a scheduler would read as a failed job.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(_close_process_group)


def run_lightning(args: list[str]) -> None:
    """fit / validate / test / predict through Lightning's CLI; user errors print one line and exit 2."""
    words = [arg.split("=", 1)[0] for arg in args[1:]]
    if not {"-h", "--help", "-c", "--config", "--model", "--print_config"} & set(words):
        raise UserError(f"resnet-tasks {args[0]} needs --config FILE: {QUICKSTART_HINT}")
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
    except UserError:
        raise
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        raise UserError(_user_message(user_error)) from None


for _name, _summary in (
    ("fit", "train a model: resnet-tasks fit --config FILE [--key value ...]"),
    ("validate", "evaluate on the validation split, write metrics.json: validate --config FILE --ckpt_path CKPT"),
    ("test", "evaluate on the test split, write metrics.json: test --config FILE --ckpt_path CKPT"),
    ("predict", "write predictions (CSV / COCO JSON / PNG masks) for a split or --data.predict_path DIR"),
):
    register(_name, _summary)(lambda args, _name=_name: run_lightning([_name, *args]))


@register("backbones", "list every backbone with its size, stage channels and strides")
def print_backbones(args: list[str]) -> None:
    """`resnet-tasks backbones`: every backbone name with its size, stage channels and strides."""
    from resnet_tasks.backbones import backbone_table

    print(f"{'backbone':<18} {'params (M)':>10}  stage channels -> strides")
    for row in backbone_table():
        channels = "/".join(str(c) for c in row["channels"])
        strides = "/".join(str(s) for s in row["strides"])
        print(f"{row['name']:<18} {row['params_m']:>10.2f}  {channels} -> {strides}")


@register("plot", "draw training curves from runs' metrics.csv: plot RUN_DIR... --out FILE.png [--error]")
def plot(args: list[str]) -> None:
    from resnet_tasks.plot import main as plot_main

    plot_main(args)


@register("report", "build report.html (metrics, per-class table, pictures) for finished runs: report RUN_DIR...")
def report(args: list[str]) -> None:
    from resnet_tasks.report.run import main as report_main

    report_main(args)


@register("export", "export a trained model to ONNX: export --config FILE (--ckpt_path CKPT | --model.weights SPEC)")
def export(args: list[str]) -> None:
    from resnet_tasks.export import main as export_main

    export_main(args)


@register("optimize", "write a dataset split as LitData chunks for streaming: optimize --data.root DIR --out OUT")
def optimize(args: list[str]) -> None:
    from resnet_tasks.optimize import main as optimize_main

    optimize_main(args)


def usage() -> str:
    """The command list `resnet-tasks --help` (and `resnet-tasks` alone) prints, one line per command."""
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: resnet-tasks COMMAND [options]    (also: python -m resnet_tasks COMMAND ...)",
        "",
        "commands:",
        *[f"  {command.name:<{width}}  {command.summary}" for command in COMMANDS.values()],
        "",
        "`resnet-tasks COMMAND --help` shows a command's options; to begin, " + QUICKSTART_HINT + ".",
    ]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of `resnet-tasks` and `python -m resnet_tasks`: dispatch to the registered command."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}.\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    try:
        command.run(argv[1:])
    except UserError as error:
        print(f"error: {_user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
