"""Time one optimizer step of AdamPower against fused AdamW on the CPU or a GPU.

The parameters mimic a small LLaMA-style decoder (tied embedding, attention and
SwiGLU matrices, norm gains) sized to --params-millions. Every candidate gets the
same float32 gradients, restored before each timed step because AdamPower
overwrites them. Candidates run in turn within each repeat, so load from other
processes spreads over all of them. The table reports the median and the minimum
over the repeats and the median's ratio to fused AdamW.

Run from the repository root: python benchmarks/power_step.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from study.metadata import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers import compiled_step, gradpower, power_kernel
from trainers.gradpower import AdamPower

POWER = 1.2
HIDDEN = 384
FFN = 1024
MAX_VOCAB = 32000


def decoder_shapes(params_millions: float) -> list[tuple[int, ...]]:
    """Return the parameter shapes of a decoder of about ``params_millions`` M."""
    target = int(params_millions * 1e6)
    block = [(HIDDEN,), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN)]
    block += [(HIDDEN, HIDDEN), (HIDDEN,), (FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
    block_numel = sum(_numel(shape) for shape in block)
    vocab = min(MAX_VOCAB, max(1000, (target - block_numel) // HIDDEN))
    layers = max(1, round((target - vocab * HIDDEN) / block_numel))
    return [(vocab, HIDDEN)] + block * layers + [(HIDDEN,)]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class Candidate:
    """One optimizer under test, with its own parameters and gradients."""

    def __init__(
        self,
        name: str,
        shapes: list[tuple[int, ...]],
        grads: list[torch.Tensor],
        build: Callable[[list[torch.nn.Parameter]], Callable[[], None]],
        device: torch.device,
    ) -> None:
        self.name = name
        self.device = device
        generator = torch.Generator().manual_seed(0)
        self.params = [
            torch.nn.Parameter(
                (torch.randn(shape, generator=generator) * 0.02).to(device)
            )
            for shape in shapes
        ]
        for param, grad in zip(self.params, grads):
            param.grad = grad.clone()
        self.grads = grads
        self.step = build(self.params)
        self.seconds: list[float] = []
        self.first_step_seconds = 0.0

    def restore_grads(self) -> None:
        torch._foreach_copy_([param.grad for param in self.params], self.grads)

    def timed_step(self) -> float:
        self.restore_grads()
        _synchronize(self.device)
        started = time.perf_counter()
        self.step()
        _synchronize(self.device)
        return time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that the timer measures the whole step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_adamw(params: list[torch.nn.Parameter]) -> Callable[[], None]:
    return torch.optim.AdamW(params, fused=True).step


def build_adampower(params: list[torch.nn.Parameter]) -> Callable[[], None]:
    return AdamPower(params, power=POWER, fused=True).step


def build_adampower_with_env(
    settings: dict[str, str], compiled_step_devices: frozenset[str] | None = None
) -> Callable[[list[torch.nn.Parameter]], Callable[[], None]]:
    """Return a builder whose steps run with the environment variables ``settings``.

    ``compiled_step_devices``, when given, replaces the device types that take
    the compiled fused step during each step.
    """

    def build(params: list[torch.nn.Parameter]) -> Callable[[], None]:
        optimizer = AdamPower(params, power=POWER, fused=True)

        def step() -> None:
            saved = {name: os.environ.get(name) for name in settings}
            saved_devices = compiled_step.DEVICE_TYPES
            os.environ.update(settings)
            if compiled_step_devices is not None:
                compiled_step.DEVICE_TYPES = compiled_step_devices
            try:
                optimizer.step()
            finally:
                compiled_step.DEVICE_TYPES = saved_devices
                for name, value in saved.items():
                    if value is None:
                        del os.environ[name]
                    else:
                        os.environ[name] = value

        return step

    return build


def build_python_loop(params: list[torch.nn.Parameter]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, fused=True)

    def step() -> None:
        with torch.no_grad():
            for param in params:
                grad = param.grad
                grad.copy_(grad.sign() * grad.abs().pow(POWER))
        optimizer.step()

    return step


KERNEL_OFF = {power_kernel.KERNEL_ENV_VAR: "0"}
COMPILED_STEP_OFF = {compiled_step.COMPILED_STEP_ENV_VAR: "0"}
CANDIDATES = {
    "AdamW fused (baseline)": build_adamw,
    f"AdamPower p={POWER} (fused C kernel)": build_adampower,
    f"AdamPower p={POWER} (compiled fused step, {power_kernel.KERNEL_ENV_VAR}=0)": (
        build_adampower_with_env(KERNEL_OFF, frozenset({"cpu"}))
    ),
    f"AdamPower p={POWER} (compiled power, {power_kernel.KERNEL_ENV_VAR}=0)": (
        build_adampower_with_env(KERNEL_OFF)
    ),
    f"AdamPower p={POWER} (eager foreach, also {gradpower.COMPILE_ENV_VAR}=0)": (
        build_adampower_with_env({**KERNEL_OFF, gradpower.COMPILE_ENV_VAR: "0"})
    ),
    "per-tensor Python loop + AdamW fused": build_python_loop,
}
# On a GPU the C kernel does not apply: AdamPower's default is the compiled
# fused step.
GPU_CANDIDATES = {
    "AdamW fused (baseline)": build_adamw,
    f"AdamPower p={POWER} (compiled fused step)": build_adampower,
    f"AdamPower p={POWER} (compiled power, then fused AdamW)": (
        build_adampower_with_env(COMPILED_STEP_OFF)
    ),
    f"AdamPower p={POWER} (eager foreach, {gradpower.COMPILE_ENV_VAR}=0)": (
        build_adampower_with_env({**COMPILED_STEP_OFF, gradpower.COMPILE_ENV_VAR: "0"})
    ),
    "per-tensor Python loop + AdamW fused": build_python_loop,
}


def describe_adampower_path(device: torch.device) -> str:
    """Return which path AdamPower's default step takes for float32 tensors."""
    if device.type != "cpu":
        if not compiled_step.compiled_step_enabled():
            return (
                "compiled power + torch's fused AdamW "
                f"({compiled_step.COMPILED_STEP_ENV_VAR}=0)"
            )
        return "compiled fused step (the C kernel is CPU-only)"
    if not power_kernel.kernel_enabled():
        return (
            f"power transform + torch AdamW ({power_kernel.KERNEL_ENV_VAR}=0 or "
            "the kernel build failed)"
        )
    library = power_kernel.load_kernel()
    if library is None:
        return "power transform + torch AdamW (the kernel build failed, see the log)"
    variant = power_kernel.kernel_variant(library)
    return f"fused C kernel, {variant} build at {library._name}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params-millions",
        type=float,
        default=20.0,
        help="number of float32 parameters, in millions (default 20)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=21,
        help="timed steps per candidate after 2 warm-up steps (default 21)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, or a CUDA device such as cuda or cuda:0 (default cpu); the C "
        "kernel serves CPU tensors only, so on a GPU AdamPower runs its compiled "
        "fused step",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.repeats < 1:
        raise SystemExit(f"Invalid --repeats value: {args.repeats}. Use 1 or more.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault(gradpower.COMPILE_ENV_VAR, "1")
    os.environ.setdefault(power_kernel.KERNEL_ENV_VAR, "1")
    os.environ.setdefault(compiled_step.COMPILED_STEP_ENV_VAR, "1")

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(
            f"Invalid --device value: {args.device}. Use cpu or cuda."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"Invalid --device value: {args.device}. Use cpu or cuda.")
    shapes = decoder_shapes(args.params_millions)
    generator = torch.Generator().manual_seed(1)
    grads = [
        (torch.randn(shape, generator=generator) * 1e-3).to(device) for shape in shapes
    ]
    numel = sum(grad.numel() for grad in grads)
    builders = CANDIDATES if device.type == "cpu" else GPU_CANDIDATES
    candidates = [
        Candidate(name, shapes, grads, build, device)
        for name, build in builders.items()
    ]

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"parameters: {numel / 1e6:.2f}M float32 in {len(shapes)} tensors")
    print(f"repeats: {args.repeats} after 2 warm-up steps")
    started = time.perf_counter()
    path = describe_adampower_path(device)
    load_ms = (time.perf_counter() - started) * 1e3
    print(f"AdamPower path: {path} (loaded in {load_ms:.0f} ms)\n")

    for candidate in candidates:
        candidate.first_step_seconds = candidate.timed_step()
        candidate.timed_step()
    for _ in range(args.repeats):
        for candidate in candidates:
            candidate.seconds.append(candidate.timed_step())

    baseline_median = statistics.median(candidates[0].seconds)
    baseline_min = min(candidates[0].seconds)
    name_width = max(len(candidate.name) for candidate in candidates)
    header = (
        f"{'optimizer step':<{name_width}}  median ms  min ms"
        "  median ratio  min ratio  first ms"
    )
    print(header)
    print("-" * len(header))
    for candidate in candidates:
        median = statistics.median(candidate.seconds)
        fastest = min(candidate.seconds)
        print(
            f"{candidate.name:<{name_width}}  {median * 1e3:9.2f}  {fastest * 1e3:6.2f}"
            f"  {median / baseline_median:12.2f}  {fastest / baseline_min:9.2f}"
            f"  {candidate.first_step_seconds * 1e3:8.0f}"
        )
    print("\nratios: step time over fused AdamW's, median to median and min to min")
    print(
        "first ms: the first step, which includes state setup and any compilation "
        "(the C kernel is built or loaded before the timed steps)"
    )


if __name__ == "__main__":
    main()
