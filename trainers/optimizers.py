"""The optimizer of a trial: AdamPower or MuonPower, with optional block-wise rates.

`build_optimizer` sorts the model's parameters into blocks (embedding, qk, vo,
ffn, norm, output, router, other) and makes one param group per block, base
optimizer and weight-decay choice. Every group carries:

- ``power``: the GradPower exponent applied to the raw gradient in ``step()``;
- ``lr_ratio``: the group's rate relative to the schedule, which
  `trainers.schedules.build_scheduler` multiplies in (1.0 unless
  ``blockwise_lr`` is set, which only ``adampower`` accepts);
- ``weight_decay``: the trial's value for matrices (ndim >= 2), 0 for norm
  gains and biases;
- ``name`` and ``block``, for the log line and for tests.

``adampower`` runs AdamPower on every group. ``muonpower`` runs
`torch.optim.Muon` on the 2-D weight matrices of the transformer blocks,
`StackedMuon` (the same update per expert) on the stacked MoE expert weights,
and AdamPower on the rest, as Muon is meant only for hidden layers. The power
goes onto the raw gradient before Muon's momentum. Muon uses
``adjust_lr_fn="match_rms_adamw"``, which scales each matrix's rate by
0.2 * sqrt(max(fan_out, fan_in)) so that the update RMS matches AdamW's, and
decoupled weight decay (``param *= 1 - lr * weight_decay``), following Liu et
al. (2025), "Muon is Scalable for LLM Training". Both let Muon use the peak
rate tuned for Adam.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Muon, Optimizer

# NOTE: private helpers and defaults of torch.optim.Muon (torch 2.14), reused so
# that each expert gets exactly Muon's orthogonalization and rate scale. They may
# move in another torch release.
from torch.optim._muon import (
    DEFAULT_A,
    DEFAULT_B,
    DEFAULT_C,
    DEFAULT_NS_STEPS,
    EPS,
    _adjust_lr,
    _zeropower_via_newtonschulz,
)

from trainers.config import TrialConfig
from trainers.gradpower import AdamPower, GradPower

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adampower", "muonpower")

# Learning-rate ratios of block-wise LR relative to the schedule's rate, as the
# GradPower paper (Appendix B.2) adopts them from Wang et al. (2025), "The
# Sharpness Disparity Principle in Transformers for Accelerating Language Model
# Pre-Training". Blocks not listed (norms, output layer, MoE router, anything
# else) keep ratio 1.
BLOCKWISE_LR_RATIOS: dict[str, float] = {
    "embedding": 10.0,
    "qk": 8.0,
    "ffn": 6.0,
    "vo": 4.0,
}

# Blocks whose 2-D weight matrices MuonPower hands to Muon.
MUON_BLOCKS = ("qk", "vo", "ffn")

# Module names (the last component of the dotted name) in the Hugging Face
# LLaMA and Qwen2MoE decoders.
_QK_MODULES = frozenset({"q_proj", "k_proj"})
_VO_MODULES = frozenset({"v_proj", "o_proj"})
_FFN_MODULES = frozenset({"gate_proj", "up_proj", "down_proj", "experts"})
_ROUTER_MODULES = frozenset({"gate", "shared_expert_gate"})


def parameter_blocks(model: nn.Module) -> dict[str, str]:
    """Return the block of every trainable parameter, keyed by its dotted name.

    Each parameter is named once, by its first owner, so tied weights count once.
    """
    output_ids = _output_parameter_ids(model)
    blocks: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in output_ids:
                blocks[name] = "output"
            else:
                blocks[name] = _module_block(module_name, module)
    return blocks


def _output_parameter_ids(model: nn.Module) -> set[int]:
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None:
        return set()
    return {id(param) for param in output.parameters()}


def _module_block(module_name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf in _QK_MODULES:
        return "qk"
    if leaf in _VO_MODULES:
        return "vo"
    if leaf in _FFN_MODULES:
        return "ffn"
    if leaf in _ROUTER_MODULES:
        return "router"
    return "other"


def build_param_groups(
    model: nn.Module, config: TrialConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the parameters into (Muon groups, AdamPower groups).

    The Muon list is empty unless ``config.optimizer`` is ``muonpower``.
    """
    named = dict(model.named_parameters())
    muon_groups: dict[tuple[str, bool], dict[str, Any]] = {}
    adam_groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, block in parameter_blocks(model).items():
        param = named[name]
        decay = param.ndim >= 2
        # MoE expert weights are stacked [experts, out, in] tensors in
        # transformers 5; StackedMuon updates each expert's matrix like Muon.
        to_muon = (
            config.optimizer == "muonpower"
            and block in MUON_BLOCKS
            and param.ndim in (2, 3)
        )
        groups = muon_groups if to_muon else adam_groups
        # The fused gate and up projections of the experts form two matrices.
        chunks = 2 if name.endswith("experts.gate_up_proj") else 1
        key = (block, decay, param.ndim, chunks)
        group = groups.get(key)
        if group is None:
            ratio = BLOCKWISE_LR_RATIOS.get(block, 1.0) if config.blockwise_lr else 1.0
            prefix = "muon" if to_muon else "adam"
            suffix = ""
            if to_muon and param.ndim == 3:
                suffix = "/experts" + ("_gate_up" if chunks == 2 else "")
            group = {
                "params": [],
                "name": f"{prefix}/{block}{suffix}" + ("" if decay else "/no_decay"),
                "block": block,
                "lr_ratio": ratio,
                "weight_decay": config.weight_decay if decay else 0.0,
                "power": config.power,
            }
            if to_muon and param.ndim == 3:
                group["row_chunks"] = chunks
            groups[key] = group
        group["params"].append(param)
    return list(muon_groups.values()), list(adam_groups.values())


