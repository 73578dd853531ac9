"""Learning-rate schedules counted in optimizer steps.

``step`` is the number of optimizer steps already taken, so step 0 is the first
update and step ``total_steps - 1`` the last. Every schedule starts with a linear
warmup whose first update uses ``lr_max / warmup_steps`` and whose last warmup
step uses ``lr_max``:

- ``cos``: cosine decay from lr_max after the warmup to lr_min at the last step.
- ``wsd`` (warmup-stable-decay): lr_max until the final ``decay_fraction`` of the
  steps, then a linear decay to lr_min at the last step.
- ``constant``: lr_max after the warmup.

lr_min defaults to lr_max / 10, the terminal rate of the GradPower paper's
language-model runs.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cos", "wsd", "constant")

DEFAULT_LR_MIN_RATIO = 0.1


def lr_at(
    step: int,
    *,
    schedule: str,
    lr_max: float,
    total_steps: int,
    warmup_steps: int,
    lr_min: float | None = None,
    decay_fraction: float = 0.2,
) -> float:
    """Return the learning rate of the update that follows ``step`` finished steps.

    Steps at or past ``total_steps`` get the final rate. The decay of ``cos`` and
    ``wsd`` follows the peak, which is the last warmup step (step 0 without a
    warmup). When the peak is the last step, for example when the warmup covers
    every step, the last step uses lr_max instead of lr_min.

    Raises:
        ValueError: an unknown schedule name or an argument out of range.
    """
    lr_min = _check_arguments(
        step=step,
        schedule=schedule,
        lr_max=lr_max,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        lr_min=lr_min,
        decay_fraction=decay_fraction,
    )
    step = min(step, total_steps - 1)
    if step < warmup_steps:
        return lr_max * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr_max

    # The peak is the last warmup step, or step 0 without a warmup. Decay phases
    # start after it and end at the last step.
    peak = max(warmup_steps, 1) - 1
    last = total_steps - 1
    if schedule == "cos":
        if step == peak:
            return lr_max
        progress = (step - peak) / (last - peak)
        # cos(pi) is exactly -1.0, so the last step gets exactly lr_min.
        return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(total_steps - decay_steps, peak + 1)
    if step < decay_start:
        return lr_max
    progress = (step - decay_start + 1) / (last - decay_start + 1)
    return lr_min + (lr_max - lr_min) * (1.0 - progress)


def build_scheduler(
    optimizer: Optimizer,
    *,
    schedule: str,
    lr_max: float,
    total_steps: int,
    warmup_steps: int,
    lr_min: float | None = None,
    decay_fraction: float = 0.2,
) -> LambdaLR:
    """Build a LambdaLR that sets each group's lr to ``lr_at(step) * lr_ratio``.

    A param group may carry ``lr_ratio`` (default 1.0), for example for
    block-wise learning rates. Call ``scheduler.step()`` once after every
    optimizer step. The scheduler overwrites each group's ``lr`` and
    ``initial_lr`` (lr_max times the group's ratio) at construction.

    Raises:
        ValueError: the schedule arguments are invalid (see :func:`lr_at`), or a
            group's ``lr_ratio`` is not a finite number > 0.
    """
    # Imported here so that validating a study file does not load torch.
    from torch.optim.lr_scheduler import LambdaLR

    _check_arguments(
        step=0,
        schedule=schedule,
        lr_max=lr_max,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        lr_min=lr_min,
        decay_fraction=decay_fraction,
    )
    for index, group in enumerate(optimizer.param_groups):
        ratio = group.get("lr_ratio", 1.0)
        if not _is_positive_finite(ratio):
            raise ValueError(
                f"Invalid lr_ratio value in param group {index}: {ratio!r}. "
                "Use a finite number > 0 (1.0 keeps the schedule's rate)."
            )
        group["initial_lr"] = lr_max * ratio
        group["lr"] = lr_max * ratio

    def factor(step: int) -> float:
        lr = lr_at(
            step,
            schedule=schedule,
            lr_max=lr_max,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            lr_min=lr_min,
            decay_fraction=decay_fraction,
        )
        return lr / lr_max

    return LambdaLR(optimizer, factor)


def _is_positive_finite(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(
    *,
    step: Any,
    schedule: Any,
    lr_max: Any,
    total_steps: Any,
    warmup_steps: Any,
    lr_min: Any,
    decay_fraction: Any,
) -> float:
    """Validate the schedule arguments and return lr_min with its default filled in."""
    if schedule not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule {schedule!r}. Choose one of {', '.join(SCHEDULES)}."
        )
    _check_steps(step=step, total_steps=total_steps, warmup_steps=warmup_steps)
    return _check_rates(lr_max=lr_max, lr_min=lr_min, decay_fraction=decay_fraction)


def _check_steps(*, step: Any, total_steps: Any, warmup_steps: Any) -> None:
    if not _is_count(total_steps) or total_steps < 1:
        raise ValueError(
            f"Invalid total_steps value: {total_steps!r}. Use an integer >= 1."
        )
    if not _is_count(warmup_steps) or warmup_steps < 0:
        raise ValueError(
            f"Invalid warmup_steps value: {warmup_steps!r}. Use an integer >= 0 "
            "(0 starts at lr_max)."
        )
    if warmup_steps > total_steps:
        raise ValueError(
            f"Invalid warmup_steps value: {warmup_steps} exceeds total_steps "
            f"{total_steps}. Use at most total_steps warmup steps."
        )
    if not _is_count(step) or step < 0:
        raise ValueError(
            f"Invalid step value: {step!r}. Use the number of optimizer steps "
            "already taken, an integer >= 0."
        )


def _check_rates(*, lr_max: Any, lr_min: Any, decay_fraction: Any) -> float:
    """Validate the rates and the decay fraction, and return lr_min with its default."""
    if not _is_positive_finite(lr_max):
        raise ValueError(f"Invalid lr_max value: {lr_max!r}. Use a finite number > 0.")

    if lr_min is None:
        lr_min = lr_max * DEFAULT_LR_MIN_RATIO
    valid_lr_min = (
        isinstance(lr_min, numbers.Real)
        and not isinstance(lr_min, bool)
        and math.isfinite(lr_min)
        and lr_min >= 0
    )
    if not valid_lr_min:
        raise ValueError(
            f"Invalid lr_min value: {lr_min!r}. Use a finite number >= 0, "
            "at most lr_max."
        )
    if lr_min > lr_max:
        raise ValueError(
            f"Invalid lr_min value: {lr_min} exceeds lr_max {lr_max}. "
            "Use lr_min <= lr_max."
        )

    valid_fraction = (
        isinstance(decay_fraction, numbers.Real)
        and not isinstance(decay_fraction, bool)
        and 0 < decay_fraction <= 1
    )
    if not valid_fraction:
        raise ValueError(
            f"Invalid decay_fraction value: {decay_fraction!r}. Use a number in "
            "(0, 1], the share of total_steps that the wsd decay takes."
        )
    return float(lr_min)
