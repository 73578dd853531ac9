"""Mixed precision: loss scaling around the power, skipped steps, autocast runs."""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import pytest
import torch

from tests.trainers.sample_data import tiny_bpe_shards
from trainers import loop
from trainers.config import TrialConfig
from trainers.gradpower import AdamPower
from trainers.precision import MixedPrecision

CPU = torch.device("cpu")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 16, generator=generator)
    targets = torch.randint(0, 4, (64,), generator=generator)
    return inputs, targets


def fp16_step(
    model: torch.nn.Module, init_scale: float, *, autocast: bool = True
) -> None:
    """Take one AdamPower step (p = 1.2) with fp16 loss scaling, in loop order."""
    inputs, targets = batch()
    optimizer = AdamPower(model.parameters(), lr=1e-2, power=1.2)
    precision = MixedPrecision("fp16", CPU, init_scale=init_scale)
    with precision.autocast() if autocast else contextlib.nullcontext():
        logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    precision.backward(loss)
    precision.unscale_(optimizer)
    precision.step(optimizer)


@pytest.fixture(scope="module")
def shards_data(tmp_path_factory) -> dict:
    return tiny_bpe_shards(tmp_path_factory.mktemp("precision"), val_tokens=65)


def lm_config(data: dict, **overrides) -> TrialConfig:
    settings = {
        "workload": "lm",
        "batch_size": 4,
        "power": 1.2,
        "lr_max": 1e-3,
        "step_budget": 3,
        "target_value": 0.0,
        "model": {"preset": "tiny"},
        "data": data,
        "device": "cpu",
        "threads": 1,
    }
    settings.update(overrides)
    return TrialConfig(**settings)


def test_loss_scale_does_not_change_powered_update():
    unscaled = small_model()
    scaled = copy.deepcopy(unscaled)

    # The forward runs in float32 here. Under float16 autocast the run with
    # scale 1 would lose small gradients to float16 underflow, which is what
    # loss scaling prevents. In float32, scaling by 2**16 and unscaling are
    # exact, so the power gets the same gradients and the updates match bitwise.
    fp16_step(unscaled, init_scale=1.0, autocast=False)
    fp16_step(scaled, init_scale=2.0**16, autocast=False)

    for param, other in zip(unscaled.parameters(), scaled.parameters()):
        assert torch.equal(param, other)


def test_scaler_step_unscales_before_adampower_power():
    reference = small_model()
    model = copy.deepcopy(reference)
    fp16_step(reference, init_scale=2.0**16)
    inputs, targets = batch()
    optimizer = AdamPower(model.parameters(), lr=1e-2, power=1.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    # No explicit unscale_: AdamPower sets _step_supports_amp_scaling = False,
    # so GradScaler.step unscales the gradients before AdamPower powers them.
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)

    assert optimizer._step_supports_amp_scaling is False
    for param, other in zip(reference.parameters(), model.parameters()):
        assert torch.equal(param, other)


def test_precision_rejects_unknown_name():
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        MixedPrecision("fp8", CPU)


def test_skip_step_needs_loss_scaling():
    with pytest.raises(RuntimeError, match="without loss scaling"):
        MixedPrecision("bf16", CPU).skip_step()


# The scheduler warns when it steps before any optimizer step, which here is
# intended: the schedule stays a function of the step count.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_fp16_overflow_skips_steps_without_diverging(shards_data, monkeypatch):
    # With a scale of 2**40 the float16 gradients overflow. The scaler halves
    # the scale after each overflow, and three halvings leave it far above
    # what float16 (max 65504) can hold, so every step of this run overflows.
    monkeypatch.setattr(
        loop, "MixedPrecision", functools.partial(MixedPrecision, init_scale=2.0**40)
    )
    reports = []

    outcome = loop.run_trial(lm_config(shards_data, precision="fp16"), reports.append)

    assert outcome.end_state == "censored"
    assert [report["train/skipped_steps"] for report in reports] == [1, 2, 3]
    assert reports[-1]["train/loss_scale"] == 2.0**37
    assert all(math.isfinite(report["train/loss"]) for report in reports)
    assert not any(math.isfinite(report["train/grad_norm"]) for report in reports)


def test_fp16_nan_loss_still_diverges(shards_data):
    reports = []
    config = lm_config(shards_data, precision="fp16", inject_nan_loss_at_step=1)

    outcome = loop.run_trial(config, reports.append)

    assert outcome.end_state == "diverged"
    assert outcome.steps == 1
    assert reports[-1]["end_state"] == "diverged"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trial_trains_on_cpu(shards_data, precision):
    reports = []

    outcome = loop.run_trial(
        lm_config(shards_data, precision=precision), reports.append
    )

    assert outcome.end_state == "censored"
    assert all(math.isfinite(report["train/loss"]) for report in reports)
    assert math.isfinite(reports[-1]["val/loss"])
    if precision == "fp16":
        assert reports[-1]["train/skipped_steps"] == 0
