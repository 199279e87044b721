"""Every command of README.md and docs/*.md is exercised: run as written at tiny scale (extra flags only shrink the
run), or, where it needs a real dataset, a GPU cluster or torchvision's downloaded weights, resolved with
`--print_config` (or its parser) so its config files and keys are checked. A new command that this file does not
know how to exercise fails `test_every_documented_command_is_classified`. The docs' links, config paths, keys and
`resnet_tasks.*` names must exist, and docs/architecture.md must name every module of the package."""

from __future__ import annotations

import dataclasses
import glob
import inspect
import itertools
import os
import re
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from tests.conftest import COMMON_TRAINER_ARGS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PACKAGE = REPO / "resnet_tasks"
ARCHITECTURE = DOCS / "architecture.md"
CI_SCRIPT = REPO / ".ci" / "run"

# Arguments that mark a command as needing what a test machine lacks (real datasets, a cluster, downloads):
# `/data/...` datasets, `my_...` folders of the user's own, a `run.ckpt` of a real run, object storage.
REAL_DATA_MARKS = re.compile(r"/data/|(?:^|[\s/=])my_|run\.ckpt|s3://")
LAUNCHERS = ("srun", "torchrun")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def documents() -> list[Path]:
    """The pages whose commands the tests run: the README first (later pages use its quickstart run), then docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def reference_documents() -> list[Path]:
    """Every page whose links, paths and names must exist: the documents plus the folders' own READMEs."""
    return [*documents(), REPO / "data" / "README.md", REPO / "notebooks" / "README.md"]


def _logical_lines(block: str) -> list[str]:
    """Shell lines of a fenced block with `\\` continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines


def _expand_loops(lines: list[str]) -> list[str]:
    """Unroll `for VAR in A B; do` ... `done` (the only compound command the docs use)."""
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = re.fullmatch(r"for (\w+) in (.+); do", lines[index])
        if not match:
            out.append(lines[index])
            index += 1
            continue
        end = lines.index("done", index)
        for value in match.group(2).split():
            out += [body.replace(f"${match.group(1)}", value) for body in lines[index + 1 : end]]
        index = end + 1
    return out


def page_commands(text: str) -> list[str]:
    """One page's commands in reading order: fenced bash blocks, then inline `resnet-tasks ...` spans that are
    complete commands (not syntax summaries with FILE, {a,b} or [...] placeholders, nor `resnet-tasks export` or a
    `resnet-tasks fit` without a config naming the command in prose), then inline `python -m`,
    `python benchmarks/`, `ruff` and `pip install -e` spans."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in _expand_loops(_logical_lines(block)):
            commands += [part.strip() for part in line.split("&&")]
    for span in re.findall(r"`(resnet-tasks [^`]+)`", text):
        words = span.split()
        named_in_prose = (len(words) == 2 and words[1] not in ("backbones", "--help")) or (
            words[1] in LIGHTNING_COMMANDS and "--config" not in words
        )
        if not named_in_prose and not re.search(r"[{\[<]|\.\.\.|\b[A-Z_]{3,}\b", span):
            commands.append(span)
    commands += re.findall(r"`((?:python -m |python benchmarks/|ruff |pip install -e \")[^`]*)`", text)
    return [" ".join(command.split()) for command in commands]


def documented_commands() -> list[str]:
    """The commands of every document, README first, each once (a command shown twice is exercised once)."""
    return list(dict.fromkeys(command for page in documents() for command in page_commands(page.read_text())))


def classify(command: str) -> str:
    """How the tests exercise one documented command (see the module docstring)."""
    words = shlex.split(command)
    if command in ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .", 'pip install -e ".[test]"'):
        return "install"  # .ci/run installs exactly so on a fresh clone: test_ci_runs_the_readme_test_command
    if re.fullmatch(r'pip install -e "\.\[\w+\]"', command):
        return "extra"  # an optional extra: test_documented_extras_exist
    if command == "pytest":
        return "pytest"
    if words[0] in LAUNCHERS or REAL_DATA_MARKS.search(command):
        return "print_config"
    if words[:2] == ["resnet-tasks", "fit"] and "..." in words:
        return "template"  # `--config ... --ckpt_path .../interrupted.ckpt`: the resume flow, tests/test_resume.py
    if words[0] == "resnet-tasks":
        return "run"
    if words[0] == "pip" and ("download" in words or "--no-index" in words):
        return "gpu_wheels"  # the GPU machine's offline install: tests/test_bench.py checks the pinned versions
    if command.startswith("python benchmarks/"):
        return "benchmark"  # long runs by design: the test checks the arguments parse (test_bench runs the suite)
    if command == "python -m resnet_tasks":
        return "module"
    if command == "ruff check .":
        return "lint"
    return "unknown"


