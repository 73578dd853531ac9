"""One training loop for every workload, run inside a Ray worker or a plain process.

Order inside one optimizer step:

1. accumulate micro-batches, under autocast for bf16 and fp16;
2. unscale the gradients (fp16 only);
3. check that the loss and the gradient norm are finite;
4. clip the global norm once;
5. apply the power and the base optimizer step (AdamPower does both);
6. advance the schedule.

Under fp16 a non-finite gradient with a finite loss is a loss-scale overflow.
The step is then skipped and counted in `train/skipped_steps`, and the trial
goes on.
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

from trainers.checkpoint import capture_state, restore_state
from trainers.config import TrialConfig
from trainers.optimizers import build_optimizer
from trainers.precision import MixedPrecision
from trainers.schedules import build_scheduler
from trainers.workloads import get_workload_class
from trainers.workloads.base import Workload, count_parameters

logger = logging.getLogger(__name__)

# report(metrics) or, at checkpoint steps, report(metrics, checkpoint=state).
Report = Callable[..., None]

END_STATES = ("reached", "censored", "complete", "diverged", "failed")


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


def _micro_batch_size(config: TrialConfig) -> int:
    micro = config.micro_batch_size or config.batch_size
    if config.batch_size % micro != 0:
        raise ValueError(
            f"micro_batch_size {micro} does not divide batch_size {config.batch_size}; "
            "choose a micro-batch size that divides every batch size of the grid"
        )
    return micro


def _accumulate_gradients(
    workload: Workload,
    model: nn.Module,
    batch: Any,
    micro: int,
    precision: MixedPrecision,
) -> float:
    """Backpropagate the batch in micro-batches; return the batch's mean loss.

    Each micro-batch loss is divided by the number of micro-batches, so the
    accumulated gradient equals the full-batch mean-loss gradient. The loss is
    read back once per batch, so micro-batches queue on a GPU without a sync.
    """
    micro_batches = workload.split(batch, micro)
    total = torch.zeros((), device=precision.device)
    for micro_batch in micro_batches:
        with precision.autocast():
            loss = workload.loss(model, micro_batch) / len(micro_batches)
        precision.backward(loss)
        total += loss.detach().float()
    return total.item()


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


def _final_evaluation(
    workload: Workload, model: nn.Module, precision: MixedPrecision
) -> dict[str, Any]:
    """Return the workload's metrics on the final weights, with their time."""
    started = time.perf_counter()
    model.eval()
    with precision.autocast():
        metrics: dict[str, Any] = workload.final_evaluate(model)
    model.train()
    if metrics:
        metrics["time/final_eval_sec"] = time.perf_counter() - started
    return metrics


