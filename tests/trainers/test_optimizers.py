"""AdamPower and MuonPower param groups, block-wise rates and the combined step."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from pydantic import ValidationError
from torch.optim import Muon

from study.spec import Training
from tests.trainers.sample_data import tiny_bpe_shards
from trainers.config import TrialConfig
from trainers.gradpower import AdamPower, GradPower, power_transform
from trainers.loop import run_trial
from trainers.optimizers import (
    BLOCKWISE_LR_RATIOS,
    CombinedOptimizer,
    StackedMuon,
    build_optimizer,
    describe_param_groups,
    parameter_blocks,
)
from trainers.schedules import build_scheduler
from trainers.workloads.lm import build_language_model
from trainers.workloads.vision import build_resnet

LR_MAX = 1e-3


def config(**overrides) -> TrialConfig:
    settings = {
        "workload": "lm",
        "batch_size": 2,
        "power": 1.2,
        "lr_max": LR_MAX,
        "step_budget": 10,
        "target_value": 0.0,
    }
    settings.update(overrides)
    return TrialConfig(**settings)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_language_model({"preset": "tiny"}, 64, 16)


def random_gradients(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 1e-2


def groups_by_name(optimizer) -> dict[str, dict]:
    return {group["name"]: group for group in optimizer.param_groups}


def test_parameter_blocks_of_llama():
    blocks = parameter_blocks(tiny_llama())

    assert blocks["model.embed_tokens.weight"] == "embedding"
    assert blocks["model.layers.0.self_attn.q_proj.weight"] == "qk"
    assert blocks["model.layers.0.self_attn.k_proj.weight"] == "qk"
    assert blocks["model.layers.0.self_attn.v_proj.weight"] == "vo"
    assert blocks["model.layers.0.self_attn.o_proj.weight"] == "vo"
    assert blocks["model.layers.0.mlp.gate_proj.weight"] == "ffn"
    assert blocks["model.layers.0.mlp.down_proj.weight"] == "ffn"
    assert blocks["model.layers.0.input_layernorm.weight"] == "norm"
    assert blocks["model.norm.weight"] == "norm"
    assert blocks["lm_head.weight"] == "output"


def test_parameter_blocks_of_qwen2moe():
    with torch.device("meta"):
        model = build_language_model({"family": "qwen2moe", "preset": "tiny"}, 64, 16)

    blocks = parameter_blocks(model)

    assert blocks["model.layers.0.self_attn.q_proj.bias"] == "qk"
    assert blocks["model.layers.0.mlp.experts.gate_up_proj"] == "ffn"
    assert blocks["model.layers.0.mlp.shared_expert.up_proj.weight"] == "ffn"
    assert blocks["model.layers.0.mlp.gate.weight"] == "router"
    assert blocks["model.layers.0.mlp.shared_expert_gate.weight"] == "router"


def test_adampower_groups_cover_every_parameter_once():
    model = tiny_llama()

    optimizer = build_optimizer(model, config())
    grouped = [param for group in optimizer.param_groups for param in group["params"]]
    groups = groups_by_name(optimizer)

    assert isinstance(optimizer, AdamPower)
    assert len(grouped) == len(list(model.parameters()))
    assert {id(param) for param in grouped} == {id(p) for p in model.parameters()}
    assert groups["adam/norm/no_decay"]["weight_decay"] == 0.0
    assert groups["adam/embedding"]["weight_decay"] == 0.1
    assert all(group["lr_ratio"] == 1.0 for group in optimizer.param_groups)
    assert all(group["power"] == 1.2 for group in optimizer.param_groups)


def test_blockwise_lr_ratios_reach_the_schedule():
    optimizer = build_optimizer(tiny_llama(), config(blockwise_lr=True))
    build_scheduler(
        optimizer, schedule="constant", lr_max=LR_MAX, total_steps=10, warmup_steps=0
    )
    rates = {group["block"]: group["lr"] for group in optimizer.param_groups}

    assert rates["embedding"] == pytest.approx(10 * LR_MAX)
    assert rates["qk"] == pytest.approx(8 * LR_MAX)
    assert rates["ffn"] == pytest.approx(6 * LR_MAX)
    assert rates["vo"] == pytest.approx(4 * LR_MAX)
    assert rates["norm"] == pytest.approx(LR_MAX)
    assert rates["output"] == pytest.approx(LR_MAX)
    assert BLOCKWISE_LR_RATIOS == {"embedding": 10, "qk": 8, "ffn": 6, "vo": 4}


def test_blockwise_lr_rejected_without_transformer_blocks():
    model = build_resnet("tiny", in_channels=3)

    with pytest.raises(ValueError, match="blockwise_lr found no embedding"):
        build_optimizer(model, config(workload="vision", blockwise_lr=True))


def test_blockwise_lr_rejected_with_muonpower():
    with pytest.raises(ValueError, match="blockwise_lr is defined for adampower"):
        build_optimizer(tiny_llama(), config(optimizer="muonpower", blockwise_lr=True))


def test_muonpower_rejected_without_weight_matrices():
    model = build_resnet("tiny", in_channels=3)

    with pytest.raises(ValueError, match="muonpower found no attention"):
        build_optimizer(model, config(workload="vision", optimizer="muonpower"))


def test_unknown_optimizer_rejected():
    with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
        build_optimizer(tiny_llama(), config(optimizer="sgd"))


def test_muonpower_splits_hidden_matrices_from_the_rest():
    model = tiny_llama()

    optimizer = build_optimizer(model, config(optimizer="muonpower"))
    muon, adam = optimizer.optimizers
    muon_params = {id(p) for group in muon.param_groups for p in group["params"]}
    adam_params = {id(p) for group in adam.param_groups for p in group["params"]}
    names = {id(param): name for name, param in model.named_parameters()}

    assert isinstance(optimizer, CombinedOptimizer)
    assert isinstance(muon, GradPower)
    assert isinstance(muon.optimizer, Muon)
    assert isinstance(adam, AdamPower)
    assert {names[i].rsplit(".", 2)[-2] for i in muon_params} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert {names[i] for i in adam_params} >= {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    }
    assert not muon_params & adam_params
    assert len(muon_params | adam_params) == len(list(model.parameters()))
    for group in muon.param_groups:
        assert group["adjust_lr_fn"] == "match_rms_adamw"
        assert group["weight_decay"] == 0.1
        assert group["nesterov"] is True
        assert group["momentum"] == 0.95
        assert group["power"] == 1.2


def test_muonpower_sends_moe_expert_stacks_to_stacked_muon():
    with torch.device("meta"):
        model = build_language_model({"family": "qwen2moe", "preset": "tiny"}, 64, 16)

    optimizer = build_optimizer(model, config(optimizer="muonpower"))
    muon, stacked, adam = optimizer.optimizers
    names = {id(param): name for name, param in model.named_parameters()}
    stacked_names = {
        names[id(p)] for group in stacked.param_groups for p in group["params"]
    }

    assert isinstance(stacked.optimizer, StackedMuon)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert all(p.ndim < 3 for g in adam.param_groups for p in g["params"])
    assert stacked_names == {
        f"model.layers.{layer}.mlp.experts.{kind}"
        for layer in (0, 1)
        for kind in ("gate_up_proj", "down_proj")
    }
    chunks = {group["name"]: group["row_chunks"] for group in stacked.param_groups}
    assert chunks == {"muon/ffn/experts_gate_up": 2, "muon/ffn/experts": 1}
    router = groups_by_name(adam)["adam/router"]
    assert router["params"]


@pytest.mark.parametrize("row_chunks", [1, 2])
def test_stacked_muon_matches_muon_per_matrix(row_chunks):
    """Each expert's row block moves exactly as under torch.optim.Muon."""
    torch.manual_seed(0)
    stacked_param = torch.nn.Parameter(torch.randn(3, 8, 6))
    blocks = [
        torch.nn.Parameter(block.detach().clone())
        for matrix in stacked_param.detach()
        for block in matrix.chunk(row_chunks, dim=0)
    ]
    settings = {
        "lr": 0.02,
        "weight_decay": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "adjust_lr_fn": "match_rms_adamw",
    }
    stacked = StackedMuon(
        [{"params": [stacked_param], "row_chunks": row_chunks}], **settings
    )
    reference = Muon(blocks, **settings)

    for step in range(3):
        grad = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(step))
        stacked_param.grad = grad.clone()
        for block, block_grad in zip(
            blocks,
            [b for matrix in grad for b in matrix.chunk(row_chunks, dim=0)],
            strict=True,
        ):
            block.grad = block_grad.clone()
        stacked.step()
        reference.step()

    expected = torch.stack(
        [
            torch.cat(blocks[i * row_chunks : (i + 1) * row_chunks], dim=0)
            for i in range(3)
        ]
    )
    torch.testing.assert_close(stacked_param.detach(), expected.detach())


