"""Pre-emption on SLURM: SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`) and SIGTERM stop `fit` at a step boundary (a
signal during a validation: at its end) with one checkpoint of ours (`interrupted.ckpt`, never Lightning's mid-step
`hpc_ckpt`); SIGUSR1 also runs `scontrol requeue JOB` (a fake `scontrol` on PATH records it), and the requeued job,
started again with the same command, resumes from that checkpoint by itself and ends bitwise-equal to an
uninterrupted run. The 2-process case (the signal reaches one rank) is in tests/test_multinode.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from resnet_tasks.callbacks import INTERRUPTED_CHECKPOINT
from resnet_tasks.lightning_cli import ResNetTasksCLI, import_components
from tests.conftest import fake_scontrol

pytestmark = pytest.mark.usefixtures("one_thread")

JOB_ID = "4242"
STEPS = 5
VALIDATION = ("--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "2")
STOP_AT = 2  # 24 images, batch 8: 3 steps per epoch, so the stop is mid-epoch 0 and the resume crosses an epoch
ARGS = [
    "--config", "configs/classification/imagenet_resnet50.yaml", "--model.backbone.name", "resnet20",
    "--data.crop_size", "32", "--data.resize_size", "36", "--data.batch_size", "8", "--data.num_workers", "0",
    "--model.optimizer.lr", "0.01", "--model.dropout", "0.2", "--model.scheduler.name", "cosine",
    "--model.scheduler.interval", "step", "--model.scheduler.warmup_steps", "2", "--model.scheduler.milestones", "[]",
    "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1", "--trainer.deterministic", "true",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
    "--trainer.check_val_every_n_epoch", "100", "--seed_everything", "0",
]  # fmt: skip


class SignalAt(L.Callback):
    """Sends this process `signum` after optimizer step `step`, or during the validation after it (as SLURM would,
    at any moment)."""

    def __init__(self, step: int, signum: int, during_validation: bool = False) -> None:
        self.step, self.signum, self.during_validation = step, signum, during_validation

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not self.during_validation:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        if trainer.global_step == self.step and self.during_validation and trainer.state.fn == "fit":
            os.kill(os.getpid(), self.signum)


def slurm_environment(monkeypatch: pytest.MonkeyPatch, bin_dir: Path, restart_count: int = 0) -> None:
    """One SLURM task of batch job JOB_ID (what `srun` sets), with the fake scontrol first on PATH."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)
    values = {"SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
              "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
              "SLURM_NODELIST": "127.0.0.1", "SLURM_RESTART_COUNT": str(restart_count)}  # fmt: skip
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def run_fit(root: Path, *extra: str) -> ResNetTasksCLI:
    """`resnet-tasks fit` in this process (the CLI object, to read the final model and optimizer)."""
    import_components()
    return ResNetTasksCLI(
        model_class=L.LightningModule, datamodule_class=L.LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
        args=["fit", *ARGS, "--trainer.default_root_dir", str(root), *extra],
    )  # fmt: skip


def final_state(cli: ResNetTasksCLI) -> tuple[dict, dict]:
    return cli.model.state_dict(), cli.trainer.optimizers[0].state_dict()


def assert_same_state(actual: tuple[dict, dict], expected: tuple[dict, dict]) -> None:
    weights, optimizer = actual
    assert weights.keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert torch.equal(weights[key], value), key
    assert [g["lr"] for g in optimizer["param_groups"]] == [g["lr"] for g in expected[1]["param_groups"]]
    for index, state in expected[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(optimizer["state"][index][name]), torch.as_tensor(value)), name


@pytest.mark.slow
def test_sigusr1_requeues_and_resumes_exactly_sigterm_in_a_validation_stops_at_its_end(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ("--data.root", str(image_folder))
    scontrol_log = fake_scontrol(tmp_path / "bin")
    slurm_environment(monkeypatch, tmp_path / "bin")
    straight = run_fit(tmp_path / "straight", *data)
    assert straight.trainer.global_step == STEPS
    # Lightning's SLURM auto-requeue (its own hpc_ckpt, saved mid-step from the signal handler) is off.
    environment = straight.trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue is False
    expected = final_state(straight)

    # SIGUSR1 mid-epoch; SIGTERM during the validation at the end of epoch 0 (it stops at the validation's end).
    for signum, step, validation in ((signal.SIGUSR1, STOP_AT, ()), (signal.SIGTERM, 3, VALIDATION)):
        root = tmp_path / signum.name
        slurm_environment(monkeypatch, tmp_path / "bin")
        callback = json.dumps({"class_path": "tests.test_requeue.SignalAt",
                               "init_args": {"step": step, "signum": int(signum),
                                             "during_validation": bool(validation)}})  # fmt: skip
        with pytest.raises(SystemExit):
            run_fit(root, *data, *validation, f"--trainer.callbacks+={callback}")
        checkpoints = {p.name: p for p in root.rglob("*.ckpt")}
        # One checkpoint of ours (beside those the validation saved), never a Lightning hpc_ckpt.
        assert INTERRUPTED_CHECKPOINT in checkpoints and not [name for name in checkpoints if "hpc" in name]
        assert validation or set(checkpoints) == {INTERRUPTED_CHECKPOINT}
        checkpoint = checkpoints[INTERRUPTED_CHECKPOINT]
        assert torch.load(checkpoint, weights_only=True)["global_step"] == step
        requeues = scontrol_log.read_text().splitlines() if scontrol_log.exists() else []
        # SIGUSR1 requeues the job; SIGTERM (scancel, or SLURM's own pre-emption) leaves that to SLURM.
        assert requeues == ([f"requeue {JOB_ID}"] if signum == signal.SIGUSR1 else []), signum.name
        scontrol_log.unlink(missing_ok=True)
        if signum == signal.SIGTERM:
            continue  # its resume is the same as after SIGUSR1 (and tests/test_resume.py checks SIGTERM for every task)

        # The requeued job runs the same command again (SLURM_RESTART_COUNT=1): it finds the checkpoint itself.
        slurm_environment(monkeypatch, tmp_path / "bin", restart_count=1)
        resumed = run_fit(root, *data)
        assert resumed.trainer.ckpt_path == str(checkpoint), signum.name
        assert resumed.trainer.global_step == STEPS
        assert_same_state(final_state(resumed), expected)
