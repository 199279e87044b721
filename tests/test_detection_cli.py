"""Detection end to end through the CLI: fit, test, predict; metrics.json agrees with COCOeval on predictions.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ALL_BOXES, COMMON_TRAINER_ARGS, cocoeval_stats, make_tiny_coco, printed_path, read_metrics
from tests.conftest import DETECTION_QUICKSTART as QUICKSTART
from tests.conftest import SMALL_DETECTOR as SMALL

# Clean annotations (no degenerate boxes, which we drop and COCOeval would keep), with a crowd region and an
# image without objects; large objects so that even an untrained detector finds a few.
CLEAN_COCO = {
    "train2017": [
        ("t0", (64, 80), [(2, [4, 6, 40, 34], 0, None), (5, [40, 20, 38, 40], 0, None)]),
        ("t1", (64, 80), [(9, [10, 10, 50, 50], 0, None)]),
        ("t2", (64, 80), [(5, [20, 12, 36, 40], 0, None), (2, [0, 0, 30, 30], 0, None)]),
        ("t3", (64, 80), [(9, [8, 8, 60, 50], 0, None)]),
    ],
    "val2017": [
        ("v0", (64, 80), [(2, [6, 8, 40, 40], 0, 900.0), (5, [42, 20, 36, 40], 0, None)]),
        ("v1", (80, 64), [(9, [10, 12, 44, 60], 0, None), (2, [0, 40, 40, 38], 1, 1200.0)]),
        ("v2", (64, 64), []),
        # Many large objects of every class: even an untrained detector's boxes hit some at IoU 0.5.
        *[
            (
                f"v{i}",
                (64, 80),
                [(2, [0, 0, 80, 64], 0, None), (5, [2 * i, 4, 44, 56], 0, None), (9, [30, 6, 50 - 2 * i, 58], 0, None)],
            )
            for i in range(3, 12)
        ],
    ],
}
# Large anchors (not weights: the 2-step checkpoint loads with other sizes), so that the boxes hit the image-sized
# objects and the comparison below is not one of two zeros.
LARGE_BOXES = ["--model.anchor_sizes", "[[48], [64], [96], [128], [160]]"]


def _cocoeval_map(annotation_file: Path, results_file: Path) -> dict[str, float]:
    stats = cocoeval_stats(annotation_file, results_file)
    return {"map": stats[0], "map_50": stats[1]}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from resnet_tasks.cli import main

    coco = make_tiny_coco(tmp_path_factory.mktemp("coco"), CLEAN_COCO)
    run = tmp_path_factory.mktemp("run")
    main(["fit", "--config", QUICKSTART, "--data.root", str(coco), *SMALL, "--trainer.max_steps", "2",
          "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir",
          str(run), *COMMON_TRAINER_ARGS])  # fmt: skip
    return {"coco": coco, "ckpt": next(run.glob("lightning_logs/version_0/checkpoints/last.ckpt")), "run": run}


def test_fit_validates_and_checkpoints_on_val_map(fitted: dict[str, Path]) -> None:
    version = fitted["run"] / "lightning_logs" / "version_0"
    assert any("val_map" in p.name for p in (version / "checkpoints").glob("*.ckpt"))
    metrics = json.loads((version / "metrics.json").read_text())
    assert {"map", "map_50", "map_75", "mar_100"} <= set(metrics)


def test_test_metrics_equal_cocoeval_on_predictions_json(run_cli, fitted: dict[str, Path], tmp_path: Path) -> None:
    # --model.weights, not --ckpt_path: Lightning's CLI lets a checkpoint's hyper-parameters override the command
    # line, and this test needs other evaluation settings than the fit used.
    common = ["--config", QUICKSTART, "--data.root", str(fitted["coco"]), *SMALL, *ALL_BOXES, *LARGE_BOXES,
              "--model.weights", str(fitted["ckpt"]), *COMMON_TRAINER_ARGS]  # fmt: skip
    code, out, err = run_cli("test", *common, "--trainer.default_root_dir", str(tmp_path / "test"))
    assert code == 0, err
    metrics = read_metrics(out)
    code, out, err = run_cli("predict", *common, "--trainer.default_root_dir", str(tmp_path / "predict"))
    assert code == 0, err
    predictions = printed_path(out, "predictions written: ")
    results = json.loads(predictions.read_text())
    annotation_file = fitted["coco"] / "annotations" / "instances_val2017.json"
    image_ids = {image["id"] for image in json.loads(annotation_file.read_text())["images"]}
    assert {r["image_id"] for r in results} <= image_ids  # the dataset's own (non-contiguous) ids
    assert {r["category_id"] for r in results} <= {2, 5, 9}  # the dataset's category ids
    assert all(r["bbox"][0] + r["bbox"][2] <= 80.01 and r["bbox"][1] + r["bbox"][3] <= 80.01 for r in results)
    assert list((predictions.parent / "pictures").glob("*.jpg"))
    reference = _cocoeval_map(annotation_file, predictions)
    assert reference["map_50"] > 0.01  # not a comparison of two zeros
    for name in ("map", "map_50"):
        assert metrics[name] == pytest.approx(reference[name], abs=1e-4)


def test_checkpoint_as_whole_model_weights_and_folder_predict(run_cli, fitted: dict[str, Path], tmp_path: Path) -> None:
    """A fit checkpoint as --model.weights: same label space (names, ids) without any dataset root."""
    code, out, err = run_cli("predict", "--config", QUICKSTART, "--data.predict_path",
                             str(fitted["coco"] / "val2017"), "--model.weights", str(fitted["ckpt"]), *SMALL,
                             *ALL_BOXES, "--trainer.default_root_dir", str(tmp_path), *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err
    results = json.loads(printed_path(out, "predictions written: ").read_text())
    assert {r["image_id"] for r in results} == {f"v{i}" for i in range(12)}  # file stems for a folder
    assert {r["category_id"] for r in results} <= {2, 5, 9}


def test_missing_dataset_is_one_clear_error(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("validate", "--config", QUICKSTART, "--data.root", str(tmp_path), *SMALL,
                             *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 2 and "instances_val2017.json" in err and "Traceback" not in err


def test_folder_predict_from_ckpt_path_keeps_the_checkpoint_label_space(
    run_cli, fitted: dict[str, Path], tmp_path: Path
) -> None:
    """No dataset, so the data announces no label space: the checkpoint's (names, category ids) stays."""
    folder = tmp_path / "images"
    folder.mkdir()
    for stem in ("v0", "v1"):
        shutil.copy(fitted["coco"] / "val2017" / f"{stem}.jpg", folder / f"{stem}.jpg")
    code, out, err = run_cli("predict", "--config", QUICKSTART, "--data.predict_path", str(folder),
                             "--ckpt_path", str(fitted["ckpt"]), *ALL_BOXES, "--trainer.default_root_dir",
                             str(tmp_path), *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 0, err
    results = json.loads(printed_path(out, "predictions written: ").read_text())
    assert results and {r["image_id"] for r in results} <= {"v0", "v1"}
    assert {r["category_id"] for r in results} <= {2, 5, 9}


def test_two_files_with_one_stem_stop_predict_before_any_work(run_cli, fitted: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(fitted["coco"] / "val2017" / "v0.jpg", folder / "x.jpg")
    Image.open(folder / "x.jpg").save(folder / "x.webp")
    code, out, err = run_cli("predict", "--config", QUICKSTART, "--data.predict_path", str(folder),
                             "--model.weights", str(fitted["ckpt"]), *SMALL, "--trainer.default_root_dir",
                             str(tmp_path / "run"), *COMMON_TRAINER_ARGS)  # fmt: skip
    assert code == 2 and "x.jpg" in err and "x.webp" in err and "Traceback" not in err
    assert not list((tmp_path / "run").rglob("predictions.json"))
