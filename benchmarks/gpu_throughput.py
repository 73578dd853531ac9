"""Measure training throughput of the paper-scale workloads through the trial loop.

LLaMA-0.2B trains for --lm-steps optimizer steps of --lm-batch-size sequences
on random token ids (T5 vocabulary, 256-token sequences), accumulated in the
micro-batches of the study file. ResNet-34 trains one epoch of CIFAR-10 at
--vision-batch-size on 50,000 random images written in the official pickle
format, with the study's augmentation. Model presets, optimizer, schedule,
precision and micro-batch size come from the `paper` scale of batch_power_grid,
and both runs go through `trainers.loop.run_trial` with AdamPower (p = 1.2 by
default), so the figures include data loading, the power, clipping and the
optimizer step.

Reported over the steps after --warmup-steps (torch.compile of the power kernel,
cuDNN autotuning and the allocator's first allocations fall in the warm-up) and
without evaluation time:

- tokens/s and images/s: progress over training seconds, which `run_trial`
  counts per step and which end in a host sync (the gradient-norm check).
- MFU: tokens/s * FLOPs per token / peak FLOP/s. FLOPs per token are
  6 * N + 12 * L * d * T. N counts the parameters that take part in matrix
  products, which is all of them but the input embedding (a lookup). The
  second term is the attention scores and weighted sum over T = seq_len
  positions in L layers of width d, forward and backward, without a discount
  for the causal mask. The default peak is 989 TFLOP/s, the dense bf16 Tensor
  Core peak listed for the H200 SXM (without 2:4 sparsity). Set --peak-tflops
  for other GPUs.

Run from the repository root: python benchmarks/gpu_throughput.py
--tiny runs small presets for a few steps on the CPU, in seconds, as a check
that the script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.grid import expand
from study.spec import load_study
from trainers.config import TrialConfig
from trainers.data.text import write_token_shards
from trainers.data.vision import write_cifar10_folder
from trainers.loop import run_trial
from trainers.workloads.lm import build_language_model, count_parameters

H200_BF16_DENSE_TFLOPS = 989.0
CIFAR10_TRAIN_IMAGES = 50_000
CIFAR10_TEST_IMAGES = 10_000
LM_TRAIN_TOKENS = 1 << 22
LM_VAL_WINDOWS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="run small presets for a few steps on the CPU, to check the script",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda, or cpu with --tiny)",
    )
    parser.add_argument(
        "--lm-steps", type=int, default=200, help="LM optimizer steps to train"
    )
    parser.add_argument(
        "--lm-batch-size", type=int, default=512, help="sequences per LM step"
    )
    parser.add_argument(
        "--vision-batch-size", type=int, default=128, help="images per ResNet step"
    )
    parser.add_argument("--power", type=float, default=1.2, help="GradPower exponent")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=10,
        help="steps at the start of each run that the rates leave out",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense TFLOP/s for MFU (default on CUDA: 989, H200 bf16)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results as JSON to this file"
    )
    return parser.parse_args(argv)


def paper_trial(label: str, data: dict[str, Any]) -> TrialConfig:
    """Return the first `paper`-scale trial of batch_power_grid for ``label``,
    with ``data`` merged over the study file's data settings."""
    scale = load_study("batch_power_grid").scale("paper")
    merged = {**scale.workloads[label].data, **data}
    plan = expand(scale, {label: merged})[0]
    return TrialConfig.from_dict(plan.config)


def lm_flops_per_token(config: TrialConfig, vocab_rows: int) -> float:
    """Return training FLOPs per token, 6 * N + 12 * L * d * T (see the module
    docstring)."""
    seq_len = int(config.data["seq_len"])
    with torch.device("meta"):
        model = build_language_model(config.model, vocab_rows, seq_len)
    embedding = model.get_input_embeddings().weight.numel()
    matmul_params = count_parameters(model)["active"] - embedding
    layers = model.config.num_hidden_layers
    width = model.config.hidden_size
    return 6 * matmul_params + 12 * layers * width * seq_len


def rate_after_warmup(
    reports: list[dict[str, Any]], unit: str, warmup_steps: int
) -> dict[str, float]:
    """Return units per training second over the steps after ``warmup_steps``."""
    by_step = {
        report["step"]: report for report in reports if "time/train_sec" in report
    }
    last = max(by_step)
    if warmup_steps >= last:
        raise ValueError(
            f"{last} steps leave none after --warmup-steps {warmup_steps}; "
            "lower --warmup-steps or train longer"
        )
    start = by_step[warmup_steps] if warmup_steps else {"time/train_sec": 0.0}
    start_progress = start.get(f"progress/{unit}", 0)
    seconds = by_step[last]["time/train_sec"] - start["time/train_sec"]
    amount = by_step[last][f"progress/{unit}"] - start_progress
    return {
        "timed_steps": last - warmup_steps,
        "train_sec": seconds,
        f"{unit}_per_sec": amount / seconds,
    }


