"""The `resnet-tasks` command: the registry of subcommands and the dispatch to them.

Each command imports what it runs when it runs (`resnet-tasks --help` stays fast); fit/validate/test/predict go
through Lightning's CLI (`resnet_tasks.lightning_cli`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from resnet_tasks.config import QUICKSTART_HINT
from resnet_tasks.errors import UserError, user_message


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


def lightning_command(name: str) -> Callable[[list[str]], None]:
    """The runner of a Lightning CLI subcommand (fit, validate, test, predict)."""

    def run(args: list[str]) -> None:
        from resnet_tasks.lightning_cli import run_lightning

        run_lightning(name, args)

    return run


for _name, _summary in (
    ("fit", "train a model: resnet-tasks fit --config FILE [--key value ...]"),
    ("validate", "evaluate on the validation split, write metrics.json: validate --config FILE --ckpt_path CKPT"),
    ("test", "evaluate on the test split, write metrics.json: test --config FILE --ckpt_path CKPT"),
    ("predict", "write predictions (CSV / COCO JSON / PNG masks) for a split or --data.predict_path DIR"),
):
    register(_name, _summary)(lightning_command(_name))


@register("backbones", "list every backbone with its size, stage channels and strides")
def print_backbones(args: list[str]) -> None:
    """`resnet-tasks backbones`: every backbone name with its size, stage channels and strides."""
    from resnet_tasks.backbones import backbone_table

    print(f"{'backbone':<18} {'params (M)':>10}  stage channels -> strides")
    for row in backbone_table():
        channels = "/".join(str(c) for c in row["channels"])
        strides = "/".join(str(s) for s in row["strides"])
        print(f"{row['name']:<18} {row['params_m']:>10.2f}  {channels} -> {strides}")


def module_command(module: str) -> Callable[[list[str]], None]:
    """The runner of a command whose module has `main(args)`, imported when the command runs."""

    def run(args: list[str]) -> None:
        importlib.import_module(module).main(args)

    return run


# name, the module whose `main(args)` runs the command, its line in the command list
for _name, _module, _summary in (
    ("plot", "resnet_tasks.plot",
     "draw training curves from runs' metrics.csv: plot RUN_DIR... --out FILE.png [--error]"),
    ("report", "resnet_tasks.report.run",
     "build report.html (metrics, per-class table, pictures) for finished runs: report RUN_DIR..."),
    ("export", "resnet_tasks.export",
     "export a trained model to ONNX: export --config FILE (--ckpt_path CKPT | --model.weights SPEC)"),
    ("optimize", "resnet_tasks.optimize",
     "write a dataset split as LitData chunks for streaming: optimize --data.root DIR --out OUT"),
    ("inspect", "resnet_tasks.inspect",
     "look at a dataset before training: counts, problems, dataset.json: inspect --config FILE"),
):  # fmt: skip
    register(_name, _summary)(module_command(_module))


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
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
