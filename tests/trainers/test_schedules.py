import itertools
import re

import pytest
import torch

from trainers.schedules import SCHEDULES, build_scheduler, lr_at

LR_MAX = 1e-3
TOTAL = 100
WARMUP = 10


def schedule_values(schedule, **overrides):
    options = {
        "schedule": schedule,
        "lr_max": LR_MAX,
        "total_steps": TOTAL,
        "warmup_steps": WARMUP,
    }
    options.update(overrides)
    return [lr_at(step, **options) for step in range(options["total_steps"])]


def test_schedules_names():
    assert SCHEDULES == ("cos", "wsd", "constant")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_at_warmup(schedule):
    values = schedule_values(schedule)

    assert values[0] == pytest.approx(LR_MAX / WARMUP, rel=1e-12)
    assert values[WARMUP - 1] == LR_MAX
    increments = [b - a for a, b in itertools.pairwise(values[:WARMUP])]
    assert increments == pytest.approx([LR_MAX / WARMUP] * (WARMUP - 1), rel=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_at_no_warmup_starts_at_lr_max(schedule):
    assert (
        lr_at(0, schedule=schedule, lr_max=LR_MAX, total_steps=TOTAL, warmup_steps=0)
        == LR_MAX
    )


@pytest.mark.parametrize("schedule", ["cos", "wsd"])
def test_lr_at_final_step_is_lr_min(schedule):
    values = schedule_values(schedule, lr_min=2e-5)

    assert values[-1] == 2e-5
    assert min(values) == 2e-5


@pytest.mark.parametrize("schedule", ["cos", "wsd"])
def test_lr_at_lr_min_defaults_to_tenth(schedule):
    values = schedule_values(schedule)

    assert values[-1] == pytest.approx(LR_MAX / 10, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cos", "wsd"])
def test_lr_at_decay_monotone(schedule):
    values = schedule_values(schedule)
    after_peak = values[WARMUP - 1 :]

    assert all(b <= a for a, b in itertools.pairwise(after_peak))
    assert after_peak[-1] < after_peak[0]


def test_lr_at_cos_midpoint():
    lr_min = 1e-4
    # Peak at step 9, last step 99: the cosine is halfway at step 54.
    value = lr_at(
        54,
        schedule="cos",
        lr_max=LR_MAX,
        total_steps=TOTAL,
        warmup_steps=WARMUP,
        lr_min=lr_min,
    )

    assert value == pytest.approx((LR_MAX + lr_min) / 2, rel=1e-12)


def test_lr_at_wsd_stable_phase():
    values = schedule_values("wsd", decay_fraction=0.2)

    # The last 20 of 100 steps decay, so steps 9..79 stay at lr_max.
    assert all(value == LR_MAX for value in values[WARMUP - 1 : 80])
    assert values[80] < LR_MAX


def test_lr_at_wsd_decay_linear():
    lr_min = 1e-4
    values = schedule_values("wsd", lr_min=lr_min, decay_fraction=0.2)
    decrements = [a - b for a, b in itertools.pairwise(values[79:])]

    assert decrements == pytest.approx([(LR_MAX - lr_min) / 20] * 20, rel=1e-9)


def test_lr_at_wsd_decay_after_warmup():
    # A decay fraction that overlaps the warmup starts the decay after the peak.
    values = schedule_values("wsd", decay_fraction=0.95)

    assert values[WARMUP - 1] == LR_MAX
    assert values[WARMUP] < LR_MAX
    assert values[-1] == pytest.approx(LR_MAX / 10, rel=1e-12)


def test_lr_at_constant_after_warmup():
    values = schedule_values("constant", lr_min=1e-5)

    assert all(value == LR_MAX for value in values[WARMUP - 1 :])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_at_past_total_steps_keeps_final(schedule):
    final = schedule_values(schedule)[-1]

    for step in (TOTAL, TOTAL + 50):
        assert (
            lr_at(
                step,
                schedule=schedule,
                lr_max=LR_MAX,
                total_steps=TOTAL,
                warmup_steps=WARMUP,
            )
            == final
        )


@pytest.mark.parametrize("schedule", ["cos", "wsd"])
def test_lr_at_warmup_covers_all_steps(schedule):
    values = schedule_values(schedule, total_steps=10, warmup_steps=10)

    assert values[-1] == LR_MAX
    assert values[0] == pytest.approx(LR_MAX / 10, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cos", "wsd"])
def test_lr_at_single_step(schedule):
    value = lr_at(0, schedule=schedule, lr_max=LR_MAX, total_steps=1, warmup_steps=0)

    assert value == LR_MAX


def test_lr_at_two_steps_reach_lr_min():
    values = schedule_values("wsd", total_steps=2, warmup_steps=0, lr_min=1e-5)

    assert values == [LR_MAX, 1e-5]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"schedule": "linear"},
            "Unknown schedule 'linear'. Choose one of cos, wsd, constant.",
        ),
        ({"warmup_steps": 101}, "warmup_steps value: 101 exceeds total_steps 100"),
        ({"warmup_steps": -1}, "Invalid warmup_steps value: -1"),
        ({"lr_min": 2e-3}, "lr_min value: 0.002 exceeds lr_max 0.001"),
        ({"lr_min": -1e-5}, "Invalid lr_min value: -1e-05"),
        ({"lr_max": -1e-3}, "Invalid lr_max value: -0.001"),
        ({"lr_max": 0.0}, "Invalid lr_max value: 0.0"),
        ({"lr_max": float("nan")}, "Invalid lr_max value: nan"),
        ({"total_steps": 0}, "Invalid total_steps value: 0"),
        ({"total_steps": 10.0}, "Invalid total_steps value: 10.0"),
        ({"decay_fraction": 0.0}, "Invalid decay_fraction value: 0.0"),
        ({"decay_fraction": 1.5}, "Invalid decay_fraction value: 1.5"),
        ({"step": -1}, "Invalid step value: -1"),
        ({"step": 2.5}, "Invalid step value: 2.5"),
    ],
)
def test_lr_at_invalid_arguments(overrides, message):
    options = {
        "step": 0,
        "schedule": "cos",
        "lr_max": LR_MAX,
        "total_steps": TOTAL,
        "warmup_steps": WARMUP,
    }
    options.update(overrides)
    step = options.pop("step")

    with pytest.raises(ValueError, match=re.escape(message)):
        lr_at(step, **options)


