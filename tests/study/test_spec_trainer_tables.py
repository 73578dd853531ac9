"""The names and limits that study-file validation checks are the ones the
trainers accept. These tests import torch and transformers."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from study.spec import (
    DEVICE_PATTERN,
    MAX_SEED,
    TORCHVISION_RESNET_PRESETS,
    lm_presets,
    vision_presets,
)
from trainers.data import text
from trainers.tables import MAX_BPE_VOCAB_SIZE, MIN_BPE_VOCAB_SIZE
from trainers.workloads import lm
from trainers.workloads import vision as vision_workload


def test_lm_presets_build():
    presets = lm_presets()
    assert list(presets) == list(lm.MODEL_FAMILIES)
    for name in presets["llama"]:
        # The meta device builds the shapes without allocating the weights.
        with torch.device("meta"):
            lm.build_llama(name, vocab_size=64, seq_len=16)
    with pytest.raises(ValueError, match="Unknown LLaMA preset"):
        lm.build_llama("huge", vocab_size=64, seq_len=16)


def test_vision_presets_build():
    names = vision_presets()
    assert names == [*vision_workload.SMALL_RESNETS, *TORCHVISION_RESNET_PRESETS]
    for name in names:
        with torch.device("meta"):
            vision_workload.build_resnet(name, in_channels=3)
    with pytest.raises(ValueError, match="Unknown ResNet preset"):
        vision_workload.build_resnet("resnet50", in_channels=3)


def test_data_kinds_match_trainers():
    for kind in typing.get_args(text.SourceKind):
        text.TextSource(kind=kind, paths=("unused",))
    with pytest.raises(ValueError, match="unknown text source kind"):
        text.TextSource(kind="wikipedia")


def test_bpe_vocabulary_bounds_hold_in_trainers():
    text.TokenizerSpec(kind="bpe", vocab_size=MIN_BPE_VOCAB_SIZE)
    text.TokenizerSpec(kind="bpe", vocab_size=MAX_BPE_VOCAB_SIZE)
    for size in (MIN_BPE_VOCAB_SIZE - 1, MAX_BPE_VOCAB_SIZE + 1):
        with pytest.raises(ValueError, match=f"vocab_size {size} is invalid"):
            text.TokenizerSpec(kind="bpe", vocab_size=size)


def test_seed_range_matches_numpy():
    np.random.seed(0)
    np.random.seed(MAX_SEED)
    with pytest.raises(ValueError):
        np.random.seed(MAX_SEED + 1)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "xpu:0"])
def test_device_pattern_values_are_torch_devices(device):
    assert DEVICE_PATTERN.fullmatch(device)
    torch.device(device)
