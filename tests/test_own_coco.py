"""COCO detection data as people export it: Roboflow (a parent category id 0, 0-based ids, `valid/`), CVAT COCO 1.0
(one split, 1-based ids, a held-out val), annotation files and image folders named per split (`../` relative and
absolute), the one label-space rule, the bad cases, and each form through the CLI with pycocotools' mAP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_tasks.data.formats import coco_files
from resnet_tasks.data.formats.coco import CocoDetectionDataModule
from resnet_tasks.errors import UserError
from tests.conftest import (
    ALL_BOXES,
    COMMON_TRAINER_ARGS,
    DETECTION_QUICKSTART,
    SMALL_DETECTOR,
    cocoeval_stats,
    draw_boxes,
    fit_one_step_then_evaluate,
    printed_path,
    read_metrics,
)

PARENT = {"id": 0, "name": "pets", "supercategory": "none"}
CATS_DOGS = [
    PARENT,
    {"id": 1, "name": "cat", "supercategory": "pets"},
    {"id": 2, "name": "dog", "supercategory": "pets"},
]
# Per split: (stem, [(category id, XYWH box)]); large objects (an untrained detector's boxes hit some), one negative.
TRAIN = [
    ("a", [(1, [4, 6, 40, 34]), (2, [40, 20, 38, 40])]),
    ("b", [(2, [10, 10, 50, 50])]),
    ("c", [(1, [20, 12, 36, 40])]),
    ("empty", []),
    ("d", [(1, [8, 8, 60, 50]), (2, [0, 0, 80, 64])]),
]
VALID = [(f"v{i}", [(1, [0, 0, 80, 64]), (2, [2 * i, 4, 44, 56])]) for i in range(3)]
# The CLI runs: a tiny detector, one training step, large anchors and every box kept (metrics above zero).
CLI = [*SMALL_DETECTOR, *ALL_BOXES, "--model.anchor_sizes", "[[48], [64], [96], [128], [160]]",
       "--model.rpn_post_nms_top_n_test", "50", *COMMON_TRAINER_ARGS]  # fmt: skip


def coco_file(path: Path, entries: list, categories: list[dict], folder: Path, first_id: int = 0) -> Path:
    """Write the images of `entries` into `folder` and their COCO file at `path` (categories first, as Roboflow)."""
    folder.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (stem, objects) in enumerate(entries, start=first_id):
        name = f"{stem}_jpg.rf.{image_id:06x}.jpg"
        Image.fromarray(draw_boxes((64, 80), [box for _, box in objects], image_id)).save(folder / name, quality=95)
        images.append({"id": image_id, "license": 1, "file_name": name, "height": 64, "width": 80})
        for category_id, box in objects:
            annotations.append({"id": len(annotations) + first_id, "image_id": image_id, "category_id": category_id,
                                "bbox": box, "area": box[2] * box[3], "segmentation": [], "iscrowd": 0})  # fmt: skip
    data = {"info": {"year": "2024"}, "licenses": [{"id": 1, "name": "CC BY 4.0"}], "categories": categories,
            "images": images, "annotations": annotations}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def make_roboflow_coco(root: Path, categories: list[dict] = CATS_DOGS, splits: dict | None = None) -> Path:
    """Roboflow's COCO export: `<split>/_annotations.coco.json` beside the images, `valid` for val."""
    for split, entries in (splits or {"train": TRAIN, "valid": VALID}).items():
        coco_file(root / split / "_annotations.coco.json", entries, categories, root / split)
    return root


def make_cvat_coco(root: Path) -> Path:
    """CVAT's COCO 1.0 export: one subset (`default`), 1-based ids, `images/` beside `annotations/`."""
    categories = [{"id": 1, "name": "cat", "supercategory": ""}, {"id": 2, "name": "dog", "supercategory": ""}]
    coco_file(root / "annotations" / "instances_default.json", TRAIN + VALID, categories, root / "images", 1)
    return root


def module(root: Path | None = None, **kwargs) -> CocoDetectionDataModule:
    return CocoDetectionDataModule(root=None if root is None else str(root), batch_size=2, num_workers=0, **kwargs)


def stems(dataset) -> list[str]:
    annotations = dataset.annotations
    return sorted(Path(annotations.file_name(i)).name.split("_jpg")[0] for i in range(len(annotations)))


