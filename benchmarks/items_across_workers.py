"""Items across the DataLoader workers: detection and segmentation training items per second through a 2-worker
loader, and the shared memory each detection item takes, for this tree and an earlier one, on the same machine and
the same data in one run.

    git worktree add /tmp/before 6520324     # the tree to compare with (read-only use of git)
    python benchmarks/items_across_workers.py --before /tmp/before --out items_across_workers.json

Each measurement runs in a fresh process whose `resnet_tasks` comes from its tree (PYTHONPATH, outside the
repository so the editable install does not win); the trees alternate (before, after, after, before, ...) and the
figures are medians over `--rounds`. A batch counts once the data module's transfer hooks have run on it
(`on_before_batch_transfer`, `on_after_batch_transfer`; the device is this process's CPU), so work moved from the
workers to the device is paid here too. Data: `--images` photo-like JPEGs of `--width` x `--height` (640 x 480: a
typical COCO image) in the COCO and VOC segmentation layouts, written once for both trees. Shared memory per item:
the bytes of the shared-memory storages of a batch that came from a worker, divided by its items (the image alone,
and the whole item with its target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
DETECTION_BATCH = 2  # the COCO recipe's per-GPU batch
SEGMENTATION_BATCH = 4
WORKERS = 2


# ---------------------------------------------------------------------------------------------- data (parent)
def write_data(root: Path, images: int, width: int, height: int) -> Path:
    """COCO detection (train2017 + a small val2017) and VOC2012 segmentation layouts over the same JPEGs."""
    sys.path.insert(0, str(HERE.parent))
    from decode import write_jpegs

    paths = write_jpegs(root / "jpegs", images, width, height)
    rng = np.random.default_rng(0)
    (root / "coco" / "annotations").mkdir(parents=True)
    categories = [{"id": 1, "name": "disc"}, {"id": 2, "name": "blob"}]
    annotation_id = 1
    splits = {"train2017": paths, "val2017": paths[:4]}
    for split, files in splits.items():
        (root / "coco" / split).mkdir()
        entries, annotations = [], []
        for index, path in enumerate(files):
            name = f"{index:06d}.jpg"
            os.link(path, root / "coco" / split / name)
            entries.append({"id": index + 1, "file_name": name, "height": height, "width": width})
            for _ in range(int(rng.integers(2, 8))):
                w, h = float(rng.uniform(20, width / 3)), float(rng.uniform(20, height / 3))
                x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
                annotations.append({"id": annotation_id, "image_id": index + 1, "category_id": int(rng.integers(1, 3)),
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
                annotation_id += 1
        document = {"images": entries, "annotations": annotations, "categories": categories}
        (root / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    voc = root / "voc" / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    palette = [value for index in range(256) for value in (index * 37 % 256, index * 91 % 256, index * 53 % 256)]
    stems = []
    for index, path in enumerate(paths):
        stem = f"2007_{index:06d}"
        os.link(path, voc / "JPEGImages" / f"{stem}.jpg")
        mask = np.zeros((height, width), dtype=np.uint8)
        for _ in range(3):
            y, x = int(rng.integers(0, height - 40)), int(rng.integers(0, width - 40))
            mask[y : y + int(rng.integers(20, height // 2)), x : x + int(rng.integers(20, width // 2))] = rng.integers(
                1, 21
            )
        picture = Image.fromarray(mask, mode="P")
        picture.putpalette(palette)
        picture.save(voc / "SegmentationClass" / f"{stem}.png")
        stems.append(stem)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(stems) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems[:4]) + "\n")
    return root


# ---------------------------------------------------------------------------------------------- measure (child)
def shared_bytes(value: Any) -> int:
    """Bytes of the shared-memory tensor storages in `value` (nested lists, tuples, dicts)."""
    import torch

    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        return storage.nbytes() if storage.is_shared() else 0
    if isinstance(value, dict):
        return sum(shared_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(shared_bytes(v) for v in value)
    return 0


def items_per_second(module: Any, batch_size: int, warmup: int, timed: int) -> tuple[float, Any]:
    """Training items/s through the module's loader and its transfer hooks, after `warmup` batches (the workers'
    start); also the first batch as it came from a worker."""
    module.setup("fit")
    loader = module.train_dataloader()
    first = None
    done = 0
    start = 0.0
    while done < warmup + timed:
        for batch in loader:
            if first is None:
                first = batch
            batch = module.on_after_batch_transfer(module.on_before_batch_transfer(batch, 0), 0)
            done += 1
            if done == warmup:
                start = time.perf_counter()
            if done == warmup + timed:
                break
    return timed * batch_size / (time.perf_counter() - start), first


def measure(data: Path, warmup: int, timed: int) -> dict[str, Any]:
    import torch

    import resnet_tasks

    torch.set_num_threads(1)  # the main process's share of a 2-core machine; the workers have theirs
    common = {"num_workers": WORKERS, "pin_memory": False, "seed": 0}
    detection = resnet_tasks.CocoDetectionDataModule(root=str(data / "coco"), batch_size=DETECTION_BATCH, **common)
    detection_rate, batch = items_per_second(detection, DETECTION_BATCH, warmup, timed)
    images, targets = batch
    segmentation = resnet_tasks.VOCSegmentationDataModule(
        root=str(data / "voc"), batch_size=SEGMENTATION_BATCH, crop_size=480, **common
    )
    segmentation_rate, seg_batch = items_per_second(segmentation, SEGMENTATION_BATCH, warmup, timed)
    return {
        "resnet_tasks": str(Path(resnet_tasks.__file__).parent),
        "detection_items_per_s": detection_rate,
        "segmentation_items_per_s": segmentation_rate,
        "detection_image": {"shape": list(images[0].shape), "dtype": str(images[0].dtype)},
        "detection_image_shared_bytes_per_item": shared_bytes(list(images)) / len(images),
        "detection_item_shared_bytes_per_item": shared_bytes(batch) / len(images),
        "segmentation_item_shared_bytes_per_item": shared_bytes(seg_batch) / SEGMENTATION_BATCH,
    }


# ---------------------------------------------------------------------------------------------- the comparison
def run_tree(tree: Path, data: Path, warmup: int, timed: int) -> dict[str, Any]:
    """One measurement in a fresh process whose `resnet_tasks` is `tree`'s."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE), "--measure", str(data), "--warmup", str(warmup), "--timed", str(timed)]
    done = subprocess.run(command, env=env, cwd=data, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement with {tree} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["resnet_tasks"]).resolve() != (tree / "resnet_tasks").resolve():
        raise RuntimeError(f"the child imported {result['resnet_tasks']}, not {tree}")
    return result


