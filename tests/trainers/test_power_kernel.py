"""Tests of the fused AdamPower CPU kernel (trainers/adampower_kernel.c).

They build the kernel with the system C compiler and skip only where no
compiler is on the PATH.
"""

import copy
import logging
import math
import shutil
import stat
import time

import pytest
import torch

from trainers import power_kernel
from trainers.gradpower import AdamPower, power_transform

# Sizes around the vector width (16) and the kernel's chunk (16384 elements).
SHAPES = [(7, 5), (11,), (3, 4, 2), (16,), (33, 17), (1,), (16385,), (129, 257)]
STEPS = 5

# Tolerances of the fused step against torch's AdamW fed the float64 powers
# rounded to float32, after STEPS steps. The kernel's power differs from those
# by about 1e-7 relative and its AdamW arithmetic rounds in a different order.
# Measured at most: params 2.4e-7 absolute (values of order 1, updates of order
# 1e-2), exp_avg 6e-8 absolute (relative errors grow where the average cancels
# to near zero), exp_avg_sq 3.8e-7 relative.
PARAM_TOLERANCE = {"rtol": 1e-6, "atol": 5e-7}
EXP_AVG_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}
EXP_AVG_SQ_TOLERANCE = {"rtol": 1e-6, "atol": 0.0}

# Maximum relative error of the kernel's |g|**p against float64, for results in
# float32's normal range. Measured 0.91e-7 (p = 0.3) to 1.84e-7 (p = 3.0) with
# both builds on an AMD EPYC (AVX-512), where exp(p * log|g|) in float32 has
# 3.1e-6 to 1.07e-5 on the same values.
POWER_RTOL = 2.5e-7


def have_compiler():
    return any(shutil.which(name) for name in ("gcc", "cc"))


needs_compiler = pytest.mark.skipif(
    not have_compiler(), reason="no C compiler (gcc or cc) on the PATH"
)


@pytest.fixture(scope="module")
def native_library():
    if not have_compiler():
        pytest.skip("no C compiler (gcc or cc) on the PATH")
    library = power_kernel.load_kernel()
    assert library is not None, "the kernel failed to build; see the warning"
    return library


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory):
    """The plain C version, built without AVX-512 in a private cache folder."""
    if not have_compiler():
        pytest.skip("no C compiler (gcc or cc) on the PATH")
    cache_dir = tmp_path_factory.mktemp("portable_kernel")
    path = power_kernel.build_library(cache_dir, extra_flags=["-mno-avx512f"])
    library = power_kernel.open_library(path)
    assert power_kernel.kernel_variant(library) == "portable"
    return library


@pytest.fixture(params=["native", "portable"])
def library(request):
    return request.getfixturevalue(f"{request.param}_library")


@pytest.fixture
def kernel_on(monkeypatch):
    monkeypatch.setenv(power_kernel.KERNEL_ENV_VAR, "1")


def powered64(values, power):
    values = values.double()
    return values.sign() * values.abs() ** power


def accuracy_values():
    """Signed values log-uniform over 1e-30..1e3, subnormals and edge values."""
    generator = torch.Generator().manual_seed(0)
    exponents = torch.empty(400_000, dtype=torch.float64).uniform_(
        -30, 3, generator=generator
    )
    normal = (10.0**exponents).float()
    subnormal = (
        torch.rand(40_000, generator=generator, dtype=torch.float64) * 2.0**-126
    ).float()
    edges = torch.tensor(
        [2.0**-149, 2.0**-126, 2.0**-126 * (1 - 2.0**-23), 0.75, 1.0, 1.5, 2.0, 1e3]
    )
    values = torch.cat([normal, subnormal[subnormal > 0], edges])
    signs = torch.where(torch.rand(values.shape, generator=generator) < 0.5, -1.0, 1.0)
    return values * signs


def max_relative_error(result, expected):
    in_range = (expected.abs() >= 2.0**-126) & (expected.abs() <= 3.4e38)
    error = (result.double() - expected).abs() / expected.abs()
    return error[in_range].max().item()


@pytest.mark.parametrize("power", [0.3, 0.6, 1.2, 1.4, 2.0, 3.0])
def test_kernel_power_accuracy(library, power):
    values = accuracy_values()
    expected = powered64(values, power)

    result = power_kernel.power_values(library, values, power)
    eager = values.sign() * values.abs().log().mul(power).exp()

    kernel_error = max_relative_error(result, expected)
    eager_error = max_relative_error(eager, expected)
    print(f"p={power}: kernel {kernel_error:.3e}, eager float32 {eager_error:.3e}")
    assert kernel_error <= POWER_RTOL
    assert kernel_error <= eager_error


