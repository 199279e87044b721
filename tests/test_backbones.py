"""Backbone architecture tests: torchvision parity, CIFAR sizes, strides, freezing, norms, plain, v2."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FrozenBatchNorm2d

from resnet_tasks.backbones import (
    ResNetBackbone,
    backbone_table,
    build_backbone,
    list_backbones,
)
from resnet_tasks.backbones.blocks import PreActBasicBlock, PreActBottleneck, ZeroPadShortcut
from resnet_tasks.errors import UserError

TORCHVISION_NAMES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
CONTRACT_NAMES = TORCHVISION_NAMES + [
    "resnet200",
    "resnet18_v2",
    "resnet34_v2",
    "resnet50_v2",
    "resnet101_v2",
    "resnet152_v2",
    "resnet200_v2",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
    "resnet164_v2",
    "resnet1001_v2",
    "plain18",
    "plain34",
    "plain20",
    "plain32",
    "plain44",
    "plain56",
    "plain110",
]
STAGES4 = ("layer1", "layer2", "layer3", "layer4")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def randomise_norm_statistics(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial affine parameters and running statistics so eval parity means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)


def test_every_contract_name_is_registered() -> None:
    names = list_backbones()
    assert set(CONTRACT_NAMES) <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_state_dict_layout_matches_torchvision(name: str) -> None:
    with torch.device("meta"):
        ours = build_backbone(name)
        theirs = getattr(torchvision.models, name)(weights=None)
    expected = [(k, tuple(v.shape)) for k, v in theirs.state_dict().items() if not k.startswith("fc.")]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == expected


def test_resnet200_is_bottleneck_3_24_36_3() -> None:
    with torch.device("meta"):
        model = build_backbone("resnet200")
    assert [len(getattr(model, s)) for s in STAGES4] == [3, 24, 36, 3]
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    assert model.channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}


@pytest.mark.parametrize(
    ("name", "output_stride", "dilation"),
    [
        ("resnet18", 32, None),
        ("resnet50", 32, None),
        ("resnext50_32x4d", 32, None),
        ("resnet50", 8, [False, True, True]),  # FCN's backbone
        ("resnet50", 16, [False, False, True]),
    ],
)
def test_stage_outputs_match_torchvision(tmp_path, name: str, output_stride: int, dilation) -> None:
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=dilation)
    randomise_norm_statistics(theirs)
    path = tmp_path / f"{name}.pth"
    torch.save(theirs.state_dict(), path)
    ours = build_backbone(name, weights=str(path), output_stride=output_stride).eval()
    extractor = create_feature_extractor(theirs.eval(), return_nodes=list(STAGES4))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = extractor(x)
        got = ours(x)
    assert list(got) == list(STAGES4)
    for stage in STAGES4:
        assert got[stage].shape == expected[stage].shape
        assert (got[stage] - expected[stage]).abs().max().item() <= 1e-5, stage


@pytest.mark.parametrize(
    ("name", "paper_millions"),
    [
        ("resnet20", 0.27),
        ("resnet32", 0.46),
        ("resnet44", 0.66),
        ("resnet56", 0.85),
        ("resnet110", 1.7),
        ("resnet1202", 19.4),
        ("resnet164_v2", 1.7),
        ("resnet1001_v2", 10.2),
    ],
)
def test_cifar_parameter_counts_match_the_papers(name: str, paper_millions: float) -> None:
    with torch.device("meta"):
        model = build_backbone(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - paper_millions) / paper_millions < 0.05, params
    assert model.stage_names == ("layer1", "layer2", "layer3")
    assert list(model.strides.values()) == [1, 2, 4]


def test_cifar_shortcuts_are_parameter_free_option_a() -> None:
    model = build_backbone("resnet20")
    assert isinstance(model.layer2[0].downsample, ZeroPadShortcut)
    assert not list(model.layer2[0].downsample.parameters())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 16
    assert list(model.channels.values()) == [16, 32, 64]


@pytest.mark.parametrize(
    ("name", "output_stride", "strides"),
    [
        ("resnet18", 32, [4, 8, 16, 32]),
        ("resnet18", 16, [4, 8, 16, 16]),
        ("resnet18", 8, [4, 8, 8, 8]),
        ("resnet50_v2", 8, [4, 8, 8, 8]),
        ("resnet20", 32, [1, 2, 4]),
        ("resnet20", 8, [1, 2, 4]),
        ("resnet20", 2, [1, 2, 2]),
        ("resnet20", 1, [1, 1, 1]),
    ],
)
def test_declared_strides_match_feature_maps(name: str, output_stride: int, strides: list[int]) -> None:
    model = build_backbone(name, output_stride=output_stride).eval()
    assert list(model.strides.values()) == strides
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    for stage, stride in model.strides.items():
        assert features[stage].shape[-2:] == (64 // stride, 64 // stride), stage
        assert features[stage].shape[1] == model.channels[stage]


@pytest.mark.parametrize(("name", "output_stride"), [("resnet18", 4), ("resnet18", 12), ("resnet20", 3)])
def test_unsupported_output_stride_is_a_user_error(name: str, output_stride: int) -> None:
    with pytest.raises(UserError, match="output_stride"):
        build_backbone(name, output_stride=output_stride)


def test_frozen_stages_keep_weights_and_statistics() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18", frozen_stages=2)
    model.train()
    frozen = [model.conv1, model.bn1, model.layer1, model.layer2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in (model.layer3, model.layer4) for p in m.parameters())
    assert not model.bn1.training and not model.layer2[1].bn2.training
    assert model.layer3[0].bn1.training
    before_frozen = model.layer1[0].bn1.running_mean.clone()
    before_trained = model.layer3[0].bn1.running_mean.clone()
    features = model(torch.randn(2, 3, 64, 64))
    features["layer4"].mean().backward()
    assert torch.equal(model.layer1[0].bn1.running_mean, before_frozen)
    assert not torch.equal(model.layer3[0].bn1.running_mean, before_trained)
    assert model.layer1[0].conv1.weight.grad is None and model.conv1.weight.grad is None
    assert model.layer3[0].conv1.weight.grad is not None
    model.eval().train()  # toggling back to train must not thaw the frozen norms
    assert not model.layer1[0].bn1.training


@pytest.mark.parametrize("frozen_stages", [0, -1])
def test_frozen_stages_zero_and_minus_one_freeze_nothing(frozen_stages: int) -> None:
    model = build_backbone("resnet20", frozen_stages=frozen_stages).train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_freezing_every_stage_of_a_v2_net_includes_its_final_norm() -> None:
    model = build_backbone("resnet164_v2", frozen_stages=3).train()
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.final_norm.training


def test_frozen_stages_out_of_range_is_a_user_error() -> None:
    with pytest.raises(UserError, match="frozen_stages"):
        build_backbone("resnet20", frozen_stages=4)


def test_norm_options() -> None:
    frozen = build_backbone("resnet18", norm="frozen_bn")
    assert isinstance(frozen.bn1, FrozenBatchNorm2d)
    assert isinstance(frozen.layer2[0].downsample[1], FrozenBatchNorm2d)
    assert not any(k.endswith("num_batches_tracked") for k in frozen.state_dict())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    sync = build_backbone("resnet18", norm="sync_bn")
    assert isinstance(sync.layer4[1].bn2, nn.SyncBatchNorm)
    gn = build_backbone("resnet50", norm="gn")
    assert isinstance(gn.layer1[0].bn3, nn.GroupNorm) and gn.layer1[0].bn3.num_groups == 32
    cifar_gn = build_backbone("resnet20", norm="gn").train()
    assert cifar_gn.bn1.num_groups == 16  # 16 channels cannot form 32 groups
    assert cifar_gn(torch.randn(2, 3, 32, 32))["layer3"].shape == (2, 64, 8, 8)
    with pytest.raises(UserError, match="norm"):
        build_backbone("resnet18", norm="layernorm")


def zero_main_branch_convs(model: nn.Module) -> None:
    """Zero every convolution inside the stages except shortcut projections."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("layer") and ".downsample" not in name and isinstance(module, nn.Conv2d):
                module.weight.zero_()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet50_v2", "resnet20", "resnet164_v2"])
