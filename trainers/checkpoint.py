"""The whole training state of a trial, so a resumed trial continues exactly.

Batches are pure functions of (seed, step), so the step counter is the data
position; the RNG states cover anything else random (augmentation, dropout).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def capture_state(
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    counters: dict[str, float],
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Collect model, optimizer (moments and power), schedule, loss scale,
    counters and RNGs."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "counters": dict(counters),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict[str, float]:
    """Load a captured state in place and return its counters."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        # A disabled scaler (fp32, bf16) saves an empty state.
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return dict(state["counters"])
