"""Mixed precision for the training loop: autocast, and loss scaling for fp16.

- ``fp32``: no autocast, no scaling.
- ``bf16``: ``torch.autocast`` with bfloat16 on the trial's device. bfloat16
  has float32's exponent range, so the loss needs no scaling.
- ``fp16``: ``torch.autocast`` with float16 and a ``torch.amp.GradScaler``.

Parameters, gradients and optimizer states stay float32 in every mode. With
fp16 the loop calls `MixedPrecision.unscale_` right after the backward passes,
so the non-finite check, the clipping and the power all see the true
gradients: the power of a scaled gradient would carry the scale raised to p.
A step whose unscaled gradients hold inf or NaN while the loss is finite is an
overflow of the loss scale. `skip_step` then lowers the scale and the
parameters stay as they are, and the trial goes on.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch.optim import Optimizer

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# torch.amp.GradScaler's default initial scale.
DEFAULT_INIT_SCALE = 2.0**16


class MixedPrecision:
    """Autocast and loss scaling of one trial, by its ``precision`` setting.

    The loop's checkpoints include ``scaler.state_dict()``, so a resumed fp16
    trial keeps its loss scale.
    """

    def __init__(
        self,
        precision: str,
        device: torch.device,
        *,
        init_scale: float = DEFAULT_INIT_SCALE,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"Unknown precision {precision!r}; choose one of {list(PRECISIONS)}"
            )
        self.precision = precision
        self.device = torch.device(device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, init_scale=init_scale, enabled=precision == "fp16"
        )

    @property
    def scales_loss(self) -> bool:
        """Whether the loss is scaled, so overflowed steps are skipped, not fatal."""
        return self.scaler.is_enabled()

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scales_loss else 1.0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the context to run forward passes (and the loss) in."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, multiplied by the loss scale under fp16."""
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: Optimizer) -> None:
        """Divide the gradients by the loss scale in place (fp16 only).

        Call it once per step, after the last backward pass.
        """
        if self.scales_loss:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: Optimizer) -> None:
        """Take the optimizer step on unscaled, finite gradients.

        Under fp16 the scaler then updates its scale (it grows after
        ``growth_interval`` steps without overflow).
        """
        optimizer.step()
        if self.scales_loss:
            self.scaler.update()

    def skip_step(self) -> None:
        """Skip the optimizer step after an overflow and lower the loss scale."""
        if not self.scales_loss:
            raise RuntimeError(
                "skip_step is for fp16 loss-scale overflows; without loss scaling "
                "a non-finite gradient means the trial diverged"
            )
        self.scaler.update()