def test_shortcut_false_removes_every_residual_addition(name: str) -> None:
    # With the residual branches zeroed, only shortcuts can carry a signal: the residual net passes the stem's
    # output through to the last stage, the plain twin must output exact zeros at every stage.
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    outputs = {}
    for shortcut in (True, False):
        torch.manual_seed(0)
        model = build_backbone(name, shortcut=shortcut).eval()
        zero_main_branch_convs(model)
        with torch.no_grad():
            outputs[shortcut] = model(x)
    assert outputs[True]["layer1"].abs().sum() > 0 and outputs[True][list(outputs[True])[-1]].abs().sum() > 0
    for stage, value in outputs[False].items():
        assert torch.count_nonzero(value) == 0, stage


def test_plain_names_are_the_shortcut_free_twins() -> None:
    for depth in (18, 34, 20, 32, 44, 56, 110):
        with torch.device("meta"):
            plain = build_backbone(f"plain{depth}")
            twin = build_backbone(f"resnet{depth}", shortcut=False)
        assert [k for k in plain.state_dict()] == [k for k in twin.state_dict()]
        assert all(not b.shortcut for s in plain.stage_names for b in getattr(plain, s))
        assert all(b.downsample is None for s in plain.stage_names for b in getattr(plain, s))
    # The downsampling stays in the main branch: the strided 3x3 conv of the first block of layer2.
    assert build_backbone("plain18").layer2[0].conv1.stride == (2, 2)
    restored = build_backbone("plain20", shortcut=True)
    assert isinstance(restored.layer2[0].downsample, ZeroPadShortcut)


