"""The non-finite step guard under 2-process DDP: a NaN loss on one rank skips the update on both ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from resnet_tasks.tasks.guard import StepGuard, all_reduce_max


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        guard = StepGuard(max_consecutive=10)
        records = []
        for step in range(3):
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.zero_grad()
            loss = model(torch.ones(3, 4)).sum()
            if step == 1 and rank == 1:
                loss = loss * float("nan")
            total = guard.flag({"loss": loss}, torch.device("cpu"))
            total.backward()
            optimizer.found_inf = guard.decide(all_reduce_max)
            optimizer.step()
            del optimizer.found_inf
            records.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
        torch.save(records, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    unchanged = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # Step 1 (NaN on rank 1 only) leaves both ranks' weights untouched; steps 0 and 2 train on both.
    assert unchanged == [[False, True, False], [False, True, False]]
