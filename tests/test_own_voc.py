"""VOC XML detection data as people export it: Roboflow's "Pascal VOC" (split folders of `x.png` beside `x.xml`,
`valid/`), LabelImg / CVAT (`Annotations/` + `JPEGImages/`, with or without `ImageSets/Main`), `<part>` children,
another image extension than `<filename>` says, negatives, class names from the XMLs, the bad cases, the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_tasks.data.formats.voc import VOCDetectionDataModule
from resnet_tasks.errors import UserError
from tests.conftest import (
    ALL_BOXES,
    COMMON_TRAINER_ARGS,
    DETECTION_QUICKSTART,
    SMALL_DETECTOR,
    draw_boxes,
    fit_one_step_then_evaluate,
    printed_path,
    read_metrics,
)

# (stem, [(name, (xmin, ymin, xmax, ymax))]); large boxes on 80 x 64 images; "empty" is a negative.
TRAIN = [
    ("a", [("dog", (4, 6, 44, 40)), ("cat", (40, 20, 78, 60))]),
    ("b", [("dog", (10, 10, 60, 60))]),
    ("c", [("cat", (20, 12, 56, 52))]),
    ("empty", []),
    ("d", [("cat", (8, 8, 68, 58)), ("dog", (0, 0, 80, 64))]),
    ("e", [("dog", (2, 2, 70, 60))]),
]
VALID = [(f"v{i}", [("cat", (0, 0, 80, 64)), ("dog", (2 * i, 4, 46, 60))]) for i in range(3)]
CLI = [*SMALL_DETECTOR, *ALL_BOXES, "--model.anchor_sizes", "[[48], [64], [96], [128], [160]]",
       "--model.rpn_post_nms_top_n_test", "50", *COMMON_TRAINER_ARGS]  # fmt: skip


def voc_xml(filename: str, objects: list, size: bool = True, parts: bool = False) -> str:
    """A LabelImg-style XML; with `parts`, each object holds a `<part>` (a named box of its own, not an object)."""
    text = f"<annotation><folder>x</folder><filename>{filename}</filename><path>/home/me/{filename}</path>"
    text += "<size><width>80</width><height>64</height><depth>3</depth></size>" if size else ""
    for name, (x0, y0, x1, y1) in objects:
        part = "<part><name>hand</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></part>"
        text += (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
                 f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
                 f"{part if parts else ''}</object>")  # fmt: skip
    return text + "</annotation>"


def write_pair(images: Path, xmls: Path, stem: str, objects: list, extension: str = ".jpg", **xml: bool) -> None:
    """The image `stem + extension` in `images` and its XML in `xmls` (whose `<filename>` says `.jpg`)."""
    images.mkdir(parents=True, exist_ok=True)
    xmls.mkdir(parents=True, exist_ok=True)
    boxes = [[x0, y0, x1 - x0, y1 - y0] for _, (x0, y0, x1, y1) in objects]
    Image.fromarray(draw_boxes((64, 80), boxes, len(stem))).save(images / f"{stem}{extension}")
    (xmls / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", objects, **xml))


def make_roboflow_voc(root: Path) -> Path:
    """Roboflow's "Pascal VOC" export: `train/` and `valid/` holding `x.png` beside `x.xml`."""
    for split, entries in (("train", TRAIN), ("valid", VALID)):
        for stem, objects in entries:
            write_pair(root / split, root / split, f"{stem}_png.rf.{len(stem):04x}", objects, ".png")
    return root


def make_labelimg(root: Path, image_sets: bool = False) -> Path:
    """LabelImg's folders: `Annotations/` + `JPEGImages/` (`.jpeg` files while the XMLs say `.jpg`), objects with
    `<part>`s; with `image_sets`, `ImageSets/Main/{train,val}.txt` and a per-class list that is no split."""
    for stem, objects in TRAIN + VALID:
        write_pair(root / "JPEGImages", root / "Annotations", stem, objects, ".jpeg", parts=True)
    if image_sets:
        lists = root / "ImageSets" / "Main"
        lists.mkdir(parents=True)
        (lists / "train.txt").write_text("".join(f"{stem}\n" for stem, _ in TRAIN))
        (lists / "val.txt").write_text("".join(f"{stem}\n" for stem, _ in VALID))
        (lists / "cat_train.txt").write_text("a  1\nb -1\n")
    return root


