"""Datasets for the study's workloads: tokenized text corpora and image sets.

The submodules `text` and `vision` load on first use, so that code which only
needs `DataUnavailableError` (the CLI's error handling) skips importing
torchvision and the tokenizers.
"""

from __future__ import annotations

import importlib
from typing import Any

from trainers.data.errors import DataUnavailableError

_EXPORTS = {
    "TextSource": "text",
    "TokenBatches": "text",
    "TokenizerSpec": "text",
    "TokenShards": "text",
    "iter_documents": "text",
    "padded_vocab_size": "text",
    "prepare_token_shards": "text",
    "CHANNEL_STATS": "vision",
    "ImageBatches": "vision",
    "eval_batches": "vision",
    "load_image_dataset": "vision",
    "prepare_fashion_mnist": "vision",
}

__all__ = [  # noqa: RUF022 - the error class first, then _EXPORTS' order
    "DataUnavailableError",
    "TextSource",
    "TokenBatches",
    "TokenizerSpec",
    "TokenShards",
    "iter_documents",
    "padded_vocab_size",
    "prepare_token_shards",
    "CHANNEL_STATS",
    "ImageBatches",
    "eval_batches",
    "load_image_dataset",
    "prepare_fashion_mnist",
]


def __getattr__(name: str) -> Any:
    if name in ("text", "vision"):
        return importlib.import_module(f"trainers.data.{name}")
    if name in _EXPORTS:
        module = importlib.import_module(f"trainers.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'trainers.data' has no attribute {name!r}")
