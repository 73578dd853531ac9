"""Causal language modelling with a LLaMA or Qwen2MoE decoder on packed tokens.

Text sources (see `trainers.data.text`): C4 from local ``c4-*.json.gz`` shards
or the Hugging Face hub, OpenWebText from the hub, the King James Bible, or
any text files. The tokenizer is a byte-level BPE trained on the source or a
pretrained one, such as T5's (32100 tokens, padded to 32128 embedding rows)
or GPT-2's (50257 tokens, padded to 50304).

Documents are packed: each one is followed by an EOS token and all of them
are concatenated into one token stream, which is cut into training windows
of ``seq_len + 1`` tokens that start every ``seq_len`` tokens. Each epoch
visits all windows once in a seeded random order, so a token budget equal to
the stream is one pass over it, as in the paper's C4 runs. A window may span a
document boundary, and the EOS token marks it. Packing spends no compute on
padding and keeps every position a real next-token target, while truncating
each document to ``seq_len`` would drop the tails of long documents and pad
the short ones.

The model is chosen by ``model: {family: llama | qwen2moe, preset: NAME}``
(family defaults to llama). The vocabulary size comes from the tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from trainers.data.text import (
    TextSource,
    TokenBatches,
    TokenizerSpec,
    TokenShards,
    prepare_token_shards,
    shard_encoder,
)
from trainers.downstream import evaluate_downstream, prepare_downstream
from trainers.tables import (
    LLAMA_PRESETS,
    LM_DEFAULT_DATA,
    MODEL_FAMILIES,
    QWEN2MOE_PRESETS,
)
from trainers.workloads.base import Workload, count_parameters

logger = logging.getLogger(__name__)

QWEN2MOE_ACTIVE_EXPERTS = 4
# The load-balancing loss is added to the training loss with this weight
# (transformers' default router_aux_loss_coef). Validation loss leaves it out.
QWEN2MOE_ROUTER_AUX_LOSS_COEF = 0.001

_MODEL_KEYS = frozenset({"family", "preset"})
DEFAULT_DATA = LM_DEFAULT_DATA


def build_llama(preset: str, vocab_size: int, seq_len: int) -> LlamaForCausalLM:
    """Build an untied LLaMA decoder (RoPE, SwiGLU, RMSNorm) from a preset name."""
    if preset not in LLAMA_PRESETS:
        raise ValueError(
            f"Unknown LLaMA preset {preset!r}; choose one of {list(LLAMA_PRESETS)}"
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


def build_qwen2moe(preset: str, vocab_size: int, seq_len: int) -> Qwen2MoeForCausalLM:
    """Build an untied Qwen2MoE decoder from a preset name.

    Every layer is a mixture-of-experts layer with a gated shared expert, the
    router picks `QWEN2MOE_ACTIVE_EXPERTS` experts per token, and the model
    returns the router's load-balancing loss as ``aux_loss``.
    """
    if preset not in QWEN2MOE_PRESETS:
        raise ValueError(
            f"Unknown Qwen2MoE preset {preset!r}; choose one of "
            f"{list(QWEN2MOE_PRESETS)}"
        )
    shape = QWEN2MOE_PRESETS[preset]
    config = Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        moe_intermediate_size=shape["ffn"] // 4,
        shared_expert_intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        num_experts=shape["experts"],
        num_experts_per_tok=QWEN2MOE_ACTIVE_EXPERTS,
        use_sliding_window=False,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=QWEN2MOE_ROUTER_AUX_LOSS_COEF,
        attn_implementation="sdpa",
    )
    return Qwen2MoeForCausalLM(config)


def build_language_model(
    model: dict[str, Any], vocab_size: int, seq_len: int
) -> PreTrainedModel:
    """Build the decoder that the workload's ``model`` settings name.

    ``model`` contains ``family`` (``llama`` by default, or ``qwen2moe``) and
    ``preset`` (``cpu`` by default for llama). Wrap the call in
    ``torch.device("meta")`` to count parameters without allocating them.
    """
    unknown = sorted(set(model) - _MODEL_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown lm model settings {unknown}; valid settings are "
            f"{sorted(_MODEL_KEYS)}"
        )
    family = model.get("family", "llama")
    if family == "llama":
        return build_llama(model.get("preset", "cpu"), vocab_size, seq_len)
    if family == "qwen2moe":
        if "preset" not in model:
            raise ValueError(
                f"The qwen2moe family needs a preset; choose one of "
                f"{list(QWEN2MOE_PRESETS)}"
            )
        return build_qwen2moe(model["preset"], vocab_size, seq_len)
    raise ValueError(
        f"Unknown lm model family {family!r}; choose one of {list(MODEL_FAMILIES)}"
    )


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
            max_train_tokens=merged["max_train_tokens"],
        )
        prepared = {**data, "shards_dir": str(shards.directory)}
        if data.get("downstream"):
            prepared["downstream_dir"] = str(
                prepare_downstream(
                    data["downstream"],
                    cache_root,
                    tokenizer_id=shards.directory.name,
                    load_encoder=lambda: shard_encoder(shards, tokenizer),
                    seq_len=int(merged["seq_len"]),
                )
            )
        return prepared

    def build_model(self) -> nn.Module:
        model = build_language_model(
            self.config.model, self.shards.model_vocab_size, self.seq_len
        )
        counts = count_parameters(model)
        logger.info(
            "model %s %s: %.1fM parameters, %.1fM active per token, vocab %d",
            self.config.model.get("family", "llama"),
            self.config.model.get("preset", "cpu"),
            counts["total"] / 1e6,
            counts["active"] / 1e6,
            self.shards.model_vocab_size,
        )
        return model

    def train_batch(self, step: int) -> torch.Tensor:
        return self.batches.train_batch(step, self.config.batch_size)

    def split(self, batch: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
        return list(batch.split(micro_batch_size))

    def loss(self, model: nn.Module, micro_batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss in nats, plus the router's weighted load-balancing
        loss for MoE models."""
        tokens = micro_batch.to(self.device, non_blocking=True)
        outputs = model(input_ids=tokens[:, :-1])
        logits = outputs.logits
        targets = tokens[:, 1:]
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)
        )
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + model.config.router_aux_loss_coef * aux_loss.float()
        return loss

    def progress_count(self, batch: torch.Tensor) -> int:
        return batch.size(0) * (batch.size(1) - 1)

    @torch.no_grad()
    def final_evaluate(self, model: nn.Module) -> dict[str, float]:
        """Zero-shot accuracy on the downstream tasks of ``data.downstream``,
        when the data names any; see `trainers.downstream`."""
        settings = self.config.data.get("downstream")
        if not settings:
            return {}
        if "downstream_dir" not in self.config.data:
            raise ValueError(
                "data.downstream needs prepared requests (data.downstream_dir); "
                "call LanguageModelWorkload.prepare first"
            )
        return evaluate_downstream(
            model,
            Path(self.config.data["downstream_dir"]),
            list(settings["tasks"]),
            seq_len=self.seq_len,
            batch_size=max(1, self.config.micro_batch_size or self.config.batch_size),
            device=self.device,
        )

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
