"""Settings of one trial, as plain data that travels to a Ray worker unchanged."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrialConfig:
    """Everything one training run needs; the study layer builds one per grid point."""

    workload: str
    """Workload name: `lm` (causal language model) or `vision` (image classifier)."""

    batch_size: int
    """Examples (sequences or images) per optimizer step."""

    power: float
    """GradPower exponent p; 1.0 is the plain base optimizer."""

    lr_max: float
    """Peak learning rate of the schedule."""

    step_budget: int
    """Optimizer steps after which an unfinished trial ends as censored."""

    target_value: float | None
    """The trial ends as reached when `target_metric` gets to this value; None
    trains for the whole budget and ends as complete."""

    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    """Workload-specific model settings, for example `{"preset": "tiny"}`."""

    data: dict[str, Any] = field(default_factory=dict)
    """Workload-specific data settings (source, tokenizer, cache directory)."""

    micro_batch_size: int | None = None
    """Examples per forward pass; None runs the whole batch at once."""

    optimizer: str = "adampower"
    """`adampower`, or `muonpower` (Muon on the transformer weight matrices,
    AdamPower on the rest); see `trainers.optimizers`."""

    blockwise_lr: bool = False
    """Scale each block's rate: embedding x10, QK x8, FFN x6, VO x4, others x1."""

    muon_momentum: float = 0.95
    """Nesterov momentum of the Muon groups of `muonpower`."""

    precision: str = "fp32"
    """`fp32`, `bf16` (autocast) or `fp16` (autocast and loss scaling)."""

    schedule: str = "cos"
    warmup_steps: int = 0
    lr_min_ratio: float = 0.1
    """lr_min as a fraction of lr_max."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    """Global gradient-norm clip applied once per step; None disables clipping."""

    eval_every_steps: int = 10
    log_every_steps: int = 1
    checkpoint_every_steps: int | None = None
    """Pass the whole training state to `report` this often; None never does."""
    target_metric: str = "val/loss"
    target_mode: str = "min"
    """`min` when lower is better (losses), `max` for accuracies."""
    target_stop: bool = True
    """End the trial when it meets the target; False trains on to the end of
    the budget and keeps the step of the first evaluation that met it."""

    threads: int = 1
    """torch intra-op threads; the study layer sets it to the trial's CPU count."""

    device: str = "auto"
    """`auto` picks CUDA when available, otherwise CPU."""

    inject_nan_loss_at_step: int | None = None
    """Fault injection: replace the training loss with NaN at this step (0-based)."""

    inject_error_at_step: int | None = None
    """Fault injection: raise a RuntimeError at this step (0-based)."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown trial settings {unknown}; valid settings are {sorted(known)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def target_met(self, value: float) -> bool:
        if self.target_value is None:
            return False
        if self.target_mode == "max":
            return value >= self.target_value
        return value <= self.target_value
