"""Toy model of AdamPower's update size under gradient noise.

The model is Example 4.1 of "GradPower: Powering Gradients for Faster Language Model
Pre-Training": one-dimensional gradients g_t are drawn i.i.d. from
Uniform(mu - sigma, mu + sigma) and fed, after the sign-power map
phi_p(g) = sign(g) * |g|**p, to Adam with weight decay 0. The quantity of interest is
the update u_t = m_t / (sqrt(v_t) + eps) at a large step t, as a function of the power
p and the noise-to-signal ratio sigma / mu.

The module provides a Monte-Carlo estimate of u_t (a fast truncated-window version
and the plain sequential recursion), the exact beta2 -> 1 limit
u = E[phi_p(g)] / (sqrt(E[phi_p(g)**2]) + eps) for the uniform distribution, the
low-noise and high-noise approximations of that limit (Propositions 4.2 and 4.3 of
the same paper), and ``run_toy_trial``, the entry point that one tuning trial calls.

Adam's bias correction m_t / (1 - beta1**t) and v_t / (1 - beta2**t) is applied by
default, as in Algorithm 1 (AdamPower) of that paper. At t = 10**6 both factors
equal 1.0 in float64, so the choice only matters for small t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

DEFAULT_MU = 1e-6
DEFAULT_BETA1 = 0.9
DEFAULT_BETA2 = 0.95
DEFAULT_EPS = 1e-8
DEFAULT_STEPS = 10**6
DEFAULT_REPLICATES = 256

# Weight share below which old gradients are dropped from the EMAs, with the bound
# given in ``truncation_window``. It is 1e4 times below float64 rounding, so u_t
# should change only in its last bits. That is an estimate, because it assumes that
# v_t stays within a factor 1e4 of max|phi|**2, as typical uniform samples do.
DEFAULT_TRUNCATION_TOLERANCE = 1e-20

# Upper bound on the number of float64 draws held in memory at once (8 MiB) by the
# window simulation.
_DRAWS_PER_CHUNK = 2**20

_REQUIRED_TRIAL_KEYS = ("noise_ratio", "power", "steps", "replicates", "seed")
_OPTIONAL_TRIAL_KEYS = ("mu", "beta1", "beta2", "eps")


@dataclass(frozen=True)
class UpdateEstimate:
    """Monte-Carlo estimate of the AdamPower update u_t over independent replicates.

    ``window`` is the number of most recent gradients that entered each EMA: equal to
    the number of steps for the sequential recursion and at most that for the window
    simulation. ``values`` contains u_t for each replicate.
    """

    mean: float
    std: float
    stderr: float
    replicates: int
    window: int
    values: NDArray[np.float64] = field(repr=False, compare=False)


@dataclass(frozen=True)
class HighNoiseOptimum:
    """Maximiser of the high-noise approximation of the limiting update.

    ``power`` is the numerical argmax of Proposition 4.3's
    (mu / sigma) / (1 / sqrt(2p + 1) + eps / sigma**p). ``order_estimate`` is the
    GradPower paper's order-of-magnitude estimate
    log(eps * log(1 / sigma)) / log(sigma). The paper states
    p* = Theta(order_estimate) without giving the constant, so the two agree only up
    to a bounded factor.
    """

    power: float
    order_estimate: float


def powered(g: ArrayLike, p: float) -> NDArray[np.floating]:
    """Apply the sign-power map sign(g) * |g|**p elementwise.

    Integer input is converted to float64, and floating input keeps its dtype.
    Raises ValueError unless p is a finite positive number.
    """
    _check_power(p)
    array = np.asarray(g)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return np.sign(array) * np.abs(array) ** p


def truncation_window(beta1: float, beta2: float, tolerance: float) -> int:
    """Return the smallest K with max(beta1, beta2)**K <= tolerance.

    At step t with EMA weights (1 - beta) * beta**j on the gradient of age j, the
    gradients of age K or more carry total weight beta**K - beta**t <= beta**K.
    Dropping them therefore changes m_t by at most beta1**K * M and v_t by at most
    beta2**K * M**2, where M = max |phi_p(g)| = (mu + sigma)**p, so both changes are
    at most ``tolerance`` in units of M and M**2 (before bias correction).
    """
    _check_beta("beta1", beta1)
    _check_beta("beta2", beta2)
    if not 0.0 < tolerance < 1.0:
        raise ValueError(
            f"tolerance must be in (0, 1), got {tolerance!r}. "
            f"The default is {DEFAULT_TRUNCATION_TOLERANCE}."
        )
    beta = max(beta1, beta2)
    if beta == 0.0:
        return 1
    return max(1, math.ceil(math.log(tolerance) / math.log(beta)))


def simulate_update(
    noise_ratio: float,
    power: float,
    *,
    mu: float = DEFAULT_MU,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    eps: float = DEFAULT_EPS,
    steps: int = DEFAULT_STEPS,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
    tolerance: float = DEFAULT_TRUNCATION_TOLERANCE,
    bias_correction: bool = True,
) -> UpdateEstimate:
    """Estimate u_t at t = ``steps`` from the most recent gradients only.

    Each replicate draws only the last K = min(steps, truncation_window(beta1, beta2,
    tolerance)) gradients and forms m_t and v_t as weighted sums over them, so the
    cost is replicates * K instead of replicates * steps. For steps <= K nothing is
    dropped and the result equals the sequential recursion up to rounding.

    The gradients are rescaled by s = mu * max(1, noise_ratio) before powering, and
    the update is computed as m(g/s) / (sqrt(v(g/s)) + eps / s**p). This equals
    m(g) / (sqrt(v(g)) + eps) exactly in real arithmetic and keeps |g/s| <= 2, so
    that large powers do not underflow.

    Draws are taken newest first, one row of ``replicates`` values per age, so for
    the same seed this function and ``simulate_update_sequential`` use the same
    uniform draws for the most recent K gradients.
    """
    _check_simulation_inputs(noise_ratio, power, mu, beta1, beta2, eps, steps)
    _check_replicates(replicates)
    window = min(steps, truncation_window(beta1, beta2, tolerance))
    scale = mu * max(1.0, noise_ratio)
    rng = np.random.default_rng(seed)

    first_moment = np.zeros(replicates)
    second_moment = np.zeros(replicates)
    start = 0
    for uniforms in _uniform_draws_by_age(rng, replicates, window):
        ages = np.arange(start, start + uniforms.shape[0])
        start += uniforms.shape[0]
        gradients = _uniform_gradients(uniforms, noise_ratio) / max(1.0, noise_ratio)
        phi = powered(gradients, power)
        first_moment += ((1.0 - beta1) * beta1**ages) @ phi
        second_moment += ((1.0 - beta2) * beta2**ages) @ (phi * phi)

    if bias_correction:
        first_moment /= 1.0 - beta1**steps
        second_moment /= 1.0 - beta2**steps
    values = first_moment / (np.sqrt(second_moment) + _scaled_eps(eps, scale, power))
    return _summarise(values, window)


def simulate_update_sequential(
    noise_ratio: float,
    power: float,
    *,
    mu: float = DEFAULT_MU,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    eps: float = DEFAULT_EPS,
    steps: int = 10_000,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
    bias_correction: bool = True,
) -> UpdateEstimate:
    """Run the AdamPower moment recursion for ``steps`` steps and return u_t.

    This is Adam's update on the unscaled gradients in float64, without truncation,
    and it serves as the reference for ``simulate_update``. It keeps all
    replicates * steps gradients in memory (8 bytes each) and loops over steps in
    Python, so it suits small t. Because the gradients are not rescaled, phi**2
    underflows once (mu + sigma)**(2p) drops below about 1e-308, for example for
    p above about 26 at mu + sigma = 1e-6.
    """
    _check_simulation_inputs(noise_ratio, power, mu, beta1, beta2, eps, steps)
    _check_replicates(replicates)
    rng = np.random.default_rng(seed)
    uniforms_newest_first = np.concatenate(
        list(_uniform_draws_by_age(rng, replicates, steps)), axis=0
    )
    gradients = mu * _uniform_gradients(uniforms_newest_first[::-1], noise_ratio)

    first_moment = np.zeros(replicates)
    second_moment = np.zeros(replicates)
    for gradient in gradients:
        phi = powered(gradient, power)
        first_moment = beta1 * first_moment + (1.0 - beta1) * phi
        second_moment = beta2 * second_moment + (1.0 - beta2) * phi * phi

    if bias_correction:
        first_moment = first_moment / (1.0 - beta1**steps)
        second_moment = second_moment / (1.0 - beta2**steps)
    values = first_moment / (np.sqrt(second_moment) + eps)
    return _summarise(values, steps)


def limit_update(
    noise_ratio: float,
    power: float,
    *,
    mu: float = DEFAULT_MU,
    eps: float = DEFAULT_EPS,
) -> float:
    """Compute the beta2 -> 1 limit E[phi_p(g)] / (sqrt(E[phi_p(g)**2]) + eps) exactly.

    For g ~ Uniform(mu - sigma, mu + sigma) with sigma = noise_ratio * mu, the
    antiderivative of sign(g)|g|**p is |g|**(p+1) / (p+1) and that of |g|**(2p) is
    sign(g)|g|**(2p+1) / (2p+1). This gives, with a = mu - sigma and b = mu + sigma,
        E[phi_p(g)]    = (|b|**(p+1) - |a|**(p+1)) / (2 sigma (p+1)),
        E[phi_p(g)**2] = (|b|**(2p+1) - sign(a)|a|**(2p+1)) / (2 sigma (2p+1)),
    which covers both sigma < mu (a > 0) and sigma >= mu (a <= 0). The differences are
    evaluated with expm1 and log1p in units of max(mu, sigma), so neither a tiny nor a
    huge noise ratio loses precision to cancellation.
    """
    _check_noise_ratio(noise_ratio)
    _check_power(power)
    _check_mu(mu)
    _check_eps(eps)
    if noise_ratio == 0.0:
        return 1.0 / (1.0 + _scaled_eps(eps, mu, power))

    if noise_ratio <= 1.0:
        # Units of mu: g/mu ~ Uniform(1 - r, 1 + r).
        r = noise_ratio
        mean_phi = _power_difference(power + 1.0, r) / (2.0 * r * (power + 1.0))
        mean_phi_squared = _power_difference(2.0 * power + 1.0, r) / (
            2.0 * r * (2.0 * power + 1.0)
        )
        scale = mu
    else:
        # Units of sigma: g/sigma ~ Uniform(s - 1, s + 1) with s = 1/r < 1.
        s = 1.0 / noise_ratio
        mean_phi = _power_difference(power + 1.0, s) / (2.0 * (power + 1.0))
        mean_phi_squared = (
            (1.0 + s) ** (2.0 * power + 1.0) + (1.0 - s) ** (2.0 * power + 1.0)
        ) / (2.0 * (2.0 * power + 1.0))
        scale = mu * noise_ratio
    return mean_phi / (math.sqrt(mean_phi_squared) + _scaled_eps(eps, scale, power))


def low_noise_update(
    power: float, *, mu: float = DEFAULT_MU, eps: float = DEFAULT_EPS
) -> float:
    """Return Proposition 4.2's low-noise approximation 1 / (1 + eps / mu**p).

    It is the limit of ``limit_update`` as sigma / mu -> 0, and for sigma / mu = r
    the relative error is O((p + p**2) r**2).
    """
    _check_power(power)
    _check_mu(mu)
    _check_eps(eps)
    return 1.0 / (1.0 + _scaled_eps(eps, mu, power))


def high_noise_update(
    noise_ratio: float,
    power: float,
    *,
    mu: float = DEFAULT_MU,
    eps: float = DEFAULT_EPS,
) -> float:
    """Return Proposition 4.3's high-noise approximation of the limiting update.

    The value is (mu / sigma) / (1 / sqrt(2p + 1) + eps / sigma**p) with
    sigma = noise_ratio * mu, and its relative error against ``limit_update`` is
    O((2p + 1)**2 / r**2) for r = sigma / mu. Raises ValueError for noise_ratio 0,
    where the approximation is undefined.
    """
    _check_noise_ratio(noise_ratio)
    _check_power(power)
    _check_mu(mu)
    _check_eps(eps)
    if noise_ratio == 0.0:
        raise ValueError(
            "noise_ratio must be positive for the high-noise approximation, got 0.0. "
            "Use low_noise_update or limit_update instead."
        )
    sigma = noise_ratio * mu
    return (1.0 / noise_ratio) / (
        1.0 / math.sqrt(2.0 * power + 1.0) + _scaled_eps(eps, sigma, power)
    )


def high_noise_optimal_power(
    noise_ratio: float, *, mu: float = DEFAULT_MU, eps: float = DEFAULT_EPS
) -> HighNoiseOptimum:
    """Find the power that maximises ``high_noise_update`` for this noise level.

    The maximiser is the root of the derivative of log(1/sqrt(2p+1) + eps/sigma**p),
    which in log form reads
        -1.5 log(2p + 1) = log(eps log(1/sigma)) + p log(1/sigma).
    The left side minus the right side is positive at p = 0 exactly when
    eps log(1/sigma) < 1 and falls to -inf as p grows when sigma < 1, so Brent's
    method runs on a bracket [0, hi] with hi doubled until the sign changes.

    Raises ValueError unless eps > 0, sigma < 1 and eps log(1/sigma) < 1, because
    without these conditions the approximation has no interior maximum.
    """
    _check_noise_ratio(noise_ratio)
    _check_mu(mu)
    _check_eps(eps)
    sigma = noise_ratio * mu
    if eps == 0.0:
        raise ValueError(
            "eps must be positive for an interior optimum, got 0.0, because with "
            "eps = 0 the high-noise approximation increases in p without bound"
        )
    if not 0.0 < sigma < 1.0:
        raise ValueError(
            f"sigma = noise_ratio * mu must be in (0, 1), got {sigma!r} "
            f"(noise_ratio={noise_ratio!r}, mu={mu!r})"
        )
    log_inverse_sigma = -math.log(sigma)
    log_threshold = math.log(eps * log_inverse_sigma)
    if log_threshold >= 0.0:
        raise ValueError(
            f"eps * log(1/sigma) must be below 1 for an interior optimum, got "
            f"{eps * log_inverse_sigma!r} (eps={eps!r}, sigma={sigma!r}). Otherwise "
            "the high-noise approximation decreases for all p > 0."
        )

    def stationarity_gap(p: float) -> float:
        return -1.5 * math.log(2.0 * p + 1.0) - log_threshold - p * log_inverse_sigma

    upper = 1.0
    while stationarity_gap(upper) > 0.0:
        upper *= 2.0
    power = optimize.brentq(stationarity_gap, 0.0, upper, xtol=1e-12, rtol=1e-12)
    order_estimate = log_threshold / math.log(sigma)
    return HighNoiseOptimum(power=float(power), order_estimate=order_estimate)


def best_power(powers: ArrayLike, values: ArrayLike) -> float:
    """Return the power whose value is largest, taking the first on ties.

    Raises ValueError if the arrays are empty, differ in length or contain NaN.
    """
    power_array = np.asarray(powers, dtype=np.float64).ravel()
    value_array = np.asarray(values, dtype=np.float64).ravel()
    if power_array.size == 0:
        raise ValueError("powers must not be empty")
    if power_array.shape != value_array.shape:
        raise ValueError(
            f"powers and values must have the same length, got {power_array.size} "
            f"and {value_array.size}"
        )
    if np.isnan(value_array).any() or np.isnan(power_array).any():
        raise ValueError(f"powers and values must not contain NaN, got {value_array}")
    return float(power_array[int(np.argmax(value_array))])


def optimal_power_continuous(
    noise_ratio: float,
    *,
    mu: float = DEFAULT_MU,
    eps: float = DEFAULT_EPS,
    bounds: tuple[float, float] = (0.05, 4.0),
) -> float:
    """Find the power in ``bounds`` that maximises ``limit_update``.

    A grid of 401 points locates the best cell, and a bounded Brent search refines it
    between the neighbouring grid points. The result may be an endpoint of
    ``bounds``, which happens when the update is monotone in p there (the low-noise
    case returns the lower bound).
    """
    lower, upper = bounds
    _check_power(lower)
    if not upper > lower:
        raise ValueError(f"bounds must satisfy lower < upper, got {bounds!r}")
    _check_power(upper)

    def negative_update(p: float) -> float:
        return -limit_update(noise_ratio, p, mu=mu, eps=eps)

    grid = np.linspace(lower, upper, 401)
    grid_values = np.array([-negative_update(p) for p in grid])
    best_index = int(np.argmax(grid_values))
    best = float(grid[best_index])
    best_value = float(grid_values[best_index])

    left = float(grid[max(best_index - 1, 0)])
    right = float(grid[min(best_index + 1, grid.size - 1)])
    refined = optimize.minimize_scalar(
        negative_update,
        bounds=(left, right),
        method="bounded",
        options={"xatol": 1e-10},
    )
    if refined.success and -refined.fun > best_value:
        best = float(refined.x)
    return best


def run_toy_trial(
    config: Mapping[str, Any], report: Callable[[dict[str, float]], None]
) -> dict[str, float]:
    """Simulate the toy update for one configuration and report it once.

    ``config`` must contain noise_ratio, power, steps, replicates and seed, and may
    contain mu, beta1, beta2 and eps. Other keys raise ValueError, so that a
    misspelt key is not silently replaced by its default. The reported and returned
    metrics are the simulated mean, std and stderr of u_t, ``limit_update``,
    ``low_noise_update`` and ``high_noise_update``. The last is NaN for
    noise_ratio 0, where it is undefined.
    """
    missing = [key for key in _REQUIRED_TRIAL_KEYS if key not in config]
    if missing:
        raise ValueError(f"toy trial config is missing required keys {missing}")
    unknown = sorted(
        set(config) - set(_REQUIRED_TRIAL_KEYS) - set(_OPTIONAL_TRIAL_KEYS)
    )
    if unknown:
        raise ValueError(
            f"toy trial config has unknown keys {unknown}. Allowed keys are "
            f"{list(_REQUIRED_TRIAL_KEYS + _OPTIONAL_TRIAL_KEYS)}."
        )

    noise_ratio = float(config["noise_ratio"])
    power = float(config["power"])
    mu = float(config.get("mu", DEFAULT_MU))
    eps = float(config.get("eps", DEFAULT_EPS))
    estimate = simulate_update(
        noise_ratio,
        power,
        mu=mu,
        beta1=float(config.get("beta1", DEFAULT_BETA1)),
        beta2=float(config.get("beta2", DEFAULT_BETA2)),
        eps=eps,
        steps=_integer_setting(config, "steps"),
        replicates=_integer_setting(config, "replicates"),
        seed=_integer_setting(config, "seed"),
    )
    if noise_ratio > 0.0:
        high_noise = high_noise_update(noise_ratio, power, mu=mu, eps=eps)
    else:
        high_noise = math.nan

    metrics = {
        "toy/update_mean": estimate.mean,
        "toy/update_std": estimate.std,
        "toy/update_stderr": estimate.stderr,
        "toy/limit_update": limit_update(noise_ratio, power, mu=mu, eps=eps),
        "toy/low_noise_update": low_noise_update(power, mu=mu, eps=eps),
        "toy/high_noise_update": high_noise,
    }
    report(dict(metrics))
    return metrics


def _uniform_draws_by_age(
    rng: np.random.Generator, replicates: int, count: int
) -> Iterator[NDArray[np.float64]]:
    """Yield Uniform[0, 1) draws of shape (ages, replicates), newest age first.

    Each block continues the generator's stream age by age, so the values do not
    depend on how ``count`` is split into blocks.
    """
    ages_per_block = max(1, _DRAWS_PER_CHUNK // replicates)
    for start in range(0, count, ages_per_block):
        yield rng.random((min(ages_per_block, count - start), replicates))


def _uniform_gradients(
    uniforms: NDArray[np.float64], noise_ratio: float
) -> NDArray[np.float64]:
    """Map Uniform[0, 1) draws to g / mu ~ Uniform(1 - r, 1 + r)."""
    return 1.0 + noise_ratio * (2.0 * uniforms - 1.0)


def _power_difference(exponent: float, x: float) -> float:
    """Return (1 + x)**exponent - (1 - x)**exponent for 0 < x <= 1.

    expm1 and log1p avoid the cancellation of the plain difference at small x.
    """
    if x == 1.0:
        return 2.0**exponent
    return math.expm1(exponent * math.log1p(x)) - math.expm1(exponent * math.log1p(-x))


def _scaled_eps(eps: float, scale: float, power: float) -> float:
    """Return eps / scale**power, or inf when that exceeds the float64 range."""
    if eps == 0.0:
        return 0.0
    log_value = math.log(eps) - power * math.log(scale)
    if log_value > math.log(np.finfo(np.float64).max):
        return math.inf
    return math.exp(log_value)


def _summarise(values: NDArray[np.float64], window: int) -> UpdateEstimate:
    std = float(values.std(ddof=1))
    return UpdateEstimate(
        mean=float(values.mean()),
        std=std,
        stderr=std / math.sqrt(values.size),
        replicates=int(values.size),
        window=window,
        values=values,
    )


def _integer_setting(config: Mapping[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(
            f"toy trial config key {key!r} must be an integer, got {value!r}"
        )
    return int(value)


def _check_noise_ratio(noise_ratio: float) -> None:
    if not (math.isfinite(noise_ratio) and noise_ratio >= 0.0):
        raise ValueError(
            "noise_ratio (sigma / mu) must be a finite number >= 0, "
            f"got {noise_ratio!r}"
        )


def _check_power(power: float) -> None:
    if not (math.isfinite(power) and power > 0.0):
        raise ValueError(f"power p must be a finite number > 0, got {power!r}")


def _check_mu(mu: float) -> None:
    if not (math.isfinite(mu) and mu > 0.0):
        raise ValueError(f"mu must be a finite number > 0, got {mu!r}")


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_beta(name: str, beta: float) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta!r}")


def _check_replicates(replicates: int) -> None:
    if replicates < 2:
        raise ValueError(
            f"replicates must be at least 2 to estimate a standard deviation, "
            f"got {replicates!r}"
        )


def _check_simulation_inputs(
    noise_ratio: float,
    power: float,
    mu: float,
    beta1: float,
    beta2: float,
    eps: float,
    steps: int,
) -> None:
    _check_noise_ratio(noise_ratio)
    _check_power(power)
    _check_mu(mu)
    _check_eps(eps)
    _check_beta("beta1", beta1)
    _check_beta("beta2", beta2)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps!r}")
