"""COCO as VOC-class semantic segmentation: masks against a pycocotools oracle, torchvision's training filter,
its evaluation protocol, and torchvision-layout FCN weights giving torchvision's outputs through the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from resnet_tasks.backbones import BackboneConfig
from resnet_tasks.data.formats.coco_segmentation import COCO_VOC_CATEGORY_IDS, CocoSegmentationDataModule
from resnet_tasks.errors import UserError
from resnet_tasks.labels import IGNORE_INDEX
from resnet_tasks.tasks.segmentation import SegmentationTask
from tests.conftest import COMMON_TRAINER_ARGS, make_tiny_coco_segmentation, read_metrics

# torchvision's references/segmentation/coco_utils.py CAT_LIST: index = VOC class, value = COCO category id.
TORCHVISION_CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_coco_segmentation(tmp_path_factory.mktemp("coco_segmentation"))


def module(root: Path, **kwargs) -> CocoSegmentationDataModule:
    options = dict(root=str(root), batch_size=2, eval_batch_size=2, num_workers=0, crop_size=32, base_size=40)
    options.update(kwargs)
    return CocoSegmentationDataModule(**options)


# -- the oracle: pycocotools' annToMask with torchvision's rules, written out -------------------------------------
def oracle_mask(coco: COCO, image_id: int) -> np.ndarray:
    info = coco.imgs[image_id]
    target = np.zeros((info["height"], info["width"]), dtype=np.int64)
    count = np.zeros_like(target)
    for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
        if annotation["category_id"] not in TORCHVISION_CAT_LIST:
            continue  # not a VOC category
        instance = coco.annToMask(annotation).astype(np.int64)
        target = np.maximum(target, instance * TORCHVISION_CAT_LIST.index(annotation["category_id"]))
        count += instance
    target[count > 1] = 255  # pixels of more than one instance are ignored
    return target.astype(np.uint8)


def oracle_train_ids(coco: COCO) -> list[int]:
    """torchvision's `_has_valid_annotation`: VOC-category annotations (crowd too) with `area` summing over 1000."""
    kept = []
    for image_id in sorted(coco.imgs):
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
                       if a["category_id"] in TORCHVISION_CAT_LIST]  # fmt: skip
        if annotations and sum(a["area"] for a in annotations) > 1000:
            kept.append(image_id)
    return kept