# ----------------------------------------------------------------------------------------------- layouts
def test_roboflow_parent_category_is_no_class_and_ids_stay_the_files(tmp_path: Path, capsys) -> None:
    root = make_roboflow_coco(tmp_path / "export")
    data = module(root)
    out = capsys.readouterr().out
    assert "COCO data: Roboflow layout" in out and "train train, val valid" in out
    assert "category 0 'pets' is the supercategory of others and has no annotation: not a class" in out
    assert data.label_space.class_names == ("background", "cat", "dog")
    assert data.label_space.category_ids == (-1, 1, 2)  # the background has no dataset id
    data.setup("fit")
    assert stems(data.dataset("val")) == ["v0", "v1", "v2"]
    assert len(data.dataset("train")) == 4  # the negative is not trained on by default (as before) ...
    out = capsys.readouterr().out
    assert "5 images, 6 boxes, 1 negatives (no object) not trained on" in out  # ... and said
    assert len(module(root, remove_images_without_annotations=False).dataset("train")) == 5
    _, target = data.dataset("val")[1]
    assert target["image_id"] == 1 and target["category_ids"].tolist() == [1, 2]  # 0-based image ids kept
    test = data.dataset("test")
    assert test is data.dataset("val") and "no test split: test evaluates the val split" in capsys.readouterr().out


def test_zero_based_ids_unused_classes_and_a_parent_with_boxes(tmp_path: Path, capsys) -> None:
    categories = [{"id": 0, "name": "cat", "supercategory": "animal"}, {"id": 1, "name": "dog", "supercategory": ""},
                  {"id": 7, "name": "bird", "supercategory": "animal"}]  # fmt: skip
    train, val = ([(stem, [(category - 1, box) for category, box in objects]) for stem, objects in split]
                  for split in (TRAIN, VALID[:1]))  # fmt: skip
    root = make_roboflow_coco(tmp_path / "zero", categories, {"train": train, "valid": val})
    data = module(root)
    assert data.label_space.category_ids == (-1, 0, 1, 7) and data.label_space.object_names == ("cat", "dog", "bird")
    data.setup("fit")
    _, target = data.dataset("val")[0]
    assert target["category_ids"].tolist() == [0, 1]  # the files' own 0-based ids
    out = capsys.readouterr().out
    assert "no box of 1 class(es): bird" in out  # unused in train: still a class, and said
    # A parent that owns a box is a class like any other.
    categories = [dict(PARENT), *CATS_DOGS[1:]]
    train = [*TRAIN, ("parent", [(0, [5, 5, 30, 30])])]
    data = module(make_roboflow_coco(tmp_path / "owned", categories, {"train": train, "valid": VALID}))
    assert data.label_space.object_names == ("pets", "cat", "dog")


def test_cvat_one_split_holds_out_a_seeded_stratified_val(tmp_path: Path, capsys) -> None:
    root = make_cvat_coco(tmp_path / "cvat")
    data = module(root)
    assert data.label_space.category_ids == (-1, 1, 2)
    data.setup("fit")
    out = capsys.readouterr().out
    assert "COCO data: CVAT layout" in out and "(train default)" in out and "holding out 10%" in out
    train, val = stems(data.dataset("train")), stems(data.dataset("val"))
    assert not set(train) & set(val) and len(train) + len(val) == 7  # the negative is not trained on
    again = module(root)
    again.setup("validate")
    assert stems(again.dataset("val")) == val  # validate/test recompute the same split
    assert data.dataset("test") is data.dataset("val")
    other = module(root, val_fraction=0.5, split_seed=1)
    assert len(other.dataset("val")) == 3  # half the 6 images mostly of cats; the one dog and the negative stay