@pytest.mark.parametrize("power", [1.4, 2.0])
def test_kernel_power_subnormal_results(library, power):
    """Results below float32's normal range are correctly rounded to 1 ulp."""
    values = accuracy_values()
    expected = powered64(values, power)
    subnormal = expected.abs() < 2.0**-126

    result = power_kernel.power_values(library, values, power)

    assert subnormal.sum() > 1000
    difference = (result.double() - expected.float().double()).abs()[subnormal]
    assert difference.max().item() <= 2.0**-149


def test_kernel_power_special_values(library):
    values = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 3e38, -3e38]
    )

    result = power_kernel.power_values(library, values, 1.2)

    assert result[0] == 0
    assert result[1] == 0
    assert result[2] == math.inf
    assert result[3] == -math.inf
    assert math.isnan(result[4])
    # (1e-45)**1.2 underflows to zero and (3e38)**1.2 overflows to inf.
    assert result[5] == 0
    assert result[6] == 0
    assert result[7] == math.inf
    assert result[8] == -math.inf


def test_kernel_power_nonfinite_like_eager(library):
    """Non-finite values give what the eager transform gives."""
    values = torch.tensor([0.0, math.inf, -math.inf, math.nan, 2.0, -0.5])

    result = power_kernel.power_values(library, values, 0.6)
    eager = power_transform(values, 0.6)

    torch.testing.assert_close(result, eager, equal_nan=True, rtol=2e-6, atol=0)


def test_kernel_power_rejects_invalid_power(library):
    with pytest.raises(ValueError, match="Invalid power value for the fused kernel"):
        power_kernel.power_values(library, torch.ones(3), 2 * power_kernel.MAX_POWER)


def test_kernel_max_power_matches_source(native_library):
    assert native_library.gradpower_max_power() == power_kernel.MAX_POWER


def make_params(seed=0, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes
    ]


def make_gradient_steps(steps, seed=1, shapes=SHAPES):
    """Return random gradients for each step, with magnitudes over five decades."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(steps):
        grads = []
        for shape in shapes:
            scale = 10.0 ** torch.randint(-4, 1, shape, generator=generator)
            grad = torch.randn(shape, generator=generator) * scale
            grad.view(-1)[0] = 0.0
            grads.append(grad)
        result.append(grads)
    return result


def group_layout(params):
    """Three groups with their own power, lr and weight decay."""
    return [
        {"params": params[0:3], "power": 0.6, "lr": 1e-2, "weight_decay": 0.1},
        {"params": params[3:6], "power": 1.4, "lr": 3e-3, "weight_decay": 0.0},
        {"params": params[6:], "lr": 2e-2, "weight_decay": 0.05},
    ]


GROUP_POWERS = [0.6, 0.6, 0.6, 1.4, 1.4, 1.4, 1.2, 1.2]
OPTIONS = {"betas": (0.9, 0.95), "eps": 1e-8}


def run_adampower(params, gradient_steps, **options):
    optimizer = AdamPower(group_layout(params), power=1.2, **OPTIONS, **options)
    for grads in gradient_steps:
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
    return optimizer


def run_adamw_on_powered(params, gradient_steps):
    """torch's AdamW fed the float64 powers rounded to float32."""
    groups = group_layout(params)
    for group in groups:
        group.pop("power", None)
    optimizer = torch.optim.AdamW(groups, foreach=False, **OPTIONS)
    for grads in gradient_steps:
        for param, grad, power in zip(params, grads, GROUP_POWERS):
            param.grad = powered64(grad, power).float()
        optimizer.step()
    return optimizer


@needs_compiler
def test_fused_step_matches_adamw(kernel_on):
    params = make_params()
    reference_params = make_params()
    gradient_steps = make_gradient_steps(STEPS)

    optimizer = run_adampower(params, gradient_steps)
    reference = run_adamw_on_powered(reference_params, gradient_steps)

    for param, reference_param in zip(params, reference_params):
        torch.testing.assert_close(
            param.detach(), reference_param.detach(), **PARAM_TOLERANCE
        )
        state = optimizer.state[param]
        reference_state = reference.state[reference_param]
        assert state["step"].item() == STEPS
        torch.testing.assert_close(
            state["exp_avg"], reference_state["exp_avg"], **EXP_AVG_TOLERANCE
        )
        torch.testing.assert_close(
            state["exp_avg_sq"], reference_state["exp_avg_sq"], **EXP_AVG_SQ_TOLERANCE
        )


