"""Datasets for the study's workloads: tokenized text corpora and image sets."""

from trainers.data.errors import DataUnavailableError
from trainers.data.text import (
    TextSource,
    TokenBatches,
    TokenizerSpec,
    TokenShards,
    iter_documents,
    padded_vocab_size,
    prepare_token_shards,
)
from trainers.data.vision import (
    CHANNEL_STATS,
    ImageBatches,
    eval_batches,
    load_image_dataset,
    prepare_fashion_mnist,
)

__all__ = [
    "CHANNEL_STATS",
    "DataUnavailableError",
    "ImageBatches",
    "TextSource",
    "TokenBatches",
    "TokenShards",
    "TokenizerSpec",
    "eval_batches",
    "iter_documents",
    "load_image_dataset",
    "padded_vocab_size",
    "prepare_fashion_mnist",
    "prepare_token_shards",
]
