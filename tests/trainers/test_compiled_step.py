"""Tests of AdamPower's torch.compile'd fused step (trainers/compiled_step.py).

The step serves CUDA tensors in production. These tests let it serve CPU
tensors, with the C kernel off, so that Inductor compiles the same graph with
its C++ backend, which needs the system C++ compiler.
"""

import copy
import logging
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from trainers import compiled_step, power_kernel
from trainers.gradpower import AdamPower

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="Inductor's CPU backend needs a C++ compiler (g++ or c++)",
)

BETAS = (0.9, 0.95)
EPS = 1e-8
# (shape, dtype, group index). Groups 0 and 1 share power 1.2 but differ in lr
# and weight decay. Group 2 has power 0.8, so one step makes two compiled calls.
PARAMS = [
    ((33, 17), torch.float32, 0),
    ((40,), torch.float32, 0),
    ((8, 8, 3), torch.float32, 1),
    ((65,), torch.float32, 2),
    ((16, 9), torch.bfloat16, 2),
]
GROUPS = [
    {"lr": 3e-3, "weight_decay": 0.1, "power": 1.2},
    {"lr": 1e-2, "weight_decay": 0.0, "power": 1.2},
    {"lr": 2e-3, "weight_decay": 0.05, "power": 0.8},
]
# The lr of every group is multiplied by these factors, one per step, as a
# scheduler would.
LR_FACTORS = [1.0, 0.7, 0.35, 0.1]

# The compiled step computes |g|**p with pow in float32 and rounds AdamW's
# arithmetic in its own order. The reference is torch's AdamW fed float64
# powers rounded to the param dtype. After 4 steps on this file's values the
# largest differences were 1.5e-8 absolute for float32 params (values up to
# 0.42, updates of 1e-3 to 1e-2 per step), 1.9e-9 absolute for exp_avg and
# 7.7e-7 relative for exp_avg_sq. bfloat16 params differed by 4.9e-4, a
# quarter of bfloat16's spacing of 2e-3 for values between 0.25 and 0.5.
FLOAT32_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}
EXP_AVG_TOLERANCE = {"rtol": 1e-6, "atol": 1e-8}
EXP_AVG_SQ_TOLERANCE = {"rtol": 2e-6, "atol": 0.0}
BFLOAT16_TOLERANCE = {"rtol": 0.0, "atol": 2e-3}


def make_params(seed):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype, _ in PARAMS:
        value = torch.randn(shape, generator=generator) * 0.1
        params.append(torch.nn.Parameter(value.to(dtype)))
    return params


def make_grads(seed):
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for shape, dtype, _ in PARAMS:
        grad = torch.randn(shape, generator=generator) * 1e-2
        # Exact zeros must stay zeros after the power.
        grad.view(-1)[::7] = 0.0
        grads.append(grad.to(dtype))
    return grads


def param_groups(params):
    groups = []
    for index, settings in enumerate(GROUPS):
        members = [p for p, (_, _, group) in zip(params, PARAMS) if group == index]
        groups.append({"params": members, **settings})
    return groups


def powered64(grad, power):
    values = grad.double()
    return (values.sign() * values.abs().pow(power)).to(grad.dtype)