@needs_compiler
def test_fused_step_writes_powered_grad(kernel_on):
    """The gradients hold the kernel's power, which only the kernel gets this close."""
    params = make_params()
    gradient_steps = make_gradient_steps(1)

    run_adampower(params, gradient_steps)

    for param, grad, power in zip(params, gradient_steps[0], GROUP_POWERS):
        torch.testing.assert_close(
            param.grad.double(), powered64(grad, power), rtol=POWER_RTOL, atol=0
        )


@needs_compiler
def test_fused_step_thread_count_invariant(kernel_on):
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            params = make_params()
            run_adampower(params, make_gradient_steps(3))
            results.append([param.detach().clone() for param in params])
    finally:
        torch.set_num_threads(threads)

    for one_thread, two_threads in zip(*results):
        assert torch.equal(one_thread, two_threads)


def test_fused_step_disabled_by_env(monkeypatch):
    """GRADPOWER_KERNEL=0 gives the power transform's gradients, bit for bit."""
    monkeypatch.setenv(power_kernel.KERNEL_ENV_VAR, "0")
    params = make_params()
    reference_params = make_params()
    gradient_steps = make_gradient_steps(STEPS)

    run_adampower(params, gradient_steps)
    run_adamw_on_powered(reference_params, gradient_steps)

    for param, grad, power in zip(params, gradient_steps[-1], GROUP_POWERS):
        assert torch.equal(param.grad, power_transform(grad, power))
    for param, reference_param in zip(params, reference_params):
        torch.testing.assert_close(
            param.detach(), reference_param.detach(), rtol=1e-5, atol=1e-6
        )


@needs_compiler
def test_fused_step_skips_unsupported_params(kernel_on):
    """float64 and non-contiguous params take the other path in the same step."""
    generator = torch.Generator().manual_seed(3)
    supported = torch.nn.Parameter(torch.randn(40, 3, generator=generator))
    double = torch.nn.Parameter(torch.randn(40, 3, dtype=torch.float64))
    transposed = torch.nn.Parameter(torch.randn(3, 40, generator=generator).t())
    params = [supported, double, transposed]
    grads = [torch.randn(40, 3, generator=generator) * 1e-2 for _ in params]
    grads[1] = grads[1].double()
    grads[2] = grads[2].t().contiguous().t()
    assert not transposed.is_contiguous()
    assert not grads[2].is_contiguous()
    optimizer = AdamPower(params, lr=1e-2, power=1.4)
    reference_params = [torch.nn.Parameter(param.detach().clone()) for param in params]
    # AdamPower's defaults: the paper's betas and weight decay.
    reference = torch.optim.AdamW(
        reference_params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False
    )

    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()
    for param, grad in zip(reference_params, grads):
        param.grad = powered64(grad, 1.4).to(grad.dtype)
    reference.step()

    torch.testing.assert_close(
        supported.grad.double(), powered64(grads[0], 1.4), rtol=POWER_RTOL, atol=0
    )
    for other, grad in zip(params[1:], grads[1:]):
        assert torch.equal(other.grad, power_transform(grad, 1.4))
    for param, reference_param in zip(params, reference_params):
        torch.testing.assert_close(
            param.detach(), reference_param.detach(), rtol=1e-5, atol=1e-6
        )


@needs_compiler
@pytest.mark.parametrize(
    "options",
    [{"amsgrad": True}, {"maximize": True}],
    ids=["amsgrad", "maximize"],
)
def test_unsupported_options_skip_kernel(kernel_on, options):
    params = make_params()
    gradient_steps = make_gradient_steps(1)

    run_adampower(params, gradient_steps, **options)

    for param, grad, power in zip(params, gradient_steps[0], GROUP_POWERS):
        assert torch.equal(param.grad, power_transform(grad, power))


