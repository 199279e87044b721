"""Fine-tuning schedules on a tiny CIFAR ResNet, unit by unit: frozen means bit-identical, unfreezing by epoch,
warmup, layer-wise LRs, the printed lines, one-line config errors, LR factors in weights-only checkpoints, and new
class layers on whole-model weights. tests/test_finetune_tasks.py runs them through the three tasks (CLI, DDP,
resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_tasks.backbones import build_backbone
from resnet_tasks.errors import UserError
from resnet_tasks.tasks.finetune import FinetuneConfig, Finetuner, StageFactor, backbone_parts, param_group_table
from resnet_tasks.tasks.optim import OptimizerConfig, ScheduleFactor, SchedulerConfig, build_optimizer, parameter_groups
from resnet_tasks.tasks.weights import CLASS_LAYERS, load_with_new_classes

STEPS_PER_EPOCH = 2


class Net(nn.Module):
    """resnet20 (stem, layer1..layer3) + a linear head over the pooled last stage."""

    def __init__(self, name: str = "resnet20", frozen_stages: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = build_backbone(name, frozen_stages=frozen_stages)
        self.fc = nn.Linear(list(self.backbone.channels.values())[-1], 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = list(self.backbone(images).values())[-1]
        return self.fc(features.mean(dim=(2, 3)))


def batches(seed: int = 0, count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator))] * count


def optimiser(net: Net, finetuner: Finetuner, lr_mult: float = 1.0) -> tuple[Any, Any, list[dict[str, Any]]]:
    """What a task's configure_optimizers does: groups split per part, one LambdaLR factor per group."""
    config = OptimizerConfig(lr=0.1, weight_decay=1e-4, backbone_lr_mult=lr_mult)
    groups = finetuner.param_groups(parameter_groups(net, net.backbone, config))
    optimizer = build_optimizer(groups, config)
    schedule = ScheduleFactor(SchedulerConfig(name="constant"), 100, STEPS_PER_EPOCH, config.lr)
    lambdas = finetuner.lr_lambdas(groups, schedule, STEPS_PER_EPOCH)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas), groups


def train(net: nn.Module, finetuner: Finetuner, optimizer: Any, scheduler: Any, steps: int, data: list) -> None:
    """The task's training step: model.train() at each epoch start (as Lightning does), then per batch apply ->
    forward -> tie -> backward -> drop frozen grads -> step."""
    for step in range(steps):
        if step % STEPS_PER_EPOCH == 0:
            net.train()
        finetuner.apply(scheduler.last_epoch)
        images, labels = data[step % len(data)]
        loss = finetuner.tie(F.cross_entropy(net(images), labels))
        loss.backward()
        finetuner.drop_frozen_grads()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: nn.Module | dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    """Keys (weights and BN statistics) under `prefix` that differ from `before`."""
    after = after.state_dict() if isinstance(after, nn.Module) else after
    return {key for key in before if key.startswith(prefix) and not torch.equal(before[key], after[key])}


def run(config: FinetuneConfig, epochs: int, frozen_stages: int = 0) -> tuple[Net, dict[str, torch.Tensor]]:
    net = Net(frozen_stages=frozen_stages)
    finetuner = Finetuner(net.backbone, config)
    optimizer, scheduler, _ = optimiser(net, finetuner)
    before = snapshot(net)
    train(net, finetuner, optimizer, scheduler, epochs * STEPS_PER_EPOCH, batches())
    return net, before