def test_every_documented_command_is_classified() -> None:
    commands = documented_commands()
    assert len(commands) >= 15, commands  # the parser still finds the docs' commands
    unknown = [c for c in commands if classify(c) == "unknown"]
    assert not unknown, f"documented commands no test exercises; teach tests/test_readme.py about them: {unknown}"
    kinds = {classify(c) for c in commands}
    assert kinds >= {"install", "pytest", "print_config", "run", "template", "benchmark", "module", "lint"}
    assert {classify(c) for c in page_commands(README.read_text())} >= {"install", "pytest", "run"}


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run evaluates the README's command 2, and command 1 installs the same way (minus the test extra)."""
    script = CI_SCRIPT.read_text()
    text = README.read_text()
    quickstart, tests = (line for line in text.splitlines() if line.startswith("python3 -m venv .venv"))
    assert tests.endswith('pip install -e ".[test]" && pytest')
    assert quickstart.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && ")
    ci_command = re.search(r"^TEST_COMMAND='(.*)'$", script, flags=re.M)
    assert ci_command is not None and ci_command.group(1) == tests
    assert 'eval "$TEST_COMMAND"' in script


def test_readme_stays_the_front_door() -> None:
    """The README is short and links to every page of docs/."""
    text = README.read_text()
    assert len(text.splitlines()) < 200
    linked = {Path(target).name for target in re.findall(r"\]\(docs/([\w.-]+\.md)[)#]", text)}
    assert linked >= {page.name for page in DOCS.glob("*.md")}


def test_documented_extras_exist() -> None:
    import tomllib

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    documented = {re.search(r"\[(\w+)\]", c).group(1) for c in documented_commands() if classify(c) == "extra"}
    assert documented and documented <= extras


def test_passed_tests_leave_no_files_behind(request: pytest.FixtureRequest) -> None:
    """The end-to-end tests write gigabytes of checkpoints: a passed test's tmp_path goes at once (CI has one disk)."""
    assert request.config.getini("tmp_path_retention_policy") == "failed"


# -- what the docs point at exists ------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(heading) for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", reference_documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_and_headings_that_exist(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to what does not exist: {broken}"


def _expand_braces(text: str) -> list[str]:
    """`a{b,c}d{e,f}` -> abde, abdf, acde, acdf (the shell's brace expansion, without nesting)."""
    parts = re.split(r"\{([^{}]*)\}", text)
    choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
    return ["".join(pieces) for pieces in itertools.product(*choices)]


def test_documented_config_files_exist() -> None:
    missing = []
    for page in reference_documents():
        for mention in re.findall(r"configs/[\w/{},.-]+\.yaml", page.read_text()):
            missing += [f"{page.name}: {path}" for path in _expand_braces(mention) if not (REPO / path).is_file()]
    assert not missing


def _init_parameters(classes: list[type]) -> dict[str, list[object]]:
    """Constructor parameter name -> its annotations, over the classes and their bases."""
    parameters: dict[str, list[object]] = {}
    for cls in classes:
        for base in cls.__mro__:
            if "__init__" not in vars(base) or base.__module__.split(".")[0] not in ("resnet_tasks", "lightning"):
                continue
            try:
                hints = typing.get_type_hints(base.__init__)
            except (NameError, TypeError):  # an annotation that does not resolve here: the names still count
                hints = {}
            for name, parameter in inspect.signature(base.__init__).parameters.items():
                if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                    parameters.setdefault(name, []).append(hints.get(name))
    return parameters


def _dataclass_fields(annotations: list[object]) -> set[str] | None:
    """The fields of the config group a parameter takes (None when it is no config group)."""
    for annotation in annotations:
        for candidate in (annotation, *typing.get_args(annotation)):
            if dataclasses.is_dataclass(candidate):
                return {field.name for field in dataclasses.fields(candidate)}
    return None


def documented_keys() -> set[str]:
    """Every `--model.*`, `--data.*` and `--trainer.*` key the docs name (braces expanded), except on the lines
    that show a mistyped key on purpose."""
    keys = set()
    for page in reference_documents():
        for line in page.read_text().splitlines():
            if re.search(r"mistyp|typo", line, flags=re.I):
                continue
            for mention in re.findall(r"--((?:model|data|trainer)\.[\w.{},]+\w\}?)", line):
                keys.update(_expand_braces(mention))
    return keys