def module(root: Path, **kwargs) -> VOCDetectionDataModule:
    return VOCDetectionDataModule(root=str(root), batch_size=2, num_workers=0, **kwargs)


def stems(dataset) -> list[str]:
    annotations = dataset.annotations
    return sorted(Path(annotations.file_name(i)).stem.split("_png")[0] for i in range(len(annotations)))


# ----------------------------------------------------------------------------------------------- layouts
def test_roboflow_voc_export(tmp_path: Path, capsys) -> None:
    data = module(make_roboflow_voc(tmp_path / "export"))
    out = capsys.readouterr().out
    assert "VOC data: Roboflow layout" in out and "(train train, val valid)" in out
    assert "class names (the XMLs' object names, sorted; --data.class_names to choose): cat, dog" in out
    assert data.label_space.class_names == ("background", "cat", "dog")
    assert data.label_space.category_ids == (-1, 1, 2)
    data.setup("fit")
    val = data.dataset("val")
    assert stems(val) == ["v0", "v1", "v2"] and val.annotations.file_name(0).endswith(".png")
    _, target = val[0]
    assert target["boxes"].tolist() == [[0, 0, 80, 64], [0, 4, 46, 60]]  # as written (the devkit's -1 is VOC's own)
    assert target["labels"].tolist() == [1, 2] and target["image_key"].startswith("v0_png")
    assert len(data.dataset("train")) == 5  # the negative is not trained on by default ...
    assert "6 images, 7 boxes, 1 negatives (no object) not trained on" in capsys.readouterr().out  # ... and said
    assert len(module(tmp_path / "export", remove_images_without_annotations=False).dataset("train")) == 6
    assert data.dataset("test") is val and "no test split" in capsys.readouterr().out


def test_labelimg_without_image_sets_holds_out_val(tmp_path: Path, capsys) -> None:
    root = make_labelimg(tmp_path / "labelimg")
    data = module(root, remove_images_without_annotations=False)
    data.setup("fit")
    out = capsys.readouterr().out
    assert "VOC data: LabelImg/CVAT layout" in out and "(train all)" in out and "holding out 10%" in out
    assert data.label_space.object_names == ("cat", "dog")  # the parts ("hand") are no objects
    train, val = stems(data.dataset("train")), stems(data.dataset("val"))
    assert len(train) + len(val) == 9 and not set(train) & set(val) and val
    every = data.annotations("all")
    assert len(every.labels) == 13  # 7 + 6 objects, no part
    assert {Path(every.file_name(i)).suffix for i in range(len(every))} == {".jpeg"}  # the XMLs say .jpg
    assert data.dataset("test") is data.dataset("val")


def test_labelimg_with_image_sets_and_given_class_names(tmp_path: Path) -> None:
    root = make_labelimg(tmp_path / "labelimg", image_sets=True)
    data = module(root, class_names=["dog", "cat"])
    assert (data.train_split, data.val_split, data.test_split) == ("train", "val", None)
    assert data.label_space.object_names == ("dog", "cat")
    data.setup("fit")
    assert stems(data.dataset("val")) == ["v0", "v1", "v2"] and len(data.dataset("train")) == 5
    _, target = data.dataset("val")[0]
    assert target["labels"].tolist() == [2, 1]  # cat, dog in the order given
    combined = module(root, train_split="train+val", val_split="val")
    assert len(combined.dataset("train")) == 8
    with pytest.raises(UserError, match=r"no split 'cat_train' .* its splits are train, val"):
        module(root, val_split="cat_train")
    with pytest.raises(UserError, match=r"a\.xml has an object named 'dog', which is not among the classes \['cat'\]"):
        module(root, class_names=["cat"]).dataset("train")


