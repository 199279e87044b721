"""Weights loading: torchvision enum names from the offline hub cache, .pth, .ckpt, prefixes, every error."""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from resnet_tasks.backbones import (
    build_backbone,
    extract_backbone_state_dict,
    load_state_dict_into,
    load_weights_spec,
)
from resnet_tasks.errors import UserError


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def random_resnet18_state_dict() -> OrderedDict[str, torch.Tensor]:
    """torchvision's resnet18 layout (fc included) with deterministic random values, BN statistics too."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)
    return model.state_dict()


@pytest.fixture(scope="module")
def tv_state() -> OrderedDict[str, torch.Tensor]:
    return random_resnet18_state_dict()


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory, tv_state) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(tv_state, path)
    return path


def assert_loaded(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[prefix + key]), key


def test_pth_in_torchvision_layout_loads_and_reports_the_fc_keys(tv_file, tv_state) -> None:
    model = build_backbone("resnet18", weights=str(tv_file))
    assert_loaded(model, tv_state)
    report = model.weights_report
    assert report.unexpected == ["fc.weight", "fc.bias"]
    assert len(report.matched) == len(tv_state) - 2 and not report.missing and not report.shape_mismatched
    assert "fc.weight" in report.summary()


def test_enum_name_is_read_from_the_hub_cache(monkeypatch, tmp_path, tv_state) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / os.path.basename(urlparse(url).path)
    cached.parent.mkdir(parents=True)
    torch.save(tv_state, cached)
    state_dict, meta = load_weights_spec("ResNet18_Weights.IMAGENET1K_V1")
    assert len(meta["categories"]) == 1000
    assert set(state_dict) == set(tv_state)
    model = build_backbone("resnet18", weights="ResNet18_Weights.DEFAULT")  # alias of IMAGENET1K_V1
    assert_loaded(model, tv_state)


def test_absent_enum_file_names_the_exact_path_and_url(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    expected = tmp_path / "empty_home" / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    with pytest.raises(UserError) as error:
        build_backbone("resnet50", weights="ResNet50_Weights.IMAGENET1K_V2")
    assert str(expected) in str(error.value) and weights.url in str(error.value)
    assert not expected.exists()  # nothing was downloaded


def test_whole_model_enum_resolves_to_its_own_file(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"):
        load_weights_spec("FasterRCNN_ResNet50_FPN_Weights.COCO_V1")


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [
        ("Resnet18_Weights.IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"),
        ("ResNet50_Weights.IMAGENET1K_V3", "ResNet50_Weights.IMAGENET1K_V2"),
    ],
)
def test_unknown_enum_name_suggests_close_names(spec: str, suggestion: str) -> None:
    with pytest.raises(UserError, match="unknown torchvision weights") as error:
        load_weights_spec(spec)
    assert suggestion in str(error.value)


def test_lightning_ckpt_backbone_part_is_taken(tmp_path, tv_state) -> None:
    state = {f"backbone.{k}": v for k, v in tv_state.items() if not k.startswith("fc.")}
    state["head.weight"] = torch.zeros(3, 512)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"num_classes": 3}, "resnet_tasks": {"x": 1}}, path)
    _, meta = load_weights_spec(str(path))
    assert meta == {"hyper_parameters": {"num_classes": 3}, "resnet_tasks": {"x": 1}}
    model = build_backbone("resnet18", weights=str(path))
    assert_loaded(model, tv_state)
    assert model.weights_report.unexpected == []


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "model._orig_mod.backbone.body."])
def test_wrapper_prefixes_are_stripped(tmp_path, tv_state, prefix: str) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in tv_state.items()}, path)
    model = build_backbone("resnet18", weights=str(path))
    assert_loaded(model, tv_state)


def test_detection_style_file_without_bn_counters_loads(tmp_path, tv_state) -> None:
    # Faster R-CNN checkpoints use FrozenBatchNorm2d: no num_batches_tracked, backbone under backbone.body.
    state = {
        f"backbone.body.{k}": v
        for k, v in tv_state.items()
        if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
    }
    state["backbone.fpn.inner_blocks.0.0.weight"] = torch.zeros(256, 64, 1, 1)
    state["roi_heads.box_head.fc6.weight"] = torch.zeros(8, 8)
    path = tmp_path / "detector.pth"
    torch.save(state, path)
    model = build_backbone("resnet18", weights=str(path))
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, tv_state[key]), key
    assert model.weights_report.tolerated_missing and not model.weights_report.missing


def test_frozen_bn_backbone_loads_a_torchvision_file_and_computes_the_same(tv_file) -> None:
    frozen = build_backbone("resnet18", weights=str(tv_file), norm="frozen_bn")
    plain_bn = build_backbone("resnet18", weights=str(tv_file)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(frozen(x)["layer4"], plain_bn(x)["layer4"], atol=1e-5)


def test_wrong_backbone_file_fails_with_a_key_summary_and_a_hint(tv_file) -> None:
    with pytest.raises(UserError) as error:
        build_backbone("resnet50", weights=str(tv_file))
    message = str(error.value)
    assert "missing" in message and "shape" in message and str(tv_file) in message
    assert "looks like resnet18 weights" in message


class _CodeOnLoad:
    """Pickles to a call of ``open(marker, "w")``: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_file_that_would_run_code_is_refused(tmp_path, tv_state) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": dict(tv_state), "payload": _CodeOnLoad(marker)}, path)
    with pytest.raises(UserError, match="execute code on load"):
        build_backbone("resnet18", weights=str(path))
    assert not marker.exists()


def test_nonexistent_and_unreadable_files_are_user_errors(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(UserError, match="not found") as error:
        build_backbone("resnet18", weights=str(missing))
    assert str(missing) in str(error.value)
    truncated = tmp_path / "truncated.pth"
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    truncated.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(UserError, match="cannot read weights file") as error:
        load_weights_spec(str(truncated))
    assert str(truncated) in str(error.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(UserError, match=str(garbage)):
        load_weights_spec(str(garbage))
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(UserError, match="does not hold a state dict"):
        load_weights_spec(str(not_a_state_dict))


def test_load_state_dict_into_is_generic() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    source = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    report = load_state_dict_into(
        model, {"module." + k: v for k, v in source.items()} | {"extra.weight": torch.zeros(1)}, source="s"
    )
    assert report.counts() == {"matched": 4, "missing": 0, "unexpected": 1, "shape_mismatched": 0}
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="1 missing"):
        load_state_dict_into(model, {k: v for k, v in source.items() if k != "2.bias"}, source="s")
    with pytest.raises(UserError, match=r"2\.weight \(file \[2, 4\] vs model \[2, 3\]\)"):
        load_state_dict_into(model, source | {"2.weight": torch.zeros(2, 4)}, source="s", what="detector")


def test_extract_backbone_state_dict_finds_the_prefix() -> None:
    backbone = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 1), bn1=nn.BatchNorm2d(4)))
    own = backbone.state_dict()
    state = {f"model.backbone.body.{k}": v for k, v in own.items()}
    state |= {"model.head.bn1.weight": torch.zeros(4), "model.backbone.fpn.layer.weight": torch.zeros(1)}
    extracted = extract_backbone_state_dict(state, backbone)
    assert set(extracted) == set(own)
    unrelated = {"unrelated": torch.zeros(1)}
    assert extract_backbone_state_dict(unrelated, backbone) == unrelated
