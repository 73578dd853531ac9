import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainers.toy_noise import (
    DEFAULT_EPS,
    DEFAULT_MU,
    best_power,
    high_noise_optimal_power,
    high_noise_update,
    limit_update,
    low_noise_update,
    optimal_power_continuous,
    powered,
    run_toy_trial,
    simulate_update,
    simulate_update_sequential,
    truncation_window,
)

POWER_GRID = np.round(np.arange(0.5, 2.0 + 1e-9, 0.1), 10)


def test_powered_keeps_sign():
    g = np.array([-4.0, -1.0, 0.0, 1.0, 4.0])

    result = powered(g, 0.5)

    np.testing.assert_array_equal(result, [-2.0, -1.0, 0.0, 1.0, 2.0])


def test_powered_converts_integers():
    result = powered(np.array([-2, 3]), 2.0)

    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, [-4.0, 9.0])


@pytest.mark.parametrize(
    ("noise_ratio", "power"),
    [(0.01, 0.5), (0.5, 0.8), (1.0, 1.2), (3.0, 1.5), (100.0, 2.0)],
)
def test_limit_update_matches_monte_carlo(noise_ratio, power):
    samples = 2_000_000
    rng = np.random.default_rng(12345)
    sigma = noise_ratio * DEFAULT_MU
    g = rng.uniform(DEFAULT_MU - sigma, DEFAULT_MU + sigma, size=samples)
    phi = powered(g, power)
    mean_phi = phi.mean()
    mean_phi_squared = (phi * phi).mean()
    root = math.sqrt(mean_phi_squared)
    estimate = mean_phi / (root + DEFAULT_EPS)

    # Delta method: the standard error of f(mean phi, mean phi**2) from the sample
    # covariance of (phi, phi**2), with f(a, b) = a / (sqrt(b) + eps).
    gradient = np.array(
        [
            1.0 / (root + DEFAULT_EPS),
            -mean_phi / (2.0 * root * (root + DEFAULT_EPS) ** 2),
        ]
    )
    covariance = np.cov(np.vstack([phi, phi * phi]))
    stderr = math.sqrt(gradient @ covariance @ gradient / samples)

    exact = limit_update(noise_ratio, power)

    assert abs(estimate - exact) <= 5.0 * stderr


def test_limit_update_continuous_at_ratio_one():
    for power in (0.5, 1.0, 2.0):
        below = limit_update(1.0 - 1e-12, power)
        above = limit_update(1.0 + 1e-12, power)
        at_one = limit_update(1.0, power)

        assert below == pytest.approx(at_one, rel=1e-9)
        assert above == pytest.approx(at_one, rel=1e-9)


def test_limit_update_continuous_at_zero_noise():
    for power in (0.5, 1.0, 2.0):
        assert limit_update(1e-9, power) == pytest.approx(
            limit_update(0.0, power), rel=1e-12
        )


