"""Image classification with torchvision ResNets on Fashion-MNIST or CIFAR-10."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet34
from torchvision.models.resnet import BasicBlock

from trainers.data.vision import (
    CHANNEL_STATS,
    ImageBatches,
    eval_batches,
    load_image_dataset,
    prepare_fashion_mnist,
)
from trainers.tables import SMALL_RESNETS, VISION_DEFAULT_DATA
from trainers.workloads.base import Workload

DEFAULT_DATA = VISION_DEFAULT_DATA

NUM_CLASSES = 10


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem without max-pool, then BasicBlock stages."""

    def __init__(
        self,
        in_channels: int,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths)):
            stride = 1 if index == 0 else 2
            for block_index in range(count):
                downsample = None
                if block_index == 0 and (stride != 1 or channels != width):
                    downsample = nn.Sequential(
                        nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(width),
                    )
                stages.append(
                    BasicBlock(
                        channels, width, stride if block_index == 0 else 1, downsample
                    )
                )
                channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_resnet(preset: str, in_channels: int) -> nn.Module:
    """Build a ResNet by preset: `tiny`, `cpu`, or `resnet34` with the CIFAR stem."""
    if preset == "resnet34":
        model = resnet34(num_classes=NUM_CLASSES)
        model.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if preset not in SMALL_RESNETS:
        valid = sorted([*SMALL_RESNETS, "resnet34"])
        raise ValueError(f"Unknown ResNet preset {preset!r}; choose one of {valid}")
    blocks, widths = SMALL_RESNETS[preset]
    return SmallResNet(in_channels, blocks, widths, NUM_CLASSES)


class VisionWorkload(Workload):
    name = "vision"
    progress_unit = "examples"

    def __init__(self, config, device) -> None:
        super().__init__(config, device)
        data = {**DEFAULT_DATA, **config.data}
        self.dataset = data["dataset"]
        root = Path(data["root"])
        train_x, train_y = load_image_dataset(self.dataset, root, train=True)
        test_x, test_y = load_image_dataset(self.dataset, root, train=False)
        if data["train_examples"]:
            train_x, train_y = (
                train_x[: data["train_examples"]],
                train_y[: data["train_examples"]],
            )
        if data["eval_examples"]:
            test_x, test_y = (
                test_x[: data["eval_examples"]],
                test_y[: data["eval_examples"]],
            )
        self.mean, self.std = CHANNEL_STATS[self.dataset]
        self.in_channels = train_x.size(1)
        self.batches = ImageBatches(
            train_x,
            train_y,
            seed=config.seed,
            augment=bool(data["augment"]),
            mean=self.mean,
            std=self.std,
        )
        self.test_x = test_x
        self.test_y = test_y

    @classmethod
    def prepare(cls, data: dict[str, Any], cache_root: Path) -> dict[str, Any]:
        merged = {**DEFAULT_DATA, **data}
        # Trials run in folders of their own, so a relative root would not
        # resolve there.
        root = (
            Path(merged["root"]).expanduser().absolute()
            if merged["root"]
            else cache_root / "vision"
        )
        if merged["dataset"] == "fashion_mnist":
            source_dir = merged["source_dir"]
            prepare_fashion_mnist(
                root,
                Path(source_dir).expanduser() if source_dir else None,
                download=merged["download"],
            )
        else:
            # Loading once here downloads (when allowed) or validates the folder
            # before any trial starts.
            load_image_dataset(
                merged["dataset"], root, train=False, download=merged["download"]
            )
        return {**data, "root": str(root)}

    def build_model(self) -> nn.Module:
        return build_resnet(self.config.model.get("preset", "cpu"), self.in_channels)

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.train_batch(step, self.config.batch_size)

    def split(self, batch, micro_batch_size: int) -> list[Any]:
        images, labels = batch
        return list(zip(images.split(micro_batch_size), labels.split(micro_batch_size)))

    def loss(self, model: nn.Module, micro_batch) -> torch.Tensor:
        images, labels = micro_batch
        logits = model(images.to(self.device, non_blocking=True))
        return F.cross_entropy(logits.float(), labels.to(self.device))

    def progress_count(self, batch) -> int:
        return batch[0].size(0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss (nats per example) and accuracy on the test images."""
        was_training = model.training
        model.eval()
        total_loss = 0.0
        correct = 0
        for images, labels in eval_batches(
            self.test_x, self.test_y, 1024, self.mean, self.std
        ):
            logits = model(images.to(self.device)).float()
            labels = labels.to(self.device)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
        model.train(was_training)
        count = self.test_y.numel()
        return {"val/loss": total_loss / count, "val/accuracy": correct / count}