def build_optimizer(model: nn.Module, config: TrialConfig) -> Optimizer:
    """Build the trial's optimizer (see the module docstring) and log its groups.

    Raises:
        ValueError: an unknown optimizer name, ``muonpower`` on a model without
            transformer weight matrices, or ``blockwise_lr`` with ``muonpower``
            or on a model without transformer blocks.
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer!r}; choose one of {list(OPTIMIZERS)}"
        )
    if config.blockwise_lr and config.optimizer != "adampower":
        raise ValueError(
            f"blockwise_lr is defined for adampower, not {config.optimizer}; set "
            "optimizer: adampower or blockwise_lr: false"
        )
    muon_groups, adam_groups = build_param_groups(model, config)
    blocks = {group["block"] for group in muon_groups + adam_groups}
    if config.blockwise_lr and not blocks & set(BLOCKWISE_LR_RATIOS):
        raise ValueError(
            "blockwise_lr found no embedding, attention or feed-forward blocks in "
            f"{type(model).__name__}; use it with the lm workload or set "
            "blockwise_lr: false"
        )
    if config.optimizer == "muonpower" and not muon_groups:
        raise ValueError(
            "muonpower found no attention or feed-forward weight matrices in "
            f"{type(model).__name__} for Muon; use optimizer: adampower"
        )

    optimizers: list[Optimizer] = []
    muon_settings = {
        "lr": config.lr_max,
        "weight_decay": config.weight_decay,
        "momentum": config.muon_momentum,
        "nesterov": True,
        "adjust_lr_fn": "match_rms_adamw",
    }
    matrix_groups = [g for g in muon_groups if "row_chunks" not in g]
    stacked_groups = [g for g in muon_groups if "row_chunks" in g]
    if matrix_groups:
        muon = Muon(matrix_groups, **muon_settings)
        optimizers.append(GradPower(muon, power=config.power))
    if stacked_groups:
        stacked = StackedMuon(stacked_groups, **muon_settings)
        optimizers.append(GradPower(stacked, power=config.power))
    if adam_groups:
        # The fused AdamW kernel exists for CPU and CUDA and makes one pass
        # over each tensor instead of the single-tensor path's many.
        devices = {p.device.type for group in adam_groups for p in group["params"]}
        optimizers.append(
            AdamPower(
                adam_groups,
                lr=config.lr_max,
                betas=(config.beta1, config.beta2),
                eps=config.eps,
                weight_decay=config.weight_decay,
                power=config.power,
                fused=devices <= {"cpu", "cuda"},
            )
        )
    optimizer = optimizers[0] if len(optimizers) == 1 else CombinedOptimizer(optimizers)
    _log_param_groups(optimizer, config)
    return optimizer


def _log_param_groups(optimizer: Optimizer, config: TrialConfig) -> None:
    logger.info(
        "optimizer %s power=%s lr_max=%s betas=(%s, %s) eps=%s blockwise_lr=%s%s",
        config.optimizer,
        config.power,
        config.lr_max,
        config.beta1,
        config.beta2,
        config.eps,
        config.blockwise_lr,
        f" muon_momentum={config.muon_momentum}"
        if config.optimizer == "muonpower"
        else "",
    )
    for group in describe_param_groups(optimizer):
        logger.info(
            "param group %s: %d tensors, %d params, lr_ratio=%g, weight_decay=%g, "
            "power=%g",
            group["name"],
            group["tensors"],
            group["params"],
            group["lr_ratio"],
            group["weight_decay"],
            group["power"],
        )


class StackedMuon(Optimizer):
    """Muon for stacked matrices of shape [n, rows, cols], such as MoE experts.

    Every one of the n matrices gets `torch.optim.Muon`'s update: Nesterov
    momentum, Newton-Schulz orthogonalization, the ``adjust_lr_fn`` rate
    scale of a rows x cols matrix, and decoupled weight decay. A group's
    ``row_chunks`` (default 1) splits each matrix into that many equal row
    blocks that are orthogonalized apart, for fused projections such as the
    experts' gate and up weights.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str | None = None,
        ns_steps: int = DEFAULT_NS_STEPS,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_steps": ns_steps,
            "ns_coefficients": (DEFAULT_A, DEFAULT_B, DEFAULT_C),
            "eps": EPS,
            "row_chunks": 1,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                rows = param.size(1) if param.ndim == 3 else 0
                if param.ndim != 3 or rows % group["row_chunks"]:
                    raise ValueError(
                        f"StackedMuon needs [n, rows, cols] tensors whose rows split "
                        f"into {group['row_chunks']} equal blocks, not shape "
                        f"{tuple(param.shape)}; give 2-D matrices to torch.optim.Muon"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            momentum = group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = (
                    param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                )
                param.mul_(1 - lr * group["weight_decay"])
                row_blocks = zip(
                    param.chunk(group["row_chunks"], dim=1),
                    update.chunk(group["row_chunks"], dim=1),
                    strict=True,
                )
                for param_block, update_block in row_blocks:
                    rate = _adjust_lr(lr, group["adjust_lr_fn"], param_block.shape[1:])
                    for matrix, matrix_update in zip(
                        param_block, update_block, strict=True
                    ):
                        orthogonal = _zeropower_via_newtonschulz(
                            matrix_update,
                            group["ns_coefficients"],
                            group["ns_steps"],
                            group["eps"],
                        )
                        matrix.add_(orthogonal, alpha=-rate)
        return loss


class CombinedOptimizer(Optimizer):
    """Several optimizers over disjoint parameters, driven as one.

    ``param_groups`` lists the groups of every inner optimizer in order (the
    group dicts themselves, so a learning-rate scheduler or
    ``torch.amp.GradScaler.unscale_`` acts on them). ``step()`` steps each inner
    optimizer in turn. ``state_dict()`` contains one state dict per inner
    optimizer. Like torch's PostLocalSGDOptimizer wrapper, this class does not
    run ``Optimizer.__init__``, so step hooks belong on the inner optimizers.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        for inner in optimizers:
            if not isinstance(inner, Optimizer):
                raise TypeError(
                    "CombinedOptimizer combines torch.optim.Optimizer objects, not "
                    f"{type(inner).__name__}"
                )
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for inner in self.optimizers for group in inner.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        """A merged copy of the inner states. Write through the inner optimizers."""
        merged: dict[torch.Tensor, Any] = {}
        for inner in self.optimizers:
            merged.update(inner.state)
        return merged

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizers[0].defaults

    def __repr__(self) -> str:
        inner = ", ".join(type(optimizer).__name__ for optimizer in self.optimizers)
        return f"CombinedOptimizer({inner})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every inner optimizer and return the closure's loss.

        The closure, if given, runs once, before the first inner step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self.optimizers:
            inner.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for inner in self.optimizers:
            inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError(
            "CombinedOptimizer cannot tell which inner optimizer a new group "
            "belongs to; add it to one of .optimizers"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [inner.state_dict() for inner in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(
                f"expected a state dict with {len(self.optimizers)} optimizer "
                "states under 'optimizers', saved by CombinedOptimizer.state_dict()"
            )
        for inner, state in zip(self.optimizers, states):
            inner.load_state_dict(state)


def describe_param_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Return name, tensor and parameter counts, lr ratio, weight decay and power
    of each param group, in order."""
    return [
        {
            "name": group["name"],
            "tensors": len(group["params"]),
            "params": sum(param.numel() for param in group["params"]),
            "lr_ratio": group["lr_ratio"],
            "weight_decay": group["weight_decay"],
            "power": group["power"],
        }
        for group in optimizer.param_groups
    ]