def compare(before: Path, after: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(Path(folder), args.images, args.width, args.height)
        for round_ in range(args.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for name in order:
                result = run_tree(before if name == "before" else after, data, args.warmup, args.timed)
                runs[name].append(result)
                print(
                    f"round {round_ + 1} {name:6s}: detection {result['detection_items_per_s']:.1f} items/s, "
                    f"segmentation {result['segmentation_items_per_s']:.1f} items/s",
                    flush=True,
                )
    report: dict[str, Any] = {
        "setup": {
            "images": args.images, "size": [args.width, args.height], "workers": WORKERS, "rounds": args.rounds,
            "timed_batches": args.timed, "detection_batch": DETECTION_BATCH, "segmentation_batch": SEGMENTATION_BATCH,
            "segmentation_crop": 480, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        },
    }  # fmt: skip
    for name, results in runs.items():
        report[name] = {
            "tree": str(before if name == "before" else after),
            "detection_items_per_s": statistics.median(r["detection_items_per_s"] for r in results),
            "segmentation_items_per_s": statistics.median(r["segmentation_items_per_s"] for r in results),
            "detection_items_per_s_rounds": [r["detection_items_per_s"] for r in results],
            "segmentation_items_per_s_rounds": [r["segmentation_items_per_s"] for r in results],
            **{key: value for key, value in results[0].items() if "bytes" in key or key == "detection_image"},
        }
    key = "detection_image_shared_bytes_per_item"
    report["detection_image_bytes_ratio_before_over_after"] = report["before"][key] / report["after"][key]
    report["shared_memory_goal_met"] = report["detection_image_bytes_ratio_before_over_after"] >= 3.5
    return report


def print_table(report: dict[str, Any]) -> None:
    rows = [
        ("detection items/s (2 workers)", "detection_items_per_s", "{:.1f}"),
        ("segmentation items/s (2 workers)", "segmentation_items_per_s", "{:.1f}"),
        ("shared memory per detection image, bytes", "detection_image_shared_bytes_per_item", "{:,.0f}"),
        ("shared memory per detection item, bytes", "detection_item_shared_bytes_per_item", "{:,.0f}"),
        ("shared memory per segmentation item, bytes", "segmentation_item_shared_bytes_per_item", "{:,.0f}"),
    ]
    print("| | before | after | after / before |\n|---|---|---|---|")
    for label, key, form in rows:
        before, after = report["before"][key], report["after"][key]
        print(f"| {label} | {form.format(before)} | {form.format(after)} | {after / before:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the earlier tree (a git worktree) to compare with")
    parser.add_argument("--after", type=Path, default=REPO, help="this tree (default: the repository of this file)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches (the workers start)")
    parser.add_argument("--timed", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # child: the data folder
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.warmup, args.timed)))
        return 0
    if args.before is None:
        parser.error("--before TREE is needed (e.g. git worktree add /tmp/before 6520324)")
    report = compare(args.before.resolve(), args.after.resolve(), args)
    print_table(report)
    print(f"shared memory per 640x480 detection image: {report['detection_image_bytes_ratio_before_over_after']:.2f}x "
          f"smaller (goal >= 3.5x: {'met' if report['shared_memory_goal_met'] else 'NOT met'})")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
