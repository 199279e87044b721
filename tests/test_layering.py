"""The package's shape: modules import downwards only (the layer table below, mirrored in docs/architecture.md),
no import cycle, no module over 400 lines, and private internals of other projects named only in compat.py.

Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "resnet_tasks"
MAX_LINES = 400

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one. A module
# belongs to the layer of the longest entry that names it or a package above it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # the package root only maps public names to modules (imported by name at first use, see __init__.py)
    ("foundation", ("resnet_tasks", "resnet_tasks.errors", "resnet_tasks.config")),
    ("compat", ("resnet_tasks.compat",)),
    ("checkpoints and labels", ("resnet_tasks.checkpoint_io", "resnet_tasks.labels")),
    ("backbones and data", ("resnet_tasks.backbones", "resnet_tasks.data")),
    ("evaluation, writers, report", ("resnet_tasks.evaluation", "resnet_tasks.writers", "resnet_tasks.report")),
    ("tasks", ("resnet_tasks.tasks",)),
    ("callbacks", ("resnet_tasks.callbacks",)),
    ("lightning cli", ("resnet_tasks.argument_parser", "resnet_tasks.lightning_cli")),
    (
        "commands",
        (
            "resnet_tasks.export",
            "resnet_tasks.export_graphs",
            "resnet_tasks.inspect",
            "resnet_tasks.optimize",
            "resnet_tasks.plot",
        ),
    ),
    ("command registry", ("resnet_tasks.cli", "resnet_tasks.__main__")),
]

# Private attributes and functions of Lightning, torch, torchmetrics, jsonargparse and LitData that the package
# relies on: reached only through resnet_tasks/compat.py (one function each, tested in tests/test_compat.py).
PRIVATE_NAMES = frozenset(
    {
        "_trainer",
        "_signal_connector",
        "fit_loop",
        "epoch_loop",
        "batch_progress",
        "epoch_progress",
        "_parse_ckpt_path",
        "_get",
        "_actions",
        "_typehint",
        "_hparams_initial",
        "_momentum_prepared",
        "_step_supports_amp_scaling",
        "_compiled_call_impl",
        "_orig_mod",
        "_reductions",
        "_is_local_file_protocol",
        "_load_state",
        "_pl_migrate_checkpoint",
        "_get_fs_provider",
        "_BatchNorm",
        "_InstanceNorm",
        "_sync_dist",
        "_kwargs",
    }
)
COMPAT = "resnet_tasks.compat"


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def _owner(name: str) -> str | None:
    """The module `name` (a module, or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str) -> set[str]:
    """The package's modules that module `name` imports (at any depth of its code)."""
    path = MODULES[name]
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_owner(alias.name) for alias in node.names if alias.name.startswith("resnet_tasks"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = base
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                source = f"{package}.{node.module}" if node.module else package
            else:
                source = node.module or ""
            if source.startswith("resnet_tasks"):
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    found.add(full if full in MODULES else _owner(source))
    found.discard(None)
    found.discard(name)
    return {module for module in found if module is not None}


def layer_of(name: str) -> int:
    """The index in LAYERS of module `name` (its longest matching entry)."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return best[1]


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer_of(name)


def test_imports_go_downwards_only() -> None:
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for name, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_400_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def private_uses(source: str) -> set[str]:
    """The PRIVATE_NAMES a module's code reaches: as an attribute, an imported name or a getattr-style string."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            found.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            found.update(alias.name for alias in node.names if alias.name in PRIVATE_NAMES)
        elif isinstance(node, ast.FunctionDef) and node.name in PRIVATE_NAMES:
            found.add(node.name)  # an override of a private method
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
                key = node.args[1]
                if isinstance(key, ast.Constant) and key.value in PRIVATE_NAMES:
                    found.add(key.value)
    return found


def test_private_internals_only_in_compat() -> None:
    uses = {name: private_uses(path.read_text()) for name, path in MODULES.items() if name != COMPAT}
    assert not {name: sorted(found) for name, found in uses.items() if found}


def test_private_uses_are_found() -> None:
    source = (
        "from x import _load_state\nm._trainer\ngetattr(o, '_orig_mod', o)\nclass C:\n def _parse_ckpt_path(s): pass"
    )
    assert private_uses(source) == {"_load_state", "_trainer", "_orig_mod", "_parse_ckpt_path"}
    assert private_uses("self._resume = 1\nkey.replace('._orig_mod.', '.')") == set()
