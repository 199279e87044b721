"""Two nodes on one machine: `torchrun --nnodes 2 --nproc_per_node 1` started twice on loopback, and 2 tasks with
the environment `srun` gives them (SLURM's variables, as Lightning's own tests set them).

Each "node" runs in its own working directory with run folders given relative to it, so a file written by rank 1
would land in node1/: the tests check that only global rank 0 writes checkpoints and metrics.json, that
`validate` gives the 1-process metrics.json, and that `predict` writes each mask once into the shared run folder
(multi-node `predict` needs a shared filesystem). Both nodes have local rank 0: a sampler that split the data by
local rank would give both the same half, and the metrics and the mask count would differ (checked by hand).
The SLURM job is also pre-empted: SIGUSR1 reaches rank 1 only, both ranks stop after the same step, rank 0 writes
one checkpoint and requeues the job with (a fake) `scontrol`; the requeued job resumes from it by itself.

One launch per environment (measured on 2 cores: ~31 s for the torchrun fixture, its 1-process references
included, ~18 s for the SLURM test): `python -m tests.test_multinode PLAN` runs every CLI step of the plan in the
same process group. The 1-process references run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from resnet_tasks.callbacks import INTERRUPTED_CHECKPOINT
from tests.conftest import COMMON_TRAINER_ARGS, clean_environment, fake_scontrol, metrics_in

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # a lost rank would otherwise leave gloo waiting for 30 minutes
NUM_VAL = 11  # odd and not a multiple of the batch (4): uneven shards
JOB_ID = "31337"
TWO_NODES = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip
DETECTION = [
    "--config", str(REPO / "configs/quickstart/detection.yaml"), "--data.batch_size", "4", "--data.num_workers", "0",
    "--data.eval_batch_size", "4", "--model.min_size", "64", "--model.max_size", "64",
    "--model.anchor_sizes", "[[8], [16], [32], [64], [128]]", "--model.rpn_pre_nms_top_n_test", "200",
    "--model.rpn_post_nms_top_n_test", "100", "--model.box_score_thresh", "0.0", "--model.optimizer.lr", "0.02",
    "--model.scheduler.warmup_steps", "0", "--trainer.max_time", "null",
]  # fmt: skip
SEGMENTATION = [
    "--config", str(REPO / "configs/quickstart/segmentation.yaml"), "--data.batch_size", "4",
    "--data.eval_batch_size", "4", "--data.num_workers", "0", "--data.crop_size", "64",
    "--model.scheduler.warmup_steps", "0",
]  # fmt: skip
FIT = ["--trainer.max_steps", "4", "--trainer.max_epochs", "-1", "--trainer.num_sanity_val_steps", "0",
       "--trainer.check_val_every_n_epoch", "1"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_nodes(commands: list[list[str]], environments: list[dict[str, str]], folders: list[Path]) -> list[str]:
    """Start one process per node (each in its own folder and session); their outputs (fails on error or hang)."""
    processes = []
    for command, env, folder in zip(commands, environments, folders):
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "output.log", "w+")  # closed below, once the node has ended
        processes.append((subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))  # fmt: skip
    outputs, failed = [], False
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # A node that fails leaves the other waiting in a collective: stop at the first failure, or at the deadline.
        while any(p.poll() is None for p, _ in processes) and not any(p.poll() for p, _ in processes):
            if time.monotonic() > deadline:
                failed = True
                break
            time.sleep(0.2)
    finally:
        for process, log in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.seek(0)
            outputs.append(log.read())
            log.close()
    codes = [process.returncode for process, _ in processes]
    for code, output in zip(codes, outputs):
        assert code in (0, -signal.SIGKILL), f"a node failed (exit {code}):\n{output[-8000:]}"
    assert not failed and codes == [0] * len(codes), f"the nodes did not finish in {TIMEOUT_S} s:\n{outputs[0][-6000:]}"
    return outputs


def write_plan(steps: list[dict], folder: Path) -> Path:
    """A plan: CLI steps (`args`), each with optional extra environment variables (`env`)."""
    plan = folder / "plan.json"
    plan.write_text(json.dumps(steps))
    return plan


def validate_reference(task_args: list[str], data_args: list[str], checkpoint: Path, root: Path) -> dict[str, float]:
    """1 process, in this process: `validate` of `checkpoint`; its metrics.json."""
    from resnet_tasks.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes run: tiny models, and no spin-waiting on a busy machine
    try:
        main(["validate", *task_args, *data_args, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir",
              str(root), *COMMON_TRAINER_ARGS])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return metrics_in(root)


def files_named(folder: Path, *patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in folder.rglob(pattern))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=15, num_val=NUM_VAL, image_size=64)


@pytest.fixture(scope="module")
def torchrun_run(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One torchrun launch on 2 loopback nodes: fit both tasks (a few steps), validate both, predict masks."""
    folder = tmp_path_factory.mktemp("torchrun")
    nodes = [folder / "node0", folder / "node1"]
    detection = [*DETECTION, "--data.root", str(shapes / "coco")]
    segmentation = [*SEGMENTATION, "--data.root", str(shapes / "voc")]
    checkpoints = {task: nodes[0] / f"fit_{task}/lightning_logs/version_0/checkpoints/last.ckpt"
                   for task in ("detection", "segmentation")}  # fmt: skip
    steps = [
        {"args": ["fit", *segmentation, *TWO_NODES, *FIT, "--trainer.default_root_dir", "fit_segmentation"]},
        # 8 steps: enough for a detector whose mAP and recall are not all zero (so they depend on every image)
        {"args": ["fit", *detection, *TWO_NODES, *FIT, "--trainer.max_steps", "8",
                  "--trainer.default_root_dir", "fit_detection"]},
        {"args": ["validate", *segmentation, *TWO_NODES, "--ckpt_path", str(checkpoints["segmentation"]),
                  "--trainer.default_root_dir", "validate_segmentation"]},
        {"args": ["validate", *detection, *TWO_NODES, "--ckpt_path", str(checkpoints["detection"]),
                  "--trainer.default_root_dir", "validate_detection"]},
        {"args": ["predict", *segmentation, *TWO_NODES, "--ckpt_path", str(checkpoints["segmentation"]),
                  "--trainer.default_root_dir", str(folder / "shared" / "predict")]},
    ]  # fmt: skip
    plan = write_plan(steps, folder)
    port = free_port()
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), "--rdzv_conf", "timeout=60",
         "--max_restarts", "0", "-m", "tests.test_multinode", str(plan)]
        for rank in range(2)
    ]  # fmt: skip
    outputs = run_nodes(commands, [clean_environment(), clean_environment()], nodes)
    references = {
        "detection": validate_reference(DETECTION, ["--data.root", str(shapes / "coco")], checkpoints["detection"],
                                        folder / "reference_detection"),
        "segmentation": validate_reference(SEGMENTATION, ["--data.root", str(shapes / "voc")],
                                           checkpoints["segmentation"], folder / "reference_segmentation"),
    }  # fmt: skip
    return {"folder": folder, "nodes": nodes, "outputs": outputs, "references": references,
            "checkpoints": checkpoints}  # fmt: skip


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback(torchrun_run: dict, shapes: Path) -> None:
    node0, node1 = torchrun_run["nodes"]
    output = torchrun_run["outputs"][0]
    for task, reference in torchrun_run["references"].items():
        assert metrics_in(node0 / f"validate_{task}") == reference, (task, output[-3000:])
    assert 0 < torchrun_run["references"]["segmentation"]["miou"] < 1
    assert 0 < torchrun_run["references"]["detection"]["mar_100"] <= 1
    for task, steps in (("segmentation", 4), ("detection", 8)):
        assert f"`max_steps={steps}` reached" in output
        assert (node0 / f"fit_{task}/lightning_logs/version_0/metrics.json").is_file()
        assert torch.load(torchrun_run["checkpoints"][task], weights_only=True)["global_step"] == steps
    # Only global rank 0 writes checkpoints, metrics.json and logs: node 1's folder has its output log only.
    assert [p.name for p in node1.iterdir()] == ["output.log"], sorted(str(p) for p in node1.rglob("*"))
    # Both ranks wrote their own masks into the shared run folder, each image once (counts gathered).
    assert f"segmentation masks: {NUM_VAL} palette PNGs" in output, output[-3000:]
    stems = (shapes / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    masks = files_named(torchrun_run["folder"] / "shared" / "predict", "*.png")
    assert sorted(p.stem for p in masks if p.parent.name == "masks") == sorted(stems)


@pytest.mark.slow
def test_two_slurm_tasks_validate_and_requeue_on_sigusr1(torchrun_run: dict, shapes: Path, tmp_path: Path) -> None:
    """2 tasks as `srun --nodes 2 --ntasks-per-node 1` starts them; SIGUSR1 reaches rank 1 only."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    segmentation = [*SEGMENTATION, "--data.root", str(shapes / "voc")]
    scontrol_log = fake_scontrol(tmp_path / "bin")
    checkpoint = torchrun_run["checkpoints"]["segmentation"]
    shared = tmp_path / "shared" / "fit"  # resuming needs the checkpoint on every node: a shared folder
    signal_rank1 = json.dumps({"class_path": "tests.test_multinode.SignalRankAt",
                               "init_args": {"rank": 1, "step": 1, "signum": int(signal.SIGUSR1)}})  # fmt: skip
    # The ranks compare their signal flags every N optimizer steps (10 by default; 2 here): the signal after step 1
    # stops both ranks after step 2.
    agree_every_2 = json.dumps({"class_path": "resnet_tasks.callbacks.InterruptCheckpoint",
                                "init_args": {"agree_every_n_steps": 2}})  # fmt: skip
    steps = [
        {"args": ["validate", *segmentation, *TWO_NODES, "--ckpt_path", str(checkpoint),
                  "--trainer.default_root_dir", "validate_segmentation"]},
        {"args": ["fit", *segmentation, *TWO_NODES, *FIT, "--trainer.default_root_dir", str(shared),
                  f"--trainer.callbacks+={signal_rank1}", f"--trainer.callbacks+={agree_every_2}"]},
        # The requeued job: the same command again, SLURM_RESTART_COUNT=1 (no --ckpt_path: it finds the checkpoint).
        {"args": ["fit", *segmentation, *TWO_NODES, *FIT, "--trainer.default_root_dir", str(shared)],
         "env": {"SLURM_RESTART_COUNT": "1"}},
    ]  # fmt: skip
    plan = write_plan(steps, tmp_path)
    port = str(free_port())
    environments = []
    for rank in range(2):
        env = clean_environment()
        env.update({
            "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "resnet-tasks", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank),
            "SLURM_NODELIST": "127.0.0.1,127.0.0.2", "SLURM_RESTART_COUNT": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}",
        })  # fmt: skip
        environments.append(env)
    command = [sys.executable, "-m", "tests.test_multinode", str(plan)]
    output, _ = run_nodes([command, command], environments, nodes)

    assert metrics_in(nodes[0] / "validate_segmentation") == torchrun_run["references"]["segmentation"]
    assert not list(nodes[1].rglob("*.json")) and not list(nodes[1].rglob("*.ckpt"))
    # Pre-empted: both ranks stopped after step 2, one interrupt checkpoint (ours; no Lightning hpc_ckpt), one requeue.
    written = files_named(shared, "*.ckpt")
    # (step 2 ends epoch 0: its validation runs whole first, and writes its own checkpoints)
    stopped_run = sorted(p.name for p in written if "version_0" in str(p))
    others = [name for name in stopped_run if not name.startswith("epoch0-step2-")]
    assert others == [INTERRUPTED_CHECKPOINT, "last.ckpt"], written
    assert not [p for p in written if "hpc" in p.name], written
    stopped = next(p for p in written if p.name == INTERRUPTED_CHECKPOINT)
    assert torch.load(stopped, weights_only=True)["global_step"] == 2
    assert scontrol_log.read_text().splitlines() == [f"requeue {JOB_ID}"]
    # The requeued job resumed from it and finished.
    assert f"requeued SLURM job: resuming from {stopped}" in output, output[-3000:]
    assert "`max_steps=4` reached" in output
    (last,) = shared.glob("lightning_logs/version_1/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 4


class SignalRankAt(L.Callback):
    """Global rank `rank` sends itself `signum` after optimizer step `step` (a signal that reached one node)."""

    def __init__(self, rank: int, step: int, signum: int) -> None:
        self.rank, self.step, self.signum = rank, step, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _run_plan(plan: Path) -> None:
    """Every node runs the same CLI steps in one process group (set up by the first step, reused later)."""
    from resnet_tasks.cli import main

    torch.set_num_threads(1)
    for step in json.loads(plan.read_text()):
        os.environ.update(step.get("env", {}))
        try:
            main(step["args"])
        except SystemExit as exit_:
            if exit_.code:
                raise


if __name__ == "__main__":
    _run_plan(Path(sys.argv[1]))