def set_lrs(optimizer, factor):
    for group, settings in zip(optimizer.param_groups, GROUPS):
        group["lr"] = settings["lr"] * factor


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """Route CPU parameters of any size to the compiled step."""
    monkeypatch.setattr(compiled_step, "DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(compiled_step, "MIN_TOTAL_NUMEL", 0)
    monkeypatch.setattr(compiled_step, "_compile_failed", False)
    monkeypatch.setenv(power_kernel.KERNEL_ENV_VAR, "0")
    monkeypatch.setenv(compiled_step.COMPILED_STEP_ENV_VAR, "1")


@pytest.fixture(scope="module")
def compiled_run():
    """Run AdamPower's compiled step and torch's AdamW side by side.

    Returns the compiled optimizer, its params, the reference params, the raw
    gradients of the last step, the count of compiled graphs after each step,
    and the reference optimizer.
    """
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (g++ or c++)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled_step, "DEVICE_TYPES", frozenset({"cpu", "cuda"}))
        patch.setattr(compiled_step, "MIN_TOTAL_NUMEL", 0)
        patch.setattr(compiled_step, "_compile_failed", False)
        patch.setenv(power_kernel.KERNEL_ENV_VAR, "0")
        patch.setenv(compiled_step.COMPILED_STEP_ENV_VAR, "1")

        params = make_params(0)
        reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizer = AdamPower(param_groups(params), betas=BETAS, eps=EPS)
        baseline = torch.optim.AdamW(
            param_groups(reference), betas=BETAS, eps=EPS, foreach=False
        )
        graphs_after_step = []
        counters.clear()
        for step, factor in enumerate(LR_FACTORS):
            grads = make_grads(100 + step)
            set_lrs(optimizer, factor)
            set_lrs(baseline, factor)
            for param, ref, grad, (_, _, group) in zip(
                params, reference, grads, PARAMS
            ):
                param.grad = grad.clone()
                ref.grad = powered64(grad, GROUPS[group]["power"])
            optimizer.step()
            baseline.step()
            graphs_after_step.append(counters["stats"]["unique_graphs"])
    return optimizer, params, reference, grads, graphs_after_step, baseline


@needs_compiler
def test_compiled_step_matches_adamw_on_powers(compiled_run):
    _, params, reference, _, _, _ = compiled_run
    for param, ref, (shape, dtype, _) in zip(params, reference, PARAMS):
        tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else BFLOAT16_TOLERANCE
        torch.testing.assert_close(
            param.detach().float(),
            ref.detach().float(),
            **tolerance,
            msg=lambda text, shape=shape: f"param {shape}: {text}",
        )


@needs_compiler
def test_compiled_step_moments_match(compiled_run):
    optimizer, params, reference, _, _, baseline = compiled_run
    for param, ref, (shape, dtype, _) in zip(params, reference, PARAMS):
        if dtype != torch.float32:
            continue
        state = optimizer.state[param]
        expected = baseline.state[ref]
        torch.testing.assert_close(
            state["exp_avg"], expected["exp_avg"], **EXP_AVG_TOLERANCE
        )
        torch.testing.assert_close(
            state["exp_avg_sq"], expected["exp_avg_sq"], **EXP_AVG_SQ_TOLERANCE
        )
        assert state["step"].item() == len(LR_FACTORS)


@needs_compiler
def test_compiled_step_compiles_once_per_batch(compiled_run):
    _, _, _, _, graphs_after_step, _ = compiled_run
    # Two batches (power 1.2 and power 0.8) compile on the first step. The lr
    # changes of later steps must not add graphs.
    assert graphs_after_step[0] == 2
    assert graphs_after_step[-1] == graphs_after_step[0]


@needs_compiler
def test_compiled_step_leaves_raw_grads(compiled_run):
    _, params, _, grads, _, _ = compiled_run
    for param, grad in zip(params, grads):
        assert torch.equal(param.grad, grad)


