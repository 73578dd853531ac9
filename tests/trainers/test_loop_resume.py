"""The loop's checkpoints resume a trial exactly, and non-finite steps never update."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from trainers import compiled_step, power_kernel, workloads
from trainers.config import TrialConfig
from trainers.loop import run_trial
from trainers.workloads.base import Workload
from trainers.workloads.lm import LanguageModelWorkload


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> dict:
    text = tmp_path_factory.mktemp("text") / "corpus.txt"
    paragraphs = [
        " ".join(f"word{(i * 7 + j) % 97} token{j % 13}" for j in range(40))
        for i in range(300)
    ]
    text.write_text("\n\n".join(paragraphs))
    cache = tmp_path_factory.mktemp("cache")
    return LanguageModelWorkload.prepare(
        {
            "source": "files",
            "paths": [str(text)],
            "vocab_size": 300,
            "seq_len": 16,
            "val_tokens": 2048,
        },
        cache,
    )


def _config(data: dict, **changes) -> TrialConfig:
    values = {
        "workload": "lm",
        "batch_size": 4,
        "power": 1.2,
        "lr_max": 0.01,
        "step_budget": 24,
        "target_value": 0.0,
        "model": {"preset": "tiny"},
        "data": data,
        "schedule": "wsd",
        "warmup_steps": 3,
        "eval_every_steps": 6,
        "checkpoint_every_steps": 8,
    }
    return TrialConfig(**{**values, **changes})


def _keep_reports(metrics: list[dict], checkpoints: list[dict]):
    """Return a report callback that appends to `metrics` and `checkpoints`.

    Checkpoints are copied, because the loop goes on updating its tensors.
    """

    def report(step_metrics, checkpoint=None):
        metrics.append(step_metrics)
        if checkpoint is not None:
            checkpoints.append(
                torch.utils._pytree.tree_map(
                    lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                    checkpoint,
                )
            )

    return report


MUON_MOE = {"optimizer": "muonpower", "model": {"family": "qwen2moe", "preset": "tiny"}}


@pytest.mark.parametrize("changes", [{}, MUON_MOE], ids=["adampower", "muonpower_moe"])
def test_loop_resume_matches_uninterrupted(lm_data, changes):
    straight: list[dict] = []
    run_trial(
        _config(lm_data, **changes),
        lambda metrics, checkpoint=None: straight.append(metrics),
    )

    first_part: list[dict] = []
    saved: list[dict] = []
    run_trial(_config(lm_data, **changes), _keep_reports(first_part, saved))
    restore = saved[1]
    assert restore["counters"]["step"] == 16

    resumed: list[dict] = []
    run_trial(
        _config(lm_data, **changes),
        lambda m, checkpoint=None: resumed.append(m),
        restore=restore,
    )
    expected = [m for m in straight if m["step"] > 16]
    assert [m["step"] for m in resumed] == [m["step"] for m in expected]
    assert [m["train/lr"] for m in resumed] == [m["train/lr"] for m in expected]
    for got, want in zip(resumed, expected):
        assert math.isfinite(got["train/loss"])
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)


def test_loop_compiled_step_resumes_and_matches(lm_data, monkeypatch):
    """AdamPower's compiled GPU step, built for the CPU here, trains the loop
    like the C kernel does and resumes exactly from its checkpoints."""
    kernel_run: list[dict] = []
    run_trial(_config(lm_data), lambda m, checkpoint=None: kernel_run.append(m))

    monkeypatch.setattr(compiled_step, "DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(compiled_step, "MIN_TOTAL_NUMEL", 0)
    monkeypatch.setattr(compiled_step, "_compile_failed", False)
    monkeypatch.setenv(power_kernel.KERNEL_ENV_VAR, "0")
    compiled_run: list[dict] = []
    saved: list[dict] = []
    run_trial(_config(lm_data), _keep_reports(compiled_run, saved))
    assert compiled_step.compiled_step_enabled(), "the compiled step fell back"
    assert [m["step"] for m in compiled_run] == [m["step"] for m in kernel_run]
    # The two paths round |g|**p and AdamW's arithmetic differently. Over the
    # 24 steps the losses differed by at most 3.8e-7 relative.
    for got, want in zip(compiled_run, kernel_run):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)

    resumed: list[dict] = []
    run_trial(
        _config(lm_data),
        lambda m, checkpoint=None: resumed.append(m),
        restore=saved[1],
    )
    expected = [m for m in compiled_run if m["step"] > 16]
    assert [m["step"] for m in resumed] == [m["step"] for m in expected]
    for got, want in zip(resumed, expected):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)


class InfiniteGradientWorkload(Workload):
    """Linear regression whose gradient becomes infinite at one step."""

    name = "infinite_gradient"
    progress_unit = "examples"
    bad_step = 3
    instances: ClassVar[list[InfiniteGradientWorkload]] = []

    def __init__(self, config, device) -> None:
        super().__init__(config, device)
        self.step = 0
        self.snapshots: dict[int, list[torch.Tensor]] = {}
        self.instances.append(self)

    @classmethod
    def prepare(cls, data, cache_root: Path) -> dict:
        return data

    def build_model(self) -> nn.Module:
        self.model = nn.Linear(4, 1)
        return self.model

    def train_batch(self, step: int):
        self.step = step
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(self.config.batch_size, 4, generator=generator)
        return inputs, inputs.sum(dim=1, keepdim=True)

    def split(self, batch, micro_batch_size: int):
        return [batch]

    def loss(self, model, micro_batch):
        self.snapshots[self.step] = [p.detach().clone() for p in model.parameters()]
        inputs, targets = micro_batch
        output = model(inputs)
        if self.step == self.bad_step:
            output.register_hook(lambda grad: grad * math.inf)
        return ((output - targets) ** 2).mean()

    def progress_count(self, batch) -> int:
        return batch[0].size(0)

    def evaluate(self, model) -> dict[str, float]:
        return {"val/loss": 1.0}


def test_loop_infinite_gradient_leaves_parameters(monkeypatch):
    monkeypatch.setitem(
        workloads.WORKLOAD_CLASSES,
        "infinite_gradient",
        f"{__name__}:InfiniteGradientWorkload",
    )
    reports: list[dict] = []
    config = TrialConfig(
        workload="infinite_gradient",
        batch_size=8,
        power=1.2,
        lr_max=0.1,
        step_budget=10,
        target_value=0.0,
        eval_every_steps=100,
    )
    outcome = run_trial(config, lambda m, checkpoint=None: reports.append(m))

    assert outcome.end_state == "diverged"
    assert reports[-1]["end_state"] == "diverged"
    assert math.isfinite(reports[-1]["train/loss"])
    assert not math.isfinite(reports[-1]["train/grad_norm"])
    workload = InfiniteGradientWorkload.instances[-1]
    before_bad_step = workload.snapshots[InfiniteGradientWorkload.bad_step]
    for parameter, snapshot in zip(workload.model.parameters(), before_bad_step):
        assert torch.equal(parameter.detach(), snapshot)


def test_loop_trains_past_target(lm_data):
    """With target_stop off a trial that meets the target at its first
    evaluation trains to its budget, ends as reached and keeps the first
    evaluation's target metrics, also after a resume from a later checkpoint."""
    stopping = _config(lm_data, target_value=100.0)
    outcome = run_trial(stopping, lambda metrics, checkpoint=None: None)
    assert (outcome.end_state, outcome.steps) == ("reached", 6)

    metrics: list[dict] = []
    checkpoints: list[dict] = []
    config = _config(lm_data, target_value=100.0, target_stop=False)
    outcome = run_trial(config, _keep_reports(metrics, checkpoints))
    assert (outcome.end_state, outcome.steps) == ("reached", 24)
    assert outcome.final_metrics["target/steps"] == 6
    assert outcome.final_metrics["target/tokens"] == 6 * 4 * 16
    assert [m.get("target/steps") for m in metrics if m["step"] >= 6] == [6] * 19
    assert all("target/steps" not in m for m in metrics if m["step"] < 6)

    resumed = run_trial(
        config, lambda metrics, checkpoint=None: None, restore=checkpoints[-1]
    )
    assert resumed.end_state == "reached"
    assert resumed.final_metrics["target/steps"] == 6
    assert resumed.final_metrics["val/loss"] == pytest.approx(
        outcome.final_metrics["val/loss"]
    )
