"""The interface every workload implements: model, batches, loss, evaluation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.config import TrialConfig


class Workload(ABC):
    """One task: a model family, its data, its loss and its evaluation."""

    name: str
    progress_unit: str
    """What one batch item counts as in progress metrics: `tokens` or `examples`."""

    default_target_metric = "val/loss"

    def __init__(self, config: TrialConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    @classmethod
    @abstractmethod
    def prepare(cls, data: dict[str, Any], cache_root: Path) -> dict[str, Any]:
        """Fetch or build the data once per study and return the data settings
        that trials read it back with (for example a token-shard directory)."""

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def train_batch(self, step: int) -> Any:
        """Return the full batch of optimizer step `step`, a pure function of
        (seed, step) so that a resumed trial sees the same data."""

    @abstractmethod
    def split(self, batch: Any, micro_batch_size: int) -> list[Any]: ...

    @abstractmethod
    def loss(self, model: nn.Module, micro_batch: Any) -> torch.Tensor:
        """Mean loss over the micro-batch, in nats."""

    @abstractmethod
    def progress_count(self, batch: Any) -> int:
        """Tokens or examples that `batch` trains on."""

    @abstractmethod
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics, keyed like `val/loss` and `val/accuracy`."""

    @torch.no_grad()
    def final_evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics computed once on the final weights of a trial that did not
        diverge, such as zero-shot downstream accuracy; none by default."""
        return {}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Return the total parameters and those active for one token.

    Active counts each MoE expert tensor at ``num_experts_per_tok /
    num_experts`` of its size and every other tensor whole.
    """
    total = 0
    active = 0
    config = getattr(model, "config", None)
    experts = getattr(config, "num_experts", None)
    per_token = getattr(config, "num_experts_per_tok", None)
    for name, param in model.named_parameters():
        total += param.numel()
        if experts and ".experts." in name:
            active += param.numel() * per_token // experts
        else:
            active += param.numel()
    return {"total": total, "active": active}