def test_stacked_muon_rejects_uneven_row_blocks():
    with pytest.raises(ValueError, match="split into 2 equal blocks"):
        StackedMuon(
            [{"params": [torch.nn.Parameter(torch.zeros(2, 5, 4))], "row_chunks": 2}]
        )


def test_muonpower_powers_gradient_before_muon():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    random_gradients(model)
    random_gradients(reference)
    optimizer = build_optimizer(model, config(optimizer="muonpower"))
    muon_names = {
        name
        for name, param in model.named_parameters()
        if any(
            param is p
            for g in optimizer.optimizers[0].param_groups
            for p in g["params"]
        )
    }
    reference_params = [
        param for name, param in reference.named_parameters() if name in muon_names
    ]
    for param in reference_params:
        param.grad = power_transform(param.grad, 1.2)
    plain_muon = Muon(
        reference_params,
        lr=LR_MAX,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",
    )

    optimizer.step()
    plain_muon.step()

    for name, param in model.named_parameters():
        if name in muon_names:
            torch.testing.assert_close(param, reference.get_parameter(name))


def test_muon_update_rms_matches_adam_scale():
    layer = torch.nn.Linear(256, 256, bias=False)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.randn(256, 256)
    muon = Muon(
        [layer.weight], lr=LR_MAX, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"
    )

    muon.step()
    update_rms = (layer.weight.detach() - before).pow(2).mean().sqrt().item()

    # An orthogonal 256 x 256 update has RMS 1/16, and the rate 0.2 * sqrt(256)
    # * lr turns it into 0.2 * lr. Newton-Schulz only approximates the
    # orthogonal factor, so the RMS lands near 0.2 * lr (0.18 * lr in torch
    # 2.14), not on it.
    assert 0.12 * LR_MAX < update_rms < 0.28 * LR_MAX


