"""YOLO data (Ultralytics data.yaml): path rules, label rows, negatives, bad rows, EXIF sizes, the cache, the CLI."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_tasks.data.formats import yolo, yolo_cache
from resnet_tasks.data.formats.yolo import YoloDetectionDataModule, build_index, list_split_images
from resnet_tasks.errors import UserError
from tests.conftest import COMMON_TRAINER_ARGS, printed_path, read_metrics, write_image, write_labels
from tests.conftest import make_yolo_roboflow as make_roboflow


@pytest.fixture
def roboflow(tmp_path: Path) -> Path:
    return make_roboflow(tmp_path / "export")


def objects(annotations, stem: str) -> tuple[np.ndarray, np.ndarray]:
    names = [Path(annotations.file_name(i)).stem for i in range(len(annotations))]
    span = annotations.objects(names.index(stem))
    return annotations.boxes[span], annotations.labels[span]


# ----------------------------------------------------------------------------------------------- data.yaml
def test_roboflow_export_reads_with_ultralytics_rules(roboflow: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = YoloDetectionDataModule(data_yaml=str(roboflow))
    out = capsys.readouterr().out
    assert out.count("no test split") == 1 and "test/images" in out  # named in data.yaml, absent on disk
    assert data.label_space.object_names == ("cat", "dog", "bird")
    assert data.label_space.category_ids[1:] == (0, 1, 2)  # YOLO's own 0-based ids; the background has none
    assert data.test_split == data.val_split

    train = data.annotations("train")
    assert sorted(Path(train.file_name(i)).name for i in range(len(train))) == [
        "a.jpg", "b.jpg", "empty.jpg", "nolabel.jpg", "poly.jpg"
    ]  # fmt: skip
    assert train.file_name(0).startswith("train/images/") and train.image_path(0).is_file()
    boxes, labels = objects(train, "a")  # 80 x 64 image; labels are class + 1
    np.testing.assert_allclose(boxes, [[20, 24, 60, 40], [16, 12, 24, 20]])
    assert labels.tolist() == [1, 3]
    boxes, labels = objects(train, "poly")  # a polygon row gives its bounding box
    np.testing.assert_allclose(boxes, [[8, 12.8, 40, 48]], rtol=1e-6)
    assert labels.tolist() == [2]
    assert len(objects(train, "empty")[0]) == 0 and len(objects(train, "nolabel")[0]) == 0
    summary = capsys.readouterr().out
    assert "5 images, 4 boxes (1 from polygons), 2 negatives (1 without a label file, 1 empty)" in summary
    assert str(train.result_image_id(0)) == Path(train.file_name(0)).stem  # results use the file stem


def test_negatives_train_unless_removed(roboflow: Path) -> None:
    assert len(YoloDetectionDataModule(data_yaml=str(roboflow), batch_size=1).dataset("train")) == 5
    kept = YoloDetectionDataModule(data_yaml=str(roboflow), batch_size=1, remove_images_without_annotations=True)
    assert len(kept.dataset("train")) == 3


def test_names_dict_path_key_txt_list_and_folder_list(tmp_path: Path) -> None:
    root = tmp_path / "datasets" / "mine"  # Ultralytics' own layout: images/<split>, labels/<split>
    for folder, stem in (("train", "t0"), ("extra", "x0"), ("val", "v0"), ("val", "v1")):
        write_image(root / "images" / folder / f"{stem}.png", size=(50, 40))
        write_labels(root / "labels" / folder / f"{stem}.txt", "1 0.5 0.5 0.2 0.5\n")
    (root / "val.txt").write_text("./images/val/v0.png\nimages/val/v1.png\n\n")
    config = tmp_path / "configs" / "mine.yaml"
    config.parent.mkdir()
    config.write_text(
        "path: ../datasets/mine\ntrain: [images/train, images/extra]\nval: val.txt\nnames:\n  0: person\n  1: car\n"
    )
    data = YoloDetectionDataModule(data_yaml=str(config))
    assert data.label_space.object_names == ("person", "car") and data.test_split == "val"
    train, val = data.annotations("train"), data.annotations("val")
    assert sorted(train.file_name(i) for i in range(2)) == ["images/extra/x0.png", "images/train/t0.png"]
    assert [val.file_name(i) for i in range(2)] == ["images/val/v0.png", "images/val/v1.png"]
    np.testing.assert_allclose(val.boxes[0], [20, 10, 30, 30])
    assert val.labels.tolist() == [2, 2]


def test_yaml_without_path_reads_splits_beside_it(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "train" / "a.jpg")
    write_labels(tmp_path / "labels" / "train" / "a.txt", "0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/train\nnames: [thing]\n")
    assert len(YoloDetectionDataModule(data_yaml=str(tmp_path / "data.yaml")).annotations("val")) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("val: ../valid/images\nnames: [a]\n", "has no 'train:' key"),
        ("train: ../train/images\nnames: [a]\n", "has no 'val:' key"),
        ("train: ../train/images\nval: ../nowhere/images\nnames: [a]\n", "'val: ../nowhere/images' points to"),
        ("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: [a, b, c]\n", "'nc: 2' but 'names' lists 3"),
        ("train: ../train/images\nval: ../valid/images\nnames: {0: a, 2: c}\n", "number the classes 0..1"),
        ("train: ../train/images\nval: ../valid/images\n", "neither 'names' nor 'nc'"),
        ("train: ../train/images\nval: [../valid/images\n", "Malformed YAML"),
    ],
)
def test_bad_data_yaml_is_one_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    config = make_roboflow(tmp_path / "export", text)
    with pytest.raises(UserError, match=message) as error:
        YoloDetectionDataModule(data_yaml=str(config))
    assert str(config) in str(error.value)


# ----------------------------------------------------------------------------------------------- label rows
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("3 0.5 0.5 0.1 0.1", r"class 3 is not among the 3 classes \(0..2\)"),
        ("-1 0.5 0.5 0.1 0.1", "class -1 is not among"),
        ("0.5 0.5 0.5 0.1 0.1", "class 0.5 is not among"),
        ("0 1.2 0.5 0.1 0.1", r"value 1.2 is outside 0..1"),
        ("0 0.5 0.5 0.1", "4 values"),
        ("0 0.1 0.1 0.2 0.2 0.3", "6 values"),
        ("0 0.5 abc 0.1 0.1", "is not all numbers"),
    ],
)
def test_a_bad_row_names_file_and_line(roboflow: Path, row: str, message: str) -> None:
    label = write_labels(roboflow.parent / "train" / "labels" / "b.txt", f"1 0.5 0.5 0.2 0.2\n{row}\n")
    data = YoloDetectionDataModule(data_yaml=str(roboflow))
    with pytest.raises(UserError, match=message) as error:
        data.annotations("train")
    assert str(error.value).startswith(f"{label}, line 2: ")
    assert not list(label.parent.parent.glob("*.cache"))  # nothing cached from a failed parse


def test_rounding_outside_the_image_is_clipped_and_counted(roboflow: Path) -> None:
    write_labels(roboflow.parent / "train" / "labels" / "b.txt", "1 0.5 0.5 1.005 1.0\n0 0.5 0.5 0 0.2\n")
    with pytest.warns(UserWarning, match="clipped 1 box.*dropped 1 degenerate"):
        train = YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("train")
    np.testing.assert_allclose(objects(train, "b")[0], [[0, 0, 80, 64]])


def test_exif_rotated_jpeg_uses_the_oriented_size(roboflow: Path) -> None:
    write_image(roboflow.parent / "train" / "images" / "b.jpg", size=(80, 40), orientation=6)  # shown 40 x 80
    write_labels(roboflow.parent / "train" / "labels" / "b.txt", "1 0.5 0.5 0.5 0.5\n")
    train = YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("train")
    index = [Path(train.file_name(i)).stem for i in range(len(train))].index("b")
    assert (train.heights[index], train.widths[index]) == (80, 40)
    np.testing.assert_allclose(objects(train, "b")[0], [[10, 20, 30, 60]])


def test_unreadable_and_unsupported_images_are_counted(roboflow: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (roboflow.parent / "train" / "images" / "b.jpg").write_bytes(b"not an image")
    (roboflow.parent / "train" / "images" / "scan.tif").write_bytes(b"")
    train = YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("train")
    assert len(train) == 4
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s), e.g. Corrupt or unreadable image" in out and "ignored 1 .tif file(s)" in out


def test_split_without_any_label_file_is_an_error(roboflow: Path) -> None:
    for label in (roboflow.parent / "valid" / "labels").iterdir():
        label.unlink()
    with pytest.raises(UserError, match="none of its 2 images has a label file"):
        YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("val")


def test_label_path_replaces_the_last_images_folder() -> None:
    image = os.path.join("/data", "images", "set", "images", "x.y.jpg")
    assert yolo.label_file(image) == os.path.join("/data", "images", "set", "labels", "x.y.txt")


def test_parallel_parse_equals_the_serial_one(roboflow: Path) -> None:
    root = roboflow.parent
    images, _ = list_split_images((root / "train" / "images",), root)
    serial = build_index(images, str(root), 3, "s").annotations
    parallel = build_index(images, str(root), 3, "s", chunk_size=2).annotations  # 3 chunks over the worker pool
    for name in ("file_names", "image_ids", "heights", "widths", "offsets", "boxes", "labels", "areas"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(parallel, name), err_msg=name)


# ----------------------------------------------------------------------------------------------- cache
def test_cache_is_read_then_rebuilt_when_a_label_changes(
    roboflow: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("train")
    cache = roboflow.parent / "train" / "labels.resnet-tasks-train.cache"
    assert cache.is_file() and f"cached in {cache}" in capsys.readouterr().out

    def no_parse(*args: object) -> None:
        raise AssertionError("parsed although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(yolo, "_index_chunk", no_parse)
        train = YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("train")
    assert f"read from the cache {cache}" in capsys.readouterr().out
    np.testing.assert_allclose(objects(train, "a")[0], [[20, 24, 60, 40], [16, 12, 24, 20]])

    label = write_labels(roboflow.parent / "train" / "labels" / "a.txt", "2 0.5 0.5 0.25 0.25\n")
    os.utime(label, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    train = YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("train")
    assert "indexed in" in capsys.readouterr().out
    np.testing.assert_allclose(objects(train, "a")[0], [[30, 24, 50, 40]])


def test_read_only_labels_folder_caches_under_cache_dir(
    roboflow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = roboflow.parent
    writable = yolo_cache.writable
    monkeypatch.setattr(yolo_cache, "writable", lambda folder: dataset not in folder.parents and writable(folder))
    cache_dir = tmp_path / "user-cache"
    YoloDetectionDataModule(data_yaml=str(roboflow), cache_dir=str(cache_dir)).annotations("val")
    assert not list(dataset.rglob("*.cache"))
    cached = list((cache_dir / "yolo").glob("*-val.cache"))
    assert len(cached) == 1 and f"cached in {cached[0]}" in capsys.readouterr().out
    YoloDetectionDataModule(data_yaml=str(roboflow), cache_dir=str(cache_dir)).annotations("val")
    assert f"read from the cache {cached[0]}" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_really_read_only_dataset_falls_back_to_cache_dir(roboflow: Path, tmp_path: Path) -> None:
    folders = [roboflow.parent / "valid", roboflow.parent / "valid" / "labels"]
    for folder in folders:
        folder.chmod(0o555)
    try:
        YoloDetectionDataModule(data_yaml=str(roboflow), cache_dir=str(tmp_path / "c")).annotations("val")
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert list((tmp_path / "c" / "yolo").glob("*-val.cache"))


def test_second_process_waits_for_the_one_building_the_cache(
    roboflow: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    built = YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("val")
    cache = roboflow.parent / "valid" / "labels.resnet-tasks-val.cache"
    stored = cache.read_bytes()
    cache.unlink()
    marker = cache.with_name(cache.name + ".building")
    marker.touch()  # another process claimed the build

    def the_other_process_finishes() -> None:
        time.sleep(0.3)
        partial = cache.with_name(".partial")
        partial.write_bytes(stored)
        partial.replace(cache)
        marker.unlink()

    monkeypatch.setattr(yolo, "_index_chunk", lambda *args: pytest.fail("parsed instead of waiting"))
    capsys.readouterr()
    thread = threading.Thread(target=the_other_process_finishes)
    thread.start()
    waited = YoloDetectionDataModule(data_yaml=str(roboflow)).annotations("val")
    thread.join()
    assert "written by another process" in capsys.readouterr().out
    np.testing.assert_array_equal(waited.boxes, built.boxes)


# ----------------------------------------------------------------------------------------------- CLI
def test_fit_validate_predict_through_the_cli(run_cli, tmp_path: Path) -> None:
    """A few steps on a Roboflow export, then validate and predict with the yaml's class names and ids."""
    from tests.conftest import ALL_BOXES, SMALL_DETECTOR
    from tests.conftest import DETECTION_QUICKSTART as QUICKSTART

    SMALL = SMALL_DETECTOR
    config = make_roboflow(tmp_path / "export")
    data = ["--data", "resnet_tasks.YoloDetectionDataModule", "--data.data_yaml", str(config), *SMALL]
    code, out, err = run_cli("fit", "--config", QUICKSTART, *data, "--trainer.max_steps", "2", "--trainer.max_epochs",
                             "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir",
                             str(tmp_path / "fit"), *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err
    assert "no test split" in out and "YOLO train: 5 images" in out
    checkpoint = next((tmp_path / "fit").rglob("last.ckpt"))
    common = ["--config", QUICKSTART, *data, *ALL_BOXES, "--model.weights", str(checkpoint), *COMMON_TRAINER_ARGS]
    code, out, err = run_cli("validate", *common, "--trainer.default_root_dir", str(tmp_path / "validate"))
    assert code == 0, err
    assert "map_50" in read_metrics(out)
    code, out, err = run_cli("predict", *common, "--trainer.default_root_dir", str(tmp_path / "predict"))
    assert code == 0, err
    results = json.loads(printed_path(out, "predictions written: ").read_text())
    assert results and {r["image_id"] for r in results} <= {"v0", "v1"}
    assert {r["category_id"] for r in results} <= {0, 1, 2}  # the yaml's class ids
