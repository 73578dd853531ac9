"""Two CPU steps of each `paper`-scale trial of batch_power_grid.

Each trial keeps its model preset, optimizer, schedule, precision and data
format from the study file. The data comes from small local files in the real
formats. Only the batch size, step budget, warmup, sequence length and device
are shrunk, so a broken preset or data path fails here and not on a GPU
cluster.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from study.grid import expand
from study.spec import load_study
from tests.trainers.sample_data import (
    documents,
    save_t5_sized_tokenizer,
    write_c4_shards,
    write_random_cifar10,
)
from trainers.config import TrialConfig
from trainers.loop import run_trial
from trainers.workloads import get_workload_class
from trainers.workloads.lm import count_parameters

# Shorter than the study's 256 tokens to keep the LLaMA-0.2B steps to seconds
# on a CPU.
SMOKE_SEQ_LEN = 64


def local_data(label: str, root) -> dict:
    """Data settings that replace the hub and download sources with local files."""
    if label == "lm":
        c4 = write_c4_shards(root / "c4", documents(20, seed=6), documents(6, seed=7))
        return {
            "source": "c4_local",
            "paths": [str(c4)],
            "tokenizer_path": str(save_t5_sized_tokenizer(root / "t5")),
            "seq_len": SMOKE_SEQ_LEN,
            "val_tokens": 2 * SMOKE_SEQ_LEN + 1,
        }
    return {"root": str(write_random_cifar10(root / "cifar", train=40, test=20))}


def paper_trial(label: str, root, scale_name: str = "paper") -> TrialConfig:
    scale = load_study("batch_power_grid").scale(scale_name)
    entry = scale.workloads[label]
    data = {**entry.data, **local_data(label, root)}
    workload_class = get_workload_class(entry.workload or label)
    prepared = workload_class.prepare(data, root / "cache")
    plan = expand(scale, {label: prepared})[0]
    config = TrialConfig.from_dict(plan.config)
    return dataclasses.replace(
        config,
        batch_size=1 if label == "lm" else 2,
        micro_batch_size=None,
        step_budget=2,
        warmup_steps=min(config.warmup_steps, 1),
        device="cpu",
        # One thread: on a shared machine two OpenMP threads waiting on each
        # other made these steps about five times slower.
        threads=1,
    )


def test_paper_scale_workloads_are_covered():
    scale = load_study("batch_power_grid").scale("paper")

    assert set(scale.workloads) == {"lm", "vision"}


def test_paper_lm_trial_runs_two_steps(tmp_path, monkeypatch):
    # The compiled power kernel would take seconds to compile for 200M
    # parameters, more than the two steps it would save.
    monkeypatch.setenv("GRADPOWER_COMPILE", "0")
    config = paper_trial("lm", tmp_path)
    workload = get_workload_class("lm")(config, torch.device("cpu"))
    with torch.device("meta"):
        counts = count_parameters(workload.build_model())
    reports = []

    outcome = run_trial(config, reports.append)

    assert config.model == {"family": "llama", "preset": "0.2b"}
    assert config.optimizer == "adampower"
    assert config.schedule == "wsd"
    assert config.precision == "bf16"
    assert workload.shards.model_vocab_size == 32128
    assert counts["total"] == pytest.approx(200e6, rel=0.01)
    assert outcome.end_state == "censored"
    assert outcome.steps == 2
    assert all(math.isfinite(report["train/loss"]) for report in reports)
    assert math.isfinite(reports[-1]["val/loss"])


def test_paper_vision_trial_runs_two_steps(tmp_path):
    config = paper_trial("vision", tmp_path)
    reports = []

    outcome = run_trial(config, reports.append)

    assert config.model == {"preset": "resnet34"}
    assert config.data["augment"] is True
    assert config.schedule == "cos"
    assert outcome.end_state == "censored"
    assert outcome.steps == 2
    assert all(math.isfinite(report["train/loss"]) for report in reports)
    assert 0.0 <= reports[-1]["val/accuracy"] <= 1.0


def test_paper_large_batch_trial_runs_two_steps(tmp_path):
    planned = paper_trial("vision", tmp_path, "paper_large_batch")
    # Two micro-batches per step, as the scale's batch 512 runs in two of 256.
    config = dataclasses.replace(planned, batch_size=4, micro_batch_size=2)
    reports = []

    outcome = run_trial(config, reports.append)

    assert config.model == {"preset": "resnet34"}
    assert config.weight_decay == 0.1
    assert outcome.end_state == "censored"
    assert outcome.steps == 2
    assert all(math.isfinite(report["train/loss"]) for report in reports)
    assert 0.0 <= reports[-1]["val/accuracy"] <= 1.0
