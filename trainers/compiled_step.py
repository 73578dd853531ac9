"""A torch.compile'd AdamPower step that fuses the power into AdamW's update.

On a GPU, AdamPower's unfused path writes the powered gradient back to memory
and then runs torch's fused AdamW, which reads it again. The graph compiled here
computes sign(g) * |g|**p inside the same pointwise pass that updates the
moments and the parameter. Inductor turns the foreach ops of one call into
horizontally fused kernels, so each element of the parameter, the gradient and
both moments is read once, and only the parameter and the moments are written.
The gradient keeps its raw value.

Each group's lr, which a scheduler changes, enters the graph as a 0-d tensor
on the parameters' device, so the graph compiles once per model. The step
counts stay on that device too, so no value is copied back to the host. A
group lr given as a CUDA tensor is the exception: reading it synchronizes.

Set GRADPOWER_COMPILED_STEP=0 to turn this path off. When compiling fails (no
Triton, no C++ compiler), one warning is logged and AdamPower keeps its other
paths for the rest of the process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

COMPILED_STEP_ENV_VAR = "GRADPOWER_COMPILED_STEP"

# The device types whose parameters take the compiled step. On the CPU the C
# kernel in trainers/adampower_kernel.c is faster than Inductor's C++ code.
DEVICE_TYPES = frozenset({"cuda"})

# A step compiles only when the parameters it would update contain at least
# this many elements in all. Compiling the graph for a small model took 5 to 45 s
# on a 2-core CPU, and for small models the unfused path costs less than that.
MIN_TOTAL_NUMEL = 1 << 22

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_compiled_graph: Callable[..., None] | None = None
_compile_failed = False


def compiled_step_enabled() -> bool:
    """Return False when GRADPOWER_COMPILED_STEP=0 or an earlier compile failed."""
    return not _compile_failed and os.environ.get(COMPILED_STEP_ENV_VAR, "1") != "0"


def supports_tensor(tensor: Tensor, param: Tensor) -> bool:
    """Return whether ``tensor`` (a param, its grad or a moment) fits the graph."""
    return (
        tensor.layout == torch.strided
        and tensor.dtype == param.dtype
        and tensor.dtype in _DTYPES
        and tensor.device == param.device
        and tensor.shape == param.shape
    )


@dataclass
class StepBatch:
    """The parameters of one compiled call, which share betas, eps and power."""

    beta1: float
    beta2: float
    eps: float
    power: float
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    lrs: list[Tensor] = field(default_factory=list)
    weight_decays: list[float] = field(default_factory=list)

    def numel(self) -> int:
        return sum(param.numel() for param in self.params)


def run_batches(batches: Sequence[StepBatch]) -> int:
    """Run the compiled step on the batches in order and return how many ran.

    A batch compiles on its first call, before any of its tensors change, so the
    batches from the returned index on are untouched and the caller updates them
    another way. A failure is logged once and disables the compiled step for the
    process.
    """
    global _compiled_graph, _compile_failed
    if _compiled_graph is None:
        logger.info(
            "compiling the fused AdamPower step with torch.compile; the first step "
            "takes seconds to a minute (set %s=0 to skip)",
            COMPILED_STEP_ENV_VAR,
        )
        _compiled_graph = torch.compile(_power_adamw_graph, fullgraph=True)
    for index, batch in enumerate(batches):
        try:
            _compiled_graph(
                batch.params,
                batch.grads,
                batch.exp_avgs,
                batch.exp_avg_sqs,
                batch.steps,
                batch.lrs,
                tuple(batch.weight_decays),
                beta1=batch.beta1,
                beta2=batch.beta2,
                eps=batch.eps,
                power=batch.power,
            )
        # torch.compile reports a missing or broken compiler (Triton or C++)
        # through many exception types, so any exception here means "no
        # compiled step".
        except Exception as error:  # noqa: BLE001
            _compile_failed = True
            logger.warning(
                "the fused AdamPower step failed to compile or run on %s; using "
                "the power transform and torch's AdamW from now on: %s",
                batch.params[0].device,
                error,
            )
            return index
    return len(batches)


def _power_adamw_graph(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lrs: list[Tensor],
    weight_decays: tuple[float, ...],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    power: float,
) -> None:
    """Take AdamW's step, in torch's operation order, on sign(g) * |g|**power.

    ``steps`` and ``lrs`` are 0-d float32 tensors on the parameters' device, one
    per parameter. This is the function that torch.compile compiles.
    """
    torch._foreach_add_(steps, 1)
    magnitudes = torch._foreach_abs(grads)
    torch._foreach_pow_(magnitudes, power)
    # sign() maps NaN to 0, but the NaN magnitude keeps the product NaN. Zeros
    # stay zero because pow(0, p) is 0 for p > 0.
    powered = torch._foreach_mul(torch._foreach_sign(grads), magnitudes)

    decay_factors = [1 - lr * decay for lr, decay in zip(lrs, weight_decays)]
    torch._foreach_mul_(params, decay_factors)
    torch._foreach_lerp_(exp_avgs, powered, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, powered, powered, 1 - beta2)

    # 1 - beta**step, written as -(beta**step - 1) because foreach_sub takes no
    # scalar as its first argument.
    bias_corrections1 = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(bias_corrections1, 1)
    torch._foreach_neg_(bias_corrections1)
    bias_corrections2 = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bias_corrections2, 1)
    torch._foreach_neg_(bias_corrections2)
    torch._foreach_sqrt_(bias_corrections2)
    step_sizes = torch._foreach_div(lrs, bias_corrections1)

    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, bias_corrections2)
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_sub_(params, updates)


def group_key(group: dict[str, Any]) -> tuple[float, float, float, float]:
    """Return the hyperparameters that a compiled call fixes as constants."""
    beta1, beta2 = group["betas"]
    return (float(beta1), float(beta2), float(group["eps"]), float(group["power"]))
