"""Plain-data tables of the workloads: model presets, data defaults and names.

They live apart from the workload modules, which import torch, transformers and
torchvision, so that study-file validation and `study list` can read them
without loading those libraries.
"""

from __future__ import annotations

from typing import Any, Literal

# Vocabulary sizes a byte-level BPE is trained to: 256 byte tokens plus EOS at
# least. The BPE trainer allocates memory in proportion to the requested
# vocabulary size (70 GB for 10**9), and 2**20 is four times the largest
# vocabularies of current LLMs.
MIN_BPE_VOCAB_SIZE = 257
MAX_BPE_VOCAB_SIZE = 2**20

# LLaMA decoder shapes by preset name. `tiny` keeps tests fast on CPU and `cpu`
# is the embedded default study. `cpu-s`, `cpu` and `cpu-l` span a 7x range of
# sizes (0.16M, 0.36M and 1.1M parameters at a vocabulary of 2048) for
# loss-versus-parameters fits that run on a CPU. The others are the GradPower paper's dense
# models. Its Table 3 gives their total sizes, so the shapes here take
# ffn = 4 * hidden and a head size of 64 (as in 0.2b, 768/3072/12 heads) and the
# depth that brings the count closest. At the T5 vocabulary of 32100 with an
# untied output layer they have 66.4M, 200.3M, 401.3M, 1004.7M and 2010.6M
# parameters, against the table's 66M, 200M, 400M, 1004M and 1994M.
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "layers": 1, "heads": 2, "ffn": 64},
    "cpu-s": {"hidden": 32, "layers": 2, "heads": 2, "ffn": 86},
    "cpu": {"hidden": 64, "layers": 2, "heads": 4, "ffn": 172},
    "cpu-l": {"hidden": 128, "layers": 3, "heads": 4, "ffn": 344},
    "66m": {"hidden": 512, "layers": 8, "heads": 8, "ffn": 2048},
    "0.2b": {"hidden": 768, "layers": 16, "heads": 12, "ffn": 3072},
    "0.4b": {"hidden": 1024, "layers": 20, "heads": 16, "ffn": 4096},
    "1b": {"hidden": 1536, "layers": 24, "heads": 24, "ffn": 6144},
    "2b": {"hidden": 2048, "layers": 28, "heads": 32, "ffn": 8192},
}

# Qwen2MoE shapes from the GradPower paper's Table 4 (d_model, d_FF, heads,
# depth, experts), with 4 experts active per token and sliding-window attention
# off. Each routed expert is a SwiGLU of width ffn / 4 and the always-on shared
# expert one of width ffn. This split reproduces the table's counts at the T5
# vocabulary of 32100: 502.5M total and 247.7M active (table: 502M, 247M),
# 1040.6M and 297.5M (1040M, 297M), 1945.4M and 536.1M (1945M, 536M).
QWEN2MOE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "layers": 2, "heads": 2, "ffn": 64, "experts": 8},
    "0.5b": {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, "experts": 16},
    "1b": {"hidden": 768, "layers": 15, "heads": 12, "ffn": 3072, "experts": 32},
    "2b": {"hidden": 1024, "layers": 16, "heads": 16, "ffn": 4096, "experts": 32},
}
MODEL_FAMILIES = ("llama", "qwen2moe")

# Zero-shot benchmarks of the paper's Table 1 that an lm entry's `downstream`
# may name, in the table's column order (`trainers.downstream` defines them).
DownstreamTask = Literal[
    "arc_easy", "arc_challenge", "piqa", "hellaswag", "openbookqa", "winogrande"
]
# Each task's column heading in the downstream table and the accuracy it shows.
# NOTE: the paper does not say which of acc and acc_norm its Table 1 shows. The
# table uses acc_norm where the answer choices differ much in length (ARC-Challenge,
# HellaSwag, OpenBookQA) and acc elsewhere, a common convention; trials record
# both.
DOWNSTREAM_COLUMNS: dict[str, tuple[str, str]] = {
    "arc_easy": ("ARC-E", "acc"),
    "arc_challenge": ("ARC-C", "acc_norm"),
    "piqa": ("PIQA", "acc"),
    "hellaswag": ("HellaSwag", "acc_norm"),
    "openbookqa": ("OBQA", "acc_norm"),
    "winogrande": ("WinoGrande", "acc"),
}

# Data settings of the lm workload that a study entry's `data` may override.
LM_DEFAULT_DATA: dict[str, Any] = {
    "source": "bible",
    "paths": [],
    "tokenizer": "bpe",
    "vocab_size": 4096,
    "tokenizer_path": None,
    "seq_len": 64,
    "val_tokens": 65536,
    "max_documents": None,
    # Tokens in the training split; None tokenizes the whole split.
    "max_train_tokens": None,
}

# Small ResNets built from torchvision's BasicBlock: (blocks per stage, widths).
# They keep the residual design of ResNet-34 at a size that trains on two CPU cores.
SMALL_RESNETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((1, 1), (8, 16)),
    "cpu": ((1, 1, 1), (16, 32, 64)),
}

VISION_DEFAULT_DATA: dict[str, Any] = {
    "dataset": "fashion_mnist",
    "root": None,
    "source_dir": None,
    "download": False,
    "train_examples": None,
    "eval_examples": None,
    "augment": False,
}

# Text sources of the lm workload, see trainers.data.text.TextSource.
SourceKind = Literal["bible", "files", "c4_local", "c4_hub", "openwebtext_hub"]
# Image datasets of the vision workload, see trainers.data.vision.
ImageDatasetName = Literal["fashion_mnist", "cifar10"]
# Images in each dataset's standard training split, which an epoch budget
# turns into steps before any data is loaded.
IMAGE_TRAIN_EXAMPLES: dict[str, int] = {"fashion_mnist": 60000, "cifar10": 50000}
