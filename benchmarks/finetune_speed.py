"""Benchmark: step time and peak memory of fine-tuning with a frozen backbone against training it all, 1 and 2 ranks.

Three ways to train a classifier (a backbone + a linear head), each in fresh processes (peak memory per run):
- `full`: `finetune.strategy none`, everything trains;
- `frozen`: a backbone frozen by `freeze_then_unfreeze` before its unfreeze epoch: the DDP-exact mechanism (every
  backbone parameter registered with DDP, run without autograd, tied to the loss by a zero term, its zero
  gradients all-reduced and dropped before the step);
- `frozen_fixed`: `finetune.strategy freeze`: the backbone never trains, so it leaves DDP altogether (the bound).
"kept" = how much of the frozen backbone's saving the DDP-exact mechanism keeps: (full - frozen) / (full - fixed).
Ranks use gloo on the CPU, or NCCL with one GPU each (`--device cuda`).

    python benchmarks/finetune_speed.py --name resnet18 --batch-size 8 --size 112 --steps 8 --out finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from resnet_tasks.backbones import build_backbone
from resnet_tasks.tasks.finetune import FinetuneConfig, Finetuner
from resnet_tasks.tasks.optim import OptimizerConfig, ScheduleFactor, SchedulerConfig, build_optimizer, parameter_groups

MODES = {
    "full": FinetuneConfig(),
    "frozen": FinetuneConfig(strategy="freeze_then_unfreeze", unfreeze_at=1000),
    "frozen_fixed": FinetuneConfig(strategy="freeze"),
}


class Classifier(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.backbone = build_backbone(name)
        self.fc = nn.Linear(list(self.backbone.channels.values())[-1], 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(list(self.backbone(images).values())[-1].mean(dim=(2, 3)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build(mode: str, name: str, device: torch.device, distributed: bool) -> tuple[Any, ...]:
    """The model (DDP-wrapped on several ranks), its finetuner, optimizer and scheduler, as a task sets them up."""
    torch.manual_seed(0)
    net = Classifier(name).to(device)
    finetuner = Finetuner(net.backbone, MODES[mode])
    config = OptimizerConfig(lr=0.01, weight_decay=1e-4)
    groups = finetuner.param_groups(parameter_groups(net, net.backbone, config))
    optimizer = build_optimizer(groups, config)
    schedule = ScheduleFactor(SchedulerConfig(name="constant"), 10_000, 100, config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, finetuner.lr_lambdas(groups, schedule, 100))
    model: nn.Module = net
    if distributed:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return model, finetuner, optimizer, scheduler


def step(model: nn.Module, finetuner: Finetuner, optimizer: Any, scheduler: Any, batch: tuple) -> None:
    """One training step in the order TaskBase runs it."""
    finetuner.apply(scheduler.last_epoch)
    loss = finetuner.tie(F.cross_entropy(model(batch[0]), batch[1]))
    loss.backward()
    finetuner.drop_frozen_grads()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def worker(rank: int, world: int, port: int, args: dict[str, Any], modes: list[str], out: str) -> None:
    """Several modes: their steps alternate (timing, load drift hits all alike); one mode: its peak memory."""
    device = torch.device(f"cuda:{rank}" if args["device"] == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(args["threads"])
    runs = {mode: build(mode, args["name"], device, world > 1) for mode in modes}
    generator = torch.Generator().manual_seed(rank)
    size = (args["batch_size"], 3, args["size"], args["size"])
    batch = (
        torch.randn(size, generator=generator).to(device),
        torch.randint(0, 10, size[:1], generator=generator).to(device),
    )
    for model, *_ in runs.values():
        model.train()
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else peak_memory_mb(device)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    steps = args["warmup"] + (args["steps"] if len(modes) > 1 else 2)
    for index in range(steps):
        for mode, run in runs.items():
            start = time.perf_counter()
            step(*run, batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= args["warmup"]:
                times[mode].append(time.perf_counter() - start)
    result = {mode: 1000 * statistics.median(values) for mode, values in times.items()}
    if len(modes) == 1:
        result = {"peak_mb": peak_memory_mb(device), "training_mb": peak_memory_mb(device) - before}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        torch.distributed.destroy_process_group()


def spawn(world: int, args: dict[str, Any], modes: list[str]) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(world, free_port(), args, modes, folder), nprocs=world)
        return [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(world)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=8, help="images per rank and step")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = vars(parser.parse_args(argv))
    results: dict[str, Any] = {"settings": {k: v for k, v in args.items() if k != "out"}, "runs": {}}
    cores = os.cpu_count() or 1
    for world in (1, 2):
        args["threads"] = max(1, cores // world)
        timing = spawn(world, args, list(MODES))
        for mode in MODES:
            memory = spawn(world, args, [mode])
            run = {"step_ms": max(rank[mode] for rank in timing)}
            run.update({key: max(rank[key] for rank in memory) for key in ("peak_mb", "training_mb")})
            results["runs"][f"{world}x{mode}"] = run
            print(f"{world} rank(s) {mode:>12}: step {run['step_ms']:7.1f} ms, peak {run['peak_mb']:7.0f} MB "
                  f"({run['training_mb']:+.0f} MB while training)", flush=True)  # fmt: skip
        full, frozen, fixed = (results["runs"][f"{world}x{mode}"] for mode in MODES)
        for key in ("step_ms", "training_mb"):
            saving = full[key] - fixed[key]
            kept = (full[key] - frozen[key]) / saving if saving > 0 else float("nan")
            results["runs"][f"{world}x_kept_{key}"] = kept
            print(f"{world} rank(s): the DDP-exact frozen backbone keeps {kept:.0%} of the {key} saving", flush=True)
    if args.get("out"):
        Path(args["out"]).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