def test_documented_keys_exist() -> None:
    import lightning as L

    import resnet_tasks
    from resnet_tasks.tasks.classification import ClassificationTask
    from resnet_tasks.tasks.detection import DetectionTask
    from resnet_tasks.tasks.segmentation import SegmentationTask

    data_classes = []
    for name in resnet_tasks._EXPORTS:
        value = getattr(resnet_tasks, name)
        if isinstance(value, type) and issubclass(value, L.LightningDataModule):
            data_classes.append(value)
    groups = {
        "model": _init_parameters([ClassificationTask, DetectionTask, SegmentationTask]),
        "data": _init_parameters(data_classes),
        "trainer": _init_parameters([L.Trainer]),
    }
    unknown = []
    for key in sorted(documented_keys()):
        group, name, *rest = key.split(".")
        parameters = groups[group]
        if name == "class_path" and not rest:
            continue
        if name not in parameters:
            unknown.append(key)
            continue
        fields = _dataclass_fields(parameters[name])
        if rest and fields is not None and rest[0] not in fields:
            unknown.append(key)
    assert not unknown, f"keys the docs name that no task, data module or Trainer has: {unknown}"


FILE_SUFFIXES = ("json", "yaml", "csv", "html", "png", "jpg", "txt", "md")


def _resolve(name: str) -> object | None:
    """The module or object a dotted name refers to, or None."""
    import importlib

    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute, None)
        return value
    return None


def test_documented_python_names_exist() -> None:
    """`resnet_tasks.x.y` in the docs is a module of the package or a name in one (the docs follow renames)."""
    missing = []
    for page in reference_documents():
        for name in sorted(set(re.findall(r"\bresnet_tasks(?:\.\w+)+", page.read_text()))):
            if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:  # a file name (`resnet_tasks.json`), not a Python name
                continue
            if _resolve(name) is None:
                missing.append(f"{page.name}: {name}")
    assert not missing


def test_architecture_map_names_every_module() -> None:
    """docs/architecture.md names each module of resnet_tasks/ by its path in the package (`data/io.py`), and
    names no module that does not exist: the map cannot go stale."""
    text = ARCHITECTURE.read_text()
    section = re.search(r"^## The package, module by module\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section is not None, "docs/architecture.md lacks its '## The package, module by module' section"
    modules = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}
    named = set(re.findall(r"`([\w/]+\.py)`", section.group(1)))
    assert not sorted(modules - named), f"docs/architecture.md does not name {sorted(modules - named)}"
    assert not sorted(named - modules), f"docs/architecture.md names modules that do not exist: {named - modules}"


# -- commands that need real data, a cluster or downloads: their configs and arguments resolve ----------------


def _strip_launcher(words: list[str]) -> list[str]:
    if words[0] == "srun":
        words = words[1:]
    if words[0] == "torchrun":
        words = ["resnet-tasks", *words[words.index("resnet_tasks") + 1 :]]
    return words


class _Parsed(Exception):
    """Raised instead of running a command (or a benchmark) once its command line has parsed."""


