"""Tests of the bundled shapes dataset: determinism, the three real layouts, and ensure_shapes' caching."""

from __future__ import annotations

import json
import multiprocessing
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from resnet_tasks.data import shapes, shapes_scenes
from resnet_tasks.data.masks import VOC_PALETTE
from resnet_tasks.data.shapes import (
    COCO_CATEGORY_IDS,
    SHAPE_CLASSES,
    ensure_shapes,
    generate_shapes,
)
from resnet_tasks.errors import UserError

SMALL = {"num_train": 24, "num_val": 8, "image_size": 64, "seed": 3}
SPLITS = {"train": 24, "val": 8}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _voc(root: Path) -> Path:
    return root / "voc" / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "shapes", **SMALL)


@pytest.fixture(scope="module")
def cocos(dataset: Path) -> dict[str, COCO]:
    return {split: COCO(str(dataset / "coco" / "annotations" / f"instances_{split}2017.json")) for split in SPLITS}


def test_same_seed_gives_byte_identical_files(dataset: Path, tmp_path: Path) -> None:
    again = _files(generate_shapes(tmp_path / "again", **SMALL))
    assert again == _files(dataset)
    other = _files(generate_shapes(tmp_path / "other", **{**SMALL, "seed": 4}))
    # Same file names except the ImageFolder class folders (another seed draws other dominant classes).
    assert {k for k in other if "imagefolder" not in k} == {k for k in again if "imagefolder" not in k}
    assert other["coco/annotations/instances_train2017.json"] != again["coco/annotations/instances_train2017.json"]


def test_voc_palette_is_the_standard_colour_map() -> None:
    assert len(VOC_PALETTE) == 768
    rgb = [tuple(VOC_PALETTE[3 * i : 3 * i + 3]) for i in range(256)]
    assert rgb[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert rgb[255] == (224, 224, 192)


def test_layouts_are_complete_and_share_stems(dataset: Path, cocos: dict[str, COCO]) -> None:
    assert SHAPE_CLASSES == ("circle", "square", "triangle")
    voc = _voc(dataset)
    stems = {
        split: [line for line in (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()] for split in SPLITS
    }
    assert [len(stems[s]) for s in SPLITS] == list(SPLITS.values())
    assert (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split() == stems["train"] + stems["val"]
    for split in (*SPLITS, "trainval"):
        main = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text()
        assert (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text() == main
    for split, split_stems in stems.items():
        assert all(stem.startswith("shapes_") and len(stem) == len("shapes_000000") for stem in split_stems)
        coco_files = sorted(image["file_name"] for image in cocos[split].dataset["images"])
        assert coco_files == sorted(f"{stem}.jpg" for stem in split_stems)
        for stem in split_stems:
            jpeg = (dataset / "coco" / f"{split}2017" / f"{stem}.jpg").read_bytes()
            assert (voc / "JPEGImages" / f"{stem}.jpg").read_bytes() == jpeg
            assert (voc / "Annotations" / f"{stem}.xml").is_file()
            assert (voc / "SegmentationClass" / f"{stem}.png").is_file()
        non_empty = {cocos[split].imgs[i]["file_name"] for i in cocos[split].getImgIds() if cocos[split].getAnnIds(i)}
        foldered = {p.name for p in (dataset / "imagefolder" / split).rglob("*.jpg")}
        assert foldered == non_empty  # empty scenes are skipped in the ImageFolder layout only
        assert sorted(p.name for p in (dataset / "imagefolder" / split).iterdir()) == list(SHAPE_CLASSES)
    manifest = json.loads((dataset / "shapes.json").read_text())
    assert manifest["params"] == SMALL and manifest["version"] == shapes.SHAPES_VERSION


def test_coco_annotations_are_consistent(dataset: Path, cocos: dict[str, COCO]) -> None:
    for split, coco in cocos.items():
        assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {
            v: k for k, v in COCO_CATEGORY_IDS.items()
        }
        assert sorted(COCO_CATEGORY_IDS.values()) != list(range(1, len(SHAPE_CLASSES) + 1))  # non-contiguous
        assert all(c["supercategory"] for c in coco.dataset["categories"])
        empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i)]
        assert 1 <= len(empty) < len(coco.getImgIds()) // 2, f"{split} needs a few empty scenes"
        counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
        assert max(counts) <= 4
        for ann in coco.loadAnns(coco.getAnnIds()):
            image = coco.imgs[ann["image_id"]]
            assert (image["width"], image["height"]) == (SMALL["image_size"],) * 2
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann)
            assert mask.shape == (image["height"], image["width"])
            assert mask.sum() == ann["area"] > 0
            assert mask_utils.area(ann["segmentation"]) == ann["area"]
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) for v in ann["bbox"]) and w > 0 and h > 0
            ys, xs = np.nonzero(mask)
            # The box is the whole drawn object; the mask only its visible part: the mask lies inside the box.
            assert x <= xs.min() and xs.max() + 1 <= x + w and y <= ys.min() and ys.max() + 1 <= y + h
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        for image_id in coco.getImgIds():
            masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            if masks:  # visible masks of one image never overlap
                assert np.stack(masks).sum(axis=0).max() == 1


