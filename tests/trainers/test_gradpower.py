import copy
import logging
import math
import re

import pytest
import torch

from trainers import gradpower
from trainers.gradpower import AdamPower, GradPower, power_transform, power_transform_

SHAPES = [(7, 5), (11,), (3, 4, 2)]
POWERS = [0.6, 0.8, 1.2, 1.5]
ADAMW_VARIANTS = {
    "for_loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
INVALID_POWERS = [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "1.2", None, True]


def make_params(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        for shape in SHAPES
    ]


def make_gradient_steps(steps, seed=1):
    """Return random gradients for each step, with magnitudes over five decades."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(steps):
        grads = []
        for shape in SHAPES:
            scale = 10.0 ** torch.randint(-4, 1, shape, generator=generator)
            grads.append(torch.randn(shape, generator=generator) * scale)
        result.append(grads)
    return result


def powered64(grad, power):
    grad = grad.double()
    return grad.sign() * grad.abs() ** power


def reference_adampower(
    params, gradient_steps, *, lr, betas, eps, weight_decay, powers
):
    """Algorithm 1 (AdamPower with decoupled weight decay) in float64."""
    beta1, beta2 = betas
    thetas = [param.detach().double().clone() for param in params]
    first = [torch.zeros_like(theta) for theta in thetas]
    second = [torch.zeros_like(theta) for theta in thetas]
    for t, grads in enumerate(gradient_steps, start=1):
        for i, grad in enumerate(grads):
            g = powered64(grad, powers[i])
            first[i] = beta1 * first[i] + (1 - beta1) * g
            second[i] = beta2 * second[i] + (1 - beta2) * g**2
            m_hat = first[i] / (1 - beta1**t)
            v_hat = second[i] / (1 - beta2**t)
            update = m_hat / (v_hat.sqrt() + eps) + weight_decay * thetas[i]
            thetas[i] = thetas[i] - lr * update
    return thetas


def run_optimizer(optimizer, params, gradient_steps):
    for grads in gradient_steps:
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()


def assert_bitwise_equal(actual, expected):
    assert actual.dtype == expected.dtype
    assert torch.equal(
        actual.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)
    )


HYPERPARAMETERS = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


@pytest.mark.parametrize("power", POWERS)
def test_adampower_matches_algorithm_1(power):
    params = make_params()
    gradient_steps = make_gradient_steps(6)
    expected = reference_adampower(
        params, gradient_steps, powers=[power] * len(params), **HYPERPARAMETERS
    )
    plain_adam = reference_adampower(
        params, gradient_steps, powers=[1.0] * len(params), **HYPERPARAMETERS
    )

    optimizer = AdamPower(params, power=power, **HYPERPARAMETERS)
    run_optimizer(optimizer, params, gradient_steps)

    for param, want, adam in zip(params, expected, plain_adam):
        torch.testing.assert_close(param.detach().double(), want, rtol=1e-5, atol=2e-6)
        # The power must change the trajectory by far more than the tolerance.
        assert (want - adam).abs().max() > 1e-4


@pytest.mark.parametrize("variant", list(ADAMW_VARIANTS))
def test_adampower_variants_match_algorithm_1(variant):
    params = make_params()
    gradient_steps = make_gradient_steps(4)
    expected = reference_adampower(
        params, gradient_steps, powers=[1.2] * len(params), **HYPERPARAMETERS
    )

    optimizer = AdamPower(
        params, power=1.2, **HYPERPARAMETERS, **ADAMW_VARIANTS[variant]
    )
    run_optimizer(optimizer, params, gradient_steps)

    for param, want in zip(params, expected):
        torch.testing.assert_close(param.detach().double(), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("variant", list(ADAMW_VARIANTS))
def test_adampower_power_one_bitwise_adamw(variant):
    options = {**HYPERPARAMETERS, **ADAMW_VARIANTS[variant]}
    params_power = make_params()
    params_adamw = make_params()
    gradient_steps = make_gradient_steps(5)

    run_optimizer(
        AdamPower(params_power, power=1.0, **options), params_power, gradient_steps
    )
    adamw = torch.optim.AdamW(params_adamw, **options)
    run_optimizer(adamw, params_adamw, gradient_steps)

    for param_power, param_adamw in zip(params_power, params_adamw):
        assert_bitwise_equal(param_power.detach(), param_adamw.detach())


def test_adampower_power_one_keeps_gradients():
    params = make_params()
    grads = make_gradient_steps(1)[0]
    optimizer = AdamPower(params, power=1.0)

    run_optimizer(optimizer, params, [grads])

    for param, grad in zip(params, grads):
        assert_bitwise_equal(param.grad, grad)


def test_adampower_overwrites_gradients():
    params = make_params()
    grads = make_gradient_steps(1)[0]
    optimizer = AdamPower(params, power=1.5)

    run_optimizer(optimizer, params, [grads])

    for param, grad in zip(params, grads):
        torch.testing.assert_close(
            param.grad.double(), powered64(grad, 1.5), rtol=1e-5, atol=0
        )


def test_adampower_defaults_are_the_papers():
    defaults = AdamPower(make_params()).defaults
    assert defaults["betas"] == (0.9, 0.95)
    assert defaults["weight_decay"] == 0.1
    assert defaults["power"] == 1.2


def test_adampower_per_group_power():
    params = make_params()
    gradient_steps = make_gradient_steps(5)
    powers = [0.8, 1.5, 1.0]
    groups = [
        {"params": [params[0]], "power": 0.8},
        {"params": [params[1]]},
        {"params": [params[2]], "power": 1.0},
    ]
    expected = reference_adampower(
        params, gradient_steps, powers=powers, **HYPERPARAMETERS
    )

    optimizer = AdamPower(groups, power=1.5, **HYPERPARAMETERS)
    run_optimizer(optimizer, params, gradient_steps)

    assert [group["power"] for group in optimizer.param_groups] == powers
    for param, want in zip(params, expected):
        torch.testing.assert_close(param.detach().double(), want, rtol=1e-5, atol=2e-6)


def test_adampower_add_param_group_default_power():
    params = make_params()
    optimizer = AdamPower([params[0]], power=0.7)

    optimizer.add_param_group({"params": [params[1]]})
    optimizer.add_param_group({"params": [params[2]], "power": 1.3})

    assert [group["power"] for group in optimizer.param_groups] == [0.7, 0.7, 1.3]


@pytest.mark.parametrize("power", INVALID_POWERS)
def test_adampower_invalid_power(power):
    message = re.escape(f"Invalid power value: {power!r}")

    with pytest.raises(ValueError, match=message) as raised:
        AdamPower(make_params(), power=power)

    assert "1.0 gives plain AdamW" in str(raised.value)


@pytest.mark.parametrize("power", [0.0, math.nan, "high"])
def test_adampower_invalid_group_power(power):
    params = make_params()
    groups = [{"params": params[:1]}, {"params": params[1:], "power": power}]

    with pytest.raises(ValueError, match=re.escape(repr(power))):
        AdamPower(groups)


@pytest.mark.parametrize("power", INVALID_POWERS)
def test_power_transform_invalid_power(power):
    with pytest.raises(ValueError, match=re.escape(f"Invalid power value: {power!r}")):
        power_transform_([torch.ones(3)], power)


@pytest.mark.parametrize("power", INVALID_POWERS)
def test_gradpower_invalid_power(power):
    base = torch.optim.SGD(make_params(), lr=0.1)

    with pytest.raises(ValueError, match=re.escape(f"Invalid power value: {power!r}")):
        GradPower(base, power=power)


def test_gradpower_rejects_non_optimizer():
    with pytest.raises(TypeError, match="list"):
        GradPower([torch.zeros(1)])


def test_adampower_state_dict_round_trip():
    params = make_params()
    gradient_steps = make_gradient_steps(6)
    groups = [{"params": params[:2], "power": 0.8}, {"params": params[2:]}]
    optimizer = AdamPower(groups, power=1.4, **HYPERPARAMETERS)
    run_optimizer(optimizer, params, gradient_steps[:3])
    saved = copy.deepcopy(optimizer.state_dict())

    clone_params = [torch.nn.Parameter(param.detach().clone()) for param in params]
    clone_groups = [{"params": clone_params[:2]}, {"params": clone_params[2:]}]
    clone = AdamPower(clone_groups, power=1.0, **HYPERPARAMETERS)
    clone.load_state_dict(saved)
    run_optimizer(optimizer, params, gradient_steps[3:])
    run_optimizer(clone, clone_params, gradient_steps[3:])

    assert [group["power"] for group in clone.param_groups] == [0.8, 1.4]
    for param, clone_param in zip(params, clone_params):
        assert_bitwise_equal(clone_param.detach(), param.detach())


def test_adampower_loads_adamw_state_dict():
    params = make_params()
    adamw = torch.optim.AdamW(params, lr=1e-2)
    run_optimizer(adamw, params, make_gradient_steps(2))

    optimizer = AdamPower(params, lr=1e-2, power=1.3)
    optimizer.load_state_dict(adamw.state_dict())

    assert optimizer.param_groups[0]["power"] == 1.3


def test_adampower_deepcopy_keeps_power():
    optimizer = AdamPower(make_params(), power=0.9)

    copied = copy.deepcopy(optimizer)
    copied.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})

    assert [group["power"] for group in copied.param_groups] == [0.9, 0.9]


def test_adampower_closure_loss_and_power():
    param = torch.nn.Parameter(torch.tensor([0.5, -2.0]))
    optimizer = AdamPower([param], power=2.0)

    def closure():
        optimizer.zero_grad()
        loss = (param**3).sum() / 3  # gradient param**2 = [0.25, 4.0]
        loss.backward()
        return loss

    loss = optimizer.step(closure)

    assert loss.item() == pytest.approx((0.125 - 8.0) / 3)
    torch.testing.assert_close(param.grad, torch.tensor([0.0625, 16.0]))


def test_adampower_grad_scaler_unscales_first():
    """The scaler must unscale before the power, even with fused=True."""
    params_scaled = make_params()
    params_plain = make_params()
    grads = make_gradient_steps(1)[0]
    scaled = AdamPower(params_scaled, power=1.5, fused=True, **HYPERPARAMETERS)
    plain = AdamPower(params_plain, power=1.5, fused=True, **HYPERPARAMETERS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    # The loss is linear in the parameters, so its gradients are exactly grads.
    loss = sum((param * grad).sum() for param, grad in zip(params_scaled, grads))
    scaler.scale(loss).backward()
    scaler.step(scaled)
    run_optimizer(plain, params_plain, [grads])

    for param_scaled, param_plain in zip(params_scaled, params_plain):
        assert_bitwise_equal(param_scaled.detach(), param_plain.detach())


EDGE_VALUES = [-3.0, -1e-3, 0.0, -0.0, 1e-40, -1e-40, 1e-45, 2.5, 1e-30, -7e-12]


@pytest.mark.parametrize("power", POWERS)
def test_power_transform_edge_values_float32(power):
    grad = torch.tensor(EDGE_VALUES, dtype=torch.float32)
    expected = powered64(grad, power)

    result = power_transform(grad, power)

    assert result.dtype == torch.float32
    assert torch.isfinite(result).all()
    assert (result[grad == 0] == 0).all()
    nonzero = result != 0
    assert torch.equal(result[nonzero].sign(), grad[nonzero].sign())
    representable = expected.abs() >= torch.finfo(torch.float32).tiny
    torch.testing.assert_close(
        result[representable].double(), expected[representable], rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("power", [0.6, 1.2])
def test_power_transform_subnormal_input_float32(power):
    grad = torch.tensor([1e-40, -1e-40, 1e-45])

    result = power_transform(grad, power)

    assert torch.isfinite(result).all()
    assert (result.sign() * grad.sign() >= 0).all()
    if power < 1:
        # A power below 1 lifts subnormals into the normal range.
        torch.testing.assert_close(
            result.double(), powered64(grad, power), rtol=1e-4, atol=0
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power", POWERS)
def test_power_transform_low_precision(dtype, power):
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(257, generator=generator) * 10.0 ** torch.randint(
        -4, 1, (257,)
    )
    values[:4] = torch.tensor([0.0, -0.0, 1e-7, -1e-7])  # 1e-7 is subnormal in fp16
    grad = values.to(dtype)
    expected = powered64(grad, power).to(dtype)

    result = power_transform(grad, power)

    assert result.dtype == dtype
    assert torch.isfinite(result).all()
    assert (result[grad == 0] == 0).all()
    nonzero = result != 0
    assert torch.equal(result[nonzero].sign(), grad[nonzero].sign())
    torch.testing.assert_close(result, expected)


def test_power_transform_float64_stays_float64():
    grad = torch.tensor([-0.3, 1e-200, 2.0], dtype=torch.float64)

    result = power_transform(grad, 1.2)

    assert result.dtype == torch.float64
    torch.testing.assert_close(result, powered64(grad, 1.2), rtol=1e-14, atol=0)


def test_power_transform_keeps_inf_and_nan():
    grad = torch.tensor([math.inf, -math.inf, math.nan, 1.0])

    result = power_transform(grad, 1.2)

    assert result[0] == math.inf
    assert result[1] == -math.inf
    assert math.isnan(result[2])
    assert result[3] == 1.0


def test_power_transform_leaves_input():
    grad = torch.tensor([-2.0, 3.0])

    result = power_transform(grad, 2.0)

    assert torch.equal(grad, torch.tensor([-2.0, 3.0]))
    assert torch.equal(result, torch.tensor([-4.0, 9.0]))


def test_power_transform_power_one_copies():
    grad = torch.tensor([-0.0, math.nan, 1e-40, -3.5])

    result = power_transform(grad, 1.0)

    assert result.data_ptr() != grad.data_ptr()
    assert_bitwise_equal(result, grad)


def test_power_transform_inplace_power_one_skips(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("power 1.0 must not launch kernels")

    monkeypatch.setattr(torch, "_foreach_abs", fail)
    grad = torch.tensor([-0.0, math.nan, -3.5])
    before = grad.clone()

    power_transform_([grad], 1.0)

    assert_bitwise_equal(grad, before)


def test_power_transform_inplace_mixed_dtypes():
    grads = [
        torch.tensor([-4.0, 9.0]),
        torch.tensor([-4.0, 9.0], dtype=torch.bfloat16),
        torch.tensor([-4.0, 9.0], dtype=torch.float64),
        torch.empty(0),
    ]

    power_transform_(grads, 0.5)

    for grad in grads[:3]:
        torch.testing.assert_close(
            grad.double(), torch.tensor([-2.0, 3.0], dtype=torch.float64)
        )


def test_power_transform_inplace_non_contiguous():
    base = torch.tensor([[-4.0, 1.0], [9.0, 16.0]])
    column = base[:, 0]

    power_transform_([column], 0.5)

    torch.testing.assert_close(base, torch.tensor([[-2.0, 1.0], [3.0, 16.0]]))


def test_power_transform_eager_batches(monkeypatch):
    monkeypatch.setattr(gradpower, "EAGER_BATCH_NUMEL", 5)
    grads = [torch.full((3,), -4.0), torch.full((4,), 9.0), torch.full((8,), 16.0)]

    power_transform_(grads, 0.5)

    for grad, want in zip(grads, [-2.0, 3.0, 4.0]):
        assert (grad == want).all()


@pytest.mark.parametrize(
    ("grad", "message"),
    [
        (torch.tensor([1, 2]), "int64"),
        (torch.tensor([1j]), "complex64"),
        (torch.eye(2).to_sparse(), "dense"),
    ],
)
def test_power_transform_rejects_unsupported(grad, message):
    with pytest.raises(TypeError, match=message):
        power_transform_([grad], 1.2)


def test_power_transform_compile_failure_falls_back(monkeypatch, caplog):
    def broken_kernel(grad, power):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv(gradpower.COMPILE_ENV_VAR, "1")
    monkeypatch.setattr(gradpower, "COMPILE_MIN_NUMEL", 2)
    monkeypatch.setattr(gradpower, "COMPILE_MIN_TOTAL_NUMEL", 2)
    monkeypatch.setattr(gradpower, "_compiled_kernel", broken_kernel)
    monkeypatch.setattr(gradpower, "_compile_failed", False)
    grads = [torch.tensor([-4.0, 9.0]), torch.tensor([16.0, 0.25])]

    with caplog.at_level(logging.WARNING, logger="trainers.gradpower"):
        power_transform_(grads, 0.5)

    torch.testing.assert_close(grads[0], torch.tensor([-2.0, 3.0]))
    torch.testing.assert_close(grads[1], torch.tensor([4.0, 0.5]))
    assert gradpower._compile_failed
    assert "no C++ compiler" in caplog.text


def test_power_transform_compile_disabled_by_env(monkeypatch):
    def unexpected_kernel(grad, power):
        raise AssertionError("the compiled kernel must not run")

    monkeypatch.setenv(gradpower.COMPILE_ENV_VAR, "0")
    monkeypatch.setattr(gradpower, "COMPILE_MIN_NUMEL", 2)
    monkeypatch.setattr(gradpower, "COMPILE_MIN_TOTAL_NUMEL", 2)
    monkeypatch.setattr(gradpower, "_compiled_kernel", unexpected_kernel)
    grad = torch.tensor([-4.0, 9.0])

    power_transform_([grad], 0.5)

    torch.testing.assert_close(grad, torch.tensor([-2.0, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_power_kernel_uncompiled_matches_eager(dtype):
    """The kernel that torch.compile gets, run as plain Python, against _power_eager."""
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(1000, generator=generator) * 1e-3
    values[:6] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, math.inf, math.nan])
    kernel_result = values.to(dtype, copy=True)
    eager_result = values.to(dtype, copy=True)

    gradpower._power_kernel(kernel_result, torch.tensor(1.2))
    gradpower._power_eager([eager_result], 1.2)

    assert_bitwise_equal(kernel_result, eager_result)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_transform_compiled_matches_eager(monkeypatch, dtype):
    """Compiles the kernel for a tensor at the call-size threshold (about 15 s
    on a cold inductor cache)."""
    monkeypatch.setenv(gradpower.COMPILE_ENV_VAR, "1")
    monkeypatch.setattr(gradpower, "_compile_failed", False)
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(gradpower.COMPILE_MIN_TOTAL_NUMEL, generator=generator) * 1e-3
    values[:6] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, math.inf, math.nan])
    compiled = values.to(dtype, copy=True)
    eager = values.to(dtype, copy=True)

    power_transform_([compiled], 1.2)
    assert not gradpower._compile_failed, "torch.compile failed; see the warning"
    monkeypatch.setenv(gradpower.COMPILE_ENV_VAR, "0")
    power_transform_([eager], 1.2)

    torch.testing.assert_close(compiled, eager, rtol=5e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(
        compiled[6:], powered64(values[6:].to(dtype), 1.2).to(dtype), rtol=1e-5, atol=0
    )


def test_gradpower_sgd_matches_hand_powered_sgd():
    params_wrapped = make_params()
    params_by_hand = make_params()
    gradient_steps = make_gradient_steps(5)
    sgd_options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    wrapped = GradPower(torch.optim.SGD(params_wrapped, **sgd_options), power=1.3)
    by_hand = torch.optim.SGD(params_by_hand, **sgd_options)

    run_optimizer(wrapped, params_wrapped, gradient_steps)
    for grads in gradient_steps:
        for param, grad in zip(params_by_hand, grads):
            param.grad = powered64(grad, 1.3).float()
        by_hand.step()

    for param_wrapped, param_by_hand in zip(params_wrapped, params_by_hand):
        torch.testing.assert_close(param_wrapped, param_by_hand, rtol=1e-5, atol=1e-6)


def test_gradpower_per_group_power():
    params = make_params()
    grads = make_gradient_steps(1)[0]
    base = torch.optim.SGD(
        [{"params": params[:1], "power": 0.5}, {"params": params[1:]}], lr=1.0
    )
    wrapped = GradPower(base, power=2.0)
    before = [param.detach().clone() for param in params]

    run_optimizer(wrapped, params, [grads])

    for i, (param, grad) in enumerate(zip(params, grads)):
        power = 0.5 if i == 0 else 2.0
        step = (before[i] - param.detach()).double()
        torch.testing.assert_close(step, powered64(grad, power), rtol=1e-5, atol=1e-7)


def test_gradpower_shares_base_param_groups():
    base = torch.optim.SGD(make_params(), lr=0.1)
    wrapped = GradPower(base, power=1.2)

    wrapped.param_groups[0]["lr"] = 0.5

    assert base.param_groups[0]["lr"] == 0.5
    assert wrapped.state is base.state
    assert wrapped.defaults is base.defaults


def test_gradpower_state_dict_round_trip():
    params = make_params()
    gradient_steps = make_gradient_steps(6)
    base = torch.optim.Adam(
        [{"params": params[:1], "power": 0.7}, {"params": params[1:]}], lr=1e-2
    )
    wrapped = GradPower(base, power=1.4)
    run_optimizer(wrapped, params, gradient_steps[:3])
    saved = copy.deepcopy(wrapped.state_dict())

    clone_params = [torch.nn.Parameter(param.detach().clone()) for param in params]
    clone_base = torch.optim.Adam(
        [{"params": clone_params[:1]}, {"params": clone_params[1:]}], lr=1e-2
    )
    clone = GradPower(clone_base, power=1.0)
    clone.load_state_dict(saved)
    run_optimizer(wrapped, params, gradient_steps[3:])
    run_optimizer(clone, clone_params, gradient_steps[3:])

    assert [group["power"] for group in saved["param_groups"]] == [0.7, 1.4]
    assert [group["power"] for group in clone.param_groups] == [0.7, 1.4]
    for param, clone_param in zip(params, clone_params):
        assert_bitwise_equal(clone_param.detach(), param.detach())


def test_gradpower_load_state_dict_without_power():
    params = make_params()
    plain = torch.optim.SGD(params, lr=0.1)
    wrapped = GradPower(torch.optim.SGD(params, lr=0.1), power=0.9)

    wrapped.load_state_dict(plain.state_dict())

    assert wrapped.param_groups[0]["power"] == 0.9


def test_gradpower_lambda_lr_on_wrapper():
    params = make_params()
    wrapped = GradPower(torch.optim.SGD(params, lr=0.1), power=1.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapped, lambda step: 0.5**step)
    lrs = []

    for grads in make_gradient_steps(3):
        lrs.append(wrapped.optimizer.param_groups[0]["lr"])
        run_optimizer(wrapped, params, [grads])
        scheduler.step()

    assert lrs == pytest.approx([0.1, 0.05, 0.025])


def test_gradpower_zero_grad_delegates():
    params = make_params()
    wrapped = GradPower(torch.optim.SGD(params, lr=0.1))
    for param in params:
        param.grad = torch.ones_like(param)

    wrapped.zero_grad()

    assert all(param.grad is None for param in params)


def test_gradpower_add_param_group_default_power():
    base = torch.optim.SGD(make_params(), lr=0.1)
    wrapped = GradPower(base, power=0.75)

    wrapped.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})

    assert len(base.param_groups) == 2
    assert base.param_groups[1]["power"] == 0.75


def test_gradpower_deepcopy():
    wrapped = GradPower(torch.optim.SGD(make_params(), lr=0.1), power=0.75)

    copied = copy.deepcopy(wrapped)

    assert copied.power == 0.75
    assert copied.param_groups is copied.optimizer.param_groups
    assert copied.optimizer is not wrapped.optimizer


def test_gradpower_grad_scaler_unscales_first():
    """The scaler must unscale before the power, even around fused AdamW."""
    params_scaled = make_params()
    params_plain = make_params()
    grads = make_gradient_steps(1)[0]
    scaled = GradPower(torch.optim.AdamW(params_scaled, fused=True), power=1.5)
    plain = GradPower(torch.optim.AdamW(params_plain, fused=True), power=1.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    loss = sum((param * grad).sum() for param, grad in zip(params_scaled, grads))
    scaler.scale(loss).backward()
    scaler.step(scaled)
    run_optimizer(plain, params_plain, [grads])

    for param_scaled, param_plain in zip(params_scaled, params_plain):
        assert_bitwise_equal(param_scaled.detach(), param_plain.detach())
