"""Language-model presets, Qwen2MoE, and the C4 and OpenWebText paths."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.trainers.sample_data import (
    GPT2_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    documents,
    save_gpt2_sized_tokenizer,
    save_t5_sized_tokenizer,
    write_c4_shards,
    write_openwebtext_parquet,
)
from trainers.config import TrialConfig
from trainers.data.text import (
    TextSource,
    TokenizerSpec,
    TokenShards,
    prepare_token_shards,
)
from trainers.loop import run_trial
from trainers.workloads.lm import (
    QWEN2MOE_ACTIVE_EXPERTS,
    LanguageModelWorkload,
    build_language_model,
    count_parameters,
)

# Sizes of the GradPower paper's models (Tables 3 and 4), at the T5 vocabulary.
LLAMA_SIZES = {"66m": 66e6, "0.2b": 200e6, "0.4b": 400e6, "1b": 1004e6, "2b": 1994e6}
QWEN2MOE_SIZES = {
    "0.5b": (502e6, 247e6),
    "1b": (1040e6, 297e6),
    "2b": (1945e6, 536e6),
}


def relative_error(value: float, expected: float) -> float:
    return abs(value - expected) / expected


def lm_config(data: dict, **overrides) -> TrialConfig:
    settings = {
        "workload": "lm",
        "batch_size": 2,
        "power": 1.2,
        "lr_max": 1e-3,
        "step_budget": 2,
        "target_value": 0.0,
        "model": {"preset": "tiny"},
        "data": data,
        "device": "cpu",
        "threads": 1,
    }
    settings.update(overrides)
    return TrialConfig(**settings)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> dict:
    """Token shards of a 300-token BPE trained on WORDS documents."""
    root = tmp_path_factory.mktemp("lm")
    text = root / "corpus.txt"
    text.write_text("\n\n".join(documents(200, seed=3)) + "\n")
    shards = prepare_token_shards(
        TextSource("files", paths=(str(text),)),
        TokenizerSpec("bpe", vocab_size=300),
        root / "cache",
        seq_len=32,
        val_tokens=4 * 32 + 1,
    )
    return {"shards_dir": str(shards.directory), "seq_len": 32}


@pytest.mark.parametrize("preset", list(LLAMA_SIZES))
def test_llama_preset_matches_paper_size(preset):
    with torch.device("meta"):
        model = build_language_model({"preset": preset}, T5_VOCAB_SIZE, 256)
    counts = count_parameters(model)

    # The paper's table lost its shape columns, so the shapes are inferred; the
    # farthest, 2b, has 2010.6M parameters against 1994M (0.83%).
    assert relative_error(counts["total"], LLAMA_SIZES[preset]) < 0.01
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.head_dim == 64


@pytest.mark.parametrize("preset", list(QWEN2MOE_SIZES))
def test_qwen2moe_preset_matches_paper_size(preset):
    total, active = QWEN2MOE_SIZES[preset]
    with torch.device("meta"):
        model = build_language_model(
            {"family": "qwen2moe", "preset": preset}, T5_VOCAB_SIZE, 256
        )
    counts = count_parameters(model)

    assert relative_error(counts["total"], total) < 0.01
    assert relative_error(counts["active"], active) < 0.01
    assert model.config.num_experts_per_tok == QWEN2MOE_ACTIVE_EXPERTS
    assert model.config.use_sliding_window is False
    assert set(model.config.layer_types) == {"full_attention"}
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_language_model_rejects_unknown_settings():
    with pytest.raises(ValueError, match="Unknown lm model family 'gpt'"):
        build_language_model({"family": "gpt", "preset": "tiny"}, 64, 16)
    with pytest.raises(ValueError, match="Unknown Qwen2MoE preset '66m'"):
        build_language_model({"family": "qwen2moe", "preset": "66m"}, 64, 16)
    with pytest.raises(ValueError, match="needs a preset"):
        build_language_model({"family": "qwen2moe"}, 64, 16)
    with pytest.raises(ValueError, match="Unknown lm model settings \\['layers'\\]"):
        build_language_model({"preset": "tiny", "layers": 3}, 64, 16)


def test_qwen2moe_loss_adds_router_aux_loss(small_shards):
    torch.manual_seed(0)
    config = lm_config(small_shards, model={"family": "qwen2moe", "preset": "tiny"})
    workload = LanguageModelWorkload(config, torch.device("cpu"))
    model = workload.build_model()
    batch = workload.train_batch(0)

    loss = workload.loss(model, batch)
    loss.backward()
    outputs = model(input_ids=batch[:, :-1])
    cross_entropy = F.cross_entropy(
        outputs.logits.reshape(-1, outputs.logits.size(-1)), batch[:, 1:].reshape(-1)
    )
    router = model.model.layers[0].mlp.gate.weight

    expected = cross_entropy + model.config.router_aux_loss_coef * outputs.aux_loss
    torch.testing.assert_close(loss, expected)
    assert outputs.aux_loss.item() > 0
    assert router.grad is not None
    assert router.grad.abs().sum().item() > 0


def test_qwen2moe_tiny_trains_on_cpu(small_shards):
    reports = []
    config = lm_config(
        small_shards,
        model={"family": "qwen2moe", "preset": "tiny"},
        lr_max=1e-2,
        step_budget=4,
        eval_every_steps=2,
    )

    outcome = run_trial(config, reports.append)

    assert outcome.end_state == "censored"
    assert outcome.steps == 4
    assert all(math.isfinite(report["train/loss"]) for report in reports)
    assert reports[-1]["val/loss"] < reports[1]["val/loss"]


def test_c4_with_t5_tokenizer_through_workload(tmp_path):
    tokenizer = save_t5_sized_tokenizer(tmp_path / "t5")
    train_documents = documents(40, seed=1)
    c4 = write_c4_shards(tmp_path / "c4", train_documents, documents(10, seed=2))
    data = {
        "source": "c4_local",
        "paths": [str(c4)],
        "tokenizer": "pretrained",
        "tokenizer_path": str(tokenizer),
        "seq_len": 256,
        "val_tokens": 400,
    }

    prepared = LanguageModelWorkload.prepare(data, tmp_path / "cache")
    shards = TokenShards.load(prepared["shards_dir"])
    train = np.asarray(shards.tokens("train"))
    config = lm_config(prepared)
    workload = LanguageModelWorkload(config, torch.device("cpu"))
    reports = []
    outcome = run_trial(config, reports.append)

    assert shards.vocab_size == T5_VOCAB_SIZE
    assert shards.model_vocab_size == 32128
    assert shards.eos_id == 1
    # Packed: every document's 40 words, then EOS, back to back.
    assert shards.train_tokens == len(train_documents) * 41
    assert np.flatnonzero(train == 1).tolist() == list(range(40, len(train), 41))
    assert workload.build_model().lm_head.out_features == 32128
    assert workload.train_batch(0).shape == (2, 257)
    assert outcome.end_state == "censored"
    assert math.isfinite(reports[-1]["val/loss"])


def test_prepare_caps_train_tokens(tmp_path):
    tokenizer = save_t5_sized_tokenizer(tmp_path / "t5")
    c4 = write_c4_shards(tmp_path / "c4", documents(40, seed=1), documents(10, seed=2))
    data = {
        "source": "c4_local",
        "paths": [str(c4)],
        "tokenizer": "pretrained",
        "tokenizer_path": str(tokenizer),
        "seq_len": 16,
        "val_tokens": 100,
    }
    # Ten documents of 40 words and EOS, and 5 tokens of the eleventh.
    cap = 10 * 41 + 5

    uncapped = LanguageModelWorkload.prepare(data, tmp_path / "cache")
    capped = LanguageModelWorkload.prepare(
        {**data, "max_train_tokens": cap}, tmp_path / "cache"
    )
    whole = TokenShards.load(uncapped["shards_dir"])
    cut = TokenShards.load(capped["shards_dir"])

    assert capped["shards_dir"] != uncapped["shards_dir"]
    assert whole.train_tokens == 40 * 41
    assert cut.train_tokens == cap
    assert np.array_equal(cut.tokens("train"), whole.tokens("train")[:cap])
    assert np.array_equal(cut.tokens("validation"), whole.tokens("validation"))


def test_openwebtext_with_gpt2_tokenizer_through_workload(tmp_path, monkeypatch):
    tokenizer = save_gpt2_sized_tokenizer(tmp_path / "gpt2")
    texts = documents(110, words_per_document=100, seed=4)
    parquet = write_openwebtext_parquet(tmp_path / "owt" / "train.parquet", texts)
    load_dataset = datasets.load_dataset
    requests = []

    def load_local_copy(name, config=None, *, split, streaming):
        # The hub is out of reach, so the same records stream from local parquet.
        requests.append((name, config, split, streaming))
        return load_dataset(
            "parquet", data_files=str(parquet), split="train", streaming=True
        )

    monkeypatch.setattr(datasets, "load_dataset", load_local_copy)
    data = {
        "source": "openwebtext_hub",
        "tokenizer": "pretrained",
        "tokenizer_path": str(tokenizer),
        "seq_len": 1024,
        "val_tokens": 1100,
    }

    prepared = LanguageModelWorkload.prepare(data, tmp_path / "cache")
    shards = TokenShards.load(prepared["shards_dir"])
    config = lm_config(prepared, batch_size=1)
    reports = []
    outcome = run_trial(config, reports.append)

    assert requests[0] == ("Skylion007/openwebtext", None, "train", True)
    assert shards.vocab_size == GPT2_VOCAB_SIZE
    assert shards.model_vocab_size == 50304
    assert shards.dtype == "uint16"
    assert shards.eos_id == GPT2_VOCAB_SIZE - 1
    # Every tenth document is held out for validation, 11 of 110.
    assert shards.train_tokens == 99 * 101
    assert shards.val_tokens == 1100
    assert outcome.end_state == "censored"
    assert math.isfinite(reports[-1]["val/loss"])
