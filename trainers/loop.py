"""One training loop for every workload, run inside a Ray worker or a plain process.

Order inside one optimizer step: accumulate micro-batches, check the loss and
gradient norm are finite, clip the global norm once, apply the power and the
base optimizer step (AdamPower does both), then advance the schedule.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trainers.config import TrialConfig
from trainers.gradpower import AdamPower
from trainers.schedules import build_scheduler
from trainers.workloads import get_workload_class
from trainers.workloads.base import Workload

logger = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]

END_STATES = ("reached", "censored", "diverged", "failed")


@dataclass
class TrialOutcome:
    end_state: str
    steps: int
    final_metrics: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: nn.Module, config: TrialConfig) -> AdamPower:
    """AdamPower with weight decay on matrices only (not norms, biases or gains)."""
    if config.optimizer != "adampower":
        raise ValueError(
            f"Unknown optimizer {config.optimizer!r}; this version supports 'adampower'"
        )
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = AdamPower(
        groups,
        lr=config.lr_max,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        power=config.power,
    )
    logger.info(
        "optimizer AdamPower power=%s lr_max=%s betas=(%s, %s) eps=%s: "
        "%d decayed tensors (%d params, weight_decay=%s), %d not decayed (%d params)",
        config.power,
        config.lr_max,
        config.beta1,
        config.beta2,
        config.eps,
        len(decay),
        sum(p.numel() for p in decay),
        config.weight_decay,
        len(no_decay),
        sum(p.numel() for p in no_decay),
    )
    return optimizer


def _micro_batch_size(config: TrialConfig) -> int:
    micro = config.micro_batch_size or config.batch_size
    if config.batch_size % micro != 0:
        raise ValueError(
            f"micro_batch_size {micro} does not divide batch_size {config.batch_size}; "
            "choose a micro-batch size that divides every batch size of the grid"
        )
    return micro


def _accumulate_gradients(
    workload: Workload, model: nn.Module, batch: Any, micro: int
) -> float:
    """Backpropagate the batch in micro-batches; return the batch's mean loss.

    Each micro-batch loss is divided by the number of micro-batches, so the
    accumulated gradient equals the full-batch mean-loss gradient.
    """
    micro_batches = workload.split(batch, micro)
    total = 0.0
    for micro_batch in micro_batches:
        loss = workload.loss(model, micro_batch) / len(micro_batches)
        loss.backward()
        total += loss.item()
    return total


def _gradient_norm(model: nn.Module, clip_norm: float | None) -> float:
    """Clip the global gradient norm once (when configured) and return the norm
    before clipping; a non-finite norm leaves the gradients untouched."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    ).item()
    if clip_norm is not None and math.isfinite(norm) and norm > clip_norm:
        scale = clip_norm / (norm + 1e-6)
        torch._foreach_mul_(grads, scale)
    return norm


def run_trial(config: TrialConfig, report: Report) -> TrialOutcome:
    """Train until the target is met, the budget is spent or the loss diverges.

    `report` receives a metrics dict after every logged step; the last one it
    receives carries `end_state`. The caller decides what reporting means
    (Ray Tune, a log line, a list in a test).
    """
    torch.set_num_threads(max(1, config.threads))
    seed_everything(config.seed)
    device = resolve_device(config.device)
    micro = _micro_batch_size(config)

    workload = get_workload_class(config.workload)(config, device)
    model = workload.build_model().to(device)
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(
        optimizer,
        schedule=config.schedule,
        lr_max=config.lr_max,
        total_steps=config.step_budget,
        warmup_steps=config.warmup_steps,
        lr_min=config.lr_max * config.lr_min_ratio,
    )
    unit = workload.progress_unit
    progress = 0
    train_seconds = 0.0
    eval_seconds = 0.0
    metrics: dict[str, Any] = {}

    for step in range(config.step_budget):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        batch = workload.train_batch(step)
        train_loss = _accumulate_gradients(workload, model, batch, micro)
        if config.inject_nan_loss_at_step == step:
            train_loss = float("nan")
        grad_norm = _gradient_norm(model, config.clip_norm)

        metrics = {"step": step, "train/loss": train_loss, "train/lr": lr}
        metrics["train/grad_norm"] = grad_norm
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            # The parameters keep the values of the last finite step.
            metrics["end_state"] = "diverged"
            report(metrics)
            logger.warning(
                "diverged at step %d: loss=%s grad_norm=%s", step, train_loss, grad_norm
            )
            return TrialOutcome("diverged", step, metrics)

        optimizer.step()
        scheduler.step()
        progress += workload.progress_count(batch)
        train_seconds += time.perf_counter() - started
        steps_done = step + 1
        metrics["step"] = steps_done
        metrics[f"progress/{unit}"] = progress
        metrics["time/train_sec"] = train_seconds

        last_step = steps_done == config.step_budget
        evaluate_now = steps_done % config.eval_every_steps == 0 or last_step
        if evaluate_now:
            eval_started = time.perf_counter()
            model.eval()
            metrics.update(workload.evaluate(model))
            model.train()
            eval_seconds += time.perf_counter() - eval_started
            metrics["time/eval_sec"] = eval_seconds
            value = metrics.get(config.target_metric)
            if value is not None and config.target_met(value):
                metrics["end_state"] = "reached"
                metrics["target/steps"] = steps_done
                metrics[f"target/{unit}"] = progress
                metrics["target/train_sec"] = train_seconds
                report(metrics)
                return TrialOutcome("reached", steps_done, metrics)
            if value is not None and not math.isfinite(value):
                metrics["end_state"] = "diverged"
                report(metrics)
                return TrialOutcome("diverged", steps_done, metrics)

        if last_step:
            metrics["end_state"] = "censored"
            report(metrics)
            return TrialOutcome("censored", steps_done, metrics)
        if evaluate_now or steps_done % config.log_every_steps == 0:
            report(metrics)

    raise RuntimeError("step_budget must be at least 1")
