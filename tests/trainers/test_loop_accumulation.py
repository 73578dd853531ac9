"""Gradient accumulation: micro-batches give the update of the whole batch."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.trainers.sample_data import tiny_bpe_shards
from trainers import loop
from trainers.config import TrialConfig
from trainers.optimizers import build_optimizer
from trainers.precision import MixedPrecision
from trainers.schedules import lr_at
from trainers.workloads.lm import LanguageModelWorkload

LR_MAX = 1e-3
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> LanguageModelWorkload:
    data = tiny_bpe_shards(
        tmp_path_factory.mktemp("accumulation"), val_tokens=129, seed=3
    )
    config = TrialConfig(
        workload="lm",
        batch_size=32,
        micro_batch_size=8,
        power=1.2,
        lr_max=LR_MAX,
        step_budget=1,
        target_value=0.0,
        model={"preset": "tiny"},
        data=data,
        device="cpu",
    )
    return LanguageModelWorkload(config, CPU)


@pytest.mark.parametrize("power", [1.0, 1.2])
def test_four_micro_batches_match_one_batch(workload, power):
    torch.manual_seed(0)
    accumulated = workload.build_model()
    whole = copy.deepcopy(accumulated)
    before = [param.detach().clone() for param in whole.parameters()]
    batch = workload.train_batch(0)
    precision = MixedPrecision("fp32", CPU)
    config = dataclasses.replace(workload.config, power=power)

    accumulated_loss = loop._accumulate_gradients(
        workload, accumulated, batch, 8, precision
    )
    whole_loss = loop._accumulate_gradients(workload, whole, batch, 32, precision)
    accumulated_norm = loop._gradient_norm(accumulated, config.clip_norm)
    whole_norm = loop._gradient_norm(whole, config.clip_norm)
    grads = [param.grad.clone() for param in accumulated.parameters()]
    whole_grads = [param.grad.clone() for param in whole.parameters()]
    build_optimizer(accumulated, config).step()
    build_optimizer(whole, config).step()

    # float32 sums the per-token losses in another order (four means over 8
    # sequences, each divided by 4, against one mean over 32), so the two agree
    # to rounding (measured: gradients within 3e-8, losses within 5e-7), not
    # bitwise.
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-6)
    assert accumulated_norm == pytest.approx(whole_norm, rel=1e-5)
    for grad, whole_grad in zip(grads, whole_grads):
        torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-7)
    # Adam's first step is lr * g / (|g| + eps) with g = sign(g)|g|^p. Where |g|
    # is near eps the rounding difference shows up in the update (measured: at
    # most 6e-5 * lr), so the updates are compared to 1e-3 * lr.
    for param, whole_param, start in zip(
        accumulated.parameters(), whole.parameters(), before
    ):
        torch.testing.assert_close(
            param - start, whole_param - start, rtol=0, atol=1e-3 * LR_MAX
        )


def test_trial_with_micro_batches_follows_whole_batch(workload):
    """Over whole trials, micro-batches change neither the number of optimizer
    steps, the learning rate of each step, nor (beyond rounding) the loss."""
    whole_config = dataclasses.replace(
        workload.config,
        micro_batch_size=None,
        step_budget=6,
        warmup_steps=2,
        schedule="wsd",
        eval_every_steps=3,
    )
    micro_config = dataclasses.replace(whole_config, micro_batch_size=8)
    reports = {}
    for name, config in (("whole", whole_config), ("micro", micro_config)):
        reports[name] = []
        outcome = loop.run_trial(
            config, lambda m, checkpoint=None, name=name: reports[name].append(m)
        )
        assert outcome.steps == 6

    whole, micro = reports["whole"], reports["micro"]
    assert [row["step"] for row in micro] == list(range(1, 7))
    expected_lrs = [
        lr_at(
            step,
            schedule="wsd",
            lr_max=LR_MAX,
            total_steps=6,
            warmup_steps=2,
            lr_min=LR_MAX * whole_config.lr_min_ratio,
        )
        for step in range(6)
    ]
    assert [row["train/lr"] for row in micro] == pytest.approx(expected_lrs, rel=1e-12)
    assert [row["train/lr"] for row in whole] == [row["train/lr"] for row in micro]
    # The rounding differences of the test above; measured over these six
    # steps: losses within 8.5e-8 relative.
    assert [row["train/loss"] for row in micro] == pytest.approx(
        [row["train/loss"] for row in whole], rel=1e-5
    )
    assert micro[-1]["val/loss"] == pytest.approx(whole[-1]["val/loss"], rel=1e-5)
    assert micro[-1]["progress/tokens"] == whole[-1]["progress/tokens"] == 6 * 32 * 32