@needs_compiler
def test_compiled_step_state_loads_into_adamw(compiled_run):
    optimizer, params, _, _, _, _ = compiled_run
    state = copy.deepcopy(optimizer.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(param_groups(copies), betas=BETAS, eps=EPS)
    plain.load_state_dict(state)
    for param in copies:
        loaded = plain.state[param]
        assert set(loaded) == {"step", "exp_avg", "exp_avg_sq"}
        assert loaded["step"].item() == len(LR_FACTORS)


@needs_compiler
def test_compiled_step_failure_falls_back(compiled_on_cpu, monkeypatch, caplog):
    def broken_graph(*args, **kwargs):
        raise RuntimeError("no compiler for this test")

    monkeypatch.setattr(compiled_step, "_compiled_graph", broken_graph)
    params = make_params(1)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = AdamPower(param_groups(params), betas=BETAS, eps=EPS)
    baseline = torch.optim.AdamW(param_groups(reference), betas=BETAS, eps=EPS)
    grads = make_grads(5)
    for param, ref, grad, (_, _, group) in zip(params, reference, grads, PARAMS):
        param.grad = grad.clone()
        ref.grad = powered64(grad, GROUPS[group]["power"])

    with caplog.at_level(logging.WARNING, logger=compiled_step.__name__):
        optimizer.step()
    baseline.step()

    assert "failed to compile or run" in caplog.text
    assert not compiled_step.compiled_step_enabled()
    for param, ref, (_, dtype, _) in zip(params, reference, PARAMS):
        tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else BFLOAT16_TOLERANCE
        torch.testing.assert_close(
            param.detach().float(), ref.detach().float(), **tolerance
        )
    # The fallback path powers the gradients in place, as before.
    torch.testing.assert_close(
        params[0].grad.double(), powered64(grads[0], 1.2).double(), rtol=1e-5, atol=0
    )


def test_compiled_step_skips_small_models(monkeypatch):
    monkeypatch.setattr(compiled_step, "DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    monkeypatch.setenv(power_kernel.KERNEL_ENV_VAR, "0")

    def unexpected_call(batches):
        raise AssertionError("a model below MIN_TOTAL_NUMEL must not compile")

    monkeypatch.setattr(compiled_step, "run_batches", unexpected_call)
    params = make_params(2)
    optimizer = AdamPower(param_groups(params), betas=BETAS, eps=EPS)
    for param, grad in zip(params, make_grads(6)):
        param.grad = grad
    optimizer.step()
    assert sum(p.numel() for p in params) < compiled_step.MIN_TOTAL_NUMEL
    assert all(len(optimizer.state[p]) == 3 for p in params)


def test_compiled_step_off_by_environment(monkeypatch):
    monkeypatch.setattr(compiled_step, "_compile_failed", False)
    monkeypatch.setenv(compiled_step.COMPILED_STEP_ENV_VAR, "0")
    assert not compiled_step.compiled_step_enabled()
    monkeypatch.setenv(compiled_step.COMPILED_STEP_ENV_VAR, "1")
    assert compiled_step.compiled_step_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_step_on_cuda(monkeypatch):
    monkeypatch.setattr(compiled_step, "MIN_TOTAL_NUMEL", 0)
    monkeypatch.setattr(compiled_step, "_compile_failed", False)
    monkeypatch.setenv(compiled_step.COMPILED_STEP_ENV_VAR, "1")
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(3)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = AdamPower(param_groups(params), betas=BETAS, eps=EPS, fused=True)
    baseline = torch.optim.AdamW(
        param_groups(reference), betas=BETAS, eps=EPS, fused=True
    )
    for step, factor in enumerate(LR_FACTORS):
        grads = [grad.cuda() for grad in make_grads(200 + step)]
        set_lrs(optimizer, factor)
        set_lrs(baseline, factor)
        for param, ref, grad, (_, _, group) in zip(params, reference, grads, PARAMS):
            param.grad = grad.clone()
            ref.grad = powered64(grad, GROUPS[group]["power"])
        optimizer.step()
        baseline.step()

    assert compiled_step.compiled_step_enabled(), "the CUDA graph failed to compile"
    for param, ref, grad, (shape, dtype, _) in zip(params, reference, grads, PARAMS):
        tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else BFLOAT16_TOLERANCE
        torch.testing.assert_close(
            param.detach().float(),
            ref.detach().float(),
            **tolerance,
            msg=lambda text, shape=shape: f"param {shape}: {text}",
        )
        # Raw gradients show that the compiled step, not the fallback, ran.
        assert torch.equal(param.grad, grad)
        assert optimizer.state[param]["step"].device == param.device
