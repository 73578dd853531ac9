"""The ResNet workload on CIFAR-10 folders in the official pickle format."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, cifar

from study.spec import load_study
from tests.trainers.sample_data import write_random_cifar10
from trainers.config import TrialConfig
from trainers.data.vision import CHANNEL_STATS, CIFAR10_CLASSES, write_cifar10_folder
from trainers.workloads.vision import VisionWorkload, build_resnet

TRAIN_IMAGES = 100
TEST_IMAGES = 1030


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_random_cifar10(
        tmp_path_factory.mktemp("cifar"), train=TRAIN_IMAGES, test=TEST_IMAGES
    )


def paper_vision_data() -> dict:
    return dict(load_study("batch_power_grid").scale("paper").workloads["vision"].data)


def vision_config(root, **overrides) -> TrialConfig:
    settings = {
        "workload": "vision",
        "batch_size": 32,
        "power": 1.2,
        "lr_max": 1e-3,
        "step_budget": 2,
        "target_value": 1.0,
        "target_metric": "val/accuracy",
        "target_mode": "max",
        "model": {"preset": "tiny"},
        "data": {**paper_vision_data(), "root": str(root)},
        "device": "cpu",
        "threads": 1,
    }
    settings.update(overrides)
    return TrialConfig(**settings)


def test_resnet34_has_cifar_stem():
    model = build_resnet("resnet34", in_channels=3)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.fc.out_features == 10
    # torchvision's ResNet-34 has 21,797,672 parameters with its 7x7 stem and
    # 1000 classes; the 3x3 stem and 10 classes leave 21,282,122.
    assert sum(p.numel() for p in model.parameters()) == 21_282_122
    # The stem keeps the 32x32 resolution that the ImageNet stem cuts to 8x8.
    with torch.no_grad():
        stem = model.maxpool(
            model.relu(model.bn1(model.conv1(torch.zeros(1, 3, 32, 32))))
        )
    assert stem.shape == (1, 64, 32, 32)


def test_cifar10_writer_matches_torchvision_reader(tmp_path, monkeypatch):
    images = np.arange(12 * 3072, dtype=np.int64).reshape(12, 3, 32, 32) % 256
    images = images.astype(np.uint8)
    write_cifar10_folder(tmp_path, images, list(range(10)) + [3, 4], images[:2], [5, 6])
    # torchvision compares every file with the md5 of the official archive.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)

    train = CIFAR10(str(tmp_path), train=True)
    test = CIFAR10(str(tmp_path), train=False)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as file:
        first_batch = pickle.load(file, encoding="latin1")

    assert train.data.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(train.data, images.transpose(0, 2, 3, 1))
    assert train.targets == list(range(10)) + [3, 4]
    assert test.targets == [5, 6]
    assert train.classes == list(CIFAR10_CLASSES)
    assert first_batch["data"].dtype == np.uint8
    assert first_batch["data"].shape == (3, 3072)


def test_paper_scale_vision_augments_cifar10(cifar_root):
    data = paper_vision_data()
    prepared = VisionWorkload.prepare({**data, "root": str(cifar_root)}, cifar_root)
    workload = VisionWorkload(vision_config(cifar_root), torch.device("cpu"))

    assert data["dataset"] == "cifar10"
    assert data["augment"] is True
    assert prepared["root"] == str(cifar_root)
    assert workload.batches.augment is True
    assert workload.in_channels == 3
    assert len(workload.batches) == TRAIN_IMAGES
    assert workload.test_y.numel() == TEST_IMAGES


def test_vision_evaluate_reports_test_loss_and_accuracy(cifar_root):
    torch.manual_seed(0)
    workload = VisionWorkload(vision_config(cifar_root), torch.device("cpu"))
    model = workload.build_model()
    model.eval()
    mean, std = CHANNEL_STATS["cifar10"]
    images = (workload.test_x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / (
        torch.tensor(std).view(1, 3, 1, 1)
    )
    with torch.no_grad():
        logits = model(images)
    expected_loss = F.cross_entropy(logits, workload.test_y).item()
    correct = (logits.argmax(1) == workload.test_y).sum().item()

    metrics = workload.evaluate(model)

    # 1030 test images: a full batch of 1024 and a partial one of 6.
    assert metrics["val/loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["val/accuracy"] == correct / TEST_IMAGES


@pytest.mark.parametrize("batch_size", [32, 64, 128, 8192])
def test_vision_batches_span_epoch_ends(cifar_root, batch_size):
    workload = VisionWorkload(
        vision_config(cifar_root, batch_size=batch_size), torch.device("cpu")
    )
    # Enough steps to pass at least one epoch end, where a window contains the
    # last images of one epoch and the first of the next.
    steps = max(1, math.ceil(TRAIN_IMAGES / batch_size))
    labels = []
    for step in range(steps):
        images, step_labels = workload.train_batch(step)
        assert images.shape == (batch_size, 3, 32, 32)
        assert images.dtype == torch.float32
        labels.append(step_labels)
    positions = steps * batch_size
    epochs, remainder = divmod(positions, TRAIN_IMAGES)
    # Labels are index % 10 and every epoch visits each image once, so each
    # label appears 10 times per whole epoch plus at most 10 more in the
    # partial one.
    counts = torch.bincount(torch.cat(labels), minlength=10)

    assert counts.sum().item() == positions
    assert counts.min().item() >= 10 * epochs
    assert counts.max().item() <= 10 * epochs + min(remainder, 10)