def test_parts_are_the_stem_and_each_stage() -> None:
    assert [p.name for p in backbone_parts(build_backbone("resnet18"))] == [
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert [p.name for p in backbone_parts(build_backbone("resnet20"))] == ["stem", "layer1", "layer2", "layer3"]
    preact = backbone_parts(build_backbone("resnet18_v2"))
    assert any(isinstance(m, nn.BatchNorm2d) and m.num_features == 512 for m in preact[-1].modules)  # final norm
    frozen = backbone_parts(build_backbone("resnet18", frozen_stages=2))
    assert [p.fixed for p in frozen] == [True, True, True, False, False]


def test_freeze_keeps_every_backbone_tensor_bit_identical() -> None:
    net, before = run(FinetuneConfig(strategy="freeze"), epochs=2)
    assert changed(before, net, "backbone.") == set()  # weights, BN running statistics, num_batches_tracked
    assert changed(before, net, "fc.") == {"fc.weight", "fc.bias"}
    assert not any(p.requires_grad for p in net.backbone.parameters())  # never trains: out of DDP's reduction


def test_freeze_then_unfreeze_trains_the_backbone_from_unfreeze_at() -> None:
    config = FinetuneConfig(strategy="freeze_then_unfreeze", unfreeze_at=1)
    net, before = run(config, epochs=1)
    assert changed(before, net, "backbone.") == set()
    assert all(p.requires_grad for p in net.backbone.parameters())  # registered with DDP from the start
    net, before = run(config, epochs=2)
    moved = changed(before, net, "backbone.")
    assert {key.split(".")[1] for key in moved} >= {"conv1", "layer1", "layer2", "layer3"}
    assert "backbone.layer1.0.bn1.running_mean" in moved


def test_milestones_unfreeze_from_the_top() -> None:
    config = FinetuneConfig(strategy="milestones", unfreeze_milestones=[1, 2])
    net, before = run(config, epochs=2)
    assert {key.split(".")[1] for key in changed(before, net, "backbone.")} == {"layer3"}
    net, before = run(config, epochs=3)
    assert {key.split(".")[1] for key in changed(before, net, "backbone.")} == {"layer2", "layer3"}


def test_frozen_stages_stay_frozen_under_every_strategy() -> None:
    config = FinetuneConfig(strategy="freeze_then_unfreeze", unfreeze_at=1)
    net, before = run(config, epochs=2, frozen_stages=1)
    assert {key.split(".")[1] for key in changed(before, net, "backbone.")} == {"layer2", "layer3"}
    with pytest.raises(UserError, match="only 2 parts can unfreeze"):
        Finetuner(Net(frozen_stages=1).backbone, FinetuneConfig(strategy="milestones", unfreeze_milestones=[1, 2, 3]))


def test_unfrozen_parts_warm_up_from_zero() -> None:
    net = Net()
    finetuner = Finetuner(net.backbone, FinetuneConfig(strategy="freeze_then_unfreeze", unfreeze_at=2, warmup_epochs=2))
    optimizer, scheduler, groups = optimiser(net, finetuner)
    factors = [scheduler.lr_lambdas[-1](step) for step in range(9)]
    assert factors == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # epoch 2 = step 4, warmup over 4 steps
    assert [scheduler.lr_lambdas[0](step) for step in (0, 4)] == [1.0, 1.0]  # the head


def test_layer_wise_lrs_are_the_printed_ones() -> None:
    net = Net()
    finetuner = Finetuner(net.backbone, FinetuneConfig(layer_decay=0.5))
    optimizer, scheduler, groups = optimiser(net, finetuner, lr_mult=0.1)
    expected = {"head": 0.1, "backbone.layer3": 0.1 * 0.1 * 0.5, "backbone.layer2": 0.1 * 0.1 * 0.25}
    expected.update({"backbone.layer1": 0.01 * 0.125, "backbone.stem": 0.01 * 0.0625})
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    for name, lr in expected.items():
        assert lrs[name] == pytest.approx(lr) and lrs[f"{name}/no_decay"] == pytest.approx(lr)
    printed = {row.split()[0]: row.split()[1:] for row in param_group_table(optimizer.param_groups).splitlines()[2:]}
    assert printed["backbone.stem/no_decay"] == ["32", "0.000625", "0"]
    for group in optimizer.param_groups:  # what the optimizer uses at step 0 is what was printed
        assert float(printed[group["name"]][1]) == pytest.approx(group["lr"], rel=1e-3)
    line = finetuner.describe(groups)
    assert line.startswith("trains: head 195 params; backbone (") and "layer decay 0.5" in line


def test_summary_and_change_lines() -> None:
    net = Net()
    finetuner = Finetuner(net.backbone, FinetuneConfig(strategy="milestones", unfreeze_milestones=[1, 3]))
    _, scheduler, groups = optimiser(net, finetuner)
    assert finetuner.describe(groups) == (
        "trains: head 195 params; layer3 (203.5K) at epoch 1; layer2 (51.1K) at epoch 3; "
        "layer1, stem (14.5K) frozen throughout (each unfreeze warms its LR up over 1 epoch(s))"
    )
    assert finetuner.apply(0) is None
    assert finetuner.apply(1) is None
    assert finetuner.apply(2) == "finetune: epoch 1: layer3 unfrozen (203.5K params, LR warmed up over 1 epoch(s))"
    other = Net()
    resumed = Finetuner(other.backbone, finetuner.config)
    optimiser(other, resumed)
    assert resumed.apply(7) == "finetune: resumed at epoch 3 (step 7); frozen: layer1, stem"


def test_config_errors_are_one_line() -> None:
    for bad, match in [
        ({"strategy": "milestones", "unfreeze_milestones": [3, 2]}, "strictly increasing"),
        ({"strategy": "milestones"}, "needs --model.finetune.unfreeze_milestones"),
        ({"strategy": "freeze", "unfreeze_milestones": [1]}, "needs --model.finetune.strategy milestones"),
        ({"layer_decay": 0.0}, "layer_decay"),
    ]:
        with pytest.raises(UserError, match=match):
            FinetuneConfig(**bad)
    with pytest.raises(UserError, match="epoch 5 is past --trainer.max_epochs 4"):
        FinetuneConfig(strategy="milestones", unfreeze_milestones=[2, 5]).check_epochs(4)
    FinetuneConfig(strategy="freeze_then_unfreeze", unfreeze_at=4).check_epochs(4)


def test_stage_factor_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    schedule = ScheduleFactor(SchedulerConfig(name="cosine"), 10, 2, 0.1)
    factor = StageFactor(schedule, 4, 2)
    parameter = nn.Parameter(torch.zeros(1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([parameter], lr=0.1), [factor])
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    fresh_schedule = ScheduleFactor(SchedulerConfig(name="cosine"), 99, 2, 0.1)
    fresh = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([parameter], lr=0.1), [StageFactor(fresh_schedule, 0, 0)])
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert [fresh.lr_lambdas[0](s) for s in range(8)] == [factor(s) for s in range(8)]
    assert fresh_schedule.total_steps == 10  # the run's schedule comes back too


def task_class(task: str) -> type:
    import resnet_tasks

    return getattr(resnet_tasks, {"classification": "ClassificationTask", "detection": "DetectionTask",
                                  "segmentation": "SegmentationTask"}[task])  # fmt: skip


# resnet20 (3 stages): detection's pyramid has 4 levels, one anchor size each.
SMALL = {"classification": {}, "detection": {"anchor_sizes": [[8], [16], [32], [64]]}, "segmentation": {}}


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_whole_model_weights_of_another_class_count(task: str, tmp_path: Path) -> None:
    from resnet_tasks.labels import LabelSpace
    from resnet_tasks.tasks.weights import built_for_fit

    cls, options = task_class(task), {"backbone": {"name": "resnet20"}, **SMALL[task]}
    path = tmp_path / "other.pth"
    torch.save(cls(num_classes=6, **options).state_dict(), path)
    source = cls.model_state_dict(cls.__new__(cls), torch.load(path))
    data = LabelSpace(("a", "b", "c")) if task == "classification" else LabelSpace.with_background(["a", "b", "c"])
    if task == "detection":  # validate / test / predict: detection keeps the weights' classes, with a warning
        with pytest.warns(UserWarning, match="keeps the weights' label space"):
            assert cls(weights=str(path), label_space=data, **options).num_classes == 6
        with pytest.warns(UserWarning), built_for_fit():  # resuming a run that kept them (its num_classes)
            assert cls(weights=str(path), num_classes=6, label_space=data, **options).num_classes == 6
    else:  # the others refuse them, pointing to fit
        with pytest.raises(UserError, match="predict 6 classes but the data has .*resnet-tasks fit"):
            cls(weights=str(path), label_space=data, **options)
    with built_for_fit():  # fit: the data's classes, new class layers
        model = cls(weights=str(path), label_space=data, **options)
    assert model.label_space == data
    fresh = snapshot(model)
    model.load_pretrained(fit=True)
    for key, value in model.state_dict().items():
        new = any(key.startswith(layer + ".") for layer in CLASS_LAYERS[task])
        assert torch.equal(value, fresh[key] if new else source[key]), key
    # The fitted model's hyper-parameters (num_classes agrees with the data) build it again outside fit.
    assert cls(weights=str(path), num_classes=data.num_classes, label_space=data, **options).label_space == data
    source.pop(next(key for key in source if key.endswith("conv1.weight")))
    with pytest.raises(UserError, match="do not fit"):
        load_with_new_classes(model, source, CLASS_LAYERS[task], source="w.pth", what=f"{task} model")


def test_torchvision_classifier_weights_get_a_new_fc(tmp_path: Path) -> None:
    import torchvision

    from resnet_tasks.labels import LabelSpace
    from resnet_tasks.tasks.classification import ClassificationTask
    from resnet_tasks.tasks.weights import built_for_fit

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with built_for_fit():
        model = ClassificationTask(weights=str(path), label_space=LabelSpace(("a", "b")), backbone={"name": "resnet18"})
    model.load_pretrained(fit=True)
    assert model.fc.out_features == 2
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, torch.load(path)["layer4.1.bn2.running_var"])


def test_data_names_win_where_the_weights_name_the_same_ids_otherwise() -> None:
    from resnet_tasks.labels import LabelSpace
    from resnet_tasks.tasks.detection import DetectionTask

    data = LabelSpace.with_background(["human", "bicycle"], [1, 2])  # COCO ids 1 and 2: person, bicycle
    with pytest.warns(UserWarning, match="1: 'person' -> 'human'"):
        task = DetectionTask(weights="FasterRCNN_ResNet50_FPN_Weights.COCO_V1", label_space=data,
                             backbone={"name": "resnet18"})  # fmt: skip
    assert task.num_classes == 91 and task.label_space.name(1) == "human" and task.label_space.name(2) == "bicycle"
    assert task.category_names[1] == "human" and task.label_space.name(3) == "car"
