"""GradPower: feed an optimizer the powered gradient sign(g) * |g|**p.

The transform and AdamPower follow Algorithm 1 of "GradPower: Powering Gradients
for Faster Language Model Pre-Training": Adam with decoupled weight decay whose
moments see phi_p(g) = sign(g) * |g|**p in place of g.

The caller orders one training step: accumulate the gradients, unscale them (AMP),
check that they are finite, clip the global norm once, then call ``step()``, which
applies the power and the base update.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import AdamW, Optimizer

from trainers import compiled_step, power_kernel

logger = logging.getLogger(__name__)

# The compiled path: each tensor of at least COMPILE_MIN_NUMEL elements goes
# through one torch.compile'd kernel that reads and writes it once, instead of
# the eager path's six foreach passes. A kernel call costs about 20 us of Python
# and guard overhead, so smaller tensors stay on the eager path. Compiling takes
# seconds on first use (15 s with a cold inductor cache on a 2-core CPU), so a
# call compiles only when its gradients hold at least COMPILE_MIN_TOTAL_NUMEL
# elements in all. Small models, and their tests, never compile.
COMPILE_MIN_NUMEL = 1 << 16
COMPILE_MIN_TOTAL_NUMEL = 1 << 22

# The eager path allocates a float32 magnitude buffer per batch of tensors and
# makes six passes over it. Batches of at most this many elements (8 MiB in
# float32) fit a server CPU's L3 cache, and glibc's malloc reuses blocks of this
# size. It maps fresh pages for every block above 32 MiB, and on the benchmark
# machine the page faults of a fresh 80 MB buffer cost about 28 ms. Contiguous
# tensors above the limit are split into chunks. Non-contiguous ones form a
# batch of their own.
EAGER_BATCH_NUMEL = 1 << 21

# Set GRADPOWER_COMPILE=0 to keep every gradient on the eager path.
COMPILE_ENV_VAR = "GRADPOWER_COMPILE"

_COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_compiled_kernel: Callable[[Tensor, Tensor], None] | None = None
_compile_failed = False


def check_power(
    power: Any, *, meaning_of_one: str = "leaves the gradients as they are"
) -> float:
    """Validate ``power`` and return it as a float.

    Raises ValueError unless ``power`` is a finite real number > 0. The message
    names the value and explains 1.0 with ``meaning_of_one``.
    """
    valid = (
        isinstance(power, numbers.Real)
        and not isinstance(power, bool)
        and math.isfinite(power)
        and power > 0
    )
    if not valid:
        raise ValueError(
            f"Invalid power value: {power!r}. Use a finite number > 0 "
            f"(1.0 {meaning_of_one})."
        )
    return float(power)


def power_transform(grad: Tensor, power: float) -> Tensor:
    """Return sign(grad) * |grad|**power as a new tensor of grad's dtype.

    Same arithmetic as :func:`power_transform_`. For power == 1.0 the result is an
    exact copy of ``grad``.
    """
    result = grad.clone()
    power_transform_([result], power)
    return result


def power_transform_(grads: Sequence[Tensor], power: float) -> None:
    """Replace every tensor in ``grads`` with sign(g) * |g|**power, in place.

    The magnitude is computed as exp(power * log|g|) in float32 (float64 stays
    float64), and the result is written back in the tensor's own dtype. Zeros stay
    zero, and inf and NaN stay inf and NaN. Subnormal inputs give finite results.
    power == 1.0 returns at once without touching the tensors.

    Large calls run a torch.compile'd kernel on large tensors (see
    COMPILE_MIN_NUMEL) and fall back to eager foreach ops when compiling fails.

    NOTE: exp(p * log|g|) in float32 has a relative error of a few 1e-6 (measured
    2.9e-6 at most for p = 1.2 against float64), a little above torch.pow's. The
    compiled and eager paths differ by up to about 2e-6 relative, so a value's
    last bits depend on its tensor's size. A finite input whose power exceeds the
    dtype's range becomes inf, which in float16 happens above |g| of about 1e4 at
    p = 1.2. Gradients get that large only when unscaling or clipping was skipped.

    Raises:
        ValueError: power is not a finite number > 0.
        TypeError: a tensor is sparse or not real floating point.
    """
    power = check_power(power)
    if power == 1.0:
        return
    grads = list(grads)
    for grad in grads:
        _check_gradient(grad)

    compiled: list[Tensor] = []
    eager: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    large_call = sum(grad.numel() for grad in grads) >= COMPILE_MIN_TOTAL_NUMEL
    for grad in grads:
        if grad.numel() == 0:
            continue
        if large_call and _use_compiled_kernel(grad):
            compiled.append(grad)
        else:
            eager.setdefault((grad.device, grad.dtype), []).append(grad)

    if compiled:
        remaining = _power_compiled(compiled, power)
        for grad in remaining:
            eager.setdefault((grad.device, grad.dtype), []).append(grad)
    for same_kind in eager.values():
        for batch in _batches(same_kind, EAGER_BATCH_NUMEL):
            _power_eager(batch, power)


def _check_gradient(grad: Tensor) -> None:
    if not isinstance(grad, Tensor):
        raise TypeError(
            f"Invalid gradient of type {type(grad).__name__}: expected a torch.Tensor"
        )
    if grad.layout != torch.strided:
        raise TypeError(
            f"GradPower supports dense gradients only, not layout {grad.layout}"
        )
    if not grad.is_floating_point():
        raise TypeError(
            f"GradPower supports real floating-point gradients, not dtype {grad.dtype}"
        )


def _batches(tensors: list[Tensor], max_numel: int) -> Iterable[list[Tensor]]:
    """Split ``tensors`` in order into batches of at most ``max_numel`` elements.

    Contiguous tensors larger than ``max_numel`` are cut into flat chunks, which
    are views, so writing a chunk writes the tensor.
    """
    batch: list[Tensor] = []
    batch_numel = 0
    for tensor in tensors:
        if tensor.numel() > max_numel and tensor.is_contiguous():
            pieces = list(tensor.view(-1).split(max_numel))
        else:
            pieces = [tensor]
        for piece in pieces:
            if batch and batch_numel + piece.numel() > max_numel:
                yield batch
                batch = []
                batch_numel = 0
            batch.append(piece)
            batch_numel += piece.numel()
    if batch:
        yield batch


def _power_eager(batch: list[Tensor], power: float) -> None:
    """Apply the power to tensors of one device and dtype with foreach kernels."""
    if batch[0].dtype in (torch.float32, torch.float64):
        magnitudes = torch._foreach_abs(batch)
    else:
        magnitudes = [grad.float().abs_() for grad in batch]
    torch._foreach_log_(magnitudes)
    torch._foreach_mul_(magnitudes, power)
    torch._foreach_exp_(magnitudes)
    # sign() maps NaN to 0, but the NaN magnitude keeps the product NaN.
    torch._foreach_sign_(batch)
    torch._foreach_mul_(batch, magnitudes)


def _power_kernel(grad: Tensor, power: Tensor) -> None:
    """Apply the power in one pass, with the same arithmetic as _power_eager.

    This is the function that torch.compile compiles.
    """
    values = grad.float()
    magnitude = torch.exp(torch.log(values.abs()) * power)
    grad.copy_(torch.sign(values) * magnitude)


def _compile_enabled() -> bool:
    return not _compile_failed and os.environ.get(COMPILE_ENV_VAR, "1") != "0"


def _use_compiled_kernel(grad: Tensor) -> bool:
    if not _compile_enabled():
        return False
    if grad.numel() < COMPILE_MIN_NUMEL or grad.dtype not in _COMPILED_DTYPES:
        return False
    if grad.device.type not in ("cpu", "cuda") or not grad.is_contiguous():
        return False
    # Inside an outer torch.compile trace the eager ops get compiled anyway, and
    # a CUDA graph capture cannot compile.
    if torch.compiler.is_compiling():
        return False
    capturing = grad.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return not capturing


def _power_compiled(grads: list[Tensor], power: float) -> list[Tensor]:
    """Apply the compiled kernel to each tensor and return those it did not reach.

    A failure to compile is logged once and disables the compiled path for the
    process. The tensor that failed and every later one are returned unchanged,
    so the caller can apply the eager path to them.
    """
    global _compiled_kernel, _compile_failed
    if _compiled_kernel is None:
        logger.info(
            "compiling the GradPower kernel with torch.compile; the first call "
            "takes seconds (set %s=0 to skip)",
            COMPILE_ENV_VAR,
        )
        _compiled_kernel = torch.compile(_power_kernel, dynamic=True, fullgraph=True)
    power_tensors: dict[torch.device, Tensor] = {}
    for index, grad in enumerate(grads):
        if grad.device not in power_tensors:
            power_tensors[grad.device] = torch.full(
                (), power, dtype=torch.float32, device=grad.device
            )
        try:
            _compiled_kernel(grad.view(-1), power_tensors[grad.device])
        # torch.compile reports a missing or broken compiler (C++ or Triton)
        # through many exception types, so any exception here means "no
        # compiled kernel".
        except Exception as error:  # noqa: BLE001
            _compile_failed = True
            logger.warning(
                "GradPower kernel failed to compile or run on %s %s; using eager "
                "foreach ops from now on: %s",
                grad.device,
                grad.dtype,
                error,
            )
            return grads[index:]
    return []


def _power_param_groups(
    param_groups: Iterable[dict[str, Any]], default_power: float
) -> None:
    """Apply each group's ``power`` (``default_power`` when unset) to its gradients.

    Groups with the same power share one call, so the size test for the compiled
    path counts the whole model.
    """
    grads_by_power: dict[float, list[Tensor]] = {}
    for group in param_groups:
        power = group.get("power", default_power)
        if power == 1.0:
            continue
        grads = grads_by_power.setdefault(power, [])
        grads.extend(param.grad for param in group["params"] if param.grad is not None)
    for power, grads in grads_by_power.items():
        power_transform_(grads, power)


class AdamPower(AdamW):
    """AdamW fed the powered gradient sign(g) * |g|**power (AdamPower, Algorithm 1).

    The powered gradient feeds both moments. Bias correction and decoupled weight
    decay are AdamW's. ``step()`` leaves in each ``.grad`` either the powered
    gradient or, on the compiled GPU path below, the raw one, so read gradient
    statistics before calling it. With power == 1.0 the update is bitwise
    AdamW's with the same arguments.

    The defaults are the paper's for LLaMA pre-training: betas (0.9, 0.95),
    decoupled weight decay 0.1 and power 1.2. They differ from AdamW's (0.9,
    0.999) and 1e-2, so pass betas and weight_decay to compare with an AdamW
    built with its own defaults.

    A param group may set its own ``power``. Groups without one get the
    constructor's value.

    On the CPU, contiguous float32 parameters of groups with power != 1.0 and
    without amsgrad, maximize, capturable or differentiable take one fused pass
    of a C kernel (see trainers/power_kernel.py) that powers the gradient in
    registers and updates the moments and the parameter. Its power has a
    relative error below 2e-7 against float64, where the other paths reach a
    few 1e-6 (up to 1.1e-5 for the eager path), so its results differ from
    theirs in the last bits. GRADPOWER_KERNEL=0 turns it off.

    On a GPU, the same groups take a torch.compile'd step (see
    trainers/compiled_step.py) when their parameters hold at least
    compiled_step.MIN_TOTAL_NUMEL elements. It computes the power inside AdamW's
    pointwise pass and leaves ``.grad`` as it was, which saves one write and one
    read of every gradient. GRADPOWER_COMPILED_STEP=0 turns it off.

    All other parameters get the power transform and torch's AdamW step with
    the constructor's ``foreach`` and ``fused`` options.

    AMP: unlike fused AdamW, this optimizer does not take over unscaling from
    ``torch.amp.GradScaler``. The scaler unscales the gradients before ``step()``,
    because the power of a scaled gradient would need the scale raised to p.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        power: float = 1.2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        fused: bool | None = None,
    ) -> None:
        # add_param_group, called from the base constructor, reads this default.
        self._default_power = _check_adam_power(power)
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            fused=fused,
        )
        self.defaults["power"] = self._default_power
        # The compiled step's lr tensors, by (id of the param group, device).
        self._lr_tensors: dict[tuple[int, torch.device], Tensor] = {}
        # Fused AdamW would unscale inside its kernel, after the power was taken.
        self._step_supports_amp_scaling = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group whose ``power`` defaults to the constructor's."""
        power = param_group.setdefault("power", self._default_power)
        param_group["power"] = _check_adam_power(power)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state, keeping the constructor's power for groups saved without one.

        A state dict saved by plain AdamW therefore loads into AdamPower.
        """
        super().load_state_dict(state_dict)
        # Loading replaces the param group dicts that key the lr tensors.
        self._lr_tensors = {}
        for group in self.param_groups:
            power = group.setdefault("power", self._default_power)
            group["power"] = _check_adam_power(power)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._default_power = self.defaults["power"]
        self._lr_tensors = {}
        for group in self.param_groups:
            group.setdefault("power", self._default_power)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Power every gradient, take one AdamW step and return the closure's loss.

        The closure, if given, runs once, before the power.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updated = self._step_with_kernel()
        updated += self._step_compiled(skip={id(param) for param in updated})
        # AdamW's step skips parameters whose gradient is None, so hiding the
        # gradients that the fused paths consumed keeps them from a second update.
        held_grads = [param.grad for param in updated]
        for param in updated:
            param.grad = None
        try:
            if any(
                param.grad is not None
                for group in self.param_groups
                for param in group["params"]
            ):
                _power_param_groups(self.param_groups, self._default_power)
                super().step()
        finally:
            for param, grad in zip(updated, held_grads):
                param.grad = grad
        return loss

    def _step_with_kernel(self) -> list[Tensor]:
        """Update the parameters that the fused kernel supports and return them."""
        if not power_kernel.kernel_enabled() or torch.compiler.is_compiling():
            return []
        candidates = [
            (group, _kernel_params(group, self.state))
            for group in self.param_groups
            if _kernel_supports_group(group)
        ]
        candidates = [(group, params) for group, params in candidates if params]
        if not candidates:
            return []
        library = power_kernel.load_kernel()
        if library is None:
            return []
        updated: list[Tensor] = []
        for group, params in candidates:
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            # torch's own state initialization, so that the state layout and
            # state_dict() stay AdamW's.
            self._init_group(
                {**group, "params": params}, [], grads, exp_avgs, exp_avg_sqs, [], steps
            )
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            power_kernel.adamw_step(
                library,
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [step.item() for step in steps],
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                power=group["power"],
                write_powered_grads=True,
            )
            updated.extend(params)
        return updated

    def _step_compiled(self, skip: set[int]) -> list[Tensor]:
        """Update the parameters that the compiled step supports and return them.

        Parameters whose id is in ``skip`` were updated already.
        """
        if not compiled_step.compiled_step_enabled() or torch.compiler.is_compiling():
            return []
        candidates = []
        for group in self.param_groups:
            if not _fused_step_supports_group(group):
                continue
            params = [
                param
                for param in group["params"]
                if id(param) not in skip and self._compiled_step_supports(param)
            ]
            if params:
                candidates.append((group, params))
        total_numel = sum(p.numel() for _, params in candidates for p in params)
        if not candidates or total_numel < compiled_step.MIN_TOTAL_NUMEL:
            return []

        # One compiled call per device and per set of constants.
        batches: dict[tuple[Any, ...], compiled_step.StepBatch] = {}
        for group, all_params in candidates:
            constants = compiled_step.group_key(group)
            for device in dict.fromkeys(param.device for param in all_params):
                params = [param for param in all_params if param.device == device]
                batch = batches.get((device, *constants))
                if batch is None:
                    batch = compiled_step.StepBatch(*constants)
                    batches[(device, *constants)] = batch
                self._add_to_batch(batch, group, params)

        ordered = list(batches.values())
        completed = compiled_step.run_batches(ordered)
        return [param for batch in ordered[:completed] for param in batch.params]

    def _add_to_batch(
        self,
        batch: compiled_step.StepBatch,
        group: dict[str, Any],
        params: list[Tensor],
    ) -> None:
        """Append the tensors of ``params``, all of one group and one device."""
        grads: list[Tensor] = []
        steps: list[Tensor] = []
        # torch's own state initialization, so that the state layout and
        # state_dict() stay AdamW's.
        self._init_group(
            {**group, "params": params},
            [],
            grads,
            batch.exp_avgs,
            batch.exp_avg_sqs,
            [],
            steps,
        )
        batch.params.extend(params)
        batch.grads.extend(grads)
        batch.steps.extend(self._steps_on_device(params))
        lr = self._lr_tensor(group, params[0].device)
        batch.lrs.extend([lr] * len(params))
        batch.weight_decays.extend([float(group["weight_decay"])] * len(params))

    def _compiled_step_supports(self, param: Tensor) -> bool:
        grad = param.grad
        if grad is None or param.device.type not in compiled_step.DEVICE_TYPES:
            return False
        if param.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        state = self.state.get(param, {})
        tensors = [param, grad, state.get("exp_avg"), state.get("exp_avg_sq")]
        return all(
            tensor is None or compiled_step.supports_tensor(tensor, param)
            for tensor in tensors
        )

    def _steps_on_device(self, params: list[Tensor]) -> list[Tensor]:
        """Return the params' step counts as float32 tensors on their device.

        AdamW keeps the count on the CPU unless ``fused`` or ``capturable`` is
        set. The compiled step reads it on the device, so a CPU count moves
        there once; torch's AdamW accepts a count on either device.
        """
        steps = []
        for param in params:
            state = self.state[param]
            step = state["step"]
            if step.device != param.device or step.dtype != torch.float32:
                step = step.to(device=param.device, dtype=torch.float32)
                state["step"] = step
            steps.append(step)
        return steps

    def _lr_tensor(self, group: dict[str, Any], device: torch.device) -> Tensor:
        """Return a 0-d tensor on ``device`` set to the group's current lr.

        The compiled step takes the lr as a tensor, so a scheduler that changes
        it does not make torch.compile recompile.
        """
        key = (id(group), device)
        tensor = self._lr_tensors.get(key)
        if tensor is None:
            tensor = torch.empty((), dtype=torch.float32, device=device)
            self._lr_tensors[key] = tensor
        tensor.fill_(float(group["lr"]))
        return tensor


def _fused_step_supports_group(group: dict[str, Any]) -> bool:
    """Return whether a fused path (C kernel or compiled step) covers the group."""
    return (
        group["power"] != 1.0
        and not group["amsgrad"]
        and not group["maximize"]
        and not group["differentiable"]
    )


def _kernel_supports_group(group: dict[str, Any]) -> bool:
    return (
        _fused_step_supports_group(group)
        and group["power"] <= power_kernel.MAX_POWER
        and not group["capturable"]
    )


def _kernel_params(group: dict[str, Any], state: dict[Tensor, Any]) -> list[Tensor]:
    """Return the params of ``group`` with a gradient that the kernel can update."""
    params = []
    for param in group["params"]:
        grad = param.grad
        if grad is None or not power_kernel.kernel_supports(param):
            continue
        if not power_kernel.kernel_supports(grad) or grad.shape != param.shape:
            continue
        param_state = state.get(param, {})
        moments = [param_state.get("exp_avg"), param_state.get("exp_avg_sq")]
        if all(
            moment is None
            or (power_kernel.kernel_supports(moment) and moment.shape == param.shape)
            for moment in moments
        ):
            params.append(param)
    return params


def _check_adam_power(power: Any) -> float:
    return check_power(power, meaning_of_one="gives plain AdamW")


class GradPower(Optimizer):
    """Apply sign(g) * |g|**power to the gradients in front of any torch optimizer.

    ``step()`` powers the gradient of every parameter in the base optimizer's
    param groups, then calls the base ``step()``. It overwrites ``.grad``. A param
    group may set its own ``power``. The constructor writes ``power`` into every
    group that has none, so the base optimizer's ``state_dict()`` carries it.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own
    objects, so a learning-rate scheduler works on this wrapper or on the base.
    Step hooks belong on the base optimizer. Like torch's PostLocalSGDOptimizer
    wrapper, this class does not run ``Optimizer.__init__``.
    """

    def __init__(self, optimizer: Optimizer, power: float = 1.2) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "GradPower wraps a torch.optim.Optimizer, not "
                f"{type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.power = check_power(power)
        for group in optimizer.param_groups:
            group["power"] = check_power(group.setdefault("power", self.power))

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def __repr__(self) -> str:
        return f"GradPower(power={self.power}, optimizer={self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Power every gradient, call the base step and return the closure's loss.

        The closure, if given, runs once, before the power, and the base step gets
        no closure. Optimizers that re-evaluate the closure (LBFGS) therefore do
        not fit this wrapper.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _power_param_groups(self.optimizer.param_groups, self.power)
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer, defaulting ``power`` to ours."""
        power = param_group.setdefault("power", self.power)
        param_group["power"] = check_power(power)
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Return the base optimizer's state dict, with ``power`` in each group."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state into the base optimizer.

        Groups saved without ``power`` get this wrapper's power.
        """
        self.optimizer.load_state_dict(state_dict)
        for group in self.optimizer.param_groups:
            group["power"] = check_power(group.setdefault("power", self.power))