def test_v2_blocks_preactivate_their_input_and_end_with_bn_relu() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet50_v2").eval()
    randomise_norm_statistics(model)
    block = model.layer2[0]
    assert isinstance(block, PreActBottleneck)
    calls: list[tuple[str, torch.Tensor]] = []
    leaves = {n: m for n, m in block.named_modules() if not list(m.children())}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, args[0].clone())))
        for n, m in leaves.items()
    ]
    block_input = {}
    handles.append(block.register_forward_pre_hook(lambda mod, args: block_input.update(x=args[0].clone())))
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    first_name, first_input = calls[0]
    assert first_name == "bn1" and torch.equal(first_input, block_input["x"])
    # the projection shortcut sees the pre-activated input, relu(bn1(x))
    projection_input = dict(calls)["downsample.0"]
    with torch.no_grad():
        assert torch.allclose(projection_input, torch.relu(block.bn1(block_input["x"])))
    assert isinstance(model.final_norm, nn.BatchNorm2d) and model.bn1.__class__ is nn.Identity
    assert features["layer4"].min() >= 0  # final BN-ReLU
    assert features["layer3"].min() < 0  # intermediate stages end on a clean addition, no activation
    assert isinstance(build_backbone("resnet18_v2").layer1[0], PreActBasicBlock)


def test_zero_init_residual_makes_blocks_start_as_identity() -> None:
    model = build_backbone("resnet18", zero_init_residual=True).eval()
    assert all(block.bn2.weight.abs().sum() == 0 for block in model.layer1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        assert torch.allclose(model(x)["layer1"], stem)
    v2 = build_backbone("resnet50_v2", zero_init_residual=True)
    assert v2.layer1[0].conv3.weight.abs().sum() == 0
    with pytest.raises(UserError, match="zero_init_residual"):
        build_backbone("plain18", zero_init_residual=True)


def test_unknown_backbone_lists_the_closest_names() -> None:
    with pytest.raises(UserError, match="resnet50") as error:
        build_backbone("resent50")
    assert "unknown backbone 'resent50'" in str(error.value)


def test_backbone_table_describes_every_backbone() -> None:
    rows = {row["name"]: row for row in backbone_table()}
    assert list(rows) == list_backbones()
    assert abs(rows["resnet50"]["params_m"] - 23.5) < 0.1
    assert rows["resnet20"]["channels"] == [16, 32, 64] and rows["resnet20"]["strides"] == [1, 2, 4]
    assert rows["resnext50_32x4d"]["strides"] == [4, 8, 16, 32]


def test_backbone_is_a_resnet_backbone_with_ordered_stage_declarations() -> None:
    model = build_backbone("resnet34")
    assert isinstance(model, ResNetBackbone)
    assert model.stage_names == STAGES4
    assert tuple(model.channels) == STAGES4 and tuple(model.strides) == STAGES4
    assert not hasattr(model, "fc")
