"""Small files in the formats of the GradPower paper's data sets, for tests.

C4 shards are gzipped JSON lines named like allenai/c4's ``en`` files,
tokenizers are saved ``PreTrainedTokenizerFast`` directories with the
vocabulary sizes of T5 and GPT-2, and CIFAR-10 folders hold the official
archive's pickled batches.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trainers.data.text import TextSource, TokenizerSpec, prepare_token_shards
from trainers.data.vision import write_cifar10_folder

T5_VOCAB_SIZE = 32100
GPT2_VOCAB_SIZE = 50257
WORDS = [
    "amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor",
    "iris", "juniper", "kelp", "lagoon", "marble", "nectar", "onyx", "pebble",
    "quartz", "raven", "sable", "tundra", "umber", "violet", "walnut", "xenon",
    "yarrow", "zephyr", "acorn", "bramble", "cobalt", "dune",
]  # fmt: skip


def documents(count: int, words_per_document: int = 40, seed: int = 0) -> list[str]:
    """Return ``count`` documents of random WORDS, the same for the same seed."""
    generator = np.random.default_rng(seed)
    return [
        " ".join(generator.choice(WORDS, size=words_per_document)) for _ in range(count)
    ]


def tiny_bpe_shards(root: Path, val_tokens: int, seed: int = 5) -> dict:
    """Tokenize 200 generated documents with a 300-token BPE under `root` and
    return the lm workload's data settings for them, at seq_len 32."""
    text = root / "corpus.txt"
    text.write_text("\n\n".join(documents(200, seed=seed)) + "\n")
    shards = prepare_token_shards(
        TextSource("files", paths=(str(text),)),
        TokenizerSpec("bpe", vocab_size=300),
        root / "cache",
        seq_len=32,
        val_tokens=val_tokens,
    )
    return {"shards_dir": str(shards.directory), "seq_len": 32}


def save_word_tokenizer(
    directory: Path, vocab_size: int, eos_token: str, eos_id: int
) -> Path:
    """Save a whitespace WordLevel tokenizer of exactly ``vocab_size`` tokens.

    WORDS get ids spread over the whole range, the last word the highest id
    that is not EOS, so training touches embedding rows near the top.
    """
    step = (vocab_size - 3) // len(WORDS)
    word_ids = [2 + index * step for index in range(len(WORDS) - 1)]
    word_ids.append(vocab_size - 2 if eos_id != vocab_size - 2 else vocab_size - 3)
    taken = {eos_id: eos_token, 0: "<unk>"}
    taken.update(dict(zip(word_ids, WORDS)))
    vocab = {taken.get(index, f"unused{index}"): index for index in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, unk_token="<unk>"
    )
    wrapped.save_pretrained(str(directory))
    return directory


def save_t5_sized_tokenizer(directory: Path) -> Path:
    """Save a tokenizer of T5's vocabulary size (32100) with EOS ``</s>`` at id 1."""
    return save_word_tokenizer(directory, T5_VOCAB_SIZE, "</s>", 1)


def save_gpt2_sized_tokenizer(directory: Path) -> Path:
    """Save a tokenizer of GPT-2's vocabulary size (50257) with EOS
    ``<|endoftext|>`` as the last id."""
    return save_word_tokenizer(
        directory, GPT2_VOCAB_SIZE, "<|endoftext|>", GPT2_VOCAB_SIZE - 1
    )


def write_c4_shards(
    directory: Path, train_documents: list[str], validation_documents: list[str]
) -> Path:
    """Write two training shards and one validation shard of C4's ``en`` layout."""
    directory.mkdir(parents=True, exist_ok=True)
    half = len(train_documents) // 2
    shards = {
        "c4-train.00000-of-00002.json.gz": train_documents[:half],
        "c4-train.00001-of-00002.json.gz": train_documents[half:],
        "c4-validation.00000-of-00001.json.gz": validation_documents,
    }
    for name, texts in shards.items():
        with gzip.open(directory / name, "wt", encoding="utf-8") as shard:
            for index, text in enumerate(texts):
                record = {
                    "text": text,
                    "timestamp": "2019-04-18T12:00:00Z",
                    "url": f"https://example.org/{name}/{index}",
                }
                shard.write(json.dumps(record) + "\n")
    return directory


def write_openwebtext_parquet(path: Path, texts: list[str]) -> Path:
    """Write texts as a parquet file with one ``text`` column, the field that
    the openwebtext_hub source reads from each record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)
    return path


def write_random_cifar10(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """Write a CIFAR-10 folder of random images with labels 0..9 in turn."""
    generator = np.random.default_rng(seed)
    train_images = generator.integers(0, 256, (train, 3, 32, 32), dtype=np.uint8)
    test_images = generator.integers(0, 256, (test, 3, 32, 32), dtype=np.uint8)
    write_cifar10_folder(
        root,
        train_images,
        [index % 10 for index in range(train)],
        test_images,
        [index % 10 for index in range(test)],
    )
    return root


def downstream_records(task: str, count: int, seed: int = 0) -> list[dict]:
    """Return ``count`` records of a downstream task with the fields of its hub
    dataset, built from WORDS; the correct choice cycles through the choices."""
    generator = np.random.default_rng(seed)

    def words(size: int) -> str:
        return " ".join(generator.choice(WORDS, size=size))

    records = []
    for index in range(count):
        if task in ("arc_easy", "arc_challenge", "openbookqa"):
            labels = ["A", "B", "C", "D"] if index % 3 else ["1", "2", "3", "4"]
            record = {
                "id": f"{task}-{index}",
                "choices": {"text": [words(2 + k) for k in range(4)], "label": labels},
                "answerKey": labels[index % 4],
            }
            if task == "openbookqa":
                record["question_stem"] = words(8)
            else:
                record["question"] = words(8) + "?"
        elif task == "piqa":
            record = {
                "goal": words(6),
                "sol1": words(5),
                "sol2": words(7),
                "label": index % 2,
            }
        elif task == "hellaswag":
            record = {
                "ind": index,
                "activity_label": words(2).title(),
                "ctx_a": words(6) + ".",
                "ctx_b": words(3),
                "ctx": "",
                "endings": [words(4 + k) + " [title] " + words(2) for k in range(4)],
                "source_id": f"activitynet~v_{index}",
                "split": "val",
                "split_type": "indomain",
                "label": str(index % 4),
            }
        elif task == "winogrande":
            first, second = generator.choice(WORDS, size=2, replace=False)
            record = {
                "sentence": f"{words(4)} _ {words(5)}.",
                "option1": str(first),
                "option2": str(second),
                "answer": str(1 + index % 2),
            }
        else:
            raise ValueError(f"unknown downstream task {task!r}; use one of TASK_NAMES")
        records.append(record)
    return records


def write_downstream_files(directory: Path, count: int, tasks=None) -> Path:
    """Write ``<task>.jsonl`` with ``count`` records for each downstream task."""
    from trainers.downstream import TASK_NAMES

    directory.mkdir(parents=True, exist_ok=True)
    for seed, task in enumerate(tasks or TASK_NAMES):
        lines = [json.dumps(r) for r in downstream_records(task, count, seed=seed)]
        (directory / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return directory
