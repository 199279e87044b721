"""The parser of fit/validate/test/predict/export: whole keys only, and a mistyped key reported in one line.

jsonargparse reports an unknown nested key inside a page of usage and union-type errors, and argparse expands a
prefix of a key to the key (`--model.backbone.nam` ran as `--model.backbone.name`). Here prefixes are refused at
every depth, and when parsing fails on a key that does not exist, the error names the key as typed, where it came
from (the command line or a config file) and the nearest valid keys.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib
import inspect
import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionSubCommands, ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

from resnet_tasks.compat import action_typehint, parser_actions
from resnet_tasks.errors import UserError

# The arguments of the parse in progress (the parser that fails may be a subcommand's, which never saw them).
_GIVEN_ARGS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("given_args", default=None)
LEAF, GROUP, OPEN = "leaf", "group", "open"  # a value; keys below it; anything below it (dicts, callbacks, ...)
SCALARS = (str, int, float, bool, type(None), Path)
CONFIG_FLAGS = ("--config", "-c")
_PARSER_KEY = re.compile(r'^(\s*)(?:error: |- )?Parser key "([^"]+)":')
_EXPECTED = re.compile(r"Expected a (.+?)(?:\. Got value: (.*))?$")
_GIVEN_VALUE = re.compile(r"Given value: (.*)$")


class StrictArgumentParser(LightningArgumentParser):
    """Lightning's argument parser without abbreviated keys (at every depth: the class parsers jsonargparse builds
    for the model and the data are of this type too); an unknown key fails with one line (a UserError)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        token = _GIVEN_ARGS.set(list(args) if args is not None else None) if _GIVEN_ARGS.get() is None else None
        try:
            return super().parse_args(args, *rest, **kwargs)
        finally:
            if token is not None:
                _GIVEN_ARGS.reset(token)

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        given = _GIVEN_ARGS.get()
        if self.exit_on_error and given is not None:  # the parser that reports (inner parsers raise to it)
            try:
                problem = unknown_key_message(self, given, message) or bad_value_message(message, given)
            except Exception:  # a config this diagnosis cannot read: the parser's own message follows
                problem = None
            if problem is not None:
                raise UserError(problem)
        super().error(message, ex)


# ---------------------------------------------------------------------------------------------- the keys that exist
def _is_scalar(hint: Any) -> bool:
    """A type whose value has no keys below it: scalars, literals, enums, paths and sequences of them."""
    origin = typing.get_origin(hint)
    if hint in SCALARS or (inspect.isclass(hint) and issubclass(hint, (Enum, *SCALARS))):
        return True
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType, list, tuple, set, Sequence):
        return all(_is_scalar(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)
    return False


def _classes_of(hint: Any) -> list[type]:
    """The classes a type hint accepts as `class_path` (Optional and unions unwrapped)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [cls for arg in typing.get_args(hint) for cls in _classes_of(arg)]
    return [hint] if inspect.isclass(hint) and hint not in SCALARS else []


def _import_class(class_path: str) -> type | None:
    """`resnet_tasks.ClassificationTask` or its short name `ClassificationTask` as a class (None if unknown)."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module or "resnet_tasks"), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None


class KeyTree:
    """Every key a subcommand's parser accepts, each a leaf, a group (keys below it) or open (anything below it).

    A class-valued key (`model`, `data`) becomes a group of `class_path` and the chosen class's `init_args` (also
    written without `init_args.` on the command line) when its class is known, else it is open.
    """

    def __init__(self, parser: ArgumentParser, class_paths: dict[str, str]) -> None:
        self.kinds: dict[str, str] = {}
        self._add(parser, "", class_paths)

    def _add(self, parser: ArgumentParser, prefix: str, class_paths: dict[str, str]) -> None:
        actions = [a for a in parser_actions(parser) if a.dest not in ("help", "config") and ".help" not in a.dest]
        dests = {action.dest for action in actions}
        for action in actions:
            key, hint = prefix + action.dest, action_typehint(action)
            if hint is None or _is_scalar(hint):
                nested = any(other.startswith(action.dest + ".") for other in dests)
                self.kinds[key] = GROUP if nested else LEAF
                continue
            chosen = _import_class(class_paths[key]) if key in class_paths else None
            accepted = _classes_of(hint)
            if chosen is not None and any(issubclass(chosen, cls) for cls in accepted):
                self.kinds.update({key: GROUP, f"{key}.class_path": LEAF, f"{key}.init_args": GROUP})
                self.kinds[f"{key}.dict_kwargs"] = OPEN
                inner = ArgumentParser(exit_on_error=False)
                inner.add_class_arguments(chosen)
                self._add(inner, f"{key}.init_args.", {})
            else:
                self.kinds[key] = OPEN

    def canonical(self, key: str) -> str:
        """`model.backbone.name` (command-line shorthand) as `model.init_args.backbone.name` when that exists."""
        if key in self.kinds:
            return key
        head, _, rest = key.partition(".")
        longer = f"{head}.init_args.{rest}"
        return longer if rest and f"{head}.init_args" in self.kinds else key

    def accepts(self, key: str) -> bool:
        """True for a key that exists or lies below an open one."""
        key = self.canonical(key)
        if key in self.kinds:
            return True
        parts = key.split(".")
        return any(self.kinds.get(".".join(parts[:n])) == OPEN for n in range(1, len(parts)))

    def nearest(self, key: str, shorthand: bool, count: int = 3) -> list[str]:
        """The valid keys closest to `key`, its siblings first, written as the user wrote theirs."""
        names = [k for k, kind in self.kinds.items() if kind != GROUP or k.count(".") == 0]
        if shorthand:
            names = [k.replace(".init_args.", ".", 1) for k in names if ".init_args." in k] + [
                k for k in names if ".init_args" not in k and not k.endswith(".dict_kwargs")
            ]
        parent, _, last = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in names if k.rpartition(".")[0] == parent}
        close = [siblings[name] for name in difflib.get_close_matches(last, list(siblings), n=count, cutoff=0.6)]
        return close or difflib.get_close_matches(key, names, n=count, cutoff=0.8)


