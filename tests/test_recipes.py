"""Recipes that follow the global batch: LR scaling (linear / square root), the printed line, torchvision's EMA."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from resnet_tasks.callbacks import global_batch_ema_decay
from resnet_tasks.errors import UserError
from resnet_tasks.tasks.classification import ClassificationTask
from resnet_tasks.tasks.optim import OptimizerConfig, SchedulerConfig, lr_scale


def test_lr_scale_follows_the_global_batch() -> None:
    config = OptimizerConfig(lr=0.1, base_batch_size=256)
    assert lr_scale(config, 256) == 1.0 and lr_scale(config, 512) == 2.0 and lr_scale(config, 64) == 0.25
    assert lr_scale(OptimizerConfig(base_batch_size=256, lr_scaling="sqrt"), 1024) == pytest.approx(2.0)
    assert lr_scale(OptimizerConfig(base_batch_size=256, scale_lr=False), 1024) == 1.0
    assert lr_scale(OptimizerConfig(), 1024) == 1.0  # no base batch: the LR as given


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": torch.rand(3, 16, 16), "label": torch.tensor(index % 3)}


def _fit_one_step(task: ClassificationTask, **trainer_args: object) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_args)  # fmt: skip
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(_Images(), batch_size=4))
    return trainer


def test_group_lrs_scale_with_accumulation_and_keep_their_multipliers(capsys: pytest.CaptureFixture[str]) -> None:
    optimizer = OptimizerConfig(lr=0.1, base_batch_size=4, backbone_lr_mult=0.1)
    task = ClassificationTask(num_classes=3, backbone={"name": "resnet18"}, optimizer=optimizer, batch_size=4,
                              scheduler=SchedulerConfig(name="cosine", min_lr=0.01, warmup_steps=2))  # fmt: skip
    trainer = _fit_one_step(task, accumulate_grad_batches=2)
    lrs = {group["name"]: group["initial_lr"] for group in trainer.optimizers[0].param_groups}
    # 4 images x 1 device x 2 accumulation = 8 = twice the recipe's base batch: every LR doubles.
    assert lrs["head"] == pytest.approx(0.2) and lrs["backbone"] == pytest.approx(0.02)
    printed = capsys.readouterr().out
    assert "global batch 8 (4 per device x 1 device(s) x 2 accumulation)" in printed
    assert "head 0.2" in printed and "backbone 0.02" in printed and "lr 0.1 at 4, linear scaling" in printed
    assert "warmup 2 steps" in printed
    # min_lr scales with the LR: the cosine floor is 0.01 x 2 for the head.
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert 0.2 * factor(factor.total_steps) == pytest.approx(0.02)


def test_base_batch_without_the_batch_size_is_explained() -> None:
    task = ClassificationTask(num_classes=3, backbone={"name": "resnet18"},
                              optimizer=OptimizerConfig(base_batch_size=256))  # fmt: skip
    with pytest.raises(UserError, match="base_batch_size needs the per-device batch size"):
        _fit_one_step(task)


def test_torchvision_ema_decay_follows_the_global_batch() -> None:
    # torchvision's V2 recipe: 8 GPUs x 128 images, EMA 0.99998 every 32 steps, 600 epochs.
    assert global_batch_ema_decay(0.99998, 1024, 32, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert global_batch_ema_decay(0.99998, 1024, 32, 600) == pytest.approx(0.998908, abs=1e-6)
    assert global_batch_ema_decay(0.9, 4096, 32, 1) == 0.0  # alpha clipped at 1


def test_repeated_augmentation_sampler_keeps_the_epoch_length_and_spreads_copies_over_ranks() -> None:
    from resnet_tasks.data.sampling import RepeatedAugmentationSampler

    size, world, reps = 32, 4, 4
    per_rank = []
    for rank in range(world):
        sampler = RepeatedAugmentationSampler(size, seed=0, repetitions=reps)
        sampler.rank, sampler.world_size, sampler.num_samples = rank, world, size // world
        sampler.set_epoch(3)
        items = list(sampler)
        assert len(items) == len(sampler) == size // world  # about N / world per rank, not reps x that
        per_rank.append(items)
    ranks_of: dict[int, set[int]] = {}
    seeds_of: dict[int, set[int]] = {}
    for rank, items in enumerate(per_rank):
        for index, seed in items:
            ranks_of.setdefault(index, set()).add(rank)
            seeds_of.setdefault(index, set()).add(seed)
    # Each chosen image is seen `reps` times, once on each of `reps` different ranks, each copy augmented its way.
    assert all(len(ranks) == reps for ranks in ranks_of.values())
    assert all(len(seeds) == reps for seeds in seeds_of.values())
    assert len(ranks_of) == size // reps  # N / reps distinct images per epoch


def test_trivial_augment_and_random_erasing_are_seeded_per_sample() -> None:
    from resnet_tasks.data.transforms import imagenet_train_transform

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    plain = imagenet_train_transform(32, (0.5, 1.0))
    augmented = imagenet_train_transform(32, (0.5, 1.0), trivial_augment=True)
    erased = imagenet_train_transform(32, (0.5, 1.0), random_erase=1.0)
    state = torch.get_rng_state()
    assert torch.equal(augmented(image, seed=7)["image"], augmented(image, seed=7)["image"])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    differs = [not torch.equal(plain(image, seed=s)["image"], augmented(image, seed=s)["image"]) for s in range(8)]
    assert any(differs)  # TrivialAugment changes pixels (its identity op may leave a few seeds alike)
    item = erased(image, seed=3)  # uint8 pixels and the rectangle erased after normalisation, on the device
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    top, left, height, width = item["erase"].tolist()
    assert height > 0 and width > 0 and top + height <= 32 and left + width <= 32
    assert torch.equal(erased(image, seed=3)["erase"], item["erase"]) and "erase" not in plain(image, seed=3)


def test_v2_recipe_keys_reach_the_data_module(image_folder) -> None:
    from resnet_tasks.data.classification import ImageFolderDataModule
    from resnet_tasks.data.sampling import RepeatedAugmentationSampler

    data = ImageFolderDataModule(root=str(image_folder), crop_size=32, resize_size=36, batch_size=4, num_workers=0,
                                 auto_augment="ta_wide", random_erase=0.1, repeated_augmentations=4)  # fmt: skip
    assert data.train_transform().policy is not None and data.train_transform().erase is not None
    loader = data.train_dataloader()
    assert isinstance(loader.batch_sampler.sampler, RepeatedAugmentationSampler)
    assert len(loader.batch_sampler.sampler) == len(data.dataset("train"))


def test_multi_scale_detection_training_draws_sizes_in_range_and_scales_boxes() -> None:
    from resnet_tasks.tasks.detection import DetectionTask

    torch.manual_seed(0)
    task = DetectionTask(num_classes=3, backbone={"name": "resnet18"}, min_size=[48, 64, 80], max_size=400,
                         anchor_sizes=[[8], [16], [32], [64], [128]], fpn_channels=32)  # fmt: skip
    task.train()
    seen: list[tuple[int, int, torch.Tensor]] = []

    def record(module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        images, targets = output
        for (height, width), target in zip(images.image_sizes, targets):
            seen.append((height, width, target["boxes"].clone()))

    task.model.transform.register_forward_hook(record)
    box = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    batch = ([torch.rand(3, 60, 90)], [{"boxes": box, "labels": torch.tensor([1])}])
    for _ in range(12):
        task.training_losses(batch)
    shorter = {min(h, w) for h, w, _ in seen}
    assert shorter <= {48, 64, 80} and len(shorter) > 1  # the network really sees the sizes vary
    for height, width, boxes in seen:
        assert torch.allclose(boxes, box * torch.tensor([width / 90, height / 60] * 2), atol=1e-3)


def test_large_scale_jitter_gives_fixed_size_crops_with_boxes_that_follow() -> None:
    from resnet_tasks.data.transforms import detection_train_transform

    image = np.zeros((60, 90, 3), dtype=np.uint8)
    image[20:40, 10:50] = (200, 30, 30)  # the object, exactly its box
    boxes = np.array([[10.0, 20.0, 50.0, 40.0]], dtype=np.float32)
    transform = detection_train_transform(hflip_prob=0.5, large_scale_jitter=(0.5, 1.5), crop_size=64)
    scales = set()
    for seed in range(20):
        transform.set_random_seed(seed)
        out = transform(image=image, bboxes=boxes, labels=np.array([1]))
        assert out["image"].shape == (64, 64, 3)
        for x1, y1, x2, y2 in np.asarray(out["bboxes"]).reshape(-1, 4):
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            scales.add(round(float(y2 - y1), 1))
            inside = out["image"][int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1]
            if inside.size:
                assert inside[..., 0].mean() > 150 and inside[..., 1].mean() < 80  # the box still holds the object
    assert len(scales) > 3  # the scale really jitters
    with pytest.raises(UserError, match="crop_size"):
        detection_train_transform(large_scale_jitter=(0.1, 2.0))


def test_global_batch_ema_callback_uses_the_rescaled_decay() -> None:
    """After `fit`, the model holds the exponential average of its weights at the rescaled decay."""
    from resnet_tasks.callbacks import GlobalBatchEMA

    direction = torch.tensor([[1.0, 3.0]])

    class Tiny(L.LightningModule):
        """Plain SGD at lr 1 on a linear loss: step k moves the weight by -k x direction, known in advance."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1, bias=False)
            torch.nn.init.zeros_(self.layer.weight)
            self.batch_size = 2  # the global batch the decay is rescaled to (1 device, no accumulation)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return (self.layer.weight * direction).sum() * (batch_idx + 1)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1.0)

    module = Tiny()
    callback = GlobalBatchEMA(decay=0.9, update_every_n_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.zeros(3, 1), batch_size=1))
    decay = global_batch_ema_decay(0.9, 2, 1, 1)
    assert callback.decay == pytest.approx(decay) and decay != pytest.approx(0.9)
    # The average starts at the weights after the first step, then each step moves it (1 - decay) of the way.
    weights = [-direction, -3 * direction, -6 * direction]
    average = weights[0]
    for current in weights[1:]:
        average = decay * average + (1 - decay) * current
    torch.testing.assert_close(module.layer.weight.detach(), average)
