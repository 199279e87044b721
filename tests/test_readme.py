"""Every command in the README is exercised: run as written at tiny scale (extra flags only shrink the run),
or, where it needs a real dataset, a GPU cluster or torchvision's downloaded weights, resolved with
`--print_config` so its config files and keys are checked. A new README command that this file does not
know how to exercise fails `test_every_readme_command_is_classified`."""

from __future__ import annotations

import glob
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from tests.conftest import COMMON_TRAINER_ARGS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"

# Arguments that mark a command as needing what a test machine lacks (real datasets, a cluster, downloads).
REAL_DATA_MARKS = ("/data/", "run.ckpt", "my_images/", "s3://")
LAUNCHERS = ("srun", "torchrun")


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
    """Unroll `for VAR in A B; do` ... `done` (the only compound command the README uses)."""
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


def readme_commands() -> list[str]:
    """The README's commands in reading order: fenced bash blocks, then inline `resnet-tasks ...` spans that are
    complete commands (not syntax summaries with FILE, {a,b} or [...] placeholders, nor a bare `resnet-tasks fit`
    naming the subcommand in prose)."""
    text = README.read_text()
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in _expand_loops(_logical_lines(block)):
            commands += [part.strip() for part in line.split("&&")]
    for span in re.findall(r"`(resnet-tasks [^`]+)`", text):
        words = span.split()
        bare_subcommand = words[1] in ("fit", "validate", "test", "predict") and "--config" not in words
        if not bare_subcommand and not re.search(r"[{\[]|\.\.\.|\b[A-Z_]{3,}\b", span):
            commands.append(span)
    commands += re.findall(r"`((?:python -m |python benchmarks/|ruff )[^`]*)`", text)
    return commands


def classify(command: str) -> str:
    """How the tests exercise one README command (see the module docstring)."""
    words = shlex.split(command)
    if command in ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .", 'pip install -e ".[test]"'):
        return "install"  # .ci/run installs exactly so on a fresh clone: test_ci_runs_the_readme_test_command
    if command == "pytest":
        return "pytest"
    if words[0] in LAUNCHERS or any(mark in command for mark in REAL_DATA_MARKS):
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


def test_every_readme_command_is_classified() -> None:
    commands = readme_commands()
    assert len(commands) >= 15, commands  # the parser still finds the README's commands
    unknown = [c for c in commands if classify(c) == "unknown"]
    assert not unknown, f"README commands no test exercises; teach tests/test_readme.py about them: {unknown}"
    kinds = {classify(c) for c in commands}
    assert kinds >= {"install", "pytest", "print_config", "run", "template", "benchmark", "module", "lint"}


def test_readme_states_what_the_print_config_commands_need() -> None:
    text = README.read_text()
    assert "need the real dataset" in text and "--print_config" in text


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


def test_passed_tests_leave_no_files_behind(request: pytest.FixtureRequest) -> None:
    """The end-to-end tests write gigabytes of checkpoints: a passed test's tmp_path goes at once (CI has one disk)."""
    assert request.config.getini("tmp_path_retention_policy") == "failed"


def _strip_launcher(words: list[str]) -> list[str]:
    if words[0] == "srun":
        words = words[1:]
    if words[0] == "torchrun":
        words = ["resnet-tasks", *words[words.index("resnet_tasks") + 1 :]]
    return words


@pytest.mark.parametrize(
    "command", [c for c in readme_commands() if classify(c) == "print_config"], ids=lambda c: c[:70]
)
def test_real_data_commands_resolve_their_configs(run_cli, command: str) -> None:
    words = _strip_launcher(shlex.split(command))
    assert words[0] == "resnet-tasks"
    if words[1] == "optimize":  # not a Lightning command: its arguments parse (converting needs the dataset)
        from resnet_tasks.optimize import parser

        parser().parse_args(words[2:])
        return
    code, out, err = run_cli(*words[1:], "--print_config")
    assert code == 0, err
    config = yaml.safe_load(out)
    for flag, value in zip(words, words[1:]):
        if flag == "--data.root":
            assert config["data"]["init_args"]["root"] == value
        if flag == "--trainer.num_nodes":
            assert config["trainer"]["num_nodes"] == int(value)


# -- the runnable commands, in README order, at tiny scale ---------------------------------------------------

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
    if subcommand not in ("fit", "validate", "test", "predict"):
        return []
    configs = [words[i + 1] for i, word in enumerate(words) if word == "--config"]
    flags = [*COMMON_TRAINER_ARGS, "--data.num_workers", "0", "--data.batch_size", "2"]
    data_class = _data_class(configs)
    if data_class in SHAPES_ROOTS:
        flags += ["--data.root", str(shapes / SHAPES_ROOTS[data_class])]
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


def test_runnable_readme_commands_work_as_written(
    run_cli: Callable[..., tuple[int, str, str]], in_scratch_checkout: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from resnet_tasks.data.shapes import generate_shapes

    shapes = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, image_size=64)
    commands = [c for c in readme_commands() if classify(c) == "run"]
    seen = set()
    for command in commands:
        words = shlex.split(command)
        # Globs (`runs/degradation/*`) expand now, after the runs they refer to exist, as the shell would.
        args = [match for word in words[1:] for match in (sorted(glob.glob(word)) if "*" in word else [word])]
        code, out, err = run_cli(*args, *_tiny_flags(words, shapes))
        assert code == 0, f"README command failed: {command}\n{err[-3000:]}"
        seen.add(words[1])
        if words[1] == "fit":
            assert "metrics written: " in out and "best checkpoint: " in out, command
        if words[1] == "predict":
            assert "predictions written: " in out, command
        if words[1] == "plot":
            written = Path(words[words.index("--out") + 1])
            assert written.is_file() and written.read_bytes()[:4] == b"\x89PNG", command
        if words[1] == "backbones":
            assert "resnet50" in out and "plain56" in out
    assert seen >= {"fit", "predict", "plot", "backbones"}
    # The README's checkpoint paths were real: the quickstart's last.ckpt fed predict, the classification run's
    # fed the detection backbone, and the four degradation runs fed the figure.
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


class _Parsed(Exception):
    """Raised instead of running a benchmark once its command line has parsed."""


@pytest.mark.parametrize("command", [c for c in readme_commands() if classify(c) == "benchmark"])
def test_benchmark_commands_parse(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib

    words = shlex.split(command)
    script = REPO / words[1]
    assert script.parent == REPO / "benchmarks" and script.is_file(), command
    # As `python benchmarks/NAME.py` runs it: the benchmarks' folder first on sys.path, the file a plain module.
    monkeypatch.syspath_prepend(str(script.parent))
    module = importlib.import_module(script.stem)
    argv = words[2:]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: list[str] | None = None, namespace: object = None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
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
