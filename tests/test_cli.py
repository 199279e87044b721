"""The CLI spine: every config parses, user errors print one message, optimisation comes from YAML."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.optim import OptimizerConfig, ScheduleFactor, SchedulerConfig
from tests.conftest import COMMON_TRAINER_ARGS

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml") if "trainer" not in p.parts)
TRAINER_PRESETS = sorted(str(p) for p in Path("configs/trainer").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_prints(run_cli, config: str) -> None:
    # A data-only config (the streaming one) is layered over the recipe its header names.
    base = (
        []
        if "model" in yaml.safe_load(Path(config).read_text())
        else ["--config", "configs/classification/imagenet_resnet50.yaml"]
    )
    code, out, err = run_cli("fit", *base, "--config", config, "--print_config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"].startswith("resnet_tasks.")
    assert printed["data"]["class_path"].startswith("resnet_tasks.")
    assert printed["trainer"]["use_distributed_sampler"] is False


@pytest.mark.parametrize("preset", TRAINER_PRESETS)
def test_trainer_presets_compose_with_task_configs(run_cli, preset: str) -> None:
    code, out, err = run_cli(
        "fit", "--config", "configs/quickstart/classification.yaml", "--config", preset, "--print_config"
    )
    assert code == 0, err
    trainer = yaml.safe_load(out)["trainer"]
    expected = yaml.safe_load(Path(preset).read_text())["trainer"]
    for key, value in expected.items():
        assert trainer[key] == value


def test_backbone_swap_is_one_value(run_cli) -> None:
    recipes = [c for c in CONFIGS if "quickstart" not in c and "model" in yaml.safe_load(Path(c).read_text())]
    for config in recipes:
        code, out, err = run_cli("fit", "--config", config, "--model.backbone.name", "resnext50_32x4d",
                                 "--print_config")  # fmt: skip
        assert code == 0, err
        assert yaml.safe_load(out)["model"]["init_args"]["backbone"]["name"] == "resnext50_32x4d"


def test_a_run_prints_no_notes_that_are_not_about_it(
    run_cli, image_folder: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """Lightning's advertising tips, its `args` vs sys.argv warning and a deprecation inside it are not shown."""
    code, out, err = run_cli(
        "validate", "--config", "configs/quickstart/classification.yaml", "--data.root", image_folder,
        "--data.num_workers", "0", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", tmp_path,
        *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    assert "metrics written: " in out and "Tip" not in out + err
    assert not [w for w in recwarn if "args parameter" in str(w.message) or "LeafSpec" in str(w.message)]


def test_unknown_backbone_is_one_clear_message(run_cli, image_folder: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(
        "fit", "--config", "configs/classification/imagenet_resnet50.yaml", "--data.root", str(image_folder),
        "--model.backbone.name", "resnet5O", "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    assert code == 2
    assert "resnet5O" in err and "resnet50" in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


def test_missing_dataset_root_is_one_clear_message(run_cli, tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    code, out, err = run_cli(
        "validate", "--config", "configs/classification/imagenet_resnet50.yaml",
        "--data.root", str(tmp_path / "imagenet"), "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    assert code == 2
    assert str(tmp_path / "imagenet") in err and "--data.root" in err and "Traceback" not in err
    # The command's arguments are sys.argv's too (here pytest's): Lightning's warning about that is not shown.
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def _error_lines(err: str) -> list[str]:
    """stderr without Python warnings."""
    return [line for line in err.splitlines() if line.strip() and "Warning" not in line and not line.startswith(" ")]


def test_mistyped_command_line_key_is_one_line_naming_it_and_the_nearest_key(run_cli) -> None:
    code, out, err = run_cli("fit", "--config", "configs/quickstart/classification.yaml",
                             "--model.backbone.nmae", "resnet18")  # fmt: skip
    assert code == 2
    assert _error_lines(err) == [
        "error: unknown key --model.backbone.nmae on the command line; did you mean --model.backbone.name? "
        "(`--help` lists every key)"
    ]
    assert "usage" not in err and "Traceback" not in err


def test_mistyped_config_file_key_names_the_file(run_cli, tmp_path: Path) -> None:
    config = yaml.safe_load(Path("configs/quickstart/classification.yaml").read_text())
    config["trainer"]["max_epochz"] = config["trainer"].pop("max_epochs")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_cli("fit", "--config", path)
    assert code == 2
    [line] = _error_lines(err)
    assert line.startswith(f"error: unknown key trainer.max_epochz in {path}; did you mean trainer.max_epochs")
    config["trainer"]["max_epochs"] = config["trainer"].pop("max_epochz")
    config["model"]["init_args"]["optimizer"]["lrr"] = 0.1
    path.write_text(yaml.safe_dump(config))
    code, out, err = run_cli("fit", "--config", path)
    assert code == 2
    assert _error_lines(err) == [
        f"error: unknown key model.init_args.optimizer.lrr in {path}; did you mean model.init_args.optimizer.lr? "
        "(`--help` lists every key)"
    ]


@pytest.mark.parametrize(
    ("given", "meant"),
    [("--model.backbone.nam", "--model.backbone.name"), ("--trainer.max_epoch", "--trainer.max_epochs")],
)
def test_a_key_prefix_is_refused(run_cli, given: str, meant: str) -> None:
    code, out, err = run_cli("fit", "--config", "configs/quickstart/classification.yaml", given, "3", "--print_config")
    assert code == 2 and out == ""
    [line] = _error_lines(err)
    assert line.startswith(f"error: unknown key {given} on the command line; did you mean {meant}")


def test_help_still_lists_every_key(run_cli) -> None:
    code, out, err = run_cli("fit", "--help")
    assert code == 0
    assert "--trainer.max_epochs" in out and "--model CONFIG | CLASS_PATH_OR_NAME | .INIT_ARG_NAME VALUE" in out
    code, out, err = run_cli(
        "fit", "--config", "configs/quickstart/classification.yaml", "--model.help", "ClassificationTask"
    )
    assert code == 0 and "--model.backbone.name" in out


def test_a_bad_value_is_one_line_naming_the_key_the_value_and_what_it_takes(run_cli, tmp_path: Path) -> None:
    config = "configs/quickstart/classification.yaml"
    code, out, err = run_cli("fit", "--config", config, "--trainer.max_epochs", "x")
    assert code == 2 and _error_lines(err) == [
        "error: --trainer.max_epochs x on the command line: not a valid value, it takes int or null "
        "(`--help` lists every key)"
    ]
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  init_args:\n    finetune:\n      strategy: bogus")  # no trailing newline
    code, out, err = run_cli("fit", "--config", config, "--config", nested)
    assert code == 2 and _error_lines(err) == [
        f"error: --model.finetune.strategy bogus in {nested}: not a valid value, it takes one of none, freeze, "
        "freeze_then_unfreeze, milestones (`--help` lists every key)"
    ]


def test_an_unknown_class_is_one_line_listing_the_classes(run_cli) -> None:
    code, out, err = run_cli("fit", "--config", "configs/quickstart/classification.yaml", "--model", "BogusTask")
    assert code == 2 and _error_lines(err) == [
        "error: --model BogusTask on the command line: not a valid value, it takes a class name (or class path) or "
        "a config file: ClassificationTask, DetectionTask, SegmentationTask (`--help` lists every key)"
    ]


def test_schedule_factor_shapes() -> None:
    warm_cos = ScheduleFactor(SchedulerConfig(name="cosine", warmup_steps=10, warmup_factor=0.1), 100, 10, 0.1)
    assert warm_cos(0) == pytest.approx(0.1)
    assert warm_cos(5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert warm_cos(100) == pytest.approx(0.0, abs=1e-9)
    steps = ScheduleFactor(SchedulerConfig(name="multistep", milestones=[2, 4], gamma=0.1), 60, 10, 0.1)
    assert [steps(s) for s in (0, 19, 20, 39, 40)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    poly = ScheduleFactor(SchedulerConfig(name="poly", power=0.9), 100, 10, 0.1)
    assert poly(50) == pytest.approx(0.5**0.9)
    floor = ScheduleFactor(SchedulerConfig(name="cosine", min_lr=0.01), 100, 10, 0.1)
    assert floor(100) == pytest.approx(0.1)


def test_parameter_groups_exclude_norm_and_bias_from_decay_and_scale_backbone_lr() -> None:
    model = ClassificationTask(
        num_classes=4, backbone={"name": "resnet18"},
        optimizer=OptimizerConfig(lr=0.2, weight_decay=1e-4, norm_weight_decay=0.0, backbone_lr_mult=0.1),
    )  # fmt: skip
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert set(groups) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(0.02) and groups["head"]["lr"] == pytest.approx(0.2)
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 1e-4
    bn_weight = model.backbone.bn1.weight
    assert any(p is bn_weight for p in groups["backbone/no_decay"]["params"])
    assert any(p is model.fc.bias for p in groups["head/no_decay"]["params"])
    assert any(p is model.fc.weight for p in groups["head"]["params"])
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_loss_skips_then_aborts_naming_the_term(fused: bool, capsys: pytest.CaptureFixture) -> None:
    """NaN steps leave weights and momentum untouched (fused: decided on the device; else on the host), a finite
    step then trains, the skipped steps are reported at the next check, and K consecutive ones abort."""
    from resnet_tasks.errors import UserError

    model = ClassificationTask(num_classes=3, backbone={"name": "resnet18"})
    value = {"loss": float("nan")}
    model.training_losses = lambda batch: {"loss_cls": model.fc.weight.sum() * value["loss"]}  # type: ignore[method-assign]
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused or None)
    batch = {"image": torch.zeros(1, 3, 8, 8), "label": torch.zeros(1, dtype=torch.long)}

    def step() -> None:
        optimizer.zero_grad()
        loss = model.training_step(batch, 0)
        model.optimizer_step(0, 0, optimizer, lambda: loss.backward())
        model.on_train_batch_end(None, batch, 0)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):
        step()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(not state.get("momentum_buffer", torch.zeros(1)).any() for state in optimizer.state.values())
    value["loss"] = 1.0
    step()
    assert not torch.equal(model.fc.weight, before["fc.weight"])
    model.on_train_epoch_end()
    assert "Non-finite loss term(s) ['loss_cls'] in 3 of the 4 steps" in capsys.readouterr().out
    value["loss"] = float("nan")
    with pytest.raises(UserError, match=r"loss_cls.*10 consecutive"):
        for _ in range(model.max_consecutive_bad_steps):
            step()


def test_help_and_no_arguments_list_every_command(run_cli) -> None:
    from resnet_tasks.cli import COMMANDS

    assert {"fit", "validate", "test", "predict", "backbones", "plot"} <= set(COMMANDS)
    for args, expected_code in ((["--help"], 0), ([], 2)):
        code, out, err = run_cli(*args)
        assert code == expected_code
        listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
        assert listed == list(COMMANDS), out  # one line per command, in the registry's order
    code, out, err = run_cli("frobnicate")
    assert code == 2 and "unknown command 'frobnicate'" in err and "backbones" in err


def test_fit_without_a_config_points_at_the_quickstarts(run_cli) -> None:
    code, out, err = run_cli("fit")
    assert code == 2 and "configs/quickstart/" in err and "Traceback" not in err
    code, out, err = run_cli("fit", "--help")
    assert code == 0 and "--config" in out


def test_a_registered_command_runs_with_its_arguments(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_tasks import cli

    seen: list[list[str]] = []
    monkeypatch.setitem(cli.COMMANDS, "echo", cli.Command("echo", "test command", seen.append))
    code, out, err = run_cli("echo", "a", "--b")
    assert code == 0 and seen == [["a", "--b"]]
    code, out, err = run_cli("--help")
    assert "  echo" in out and "test command" in out


def test_package_code_has_one_owner_per_concept() -> None:
    """Tasks and writers never read the data module; the package never imports its benchmarks."""
    package = Path(__file__).resolve().parent.parent / "resnet_tasks"
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "benchmarks" not in text, path
        if path.parent.name in ("tasks", "writers"):
            assert "datamodule" not in text, path
    assert not (package / "tasks" / "label_space.py").exists()