def test_combined_optimizer_state_dict_round_trip():
    model = tiny_llama()
    optimizer = build_optimizer(model, config(optimizer="muonpower"))
    random_gradients(model)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    restored_model = copy.deepcopy(model)
    restored = build_optimizer(restored_model, config(optimizer="muonpower"))

    restored.load_state_dict(saved)
    random_gradients(model, seed=2)
    random_gradients(restored_model, seed=2)
    optimizer.step()
    restored.step()

    for param, other in zip(model.parameters(), restored_model.parameters()):
        torch.testing.assert_close(param, other)
    with pytest.raises(ValueError, match="expected a state dict with 2"):
        restored.load_state_dict({"optimizers": []})


def test_scheduler_drives_every_combined_group():
    optimizer = build_optimizer(tiny_llama(), config(optimizer="muonpower"))
    scheduler = build_scheduler(
        optimizer, schedule="cos", lr_max=LR_MAX, total_steps=4, warmup_steps=2
    )
    count = len(optimizer.param_groups)
    first = [group["lr"] for group in optimizer.param_groups]

    optimizer.step()
    scheduler.step()
    second = [group["lr"] for group in optimizer.param_groups]

    assert first == pytest.approx([LR_MAX / 2] * count)
    assert second == pytest.approx([LR_MAX] * count)


def test_param_groups_logged_at_build(caplog):
    with caplog.at_level(logging.INFO, logger="trainers.optimizers"):
        optimizer = build_optimizer(
            tiny_llama(), config(optimizer="muonpower", power=1.1)
        )
    described = describe_param_groups(optimizer)
    lines = [record.getMessage() for record in caplog.records]

    assert lines[0].startswith("optimizer muonpower power=1.1")
    assert len(lines) == 1 + len(described)
    assert any(
        line.startswith("param group muon/qk: 2 tensors") and "power=1.1" in line
        for line in lines
    )
    assert any(
        line.startswith("param group adam/norm/no_decay") and "weight_decay=0," in line
        for line in lines
    )


def test_study_training_settings_validated():
    training = Training(optimizer="muonpower", precision="fp16")

    assert training.blockwise_lr is False
    assert training.muon_momentum == 0.95
    with pytest.raises(ValidationError, match="blockwise_lr is defined for adampower"):
        Training(optimizer="muonpower", blockwise_lr=True)
    with pytest.raises(ValidationError, match="precision"):
        Training(precision="fp8")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> dict:
    return tiny_bpe_shards(tmp_path_factory.mktemp("optimizers"), val_tokens=129)


@pytest.mark.parametrize(
    ("optimizer", "blockwise_lr"),
    [("muonpower", False), ("adampower", True)],
)
def test_optimizer_trains_tiny_llama(tiny_corpus, optimizer, blockwise_lr):
    trial = config(
        batch_size=8,
        step_budget=8,
        lr_max=3e-3,
        warmup_steps=2,
        optimizer=optimizer,
        blockwise_lr=blockwise_lr,
        model={"preset": "tiny"},
        data=tiny_corpus,
        eval_every_steps=8,
        device="cpu",
    )
    rows = []
    outcome = run_trial(trial, lambda metrics, checkpoint=None: rows.append(metrics))

    assert outcome.end_state == "censored"
    losses = [row["train/loss"] for row in rows]
    assert len(losses) == 8
    assert all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(rows[-1]["val/loss"])
    # The first loss is near log(vocab size); eight steps lower it.
    assert losses[-1] < losses[0]
