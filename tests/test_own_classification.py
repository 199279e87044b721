"""Classification from CSV files of (image, label): columns, `../` paths, the stratified val split, the errors,
and the CLI end to end (fit, validate, test on val, predict)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

from resnet_tasks.data.classification import ImageFolderDataModule
from resnet_tasks.data.formats.csv import CsvClassificationDataModule
from resnet_tasks.errors import UserError
from tests.conftest import COMMON_TRAINER_ARGS, make_csv_dataset, make_image_folder, printed_path, read_metrics


def module(root: Path, **kwargs) -> CsvClassificationDataModule:
    options = dict(root=str(root), train_csv="train.csv", image_column="file", label_column="species",
                   crop_size=16, resize_size=20, batch_size=4, num_workers=0)  # fmt: skip
    return CsvClassificationDataModule(**{**options, **kwargs})


def test_csv_rows_columns_and_the_stratified_val_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_csv_dataset(tmp_path)
    data = module(root, split_seed=3)
    assert data.label_space.class_names == ("blue", "green", "red")  # sorted labels
    data.setup("fit")
    assert "train.csv has no val split: holding out 10%" in capsys.readouterr().out
    train, val = data.dataset("train"), data.dataset("val")
    assert len(train) + len(val) == 18 and len(val) == 3  # one per class (10% of 6 rounds to 1)
    assert sorted(int(label) for label in val.labels) == [0, 1, 2]
    names = [name.decode() for name in val.names]
    assert all(name.startswith("../photos/") for name in names)  # named as the CSV writes them
    assert not set(names) & {name.decode() for name in train.names}
    item = val[0]
    assert item["image"].shape == (3, 16, 16) and item["name"] == names[0]
    again = module(root, split_seed=3)
    assert [n.decode() for n in again.dataset("val").names] == names  # validate/test recompute the same split
    assert [n.decode() for n in module(root, split_seed=4).dataset("val").names] != names
    data.setup("test")
    assert "no test split: test evaluates the val split" in capsys.readouterr().out
    assert data.dataset("test") is val


def test_csv_given_val_and_class_names(tmp_path: Path) -> None:
    root = make_csv_dataset(tmp_path)
    (root / "val.csv").write_text("species,file\nred,../photos/red0.jpg\n\nblue,../photos/blue1.jpg\n")
    data = module(root, val_csv="val.csv", class_names=["red", "green", "blue", "yellow"])
    assert data.label_space.class_names == ("red", "green", "blue", "yellow")
    assert len(data.dataset("train")) == 18  # a val CSV: nothing held out
    assert data.dataset("val").labels.tolist() == [0, 2]


def test_csv_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    root = make_csv_dataset(tmp_path)
    with pytest.raises(UserError, match=r"train\.csv has no column 'image' \(its columns: file, species\)"):
        module(root, image_column="image")
    (root / "val.csv").write_text("file,species\n../photos/red0.jpg,purple\n")
    with pytest.raises(UserError, match=r"val\.csv has label 'purple' \(line 2\), which is not in the training CSV"):
        module(root, val_csv="val.csv").dataset("val")
    (root / "val.csv").write_text("file,species\n../photos/nope.jpg,red\n")
    with pytest.raises(UserError, match=r"Missing image .*photos/nope\.jpg \(listed in .*val\.csv\)"):
        module(root, val_csv="val.csv").dataset("val")
    with pytest.raises(UserError, match=r"Missing CSV file .*absent\.csv"):
        module(root, train_csv="absent.csv")
    with pytest.raises(UserError, match="val_fraction must be between 0 and 1"):
        module(root, val_fraction=1.5).dataset("train")


def test_image_folder_without_val_holds_out_a_stratified_share(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_image_folder(tmp_path / "folder", per_class=5, splits=("train",))
    data = ImageFolderDataModule(root=str(root), crop_size=16, resize_size=20, num_workers=0)
    data.setup("validate")
    assert "train has no val split: holding out 10%" in capsys.readouterr().out
    names = [name.decode() for name in data.dataset("val").names]
    assert len(names) == 3 and sorted(name.split("/")[1] for name in names) == ["blue", "green", "red"]
    assert len(data.dataset("train")) == 12 and not set(names) & {n.decode() for n in data.dataset("train").names}
    data.setup("test")
    assert "no test split: test evaluates the val split" in capsys.readouterr().out
    make_image_folder(root, per_class=2, splits=("val",))  # with a val folder, it is the val split ...
    assert len(ImageFolderDataModule(root=str(root), num_workers=0).dataset("val")) == 6
    explicit = ImageFolderDataModule(root=str(root), num_workers=0, val_fraction=0.4, split_seed=1)
    assert len(explicit.dataset("val")) == 6 and len(explicit.dataset("train")) == 9  # ... unless a share is asked


def test_csv_cli_fit_validate_test_predict(tmp_path: Path, run_cli: Callable) -> None:
    root = make_csv_dataset(tmp_path / "data")
    common = [
        "--model", "ClassificationTask", "--model.backbone.name", "resnet20", "--data", "CsvClassificationDataModule",
        "--data.root", root, "--data.train_csv", "train.csv", "--data.image_column", "file",
        "--data.label_column", "species", "--data.val_fraction", "0.34", "--data.crop_size", "16",
        "--data.resize_size", "20", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.default_root_dir", tmp_path / "runs", *COMMON_TRAINER_ARGS,
    ]  # fmt: skip
    code, out, err = run_cli("fit", *common, "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0")
    assert code == 0, err
    split_file = printed_path(out, "val split written: ")
    assert split_file == tmp_path / "runs/lightning_logs/version_0/val_split.txt"
    held_out = split_file.read_text().splitlines()
    assert len(held_out) == 6 and all(line.startswith("../photos/") for line in held_out)
    checkpoint = printed_path(out, "best checkpoint: ")
    code, out, err = run_cli("validate", *common, "--ckpt_path", checkpoint)
    assert code == 0, err
    assert "top1" in read_metrics(out)
    code, out, err = run_cli("test", *common, "--ckpt_path", checkpoint)
    assert code == 0, err
    assert "no test split: test evaluates the val split" in out
    code, out, err = run_cli("predict", *common, "--ckpt_path", checkpoint)
    assert code == 0, err
    rows = list(csv.DictReader(printed_path(out, "predictions written: ").open()))
    assert sorted(row["image"] for row in rows) == sorted(held_out)
    assert {row["target"] for row in rows} == {"red", "green", "blue"}