@needs_compiler
def test_fused_step_state_dict_round_trip(kernel_on):
    params = make_params()
    gradient_steps = make_gradient_steps(6)
    optimizer = run_adampower(params, gradient_steps[:3])
    saved = copy.deepcopy(optimizer.state_dict())

    for state in saved["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert isinstance(state["step"], torch.Tensor)
        assert state["step"].item() == 3
    clone_params = [torch.nn.Parameter(param.detach().clone()) for param in params]
    clone = AdamPower(group_layout(clone_params), power=1.2, **OPTIONS)
    clone.load_state_dict(saved)
    for grads in gradient_steps[3:]:
        for optimizer_params in (params, clone_params):
            for param, grad in zip(optimizer_params, grads):
                param.grad = grad.clone()
        optimizer.step()
        clone.step()

    for param, clone_param in zip(params, clone_params):
        assert torch.equal(clone_param.detach(), param.detach())


@needs_compiler
def test_fused_state_loads_into_adamw(kernel_on):
    """torch's AdamW continues from the kernel's state."""
    params = make_params()
    optimizer = run_adampower(params, make_gradient_steps(2))
    groups = group_layout([torch.nn.Parameter(param.detach()) for param in params])
    adamw = torch.optim.AdamW(groups, **OPTIONS)

    adamw.load_state_dict(optimizer.state_dict())

    for param in adamw.param_groups[0]["params"]:
        state = adamw.state[param]
        assert state["step"].item() == 2
        assert state["exp_avg"].shape == param.shape


def test_build_library_cached_and_fast(tmp_path):
    if not have_compiler():
        pytest.skip("no C compiler (gcc or cc) on the PATH")
    started = time.perf_counter()
    path = power_kernel.build_library(tmp_path)
    build_seconds = time.perf_counter() - started
    modified = path.stat().st_mtime_ns

    again = power_kernel.build_library(tmp_path)

    print(f"first build: {build_seconds:.2f} s")
    # The build took 0.2 to 0.3 s on a 2-core AMD EPYC. The limit leaves room
    # for a loaded machine.
    assert build_seconds < 20
    assert again == path
    assert again.stat().st_mtime_ns == modified
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


def test_build_library_reports_compiler_error(tmp_path):
    compiler = tmp_path / "failing-cc"
    compiler.write_text("#!/bin/sh\necho 'error: unsupported flag' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    cache_dir = tmp_path / "cache"

    with pytest.raises(RuntimeError, match="unsupported flag"):
        power_kernel.build_library(cache_dir, compiler=str(compiler))

    assert list(cache_dir.iterdir()) == []


def test_missing_compiler_falls_back(monkeypatch, tmp_path, caplog):
    """No compiler: one warning, then AdamPower's other path."""
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    monkeypatch.setenv("PATH", str(empty_dir))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(power_kernel.KERNEL_ENV_VAR, "1")
    monkeypatch.setattr(power_kernel, "_library", None)
    monkeypatch.setattr(power_kernel, "_load_failed", False)
    params = make_params()
    gradient_steps = make_gradient_steps(2)

    with caplog.at_level(logging.WARNING, logger="trainers.power_kernel"):
        run_adampower(params, gradient_steps)

    warnings = [
        record for record in caplog.records if record.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "C compiler not found" in warnings[0].getMessage()
    assert not power_kernel.kernel_enabled()
    for param, grad, power in zip(params, gradient_steps[-1], GROUP_POWERS):
        assert torch.equal(param.grad, power_transform(grad, power))


@needs_compiler
def test_power_one_keeps_adamw_path(kernel_on):
    """At power 1.0 the gradients stay untouched, as with plain AdamW."""
    params = make_params()
    grads = make_gradient_steps(1)[0]
    optimizer = AdamPower(params, power=1.0)

    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()

    for param, grad in zip(params, grads):
        assert torch.equal(param.grad, grad)


@needs_compiler
def test_portable_build_matches_native(portable_library, native_library):
    """Both builds give the same step to within the power's error."""
    results = []
    for library in (native_library, portable_library):
        generator = torch.Generator().manual_seed(7)
        tensors = [torch.randn(1000, generator=generator) for _ in range(2)]
        param, grad = tensors[0].clone(), tensors[1] * 1e-3
        exp_avg = torch.zeros(1000)
        exp_avg_sq = torch.zeros(1000)
        power_kernel.adamw_step(
            library,
            [param],
            [grad],
            [exp_avg],
            [exp_avg_sq],
            [1.0],
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            power=1.2,
            write_powered_grads=False,
        )
        assert torch.equal(grad, tensors[1] * 1e-3), "the gradient must stay as it was"
        results.append((param, exp_avg, exp_avg_sq))

    for native, portable in zip(*results):
        torch.testing.assert_close(native, portable, rtol=1e-6, atol=1e-9)