def make_optimizer(ratios):
    groups = []
    for ratio in ratios:
        group = {"params": [torch.nn.Parameter(torch.zeros(2))]}
        if ratio is not None:
            group["lr_ratio"] = ratio
        groups.append(group)
    return torch.optim.SGD(groups, lr=0.123)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_build_scheduler_follows_lr_at(schedule):
    optimizer = make_optimizer([None, 4.0])
    options = {
        "schedule": schedule,
        "lr_max": LR_MAX,
        "total_steps": TOTAL,
        "warmup_steps": WARMUP,
        "lr_min": 1e-5,
    }
    scheduler = build_scheduler(optimizer, **options)
    seen = []
    expected = []

    for step in range(TOTAL):
        seen.append([group["lr"] for group in optimizer.param_groups])
        expected.append([lr_at(step, **options), 4.0 * lr_at(step, **options)])
        optimizer.step()
        scheduler.step()

    assert seen == [pytest.approx(pair, rel=1e-12) for pair in expected]


def test_build_scheduler_sets_initial_lr():
    optimizer = make_optimizer([None, 2.0])

    build_scheduler(
        optimizer, schedule="cos", lr_max=LR_MAX, total_steps=TOTAL, warmup_steps=WARMUP
    )

    assert [group["initial_lr"] for group in optimizer.param_groups] == [
        LR_MAX,
        2 * LR_MAX,
    ]


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("inf"), "2"])
def test_build_scheduler_invalid_lr_ratio(ratio):
    optimizer = make_optimizer([None, ratio])

    with pytest.raises(
        ValueError, match=re.escape(f"lr_ratio value in param group 1: {ratio!r}")
    ):
        build_scheduler(
            optimizer,
            schedule="cos",
            lr_max=LR_MAX,
            total_steps=TOTAL,
            warmup_steps=WARMUP,
        )


def test_build_scheduler_invalid_schedule():
    with pytest.raises(ValueError, match="Unknown schedule 'step'"):
        build_scheduler(
            make_optimizer([None]),
            schedule="step",
            lr_max=LR_MAX,
            total_steps=TOTAL,
            warmup_steps=0,
        )