def _imagefolder_files(dataset: Path, cocos: dict[str, COCO]) -> Iterator[tuple[str, str, Path, list[dict]]]:
    """(split, scene file name, its ImageFolder file, annotations largest first) for every non-empty scene."""
    for split, coco in cocos.items():
        for image_id in coco.getImgIds():
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=image_id)), key=lambda a: -a["area"])
            if anns:
                name = coco.imgs[image_id]["file_name"]
                [path] = list((dataset / "imagefolder" / split).glob(f"*/{name}"))
                yield split, name, path, anns


def test_imagefolder_label_is_the_clearly_largest_object(dataset: Path, cocos: dict[str, COCO]) -> None:
    names = {v: k for k, v in COCO_CATEGORY_IDS.items()}
    for _split, _name, path, anns in _imagefolder_files(dataset, cocos):
        assert path.parent.name == names[anns[0]["category_id"]]
        if len(anns) > 1:
            assert anns[0]["area"] >= 1.5 * anns[1]["area"]


def test_imagefolder_image_is_a_crop_centred_on_the_largest_object(dataset: Path, cocos: dict[str, COCO]) -> None:
    size = SMALL["image_size"]
    for split, name, path, anns in _imagefolder_files(dataset, cocos):
        crop = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert crop.shape == (size // 2, size // 2, 3)
        x, y, w, h = anns[0]["bbox"]
        left, top, side = shapes_scenes.crop_window((int(x), int(y), int(x + w), int(y + h)), size)
        # The window holds the whole box, with context, and stays inside the image.
        assert left <= x and top <= y and x + w <= left + side + 1e-6 and y + h <= top + side + 1e-6
        assert 0 <= left and 0 <= top and left + side <= size and top + side <= size
        assert side >= min(1.3 * max(w, h), size) - 1e-6
        # Its pixels are the scene's pixels there (both JPEGs: compare loosely).
        scene = Image.open(dataset / "coco" / f"{split}2017" / name).convert("RGB")
        expected = np.asarray(
            scene.resize((size // 2,) * 2, Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)),
            dtype=np.float32,
        )
        assert np.abs(crop - expected).mean() < 6.0


def test_voc_xml_boxes_match_coco_boxes(dataset: Path, cocos: dict[str, COCO]) -> None:
    names = {v: k for k, v in COCO_CATEGORY_IDS.items()}
    for coco in cocos.values():
        for image_id in coco.getImgIds():
            stem = Path(coco.imgs[image_id]["file_name"]).stem
            root = ET.parse(_voc(dataset) / "Annotations" / f"{stem}.xml").getroot()
            assert root.findtext("filename") == f"{stem}.jpg" and root.findtext("size/depth") == "3"
            assert root.findtext("size/width") == str(SMALL["image_size"])
            from_xml = []
            for obj in root.findall("object"):
                assert obj.findtext("difficult") == "0" and obj.findtext("truncated") == "0"
                box = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
                from_xml.append((obj.findtext("name"), box))
            from_coco = []
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                x, y, w, h = ann["bbox"]
                # 1-based inclusive VOC pixel indices from COCO's 0-based pixel-edge XYWH.
                from_coco.append((names[ann["category_id"]], [int(x) + 1, int(y) + 1, int(x + w), int(y + h)]))
            assert from_xml == from_coco


def test_voc_segmentation_masks_match_coco_masks(dataset: Path, cocos: dict[str, COCO]) -> None:
    labels = {COCO_CATEGORY_IDS[name]: index + 1 for index, name in enumerate(SHAPE_CLASSES)}
    for coco in cocos.values():
        for image_id in coco.getImgIds():
            stem = Path(coco.imgs[image_id]["file_name"]).stem
            png = Image.open(_voc(dataset) / "SegmentationClass" / f"{stem}.png")
            assert png.mode == "P" and png.getpalette() == VOC_PALETTE
            seg = np.asarray(png)
            assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3, 255}
            expected = np.zeros_like(seg)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                expected[coco.annToMask(ann) == 1] = labels[ann["category_id"]]
            known = seg != 255
            assert np.array_equal(seg[known], expected[known])
            if expected.any():
                void = ~known
                # A thin void band at the outlines, not a blanket over the objects.
                assert 0 < void.sum() < (expected > 0).sum() + void.sum()
                assert (expected[void] > 0).any() and (expected[void] == 0).any()
                assert (seg[known] > 0).any()
            else:
                assert known.all()


def test_torchvision_datasets_read_every_layout(dataset: Path) -> None:
    datasets = torchvision.datasets
    coco = datasets.CocoDetection(
        str(dataset / "coco" / "train2017"),
        str(dataset / "coco" / "annotations" / "instances_train2017.json"),
    )
    assert len(coco) == SPLITS["train"]
    image, target = coco[1]
    assert image.size == (SMALL["image_size"],) * 2 and isinstance(target, list)
    for split, count in SPLITS.items():
        detection = datasets.VOCDetection(str(dataset / "voc"), year="2012", image_set=split, download=False)
        assert len(detection) == count
        sizes = set()
        for index in range(len(detection)):
            image, target = detection[index]
            objects = target["annotation"]["object"]
            assert all(obj["name"] in SHAPE_CLASSES for obj in objects)
            sizes.add(len(objects))
        assert 0 in sizes and max(sizes) > 1
        segmentation = datasets.VOCSegmentation(str(dataset / "voc"), year="2012", image_set=split, download=False)
        assert len(segmentation) == count
        image, mask = segmentation[0]
        assert image.mode == "RGB" and mask.mode == "P" and mask.size == image.size
        folder = datasets.ImageFolder(str(dataset / "imagefolder" / split))
        assert folder.classes == list(SHAPE_CLASSES)  # alphabetical order is SHAPE_CLASSES order
        assert len(folder) == count - sum(1 for _, n in _coco_counts(dataset, split) if n == 0)
        assert set(folder.targets) == {0, 1, 2}


def _coco_counts(root: Path, split: str) -> list[tuple[int, int]]:
    data = json.loads((root / "coco" / "annotations" / f"instances_{split}2017.json").read_text())
    counts = {image["id"]: 0 for image in data["images"]}
    for ann in data["annotations"]:
        counts[ann["image_id"]] += 1
    return sorted(counts.items())


def test_ensure_shapes_generates_once_and_regenerates_on_new_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data" / "shapes"
    params = {"num_train": 6, "num_val": 4, "image_size": 48}
    assert ensure_shapes(root, **params) == root
    first = capsys.readouterr()
    assert first.out == "" and str(root) in first.err and len(first.err.strip().splitlines()) == 1
    stamp = (root / "shapes.json").stat().st_mtime_ns
    assert ensure_shapes(root, **params) == root
    assert capsys.readouterr().err == ""  # nothing printed, nothing rewritten
    assert (root / "shapes.json").stat().st_mtime_ns == stamp
    ensure_shapes(root, **{**params, "num_val": 5})
    assert "generated" in capsys.readouterr().err
    assert json.loads((root / "shapes.json").read_text())["params"]["num_val"] == 5
    assert len(list((_voc(root) / "JPEGImages").iterdir())) == 11  # the stale copy is gone, not merged
    assert sorted(p.name for p in tmp_path.joinpath("data").iterdir()) == ["shapes"]  # no leftovers


def test_ensure_shapes_default_root_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(shapes.SHAPES_DIR_ENV, raising=False)
    assert ensure_shapes(num_train=3, num_val=2, image_size=32) == tmp_path / "data" / "shapes"
    monkeypatch.setenv(shapes.SHAPES_DIR_ENV, str(tmp_path / "elsewhere"))
    assert ensure_shapes(num_train=3, num_val=2, image_size=32) == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere" / "shapes.json").is_file()


def test_ensure_shapes_refuses_bad_input(tmp_path: Path) -> None:
    user_data = tmp_path / "mine"
    user_data.mkdir()
    (user_data / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a shapes dataset"):
        ensure_shapes(user_data, num_train=3, num_val=2, image_size=32)
    assert (user_data / "precious.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="num_train"):
        ensure_shapes(tmp_path / "x", num_train=0)
    with pytest.raises(UserError, match="unknown"):
        ensure_shapes(tmp_path / "x", num_images=5)


def test_ensure_shapes_discards_its_copy_when_another_process_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "shapes"
    params = {"num_train": 3, "num_val": 2, "image_size": 32, "seed": 0}
    real_generate = shapes.generate_shapes

    def racing_generate(staging: Path, **kwargs: int) -> Path:
        real_generate(root, **kwargs)  # the "other process" installs first
        return real_generate(staging, **kwargs)

    monkeypatch.setattr(shapes, "generate_shapes", racing_generate)
    assert not root.exists()
    assert ensure_shapes(root, **params) == root
    assert json.loads((root / "shapes.json").read_text())["params"] == params
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # our staging copy was removed


def _ensure_after_barrier(root: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    ensure_shapes(root, num_train=12, num_val=4, image_size=48, seed=1)


def test_concurrent_ensure_shapes_end_with_one_valid_dataset(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    root = tmp_path / "race" / "shapes"
    workers = [context.Process(target=_ensure_after_barrier, args=(str(root), barrier)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert [p.name for p in root.parent.iterdir()] == ["shapes"]  # no staging or stale copies left
    reference = generate_shapes(tmp_path / "reference", num_train=12, num_val=4, image_size=48, seed=1)
    assert _files(root) == _files(reference)