def test_limit_update_at_ratio_one_by_hand():
    # With r = 1, g/mu ~ Uniform(0, 2), so E[h**p] = 2**p / (p + 1) and
    # E[h**(2p)] = 4**p / (2p + 1).
    power = 1.0
    mean_phi = 2.0**power / (power + 1.0)
    root = math.sqrt(4.0**power / (2.0 * power + 1.0))
    expected = mean_phi / (root + DEFAULT_EPS / DEFAULT_MU**power)

    assert limit_update(1.0, power) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("power", [0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
def test_low_noise_update_near_limit(power):
    # The expansion E[h**q] = 1 + q (q - 1) r**2 / 6 + O(r**4) for
    # h ~ Uniform(1 - r, 1 + r) gives |u / u_low - 1| <= (p + p**2) r**2 up to
    # O(r**4) terms.
    noise_ratio = 0.01
    tolerance = (power + power**2) * noise_ratio**2

    exact = limit_update(noise_ratio, power)
    approximation = low_noise_update(power)

    assert abs(exact / approximation - 1.0) <= tolerance


@pytest.mark.parametrize("noise_ratio", [1e3, 1e4])
@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_high_noise_update_near_limit(noise_ratio, power):
    # In units of sigma, E[phi] = (mu/sigma) (1 + O(p**2 s**2)) and
    # sqrt(E[phi**2]) = (1 + O(p**2 s**2)) / sqrt(2p + 1) with s = mu / sigma, so the
    # relative error is within (2p + 1)**2 s**2.
    tolerance = (2.0 * power + 1.0) ** 2 / noise_ratio**2

    exact = limit_update(noise_ratio, power)
    approximation = high_noise_update(noise_ratio, power)

    assert abs(exact / approximation - 1.0) <= tolerance


def test_truncation_window_bound():
    window = truncation_window(0.9, 0.95, 1e-20)

    assert window == 898
    assert 0.95**window <= 1e-20
    assert 0.95 ** (window - 1) > 1e-20


@pytest.mark.parametrize(
    ("noise_ratio", "power"), [(0.5, 0.8), (1.0, 0.5), (2.0, 1.2), (10.0, 1.2)]
)
def test_simulation_matches_limit_for_slow_beta2(noise_ratio, power):
    # With beta2 = 0.9999 and 30000 steps the bias-corrected v_t averages about
    # 15000 effective samples, so its spread shifts E[u_t] by roughly 1e-4
    # relative. The allowance is 5 standard errors plus 1e-3 relative.
    estimate = simulate_update(
        noise_ratio,
        power,
        beta2=0.9999,
        steps=30_000,
        replicates=1024,
        seed=7,
    )
    exact = limit_update(noise_ratio, power)

    assert estimate.window == 30_000
    assert abs(estimate.mean - exact) <= 5.0 * estimate.stderr + 1e-3 * abs(exact)


@pytest.mark.parametrize("noise_ratio", [0.5, 3.0])
@pytest.mark.parametrize("power", [0.7, 1.4])
@pytest.mark.parametrize("steps", [500, 3000])
def test_window_simulation_matches_sequential(noise_ratio, power, steps):
    window_estimate = simulate_update(
        noise_ratio, power, steps=steps, replicates=64, seed=3
    )
    sequential_estimate = simulate_update_sequential(
        noise_ratio, power, steps=steps, replicates=64, seed=3
    )
    scale = np.abs(sequential_estimate.values).max()

    assert window_estimate.window == min(steps, 898)
    assert sequential_estimate.window == steps
    np.testing.assert_allclose(
        window_estimate.values,
        sequential_estimate.values,
        rtol=1e-10,
        atol=1e-12 * scale,
    )


def test_simulate_update_statistics():
    estimate = simulate_update(2.0, 1.0, steps=2000, replicates=100, seed=1)

    assert estimate.replicates == 100
    assert estimate.mean == pytest.approx(estimate.values.mean())
    assert estimate.std == pytest.approx(estimate.values.std(ddof=1))
    assert estimate.stderr == pytest.approx(estimate.std / 10.0)


def test_simulate_update_same_seed_repeats():
    first = simulate_update(2.0, 1.0, steps=2000, replicates=16, seed=5)
    second = simulate_update(2.0, 1.0, steps=2000, replicates=16, seed=5)

    np.testing.assert_array_equal(first.values, second.values)


@pytest.mark.parametrize("noise_ratio", [0.1, 0.5, 1.0])
def test_low_noise_limit_decreases_in_power(noise_ratio):
    values = [limit_update(noise_ratio, p) for p in POWER_GRID]

    assert np.all(np.diff(values) < 0.0)
    assert best_power(POWER_GRID, values) == 0.5
    assert optimal_power_continuous(noise_ratio) == 0.05


@pytest.mark.parametrize("noise_ratio", [10.0, 1e3, 1e4])
def test_high_noise_optimum_above_one(noise_ratio):
    optimum = optimal_power_continuous(noise_ratio)
    at_optimum = limit_update(noise_ratio, optimum)

    assert optimum > 1.0
    assert at_optimum > limit_update(noise_ratio, 0.5)
    assert at_optimum > limit_update(noise_ratio, 4.0)


@pytest.mark.parametrize("noise_ratio", [1e3, 1e4])
def test_high_noise_optimal_power_matches_limit(noise_ratio):
    result = high_noise_optimal_power(noise_ratio)

    assert result.power > 1.0
    assert result.power == pytest.approx(
        optimal_power_continuous(noise_ratio), abs=1e-3
    )
    assert result.order_estimate > 1.0


def test_high_noise_optimal_power_is_stationary():
    result = high_noise_optimal_power(1e3)
    step = 1e-4

    assert high_noise_update(1e3, result.power) > high_noise_update(
        1e3, result.power - step
    )
    assert high_noise_update(1e3, result.power) > high_noise_update(
        1e3, result.power + step
    )


def test_high_noise_optimal_power_rejects_large_sigma():
    with pytest.raises(ValueError, match="sigma"):
        high_noise_optimal_power(2e6)


def test_high_noise_optimal_power_rejects_large_eps():
    with pytest.raises(ValueError, match="eps"):
        high_noise_optimal_power(1e3, eps=0.5)


def test_best_power_takes_argmax():
    assert best_power([0.5, 1.0, 1.5], [0.1, 0.3, 0.2]) == 1.0


def test_best_power_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        best_power([0.5, 1.0], [0.1])


@pytest.mark.parametrize("noise_ratio", [-1.0, -1e-9, math.nan, math.inf])
def test_invalid_noise_ratio_raises(noise_ratio):
    pattern = "noise_ratio.*" + str(noise_ratio).replace("-", r"\-")

    with pytest.raises(ValueError, match=pattern):
        limit_update(noise_ratio, 1.0)
    with pytest.raises(ValueError, match=pattern):
        simulate_update(noise_ratio, 1.0, steps=10, replicates=2)
    with pytest.raises(ValueError, match=pattern):
        high_noise_update(noise_ratio, 1.0)


@pytest.mark.parametrize("power", [0.0, -0.5])
def test_invalid_power_raises(power):
    pattern = r"power p .* got " + str(power).replace("-", r"\-")

    with pytest.raises(ValueError, match=pattern):
        powered(np.ones(3), power)
    with pytest.raises(ValueError, match=pattern):
        limit_update(1.0, power)
    with pytest.raises(ValueError, match=pattern):
        low_noise_update(power)
    with pytest.raises(ValueError, match=pattern):
        simulate_update_sequential(1.0, power, steps=10, replicates=2)


def test_invalid_simulation_settings_raise():
    with pytest.raises(ValueError, match="beta2 .* got 1.0"):
        simulate_update(1.0, 1.0, beta2=1.0)
    with pytest.raises(ValueError, match="steps .* got 0"):
        simulate_update(1.0, 1.0, steps=0)
    with pytest.raises(ValueError, match="replicates .* got 1"):
        simulate_update(1.0, 1.0, replicates=1)
    with pytest.raises(ValueError, match="mu .* got 0.0"):
        limit_update(1.0, 1.0, mu=0.0)


def test_high_noise_update_rejects_zero_noise():
    with pytest.raises(ValueError, match="noise_ratio .* got 0.0"):
        high_noise_update(0.0, 1.0)


def test_run_toy_trial_reports_once():
    config = {
        "noise_ratio": 10.0,
        "power": 1.2,
        "steps": 10**6,
        "replicates": 32,
        "seed": 0,
    }
    reports = []

    metrics = run_toy_trial(config, reports.append)

    assert len(reports) == 1
    assert reports[0] == metrics
    assert set(metrics) == {
        "toy/update_mean",
        "toy/update_std",
        "toy/update_stderr",
        "toy/limit_update",
        "toy/low_noise_update",
        "toy/high_noise_update",
    }
    assert all(isinstance(value, float) for value in metrics.values())
    assert metrics["toy/limit_update"] == limit_update(10.0, 1.2)
    assert metrics["toy/high_noise_update"] == high_noise_update(10.0, 1.2)


def test_run_toy_trial_uses_optional_keys():
    config = {
        "noise_ratio": 0.0,
        "power": 1.0,
        "steps": 100,
        "replicates": 4,
        "seed": 0,
        "mu": 1e-3,
        "beta1": 0.8,
        "beta2": 0.99,
        "eps": 1e-6,
    }

    metrics = run_toy_trial(config, lambda _: None)

    # Zero noise makes every gradient mu, so u_t equals mu / (mu + eps) exactly.
    assert metrics["toy/update_mean"] == pytest.approx(1e-3 / (1e-3 + 1e-6))
    assert metrics["toy/limit_update"] == pytest.approx(1e-3 / (1e-3 + 1e-6))
    assert math.isnan(metrics["toy/high_noise_update"])


def test_run_toy_trial_rejects_missing_key():
    config = {"noise_ratio": 1.0, "power": 1.0, "steps": 10, "replicates": 2}

    with pytest.raises(ValueError, match="seed"):
        run_toy_trial(config, lambda _: None)


def test_run_toy_trial_rejects_unknown_key():
    config = {
        "noise_ratio": 1.0,
        "power": 1.0,
        "steps": 10,
        "replicates": 2,
        "seed": 0,
        "beta_2": 0.99,
    }

    with pytest.raises(ValueError, match="beta_2"):
        run_toy_trial(config, lambda _: None)


def test_run_toy_trial_rejects_fractional_steps():
    config = {
        "noise_ratio": 1.0,
        "power": 1.0,
        "steps": 10.5,
        "replicates": 2,
        "seed": 0,
    }

    with pytest.raises(ValueError, match="steps"):
        run_toy_trial(config, lambda _: None)


def test_module_imports_no_tracking_libraries():
    code = (
        "import sys, trainers.toy_noise; "
        "print([m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules])"
    )

    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )

    assert result.stdout.strip() == "[]"
