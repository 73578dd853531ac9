"""Causal language modelling with a LLaMA model on packed token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.data.text import (
    TextSource,
    TokenBatches,
    TokenizerSpec,
    TokenShards,
    prepare_token_shards,
)
from trainers.workloads.base import Workload

# Decoder shapes by preset name. The vocabulary size comes from the tokenizer.
# `tiny` keeps tests fast on CPU and `cpu` is the embedded default study. `0.2b`
# is about 200M parameters at the T5 vocabulary of 32100 (151M in the blocks,
# 49M in the untied embedding and output layer).
# TODO: the paper's 66M, 0.4B, 1B and 2B presets, checked by parameter count.
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "layers": 1, "heads": 2, "ffn": 64},
    "cpu": {"hidden": 64, "layers": 2, "heads": 4, "ffn": 172},
    "0.2b": {"hidden": 768, "layers": 16, "heads": 12, "ffn": 3072},
}

DEFAULT_DATA: dict[str, Any] = {
    "source": "bible",
    "paths": [],
    "tokenizer": "bpe",
    "vocab_size": 4096,
    "tokenizer_path": None,
    "seq_len": 64,
    "val_tokens": 65536,
    "max_documents": None,
}


def build_llama(preset: str, vocab_size: int, seq_len: int) -> LlamaForCausalLM:
    """Build an untied LLaMA decoder (RoPE, SwiGLU, RMSNorm) from a preset name."""
    if preset not in LLAMA_PRESETS:
        raise ValueError(
            f"Unknown LLaMA preset {preset!r}; choose one of {sorted(LLAMA_PRESETS)}"
        )
    shape = LLAMA_PRESETS[preset]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


class LanguageModelWorkload(Workload):
    name = "lm"
    progress_unit = "tokens"

    def __init__(self, config, device) -> None:
        super().__init__(config, device)
        data = {**DEFAULT_DATA, **config.data}
        if "shards_dir" not in data:
            raise ValueError(
                "The lm workload needs prepared token shards (data.shards_dir); "
                "call LanguageModelWorkload.prepare first"
            )
        self.seq_len = int(data["seq_len"])
        self.shards = TokenShards.load(Path(data["shards_dir"]))
        self.batches = TokenBatches(self.shards, seq_len=self.seq_len, seed=config.seed)

    @classmethod
    def prepare(cls, data: dict[str, Any], cache_root: Path) -> dict[str, Any]:
        merged = {**DEFAULT_DATA, **data}
        source = TextSource(
            kind=merged["source"],
            paths=tuple(str(p) for p in merged["paths"]),
            max_documents=merged["max_documents"],
        )
        tokenizer = TokenizerSpec(
            kind=merged["tokenizer"],
            vocab_size=int(merged["vocab_size"]),
            name_or_path=merged["tokenizer_path"],
        )
        shards = prepare_token_shards(
            source,
            tokenizer,
            cache_root / "tokens",
            seq_len=int(merged["seq_len"]),
            val_tokens=merged["val_tokens"],
        )
        return {**data, "shards_dir": str(shards.directory)}

    def build_model(self) -> nn.Module:
        preset = self.config.model.get("preset", "cpu")
        return build_llama(preset, self.shards.model_vocab_size, self.seq_len)

    def train_batch(self, step: int) -> torch.Tensor:
        return self.batches.train_batch(step, self.config.batch_size)

    def split(self, batch: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
        return list(batch.split(micro_batch_size))

    def loss(self, model: nn.Module, micro_batch: torch.Tensor) -> torch.Tensor:
        tokens = micro_batch.to(self.device, non_blocking=True)
        logits = model(input_ids=tokens[:, :-1]).logits
        targets = tokens[:, 1:]
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)
        )

    def progress_count(self, batch: torch.Tensor) -> int:
        return batch.size(0) * (batch.size(1) - 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean next-token loss in nats per token over the fixed validation set."""
        total_loss = 0.0
        total_tokens = 0
        eval_batch_size = max(1, self.config.micro_batch_size or self.config.batch_size)
        for batch in self.batches.val_batches(eval_batch_size):
            tokens = batch.to(self.device)
            logits = model(input_ids=tokens[:, :-1]).logits
            targets = tokens[:, 1:]
            total_loss += F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                reduction="sum",
            ).item()
            total_tokens += targets.numel()
        return {"val/loss": total_loss / total_tokens}
