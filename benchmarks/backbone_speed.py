"""Benchmark: forward+backward step time of our resnet50 backbone vs torchvision's resnet50 body.

Both run in the same process on the same input, alternating (ours, torchvision, ours, ...) so that drift in
machine load hits both alike. Speed ratio = t_torchvision / t_ours (>= 0.98 is the goal).

    python benchmarks/backbone_speed.py --batch-size 8 --size 224 --steps 10 --out speed.json
"""

from __future__ import annotations

import argparse
import io
import platform
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
import torchvision
from timing import Sizes, alternate, median, write_report
from torch import nn

from resnet_tasks.backbones import build_backbone


def torchvision_body(model: nn.Module) -> nn.Module:
    """torchvision's network up to its last stage (no pooling / fc), i.e. the same work as our backbone."""
    parts = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(*(getattr(model, part) for part in parts))


def train_step(model: nn.Module, images: torch.Tensor, ours: bool) -> None:
    """One forward+backward on the last stage's mean, gradients cleared (timed by `timing.alternate`)."""
    output = model(images)
    last = output[next(reversed(output))] if ours else output
    last.mean().backward()
    model.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="resnet50", help="a backbone name that torchvision also has")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    reference = getattr(torchvision.models, args.name)(weights=None)
    ours = build_backbone(args.name)
    # Same weights in both (our keys are torchvision's minus fc.*), so the numerics are identical too.
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    ours = ours.to(device).train()
    theirs = torchvision_body(reference).to(device).train()
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)

    # GPU work included: the device is synchronized before the clock starts and before it stops.
    times = alternate(
        {
            "ours": lambda: train_step(ours, images, ours=True),
            "torchvision": lambda: train_step(theirs, images, ours=False),
        },
        repeats=args.steps,
        warmup=args.warmup,
        collect=False,
        device=device,
    )
    median_ours = median(times["ours"])
    median_tv = median(times["torchvision"])
    # Each (ours, torchvision) pair ran back to back: the median of per-pair ratios resists load drift.
    paired = median([tv / mine for mine, tv in zip(times["ours"], times["torchvision"])])
    result = {
        "name": args.name,
        "batch_size": args.batch_size,
        "size": args.size,
        "steps": args.steps,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "median_step_s_ours": median_ours,
        "median_step_s_torchvision": median_tv,
        "speed_ratio_ours_over_torchvision": median_tv / median_ours,
        "paired_speed_ratio_median": paired,
        "times_ours": times["ours"],
        "times_torchvision": times["torchvision"],
    }
    print(
        f"{args.name} fwd+bwd, batch {args.batch_size}x3x{args.size}x{args.size} on {device} "
        f"({torch.get_num_threads()} threads), median of {args.steps} alternating steps:\n"
        f"  ours        {median_ours * 1000:9.1f} ms\n"
        f"  torchvision {median_tv * 1000:9.1f} ms\n"
        f"  speed ratio (t_torchvision / t_ours) = {median_tv / median_ours:.3f}  (goal >= 0.98); "
        f"median of per-pair ratios = {paired:.3f}"
    )
    return write_report(args.out, result)


def bench_backbone(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """The suite's entry (`python benchmarks/run.py --only backbone`): `main` at the suite's sizes, quietly."""
    name, batch, size, steps = sizes.backbone
    if device.type == "cuda":
        name, batch, size, steps = "resnet50", 64, 224, 20
    with redirect_stdout(io.StringIO()):
        result = main(
            ["--name", name, "--batch-size", str(batch), "--size", str(size), "--steps", str(steps),
             "--warmup", "1", "--device", str(device)]
        )  # fmt: skip
    for key in ("times_ours", "times_torchvision", "platform"):
        result.pop(key, None)
    result["goal"] = 0.98
    result["met"] = result["speed_ratio_ours_over_torchvision"] >= 0.98
    return result


if __name__ == "__main__":
    main()