def reference_eval(path: Path, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's reference evaluation preset: PIL, shorter side to `size` (image antialiased bilinear, mask
    nearest), to float, normalise."""
    image = TF.resize(Image.open(path).convert("RGB"), [size], antialias=True)
    target = TF.resize(Image.fromarray(mask), [size], interpolation=InterpolationMode.NEAREST)
    tensor = TF.normalize(TF.convert_image_dtype(TF.pil_to_tensor(image), torch.float), mean=MEAN, std=STD)
    return tensor, torch.as_tensor(np.array(target))


def test_category_list_is_torchvisions() -> None:
    assert list(COCO_VOC_CATEGORY_IDS) == TORCHVISION_CAT_LIST


def test_masks_equal_the_pycocotools_oracle(coco_root: Path) -> None:
    coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    data = module(coco_root, eval_protocol="original", eval_size=None)
    assert data.num_classes == 21 and data.label_space.class_names[:2] == ("background", "aeroplane")
    data.setup("validate")
    dataset = data.dataset("val")
    assert len(dataset) == 5  # evaluation keeps every image, empty ones too
    masks = {}
    for index in range(len(dataset)):
        item = dataset[index]
        image_id = int(dataset.annotations.image_ids[index])
        masks[item["stem"]] = item["mask"].numpy()
        assert np.array_equal(masks[item["stem"]], oracle_mask(coco, image_id)), item["stem"]
        assert tuple(item["size"]) == item["mask"].shape
    # The generated data holds every case the rules are about.
    overlaps = masks["overlaps"]
    assert overlaps[5, 5] == 15 and overlaps[25, 30] == 7  # person, car
    assert (overlaps[12:24, 16:24] == IGNORE_INDEX).all()  # person under car: ignored
    assert (overlaps[5:8, 19:24] == IGNORE_INDEX).all()  # person under person: ignored
    assert (overlaps[9:15, 40:50] == 12).all()  # the dog under the fire hydrant stays dog
    assert overlaps[30, 4] == 15  # the crowd region is painted like the rest
    assert overlaps[37, 13] == IGNORE_INDEX and overlaps[32, 26] == 5  # bottle over the crowd; bottle part 2
    assert not masks["empty"].any() and not masks["only_other"].any()
    assert set(np.unique(masks["crowd_counts"]).tolist()) == {0, 13, 17, 255}


def test_training_keeps_images_over_1000_annotated_pixels(coco_root: Path) -> None:
    coco = COCO(str(coco_root / "annotations" / "instances_train2017.json"))
    data = module(coco_root)
    data.setup("fit")
    train = data.dataset("train")
    assert train.annotations.image_ids.tolist() == oracle_train_ids(coco) == [1, 5]  # crowd area counts
    for index in range(len(train)):
        assert np.array_equal(train.annotations.mask(index), oracle_mask(coco, int(train.annotations.image_ids[index])))
    seen: set[int] = set()
    for batch in data.train_dataloader():
        assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
        seen.update(batch["mask"].unique().tolist())
    assert seen <= set(range(21)) | {IGNORE_INDEX} and len(seen) > 2


@pytest.mark.parametrize("size", [32, 52])  # shrinking (antialiased) and enlarging
def test_torchvision_protocol_resizes_image_and_mask_as_torchvision(coco_root: Path, size: int) -> None:
    coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    data = module(coco_root, eval_protocol="torchvision", eval_size=size)
    data.setup("test")
    batches = [data.on_after_batch_transfer(batch, 0) for batch in data.test_dataloader()]  # normalised
    assert sum(len(batch["stem"]) for batch in batches) == 5
    stem_to_id = {Path(info["file_name"]).stem: image_id for image_id, info in coco.imgs.items()}
    for batch in batches:
        assert batch["size"] == batch["input_size"]  # scored at the resized size
        for k, stem in enumerate(batch["stem"]):
            image, mask = reference_eval(Path(batch["path"][k]), oracle_mask(coco, stem_to_id[stem]), size)
            assert batch["size"][k] == tuple(mask.shape) and min(mask.shape) == size
            torch.testing.assert_close(batch["image"][k], image, rtol=0, atol=1e-5)
            assert torch.equal(batch["mask"][k], mask)
    # The default protocol resizes only the network input; masks (and predictions) keep the original size.
    original = module(coco_root, eval_size=size)
    original.setup("predict")
    for dataset in (original.dataset("val"), original.dataset("predict")):
        item = dataset[0]
        assert tuple(item["mask"].shape) == tuple(item["size"]) == (40, 56)
        assert min(item["input_size"]) == size
    torchvision_predict = module(coco_root, eval_protocol="torchvision", eval_size=size).dataset("predict")
    assert tuple(torchvision_predict[0]["size"]) == (40, 56)  # predict writes masks at the original size


def torchvision_fcn(path: Path, seed: int) -> tuple[torch.nn.Module, Path]:
    """A randomly initialised torchvision FCN R50 (eval mode) and its weights saved at `path`."""
    torch.manual_seed(seed)
    reference = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).eval()
    torch.save(reference.state_dict(), path)
    return reference, path


def test_torchvision_fcn_weights_give_torchvision_outputs(coco_root: Path, tmp_path: Path) -> None:
    reference, weights = torchvision_fcn(tmp_path / "fcn_resnet50.pth", seed=0)
    task = SegmentationTask(weights=str(weights), backbone=BackboneConfig(name="resnet50"))
    task.load_pretrained()
    task.eval()
    coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    data = module(coco_root, eval_protocol="torchvision", eval_size=24)
    data.setup("test")
    [batch] = [b for b in data.test_dataloader() if len(b["stem"]) == 2][:1]  # the two 40x56 images in one batch
    batch = data.on_after_batch_transfer(batch, 0)  # the model's input, as the Trainer makes it
    stem_to_id = {Path(info["file_name"]).stem: image_id for image_id, info in coco.imgs.items()}
    references = [
        reference_eval(Path(path), oracle_mask(coco, stem_to_id[stem]), 24)
        for path, stem in zip(batch["path"], batch["stem"])
    ]
    with torch.no_grad():
        ours = task(batch["image"])
        theirs = reference(torch.stack([image for image, _ in references]))["out"]
        task.test_step(batch, 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # torchvision's ConfusionMatrix on its own outputs and targets equals the task's metric state.
    target = torch.stack([mask for _, mask in references]).flatten().long()
    prediction = theirs.argmax(1).flatten()
    valid = (target >= 0) & (target < 21)
    confusion = torch.bincount(21 * target[valid] + prediction[valid], minlength=21 * 21).reshape(21, 21)
    assert torch.equal(task.test_metrics.confusion, confusion)


def test_cli_test_command_scores_torchvision_weights(run_cli, coco_root: Path, tmp_path: Path) -> None:
    """The recipe's `test` command with a torchvision-layout file: metrics equal torchvision's evaluation."""
    reference, weights = torchvision_fcn(tmp_path / "fcn.pth", seed=1)
    code, out, err = run_cli(
        "test", "--config", "configs/segmentation/coco_voc_fcn_resnet50.yaml", "--model.weights", str(weights),
        "--data.root", str(coco_root), "--data.eval_size", "24", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(tmp_path / "runs"), *COMMON_TRAINER_ARGS,
    )  # fmt: skip
    assert code == 0, err
    metrics = read_metrics(out)
    coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    confusion = torch.zeros(21, 21, dtype=torch.int64)
    with torch.no_grad():
        for image_id, info in coco.imgs.items():  # torchvision's evaluate(): one image at a time
            image, mask = reference_eval(coco_root / "val2017" / info["file_name"], oracle_mask(coco, image_id), 24)
            prediction = reference(image[None])["out"].argmax(1).flatten()
            target = mask.flatten().long()
            valid = (target >= 0) & (target < 21)
            confusion += torch.bincount(21 * target[valid] + prediction[valid], minlength=441).reshape(21, 21)
    confusion = confusion.double()
    assert metrics["pixel_acc"] == pytest.approx(float(confusion.diagonal().sum() / confusion.sum()), abs=1e-6)
    union = confusion.sum(0) + confusion.sum(1) - confusion.diagonal()
    present = union > 0  # classes absent from targets and predictions have no IoU (torchvision: NaN)
    miou = float((confusion.diagonal()[present] / union[present]).mean())
    assert metrics["miou"] == pytest.approx(miou, abs=1e-6)


def _write(root: Path, split: str, data: dict) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["categories"].__setitem__(0, {"id": 1, "name": "circle"}), "COCO's id 1 is 'person'"),
        (lambda d: d["annotations"][0].__setitem__("image_id", 999), "image id 999"),
        (lambda d: d["annotations"][0].pop("segmentation"), "semantic masks need polygons"),
        (lambda d: d["annotations"][3]["segmentation"].__setitem__("size", [10, 10]), "RLE segmentation of size"),
    ],
    ids=["foreign categories", "unknown image", "boxes only", "rle size"],
)
def test_bad_annotation_files_name_the_problem(tmp_path: Path, coco_root: Path, change, message: str) -> None:
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    change(data)
    _write(tmp_path, "val2017", data)
    with pytest.raises(UserError, match=message):
        module(tmp_path).setup("validate")


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="instances_val2017.json"):
        module(tmp_path).setup("validate")
    with pytest.raises(UserError, match="--data.root"):
        CocoSegmentationDataModule().setup("validate")
    with pytest.raises(UserError, match="eval_protocol"):
        CocoSegmentationDataModule(eval_protocol="mmseg")  # type: ignore[arg-type]