def run_lm(args: argparse.Namespace, device: str, root: Path) -> dict[str, Any]:
    base = paper_trial("lm", {})
    seq_len = 32 if args.tiny else int(base.data["seq_len"])
    vocab_size = 32100
    generator = np.random.default_rng(0)
    train = generator.integers(
        0, vocab_size, LM_TRAIN_TOKENS // (64 if args.tiny else 1)
    )
    validation = generator.integers(0, vocab_size, LM_VAL_WINDOWS * seq_len + 1)
    shards = write_token_shards(
        root / "tokens", train, validation, vocab_size=vocab_size, eos_id=1
    )
    overrides: dict[str, Any] = {
        "data": {**base.data, "shards_dir": str(shards.directory), "seq_len": seq_len},
        "batch_size": args.lm_batch_size,
        "power": args.power,
        "step_budget": args.lm_steps,
        "eval_every_steps": args.lm_steps,
        "warmup_steps": min(base.warmup_steps, args.lm_steps // 10),
        "device": device,
    }
    if args.tiny:
        overrides.update(model={"preset": "tiny"}, precision="fp32", threads=1)
        overrides.update(micro_batch_size=args.lm_batch_size // 2)
    config = dataclasses.replace(base, **overrides)
    reports: list[dict[str, Any]] = []
    run_trial(config, reports.append)

    result = rate_after_warmup(reports, "tokens", args.warmup_steps)
    result.update(
        workload="lm",
        model=config.model,
        batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size,
        seq_len=seq_len,
        precision=config.precision,
        flops_per_token=lm_flops_per_token(config, shards.model_vocab_size),
    )
    return result


def run_vision(args: argparse.Namespace, device: str, root: Path) -> dict[str, Any]:
    base = paper_trial("vision", {"root": str(root)})
    train_images = 256 if args.tiny else CIFAR10_TRAIN_IMAGES
    test_images = 64 if args.tiny else CIFAR10_TEST_IMAGES
    generator = np.random.default_rng(1)
    write_cifar10_folder(
        root,
        generator.integers(0, 256, (train_images, 3, 32, 32), dtype=np.uint8),
        generator.integers(0, 10, train_images).tolist(),
        generator.integers(0, 256, (test_images, 3, 32, 32), dtype=np.uint8),
        generator.integers(0, 10, test_images).tolist(),
    )
    batch_size = 32 if args.tiny else args.vision_batch_size
    # One epoch; the last step wraps into the next epoch's first images.
    steps = math.ceil(train_images / batch_size)
    overrides: dict[str, Any] = {
        "batch_size": batch_size,
        "power": args.power,
        "step_budget": steps,
        "eval_every_steps": steps,
        "device": device,
    }
    if args.tiny:
        overrides.update(model={"preset": "tiny"}, threads=1)
    config = dataclasses.replace(base, **overrides)
    reports: list[dict[str, Any]] = []
    run_trial(config, reports.append)

    result = rate_after_warmup(reports, "examples", args.warmup_steps)
    result.update(
        workload="vision",
        model=config.model,
        batch_size=batch_size,
        steps=steps,
        precision=config.precision,
        augment=bool(config.data.get("augment")),
    )
    return result


def describe_machine(device: str) -> dict[str, Any]:
    machine = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return machine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.lm_steps = min(args.lm_steps, 4)
        args.lm_batch_size = min(args.lm_batch_size, 8)
        args.warmup_steps = min(args.warmup_steps, 1)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device found; pass --tiny (or --device cpu) to run on the CPU.")
        return 2
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.startswith("cuda"):
        peak_tflops = H200_BF16_DENSE_TFLOPS
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as directory:
        root = Path(directory)
        lm = run_lm(args, device, root / "lm")
        vision = run_vision(args, device, root / "cifar")
    machine = describe_machine(device)
    if device.startswith("cuda"):
        machine["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30

    tokens_per_sec = lm["tokens_per_sec"]
    lm["mfu"] = None
    if peak_tflops:
        lm["mfu"] = tokens_per_sec * lm["flops_per_token"] / (peak_tflops * 1e12)
    print(f"machine: {json.dumps(machine)}")
    print(
        f"lm {lm['model']}: {tokens_per_sec:,.0f} tokens/s over {lm['timed_steps']} "
        f"steps of {lm['batch_size']} x {lm['seq_len']} tokens "
        f"(micro-batch {lm['micro_batch_size']}, {lm['precision']})"
    )
    if lm["mfu"] is None:
        print("lm MFU: not computed without --peak-tflops")
    else:
        print(
            f"lm MFU: {lm['mfu']:.1%} at {lm['flops_per_token'] / 1e9:.3f} GFLOP per "
            f"token and a peak of {peak_tflops:g} TFLOP/s"
        )
    print(
        f"vision {vision['model']}: {vision['examples_per_sec']:,.0f} images/s over "
        f"{vision['timed_steps']} steps of {vision['batch_size']} images "
        f"({vision['precision']}, augment={vision['augment']})"
    )
    print(f"total wall time: {time.perf_counter() - started:.1f} s")
    if args.json:
        results = {"machine": machine, "peak_tflops": peak_tflops, "lm": lm}
        results["vision"] = vision
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