def test_files_given_per_split_relative_and_absolute(tmp_path: Path, capsys) -> None:
    coco_file(tmp_path / "labels" / "train.json", TRAIN, CATS_DOGS, tmp_path / "pictures" / "train")
    valid = coco_file(tmp_path / "labels" / "val.json", VALID, CATS_DOGS, tmp_path / "pictures" / "val")
    (tmp_path / "root").mkdir()
    data = module(tmp_path / "root", train_annotations="../labels/train.json", train_images="../pictures/train",
                  val_annotations=str(valid), val_images=str(tmp_path / "pictures" / "val"))  # fmt: skip
    assert "COCO data: train" in capsys.readouterr().out
    data.setup("fit")
    assert stems(data.dataset("val")) == ["v0", "v1", "v2"] and len(data.dataset("train")) == 4
    # Without --data.root paths are relative to the working directory; without *_images the images are beside
    # the annotation file (Roboflow's way).
    beside = coco_file(tmp_path / "beside" / "x.json", VALID, CATS_DOGS, tmp_path / "beside")
    alone = module(train_annotations=str(beside), train_images=str(tmp_path / "beside"), val_annotations=str(beside))
    assert len(alone.dataset("val")) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"train_images": "pictures/train"}, r"--data.train_images needs --data.train_annotations"),
        ({"train_annotations": "nowhere.json"}, r"nowhere\.json \(--data.train_annotations\) does not exist"),
        ({"val_annotations": "labels/train.json", "val_images": "pictures/val"}, r"is not on disk"),
    ],
)
def test_files_given_per_split_errors(tmp_path: Path, options: dict, message: str) -> None:
    coco_file(tmp_path / "labels" / "train.json", TRAIN, CATS_DOGS, tmp_path / "pictures" / "train")
    (tmp_path / "pictures" / "val").mkdir()
    with pytest.raises(UserError, match=message):
        module(tmp_path, **options).dataset("val")