def run_trial(
    config: TrialConfig, report: Report, restore: dict[str, Any] | None = None
) -> TrialOutcome:
    """Train until the target is met, the budget is spent or the loss diverges.

    With `config.target_stop` off, a trial that meets the target trains on to
    the end of its budget and ends as reached, its `target/*` metrics from
    the first evaluation that met the target. A trial that ends without
    diverging gets the workload's `final_evaluate` metrics in its last report.

    `report` receives a metrics dict after every logged step; the last one it
    receives carries `end_state`. Every `checkpoint_every_steps` it also gets
    the training state as `checkpoint=`, which `restore` takes back to
    continue with the same learning rate and the same next batch. The caller
    decides what reporting means (Ray Tune, a log line, a list in a test).
    """
    torch.set_num_threads(max(1, config.threads))
    seed_everything(config.seed)
    device = resolve_device(config.device)
    micro = _micro_batch_size(config)

    workload = get_workload_class(config.workload)(config, device)
    model = workload.build_model().to(device)
    model.train()
    sizes = count_parameters(model)
    size_metrics = {
        "model/params": sizes["total"],
        "model/active_params": sizes["active"],
    }
    optimizer = build_optimizer(model, config)
    precision = MixedPrecision(config.precision, device)
    scheduler = build_scheduler(
        optimizer,
        schedule=config.schedule,
        lr_max=config.lr_max,
        total_steps=config.step_budget,
        warmup_steps=config.warmup_steps,
        lr_min=config.lr_max * config.lr_min_ratio,
    )
    unit = workload.progress_unit
    counters = {"step": 0, "progress": 0, "train_seconds": 0.0, "eval_seconds": 0.0}
    if restore is not None:
        counters = restore_state(restore, model, optimizer, scheduler, precision.scaler)
        logger.info("resumed from step %d", counters["step"])
    progress = int(counters["progress"])
    train_seconds = counters["train_seconds"]
    eval_seconds = counters["eval_seconds"]
    # With target_stop off, the metrics of the first evaluation that met the
    # target; every later report carries them.
    reached = {k: v for k, v in counters.items() if k.startswith("target/")}
    metrics: dict[str, Any] = {}
    skipped_steps = 0

    for step in range(int(counters["step"]), config.step_budget):
        started = time.perf_counter()
        # The schedule's rate, without the group's block-wise ratio.
        first_group = optimizer.param_groups[0]
        lr = first_group["lr"] / first_group.get("lr_ratio", 1.0)
        optimizer.zero_grad(set_to_none=True)
        batch = workload.train_batch(step)
        train_loss = _accumulate_gradients(workload, model, batch, micro, precision)
        if config.inject_nan_loss_at_step == step:
            train_loss = float("nan")
        if config.inject_error_at_step == step:
            raise RuntimeError(
                f"injected fault: error at step {step} on purpose, set by "
                "inject_error_at_step (fault_injection.error_at_step in a study file)"
            )
        precision.unscale_(optimizer)
        grad_norm = _gradient_norm(model, config.clip_norm)

        metrics = {"step": step, "train/loss": train_loss, "train/lr": lr}
        metrics["train/grad_norm"] = grad_norm
        finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
        # Under fp16 a finite loss with non-finite gradients is a loss-scale
        # overflow, not a divergence.
        overflow = precision.scales_loss and math.isfinite(train_loss) and not finite
        if not finite and not overflow:
            # The parameters keep the values of the last finite step.
            metrics["end_state"] = "diverged"
            report(metrics)
            logger.warning(
                "diverged at step %d: loss=%s grad_norm=%s", step, train_loss, grad_norm
            )
            return TrialOutcome("diverged", step, metrics)

        if overflow:
            precision.skip_step()
            skipped_steps += 1
            logger.info(
                "skipped step %d: fp16 gradients overflowed, loss scale lowered to %g",
                step,
                precision.loss_scale,
            )
        else:
            precision.step(optimizer)
        scheduler.step()
        if precision.scales_loss:
            metrics["train/loss_scale"] = precision.loss_scale
            metrics["train/skipped_steps"] = skipped_steps
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
            with precision.autocast():
                metrics.update(workload.evaluate(model))
            model.train()
            metrics.update(size_metrics)
            eval_seconds += time.perf_counter() - eval_started
            metrics["time/eval_sec"] = eval_seconds
            value = metrics.get(config.target_metric)
            if value is not None and config.target_met(value) and not reached:
                reached = {
                    "target/steps": steps_done,
                    f"target/{unit}": progress,
                    "target/train_sec": train_seconds,
                }
                if config.target_stop:
                    metrics.update(reached, end_state="reached")
                    metrics.update(_final_evaluation(workload, model, precision))
                    report(metrics)
                    return TrialOutcome("reached", steps_done, metrics)
            if value is not None and not math.isfinite(value):
                metrics["end_state"] = "diverged"
                report(metrics)
                return TrialOutcome("diverged", steps_done, metrics)

        metrics.update(reached)
        if last_step:
            # Without a target the whole budget is the plan, not a censoring.
            state = "censored" if config.target_value is not None else "complete"
            if reached:
                state = "reached"
            metrics["end_state"] = state
            metrics.update(_final_evaluation(workload, model, precision))
            report(metrics)
            return TrialOutcome(state, steps_done, metrics)
        every = config.checkpoint_every_steps
        if every and steps_done % every == 0:
            counters = {
                "step": steps_done,
                "progress": progress,
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
                **reached,
            }
            state = capture_state(
                model, optimizer, scheduler, counters, precision.scaler
            )
            report(metrics, checkpoint=state)
        elif evaluate_now or steps_done % config.log_every_steps == 0:
            report(metrics)

    raise RuntimeError("step_budget must be at least 1")