# ---------------------------------------------------------------------------------------------- the keys given
@dataclass(frozen=True)
class GivenKey:
    """A key as the user wrote it and where: `source` is "command line" or a config file's path."""

    key: str
    source: str

    @property
    def on_command_line(self) -> bool:
        return self.source == "command line"


def _config_files(args: Sequence[str]) -> Iterator[str]:
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag in CONFIG_FLAGS:
            if equals:
                yield value
            elif index + 1 < len(args):
                yield args[index + 1]


def _read_config(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _class_paths(args: Sequence[str]) -> dict[str, str]:
    """The class chosen for each class-valued key (`model`, `data`), the last setting winning as in parsing."""
    chosen: dict[str, str] = {}
    for path in _config_files(args):
        for key, value in _read_config(path).items():
            if isinstance(value, dict) and isinstance(value.get("class_path"), str):
                chosen[key] = value["class_path"]
            elif isinstance(value, str) and key in ("model", "data"):
                chosen[key] = value
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if not flag.startswith("--") or not (equals or index + 1 < len(args)):
            continue
        value = value if equals else args[index + 1]
        key = flag[2:].removesuffix(".class_path")
        if (flag.endswith(".class_path") or key in ("model", "data")) and not value.startswith("-"):
            chosen[key] = value
    return chosen


def _config_keys(tree: KeyTree, data: Any, prefix: str = "") -> Iterator[str]:
    """The keys a config file sets, down to the first leaf, open or unknown key on each path."""
    for name, value in data.items() if isinstance(data, dict) else ():
        key = f"{prefix}{name}"
        if tree.kinds.get(key) == GROUP and isinstance(value, dict):
            yield from _config_keys(tree, value, key + ".")
        else:
            yield key


def given_keys(tree: KeyTree, args: Sequence[str]) -> Iterator[GivenKey]:
    """Every key the arguments set, config files' keys at the place of their `--config`, in order."""
    skip_next = False
    for index, arg in enumerate(args):
        if skip_next:
            skip_next = False
            continue
        flag = arg.partition("=")[0]
        if flag in CONFIG_FLAGS:
            skip_next = "=" not in arg
            path = arg.partition("=")[2] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
            yield from (GivenKey(key, path) for key in _config_keys(tree, _read_config(path)))
        elif flag.startswith("--") and len(flag) > 2:
            key = flag[2:].removesuffix("+")
            if key != "help" and not key.endswith(".help"):
                yield GivenKey(key, "command line")


# ---------------------------------------------------------------------------------------------- the message
def _subcommand_parser(parser: ArgumentParser, args: list[str]) -> tuple[ArgumentParser, list[str]]:
    """The parser of the subcommand `args` names (and the arguments after it), or `parser` itself."""
    for action in parser_actions(parser):
        if isinstance(action, ActionSubCommands) and args and args[0] in action.choices:
            return action.choices[args[0]], args[1:]
    return parser, args


def unknown_key_message(parser: ArgumentParser, args: list[str], message: str) -> str | None:
    """One line naming the first given key that does not exist (`message`, the parser's error, must name it), or
    None when every key exists (the error is about something else)."""
    parser, args = _subcommand_parser(parser, list(args))
    tree = KeyTree(parser, _class_paths(args))
    for given in given_keys(tree, args):
        if tree.accepts(given.key) or given.key.rpartition(".")[2] not in message:
            continue
        dash = "--" if given.on_command_line else ""
        where = "on the command line" if given.on_command_line else f"in {given.source}"
        nearest = [f"{dash}{key}" for key in tree.nearest(given.key, shorthand=".init_args." not in given.key)]
        hint = f"; did you mean {' or '.join(nearest)}?" if nearest else ""
        return f"unknown key {dash}{given.key} {where}{hint} (`--help` lists every key)"
    return None


def _type_names(hints: list[str]) -> str:
    """jsonargparse's printed types as a user reads them: `one of a, b` (every literal's choices, once), `int`,
    `null`."""
    choices, names = [], []
    for hint in hints:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", hint)
        if literal:
            choices += [part.strip().strip("'\"") for part in literal.group(1).split(",")]
            continue
        if hint.startswith(("path but", "dot import path string")):  # a class-valued key (model, data)
            names.append("a class name (or class path) or a config file")
            continue
        named = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", hint)
        names.append("null" if named and named.group(1) == "NoneType" else named.group(1) if named else hint)
    listed = [f"one of {', '.join(dict.fromkeys(choices))}"] if choices else []
    return " or ".join(
        listed + [name for name in dict.fromkeys(names) if name != "null"] + ["null"] * ("null" in names)
    )


def _sets(data: Any, parts: list[str]) -> bool:
    """Whether a config's `data` sets the key `parts` (written with or without `init_args`)."""
    if not parts:
        return True
    if not isinstance(data, dict):
        return False
    return (parts[0] in data and _sets(data[parts[0]], parts[1:])) or _sets(data.get("init_args"), parts)


def _where(key: str, args: Sequence[str]) -> str:
    """Where the arguments set `key`: "on the command line", "in FILE" (the last config setting it) or ""."""
    if f"--{key}" in {arg.partition("=")[0] for arg in args}:
        return " on the command line"
    files = [path for path in _config_files(args) if _sets(_read_config(path), key.split("."))]
    return f" in {files[-1]}" if files else ""


def bad_value_message(message: str, args: Sequence[str] = ()) -> str | None:
    """One line for a value the key's type refuses (`message`, the parser's error): the key (nested keys joined),
    the value, where it was set (in `args`) and what the key takes; None when `message` is not about a value's
    type."""
    lines = message.splitlines()
    keys, start, indent = [], 0, 0
    for index, line in enumerate(lines):
        found = _PARSER_KEY.match(line)
        if found:
            keys.append(found.group(2))
            start, indent = index + 1, len(found.group(1))
    inner = []
    for line in lines[start:]:
        if len(line) - len(line.lstrip()) <= indent and line.strip():
            break
        inner.append(line.strip().removeprefix("- "))
    expected, value = [], None
    for line in inner:
        found, given = _EXPECTED.match(line), _GIVEN_VALUE.match(line)
        if found:
            expected.append(found.group(1))
            value = found.group(2) if found.group(2) is not None else value
        elif given and value is None:
            value = given.group(1)
    if not keys or not expected or value is None:
        return None
    key = ".".join(keys).replace(".init_args.", ".")
    takes = _type_names(expected)
    suffix = {"model": "Task", "data": "DataModule"}.get(key)
    if suffix is not None:
        import resnet_tasks

        takes = takes.removesuffix(" or null") + ": " + ", ".join(n for n in resnet_tasks.__all__ if n.endswith(suffix))
    return f"--{key} {value}{_where(key, args)}: not a valid value, it takes {takes} (`--help` lists every key)"
