"""Worker memory: USS of the DataLoader workers over one epoch of a big COCO JSON, ours vs Python dicts.

Run in the suite: `python benchmarks/run.py --only memory [--quick] [--memory-images 100000]`
"""

from __future__ import annotations

import contextlib
import gc
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timing import Sizes


def write_memory_coco(root: Path, num_images: int, num_files: int = 100, objects_per_image: int = 3) -> Path:
    """A COCO root whose train split lists `num_images` images that reuse `num_files` tiny 8x8 JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for index in range(num_files):
        pixels = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train2017" / f"tiny_{index:03d}.jpg")
        Image.fromarray(pixels).save(root / "val2017" / f"tiny_{index:03d}.jpg")
    categories = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]
    for split, count in (("train2017", num_images), ("val2017", 8)):
        images = [
            {"id": i + 1, "file_name": f"tiny_{i % num_files:03d}.jpg", "width": 8, "height": 8} for i in range(count)
        ]
        annotations = []
        for image in images:
            for _ in range(objects_per_image):
                x, y = (float(v) for v in rng.integers(0, 4, size=2))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image["id"],
                        "category_id": int(rng.choice([1, 3, 7])),
                        "bbox": [x, y, 3.0, 3.0],
                        "area": 9.0,
                        "iscrowd": 0,
                    }
                )
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def process_memory(pid: int) -> dict[str, int]:
    """Rss / Pss / USS (private clean + dirty) of one process in bytes, from /proc/PID/smaps_rollup."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                values[parts[0][:-1]] = int(parts[1]) * 1024
    return {
        "rss": values.get("Rss", 0),
        "pss": values.get("Pss", 0),
        "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    }


class DictCocoDataset(torch.utils.data.Dataset):
    """The counterfactual: the parsed COCO JSON kept as Python lists of dicts (what our dataset avoids)."""

    def __init__(self, annotation_file: Path, image_folder: Path) -> None:
        data = json.loads(annotation_file.read_text())
        self.image_folder = image_folder
        self.images = data["images"]
        self.objects: list[list[dict]] = [[] for _ in self.images]
        position = {image["id"]: index for index, image in enumerate(self.images)}
        for annotation in data["annotations"]:
            self.objects[position[annotation["image_id"]]].append(annotation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from resnet_tasks.data.io import image_to_tensor, read_image

        image = self.images[index]
        boxes = torch.tensor([a["bbox"] for a in self.objects[index]], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([a["category_id"] for a in self.objects[index]], dtype=torch.int64)
        pixels = read_image(self.image_folder / image["file_name"])
        image_tensor = image_to_tensor(pixels).float().div_(255.0)  # float items, as this benchmark measures
        return image_tensor, {"boxes": boxes, "labels": labels, "image_id": image["id"]}


def _epoch_memory(loader: torch.utils.data.DataLoader, interval: float = 0.25) -> dict[str, Any]:
    """Iterate one epoch while a thread samples the workers' memory; first sample after the first batch."""
    iterator = iter(loader)
    next(iterator)
    pids = [worker.pid for worker in iterator._workers]  # the DataLoader's worker processes
    samples: list[dict[str, float]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        total = {"t": time.perf_counter() - start, "rss": 0.0, "pss": 0.0, "uss": 0.0}
        for pid in pids:
            for key, value in process_memory(pid).items():
                total[key] += value
        samples.append(total)

    def sampler() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError):
                sample()

    sample()
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    batches = 1
    for _ in iterator:
        batches += 1
    stop.set()
    thread.join()
    sample()  # persistent workers are still alive after the epoch
    seconds = time.perf_counter() - start
    del iterator
    first, last = samples[0], samples[-1]
    steady = next((s for s in samples if s["t"] >= 0.1 * seconds), last)
    mib = 1024.0**2
    return {
        "batches": batches,
        "seconds": seconds,
        "samples": len(samples),
        "uss_mib_first": first["uss"] / mib,
        "uss_mib_last": last["uss"] / mib,
        "uss_mib_max": max(s["uss"] for s in samples) / mib,
        "pss_mib_first": first["pss"] / mib,
        "pss_mib_last": last["pss"] / mib,
        "rss_mib_last": last["rss"] / mib,
        "uss_growth": (last["uss"] - first["uss"]) / first["uss"],
        # After the workers' one-time start-up (lazy imports, allocator arenas): growth with data touched.
        "uss_mib_at_10pct": steady["uss"] / mib,
        "uss_growth_from_10pct": (last["uss"] - steady["uss"]) / steady["uss"],
        "pss_growth": (last["pss"] - first["pss"]) / first["pss"],
        "trace_uss_mib": [round(s["uss"] / mib, 1) for s in samples[:: max(1, len(samples) // 20)]],
    }


def bench_memory(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Memory of the DataLoader workers over one epoch of a big COCO JSON through CocoDetectionDataModule.

    Runs in a fresh (spawned) process: forked workers otherwise inherit this process's heap from the
    earlier benchmarks and copy it page by page as their garbage collector walks it, which is growth of
    the parent's making, not the dataset's.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_memory_in_process, sizes, torch.get_num_threads()).result()


def _memory_in_process(sizes: Sizes, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    from resnet_tasks.data.detection import detection_collate
    from resnet_tasks.data.formats.coco import CocoDetectionDataModule

    with tempfile.TemporaryDirectory() as tmp:
        root = write_memory_coco(Path(tmp), sizes.memory_images)
        module = CocoDetectionDataModule(
            root=str(root), batch_size=sizes.memory_batch_size, num_workers=sizes.memory_workers, pin_memory=False
        )
        module.setup("fit")
        ours = _epoch_memory(module.train_dataloader())
        result: dict[str, Any] = {
            "images": sizes.memory_images,
            "workers": sizes.memory_workers,
            "measure": "sum over workers of USS (Private_Clean + Private_Dirty, /proc/PID/smaps_rollup)",
            "ours": ours,
            "goal_growth": 0.05,
            "met": abs(ours["uss_growth_from_10pct"]) <= 0.05,
        }
        del module
        gc.collect()
        if sizes.memory_counterfactual:
            dataset = DictCocoDataset(root / "annotations" / "instances_train2017.json", root / "train2017")
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=sizes.memory_batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
                num_workers=sizes.memory_workers,
                collate_fn=detection_collate,
                persistent_workers=True,
            )
            result["python_dicts"] = _epoch_memory(loader)
            del loader, dataset
            gc.collect()
    return result