def test_no_layout_ambiguous_images_and_no_objects_are_one_error_each(tmp_path: Path) -> None:
    (tmp_path / "nothing" / "images").mkdir(parents=True)
    with pytest.raises(UserError) as error:
        module(tmp_path / "nothing")
    assert all(
        layout in str(error.value) for layout in ("No VOC dataset", "(VOCdevkit", "(Roboflow)", "(LabelImg/CVAT)")
    )
    root = make_labelimg(tmp_path / "twice")
    Image.new("RGB", (80, 64)).save(root / "JPEGImages" / "a.png")
    with pytest.raises(UserError, match=r"a\.xml: its image is ambiguous, a\.jpeg and a\.png"):
        module(root).dataset("val")
    empty = tmp_path / "empty"
    write_pair(empty / "JPEGImages", empty / "Annotations", "x", [])
    with pytest.raises(UserError, match=r"No object in any XML .* pass --data.class_names"):
        module(empty)
    with pytest.raises(UserError, match=r"split 'all' .* has 1 item\(s\): too few to hold out a val split"):
        module(empty, class_names=["cat"]).dataset("train")


def test_size_missing_from_the_xml_is_read_from_the_image(tmp_path: Path) -> None:
    root = tmp_path / "nosize"
    for stem, objects in TRAIN:
        write_pair(root / "train", root / "train", stem, objects, ".png", size=False)
    data = module(root)
    annotations = data.annotations("train")
    assert set(annotations.widths.tolist()) == {80} and set(annotations.heights.tolist()) == {64}
    assert data.val_split is None  # no valid/: held out
    assert np.all(annotations.clipped_per_image == 0)


def test_inspect_counts_negatives_and_objects_without_parts(tmp_path: Path) -> None:
    from resnet_tasks.data.inspection import inspect_data

    data = inspect_data(module(make_labelimg(tmp_path / "labelimg", image_sets=True))).to_json()
    assert [(c["id"], c["name"], c["train"], c["val"]) for c in data["classes"]] == [(1, "cat", 3, 3), (2, "dog", 4, 3)]
    assert data["splits"]["train"]["negatives"] == 1 and data["problems"] == []


# ----------------------------------------------------------------------------------------------- the CLI
def fit_then_evaluate(run_cli: Callable, root: Path, tmp_path: Path, *extra: str) -> dict[str, str]:
    """`fit` one step on the VOC data at `root`, then `validate`, `test` and `predict`; the output of each."""
    args = ["--config", DETECTION_QUICKSTART, "--data", "resnet_tasks.VOCDetectionDataModule", "--data.root",
            str(root), *extra, *CLI]  # fmt: skip
    return fit_one_step_then_evaluate(run_cli, args, tmp_path)


def predictions(out: str) -> list[dict]:
    return json.loads(printed_path(out, "predictions written: ").read_text())


def test_roboflow_voc_through_the_cli(run_cli: Callable, tmp_path: Path) -> None:
    out = fit_then_evaluate(run_cli, make_roboflow_voc(tmp_path / "export"), tmp_path)
    assert "map_50" in read_metrics(out["validate"]) and "no test split" in out["test"]
    results = predictions(out["predict"])
    assert results and {r["image_id"].split("_png")[0] for r in results} <= {"v0", "v1", "v2"}
    assert {r["category_id"] for r in results} <= {1, 2}


def test_labelimg_without_image_sets_through_the_cli(run_cli: Callable, tmp_path: Path) -> None:
    out = fit_then_evaluate(run_cli, make_labelimg(tmp_path / "labelimg"), tmp_path)
    written = printed_path(out["fit"], "val split written: ").read_text().split()
    assert written and all(name.startswith("JPEGImages/") for name in written)
    assert {r["image_id"] for r in predictions(out["predict"])} <= {Path(name).stem for name in written}
    assert "map" in read_metrics(out["test"])


def test_labelimg_with_image_sets_through_the_cli(run_cli: Callable, tmp_path: Path) -> None:
    root = make_labelimg(tmp_path / "labelimg", image_sets=True)
    out = fit_then_evaluate(run_cli, root, tmp_path, "--data.train_split", "train", "--data.val_split", "val")
    assert {r["image_id"] for r in predictions(out["predict"])} <= {"v0", "v1", "v2"}
    assert "map_50" in read_metrics(out["validate"])
