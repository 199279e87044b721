"""ClassificationTask end to end through the CLI: fit, validate, predict, checkpoints, CIFAR, parity."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnet_tasks import ClassificationTask
from resnet_tasks.data.classification import ImageFolderDataModule
from resnet_tasks.data.formats.cifar import CIFARDataModule
from resnet_tasks.errors import UserError
from tests.conftest import COMMON_TRAINER_ARGS, printed_path, read_metrics
from tests.conftest import write_cifar10 as _write_cifar10

IMAGENET_CONFIG = "configs/classification/imagenet_resnet50.yaml"
SMALL_DATA = ["--data.crop_size", "32", "--data.resize_size", "36", "--data.num_workers", "0",
              "--data.batch_size", "8"]  # fmt: skip
SMALL_MODEL = ["--model.backbone.name", "resnet18", "--model.optimizer.lr", "0.01"]


@pytest.fixture(scope="module")
def trained_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short fit on the tiny ImageFolder, shared by the tests below."""
    from resnet_tasks.cli import main

    root_dir = tmp_path_factory.mktemp("run")
    args = [
        "fit",
        "--config",
        IMAGENET_CONFIG,
        "--data.root",
        str(image_folder),
        *SMALL_DATA,
        *SMALL_MODEL,
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(root_dir),
        "--trainer.log_every_n_steps",
        "1",
        *COMMON_TRAINER_ARGS,
    ]
    main(args)
    last = next(root_dir.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    return {"root_dir": root_dir, "ckpt": last}


def test_fit_writes_checkpoint_metrics_and_logs(trained_run: dict[str, Path]) -> None:
    version = trained_run["root_dir"] / "lightning_logs" / "version_0"
    checkpoints = sorted(p.name for p in (version / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any("val_top1" in name for name in checkpoints)
    # last.ckpt is the latest state (the end of epoch 2), whichever epoch scored best
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert (version / "metrics.csv").is_file() and (version / "config.yaml").is_file()
    metrics = (version / "metrics.json").read_text()
    assert '"top1"' in metrics and '"top5"' in metrics
    assert list((trained_run["root_dir"] / "tensorboard" / "version_0").glob("events.*"))


def test_validate_top1_equals_predictions_csv_accuracy(
    run_cli, trained_run: dict[str, Path], image_folder: Path, tmp_path: Path
) -> None:
    common = ["--config", IMAGENET_CONFIG, "--data.root", str(image_folder), *SMALL_DATA, *SMALL_MODEL,
              "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(trained_run["ckpt"]),
              *COMMON_TRAINER_ARGS]  # fmt: skip
    code, out, err = run_cli("validate", *common)
    assert code == 0, err
    metrics = read_metrics(out)
    assert set(metrics) >= {"top1", "top5"} and all(0 <= metrics[k] <= 1 for k in ("top1", "top5"))

    code, out, err = run_cli("predict", *common)
    assert code == 0, err
    rows = list(csv.DictReader(printed_path(out, "predictions written: ").open()))
    assert len(rows) == 3 * 8  # every validation image exactly once
    assert {"image", "target", "top1_class", "top1_prob", "top3_class"} <= set(rows[0])
    accuracy = np.mean([row["top1_class"] == row["target"] for row in rows])
    assert metrics["top1"] == pytest.approx(accuracy, abs=1e-6)
    top3_hits = np.mean([row["target"] in (row["top1_class"], row["top2_class"], row["top3_class"]) for row in rows])
    assert metrics["top5"] == pytest.approx(top3_hits, abs=1e-6)  # 3 classes: top-5 clips to top-3
    probs = [float(row["top1_prob"]) for row in rows]
    assert all(float(row["top1_prob"]) >= float(row["top2_prob"]) for row in rows) and max(probs) <= 1.0


def test_load_from_checkpoint_needs_no_arguments(trained_run: dict[str, Path]) -> None:
    model = ClassificationTask.load_from_checkpoint(trained_run["ckpt"], map_location="cpu")
    assert model.label_space.class_names == ("blue", "green", "red")
    assert model.num_classes == 3 and model.hparams["backbone"]["name"] == "resnet18"
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_parity_with_torchvision_resnet18_top5(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our predict with torchvision's IMAGENET1K_V1 file gives torchvision's own top-5 on 256x256 images."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    # Random weights but realistic statistics so the logits spread out (no ties in the top-5).
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.1, 0.1)
    reference.eval()
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        smooth = rng.random((8, 8, 3)) * 255
        image = np.asarray(Image.fromarray(smooth.astype(np.uint8)).resize((256, 256), Image.BILINEAR))
        Image.fromarray(image).save(images_dir / f"img{i}.jpg", quality=92)

    code, out, err = run_cli(
        "predict", "--config", IMAGENET_CONFIG, "--model.backbone.name", "resnet18",
        "--model.weights", "ResNet18_Weights.IMAGENET1K_V1", "--data.predict_path", str(images_dir),
        "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run"), *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    rows = {row["image"]: row for row in csv.DictReader(printed_path(out, "predictions written: ").open())}
    preprocess = weights.transforms()
    categories = weights.meta["categories"]
    for path in sorted(images_dir.iterdir()):
        with torch.no_grad():
            probs = reference(preprocess(Image.open(path).convert("RGB")).unsqueeze(0)).softmax(1)[0]
        top = probs.topk(5)
        row = rows[path.name]
        assert [row[f"top{i}_class"] for i in range(1, 6)] == [categories[j] for j in top.indices.tolist()]
        ours = [float(row[f"top{i}_prob"]) for i in range(1, 6)]
        assert ours == pytest.approx(top.values.tolist(), abs=1e-4)


def test_cifar_split_and_transforms(tmp_path: Path) -> None:
    root = _write_cifar10(tmp_path)
    data = CIFARDataModule(root=str(root), val_size=10, num_workers=0, batch_size=4)
    assert data.num_classes == 10 and data.label_space.name(3) == "class3"
    train, val, test = data.dataset("train"), data.dataset("val"), data.dataset("test")
    assert (len(train), len(val), len(test)) == (50, 10, 20)
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    # evaluation is normalisation only (after the transfer): pixel (0,0) of image 0 of the test set, channel 0
    raw = test.images[0][0, 0, 0] / 255.0
    batch = data.on_after_batch_transfer(torch.utils.data.default_collate([test[0]]), 0)
    assert batch["image"][0, 0, 0, 0].item() == pytest.approx((raw - 0.4914) / 0.2470, abs=1e-5)
    # the held-out split is disjoint from training and stable across instances
    again = CIFARDataModule(root=str(root), val_size=10, num_workers=0).dataset("val")
    assert np.array_equal(val.images, again.images)


def test_cifar_missing_files_are_explained(tmp_path: Path) -> None:
    data = CIFARDataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        data.dataset("train")


def test_cifar_config_trains_a_step(run_cli, tmp_path: Path) -> None:
    root = _write_cifar10(tmp_path / "cifar")
    code, out, err = run_cli(
        "fit", "--config", "configs/classification/cifar10_resnet20.yaml", "--data.root", str(root),
        "--data.val_size", "10", "--data.batch_size", "16", "--data.num_workers", "0",
        "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path / "run"), *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    assert "top1" in read_metrics(out)


def test_imagefolder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="train/"):
        ImageFolderDataModule(root=str(tmp_path / "flat"))
    with pytest.raises(UserError, match="--data.root"):
        ImageFolderDataModule(root=None)


def test_whole_model_weights_with_other_class_count_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)
    with pytest.raises(UserError, match="--model.backbone.weights"):
        ClassificationTask(num_classes=3, backbone={"name": "resnet18"}, weights=str(path))
    model = ClassificationTask(num_classes=7, backbone={"name": "resnet18"}, weights=str(path))
    model.load_pretrained()
    assert torch.equal(model.fc.weight, torch.load(path)["fc.weight"])


def test_mixup_cutmix_and_label_smoothing_train(image_folder: Path) -> None:
    model = ClassificationTask(num_classes=3, backbone={"name": "resnet18"}, mixup_alpha=0.2, cutmix_alpha=1.0,
                               label_smoothing=0.1)  # fmt: skip
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    losses = model.training_losses(batch)
    assert set(losses) == {"loss_cls"} and torch.isfinite(losses["loss_cls"])
    losses["loss_cls"].backward()
    assert model.fc.weight.grad is not None


def test_plot_draws_training_curves_and_the_error_figure(run_cli, trained_run: dict[str, Path], tmp_path: Path) -> None:
    from resnet_tasks.plot import find_metrics_csv, read_curves

    curves = read_curves(find_metrics_csv(trained_run["root_dir"]))
    assert len(curves["train/error"]) == 6 and len(curves["val/top1"]) == 2
    assert all(0.0 <= value <= 1.0 for _, value in curves["train/error"])
    for extra in ([], ["--error"]):
        out_png = tmp_path / f"plot{len(extra)}.png"
        code, out, err = run_cli("plot", trained_run["root_dir"], *extra, "--out", out_png)
        assert code == 0, err
        with Image.open(out_png) as image:
            assert image.size[0] > 400 and image.getextrema() != ((255, 255),) * 3
    code, out, err = run_cli("plot", tmp_path / "nothing-here")
    assert code == 2 and "No metrics.csv" in err