def _stop_after_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every argparse / jsonargparse parser raises _Parsed(result) once it has parsed its arguments."""
    import argparse

    import jsonargparse

    for parser_class in (argparse.ArgumentParser, jsonargparse.ArgumentParser):
        original = parser_class.parse_args

        def parse_then_stop(self, *args: object, _original: Callable = original, **kwargs: object) -> None:
            raise _Parsed(_original(self, *args, **kwargs))

        monkeypatch.setattr(parser_class, "parse_args", parse_then_stop)


@pytest.mark.parametrize(
    "command", [c for c in documented_commands() if classify(c) == "print_config"], ids=lambda c: c[:70]
)
def test_real_data_commands_resolve_their_configs(run_cli, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    words = _strip_launcher(shlex.split(command))
    assert words[0] == "resnet-tasks"
    if words[1] not in LIGHTNING_COMMANDS:  # optimize, inspect, ...: their arguments parse (the work needs data)
        from resnet_tasks.cli import main

        _stop_after_parsing(monkeypatch)
        with pytest.raises(_Parsed):
            main(words[1:])
        return
    code, out, err = run_cli(*words[1:], "--print_config")
    assert code == 0, err
    config = yaml.safe_load(out)
    for flag, value in zip(words, words[1:]):
        if flag == "--data.root":
            assert config["data"]["init_args"]["root"] == value
        if flag == "--trainer.num_nodes":
            assert config["trainer"]["num_nodes"] == int(value)


# -- the runnable commands at tiny scale ------------------------------------------------------------------------

SHAPES_ROOTS = {
    "ShapesClassificationDataModule": "imagefolder",
    "ShapesDetectionDataModule": "coco",
    "ShapesSegmentationDataModule": "voc",
}


def _data_class(config_paths: list[str]) -> str:
    name = ""
    for path in config_paths:
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
        name = str(data.get("class_path", name)).rsplit(".", 1)[-1]
    return name


def _tiny_flags(words: list[str], shapes: Path) -> list[str]:
    """Flags appended to a runnable command: the bundled-shapes root at test size and a few steps."""
    subcommand = words[1]
    configs = [words[i + 1] for i, word in enumerate(words) if word == "--config"]
    data_class = _data_class(configs)
    root = ["--data.root", str(shapes / SHAPES_ROOTS[data_class])] if data_class in SHAPES_ROOTS else []
    data = ["--data.num_workers", "0", "--data.batch_size", "2", *root]
    if subcommand == "inspect":
        return data
    if subcommand not in LIGHTNING_COMMANDS:
        return []
    flags = [*COMMON_TRAINER_ARGS, *data]
    if subcommand == "fit":
        flags += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
                  "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1"]  # fmt: skip
    if subcommand == "predict":
        flags += ["--trainer.limit_predict_batches", "2"]
    return flags


@pytest.fixture
def in_scratch_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that looks like the checkout (configs/) with nothing else in it."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runnable_documented_commands_work_as_written(
    run_cli: Callable[..., tuple[int, str, str]], in_scratch_checkout: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every `run` command, `fit` first (in reading order: the README's quickstart run is version_0, which later
    pages' commands read), then the others in reading order."""
    from resnet_tasks.data.shapes import generate_shapes

    shapes = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=64)
    commands = [c for c in documented_commands() if classify(c) == "run"]
    commands.sort(key=lambda c: shlex.split(c)[1] != "fit")
    seen = set()
    for command in commands:
        words = shlex.split(command)
        # Globs (`runs/degradation/*`) expand now, after the runs they refer to exist, as the shell would.
        args = [match for word in words[1:] for match in (sorted(glob.glob(word)) if "*" in word else [word])]
        code, out, err = run_cli(*args, *_tiny_flags(words, shapes))
        assert code == 0, f"documented command failed: {command}\n{err[-3000:]}"
        seen.add(words[1])
        if words[1] == "fit":
            assert "metrics written: " in out and "best checkpoint: " in out, command
        if words[1] == "predict":
            assert "predictions written: " in out, command
        if words[1] == "inspect":
            assert "dataset written: " in out, command
        if words[1] == "plot":
            written = Path(words[words.index("--out") + 1])
            assert written.is_file() and written.read_bytes()[:4] == b"\x89PNG", command
        if words[1] == "backbones":
            assert "resnet50" in out and "plain56" in out
    assert seen >= {"fit", "predict", "plot", "backbones", "export", "report"}
    # The docs' checkpoint paths were real: the quickstart's last.ckpt fed predict and export, the classification
    # run's fed the detection backbone, and the four degradation runs fed the figure.
    assert (in_scratch_checkout / "runs/degradation/figure6.png").is_file()
    assert len(list((in_scratch_checkout / "runs/degradation").glob("*/lightning_logs"))) == 4


def test_readme_python_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ```python block, with torchvision's ResNet-50 file in a scratch hub cache (as a user would have it)."""
    text = README.read_text()
    [snippet] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.resnet50()
    torch.save(reference.state_dict(), cached)
    namespace: dict[str, object] = {"images": torch.rand(1, 3, 64, 64)}
    exec(compile(snippet, "README.md", "exec"), namespace)
    backbone = namespace["backbone"]
    features = namespace["features"]
    assert list(features) == ["layer1", "layer2", "layer3", "layer4"]
    assert backbone.channels["layer4"] == 2048 and backbone.strides["layer4"] == 8  # output_stride=8
    assert torch.equal(backbone.state_dict()["conv1.weight"], reference.state_dict()["conv1.weight"])


@pytest.mark.parametrize("command", [c for c in documented_commands() if classify(c) == "benchmark"])
def test_benchmark_commands_parse(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    words = shlex.split(command)
    script = REPO / words[1]
    assert script.parent == REPO / "benchmarks" and script.is_file(), command
    # As `python benchmarks/NAME.py` runs it: the benchmarks' folder first on sys.path, the file a plain module.
    monkeypatch.syspath_prepend(str(script.parent))
    module = importlib.import_module(script.stem)
    argv = words[2:]
    _stop_after_parsing(monkeypatch)
    with pytest.raises(_Parsed) as parsed:
        module.main(argv)
    if "--memory-images" in argv:
        assert parsed.value.args[0].memory_images == int(argv[argv.index("--memory-images") + 1])


def test_python_dash_m_resnet_tasks_is_the_cli(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import runpy

    monkeypatch.setattr("sys.argv", ["resnet_tasks", "backbones"])
    try:
        runpy.run_module("resnet_tasks", run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    assert "resnet50" in capsys.readouterr().out


def test_lint_command_passes() -> None:
    """`ruff check .` from the README's Development section: the code base stays ruff clean."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