def test_no_layout_found_lists_every_layout(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(UserError) as error:
        module(tmp_path)
    text = str(error.value)
    wanted = [
        "No COCO dataset found under",
        "annotations/instances_train2017.json",
        "(COCO 2017",
        "(Roboflow)",
        "train/_annotations.coco.json",
        "(CVAT)",
        "instances_<name>.json with images/",
        "--data.train_annotations",
    ]
    assert "\n" not in text  # one line
    assert all(part in text for part in wanted), text
    root = make_roboflow_coco(tmp_path / "export")
    with pytest.raises(UserError, match=r"Roboflow layout .* has no split 'val2017' .* its splits are train, valid"):
        module(root, val_split="val2017")


def test_splits_whose_category_lists_differ_are_one_error(tmp_path: Path) -> None:
    root = make_roboflow_coco(tmp_path / "export")
    renamed = [CATS_DOGS[0], CATS_DOGS[1], {"id": 2, "name": "puppy", "supercategory": "pets"}]
    coco_file(root / "valid" / "_annotations.coco.json", VALID, renamed, root / "valid")
    with pytest.raises(UserError, match=r"valid/_annotations\.coco\.json and .*train/_annotations\.coco\.json list "
                                        r"different categories .*\(2, 'puppy'\).*\(2, 'dog'\)"):  # fmt: skip
        module(root)


def test_categories_are_read_without_the_annotations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_roboflow_coco(tmp_path / "export")
    path = root / "train" / "_annotations.coco.json"

    def no_full_parse(path: Path) -> None:
        raise AssertionError("parsed the whole file")

    monkeypatch.setattr(coco_files, "read_json", no_full_parse)
    assert [entry["id"] for entry in coco_files.read_categories(path)] == [0, 1, 2]
    assert coco_files.owns_annotations(path, 2) and not coco_files.owns_annotations(path, 0)
    data = json.loads(path.read_text())
    data["categories"] = data.pop("categories")  # last, as in COCO 2017's own files
    path.write_text(json.dumps(data, indent=2))
    assert [entry["name"] for entry in coco_files.read_categories(path)] == ["pets", "cat", "dog"]


def test_inspect_counts_negatives_and_the_files_own_ids(tmp_path: Path) -> None:
    from resnet_tasks.data.inspection import inspect_data

    data = inspect_data(module(make_roboflow_coco(tmp_path / "export"))).to_json()
    assert [(c["id"], c["name"], c["train"], c["val"]) for c in data["classes"]] == [(1, "cat", 3, 3), (2, "dog", 3, 3)]
    assert data["splits"]["train"]["negatives"] == 1 and data["splits"]["train"]["images"] == 5
    assert data["problems"] == [] and set(data["splits"]) == {"train", "val"}  # test is val: listed once
    held_out = inspect_data(module(make_cvat_coco(tmp_path / "cvat"))).to_json()["splits"]
    assert held_out["train"]["images"] + held_out["val"]["images"] == 8 and held_out["train"]["negatives"] == 1


# ----------------------------------------------------------------------------------------------- the CLI
def cocoeval_map(annotation_file: Path, results_file: Path, tmp_path: Path) -> float:
    """pycocotools' mAP of `results_file` on `annotation_file`, its annotation ids renumbered from 1: COCOeval marks
    a ground-truth box as matched by its annotation id, so one whose id is 0 (Roboflow numbers from 0) never counts
    as found there; the ids mean nothing else to the metric."""
    data = json.loads(annotation_file.read_text())
    for number, annotation in enumerate(data["annotations"], start=1):
        annotation["id"] = number
    renumbered = tmp_path / f"renumbered_{annotation_file.parent.name}_{annotation_file.name}"
    renumbered.write_text(json.dumps(data))
    return cocoeval_stats(renumbered, results_file)[0]


def fit_then_evaluate(run_cli: Callable, data: list[str], tmp_path: Path) -> dict[str, str]:
    """`fit` one step on the COCO data `data` names, then `validate`, `test` and `predict`; the output of each."""
    args = ["--config", DETECTION_QUICKSTART, "--data", "resnet_tasks.CocoDetectionDataModule", *data, *CLI]
    return fit_one_step_then_evaluate(run_cli, args, tmp_path)


def test_roboflow_export_through_the_cli_equals_pycocotools(run_cli: Callable, tmp_path: Path) -> None:
    root = make_roboflow_coco(tmp_path / "export")
    out = fit_then_evaluate(run_cli, ["--data.root", str(root)], tmp_path)
    assert "not a class" in out["fit"] and "no test split" in out["test"]
    assert "no test split" not in out["fit"]  # fit builds no test loader (not even to print the data module)
    assert (
        out["fit"].count("COCO data: Roboflow layout") == 1 and out["fit"].count("train/_annotations.coco.json:") == 1
    )
    metrics = read_metrics(out["test"])
    predictions = printed_path(out["predict"], "predictions written: ")
    results = json.loads(predictions.read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2} and {r["image_id"] for r in results} <= {0, 1, 2}
    reference = cocoeval_map(root / "valid" / "_annotations.coco.json", predictions, tmp_path)
    assert reference > 0.01 and metrics["map"] == pytest.approx(reference, abs=1e-6)


def test_cvat_export_through_the_cli_saves_its_val_split(run_cli: Callable, tmp_path: Path) -> None:
    root = make_cvat_coco(tmp_path / "cvat")
    out = fit_then_evaluate(run_cli, ["--data.root", str(root)], tmp_path)
    written = printed_path(out["fit"], "val split written: ").read_text().split()
    assert written and all(name.startswith("images/") for name in written)
    results = json.loads(printed_path(out["predict"], "predictions written: ").read_text())
    held_out = {image["id"] for image in json.loads((root / "annotations" / "instances_default.json").read_text())
                ["images"] if f"images/{image['file_name']}" in written}  # fmt: skip
    assert {r["image_id"] for r in results} <= held_out and {r["category_id"] for r in results} <= {1, 2}
    assert "map_50" in read_metrics(out["validate"])


def test_files_given_per_split_through_the_cli(run_cli: Callable, tmp_path: Path) -> None:
    coco_file(tmp_path / "labels" / "train.json", TRAIN, CATS_DOGS, tmp_path / "pictures" / "train")
    val = coco_file(tmp_path / "labels" / "val.json", VALID, CATS_DOGS, tmp_path / "pictures" / "val")
    (tmp_path / "root").mkdir()
    data = ["--data.root", str(tmp_path / "root"), "--data.train_annotations", "../labels/train.json",
            "--data.train_images", "../pictures/train", "--data.val_annotations", str(val),
            "--data.val_images", str(tmp_path / "pictures" / "val")]  # fmt: skip
    out = fit_then_evaluate(run_cli, data, tmp_path)
    metrics, predictions = read_metrics(out["test"]), printed_path(out["predict"], "predictions written: ")
    assert metrics["map"] == pytest.approx(cocoeval_map(val, predictions, tmp_path), abs=1e-6)
    assert np.isfinite(metrics["map_50"])
