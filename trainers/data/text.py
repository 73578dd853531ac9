"""Text corpora for the language-model workloads, tokenized into memory-mapped shards.

A `TextSource` yields documents (plain strings) for the train or validation split.
`prepare_token_shards` tokenizes a source once and caches the token ids as flat
arrays, and `TokenBatches` samples training windows from them and walks the fixed
validation windows.

Documents are packed: each document is followed by an EOS token and the results are
concatenated. Packing wastes nothing on padding and makes every position a real
next-token target, whereas truncating documents to seq_len would drop their tails and
pad the short ones.

Sources without their own validation split (bible, files, openwebtext_hub) hold out
every `HELD_OUT_EVERY`-th document, counted from 0 in source order. The held-out
documents are spread over the whole corpus, so validation text is not one region of
it (such as the last books of the Bible).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from trainers.data.errors import DataUnavailableError, one_line
from trainers.tables import MAX_BPE_VOCAB_SIZE, MIN_BPE_VOCAB_SIZE, SourceKind

logger = logging.getLogger(__name__)

Split = Literal["train", "validation"]

# Document i goes to validation when i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1. With
# 10, the Bible's 118 validation chapters contain 100,738 tokens of the 4096-token
# BPE, enough for a fixed validation set of 65,536 tokens.
HELD_OUT_EVERY = 10

BIBLE_RANGE = "Gen1:1-Rev22:21"
BPE_EOS_TOKEN = "<|endoftext|>"
# The BPE merges are learned from at most this many characters of the training split,
# which bounds the training time on the streaming sources. Smaller corpora are used
# whole (the King James Bible has about 4.4 million characters).
BPE_TRAINING_MAX_CHARS = 100_000_000
# The model's embedding table is padded to a multiple of this many rows
# (GPT-2: 50257 tokens become 50304 rows, T5: 32100 become 32128).
EMBEDDING_ROWS_MULTIPLE = 64
ENCODE_BATCH_DOCUMENTS = 1024
# Bump when the shard layout or the tokenization changes, so that old caches are
# not reused.
CACHE_FORMAT_VERSION = 1

_SPLIT_FILES = {"train": "train.bin", "validation": "val.bin"}
# A line of `bible -f` output such as "1Cor13:4 Charity suffereth long, ...". The
# chapter group is the book and chapter ("1Cor13").
_VERSE_LINE = re.compile(r"^(?P<chapter>[1-3]?[A-Za-z]+\d+):\d+ (?P<text>.*)$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_GLOB_CHARACTERS = frozenset("*?[")
# transformers' AutoTokenizer.from_pretrained needs at least one of these files in a
# local folder. save_pretrained writes both.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TextSource:
    """A text corpus and how to read it.

    ``paths`` are files or glob patterns for "files" and directories that contain
    ``c4-train.*.json.gz`` and ``c4-validation.*.json.gz`` shards for "c4_local".
    Other kinds ignore them. ``max_documents`` caps the documents read from each
    split.
    """

    kind: SourceKind
    paths: tuple[str, ...] = ()
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in {"bible", "files", "c4_local", "c4_hub", "openwebtext_hub"}:
            raise ValueError(f"unknown text source kind {self.kind!r}")
        if isinstance(self.paths, (str, os.PathLike)):
            raise TypeError(
                f"TextSource.paths must be a sequence of paths, got {self.paths!r}"
            )
        object.__setattr__(self, "paths", tuple(str(path) for path in self.paths))
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(
                f"max_documents must be at least 1 or None, got {self.max_documents}"
            )


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer: a byte-level BPE trained on the source, or a pretrained one.

    ``vocab_size`` applies to "bpe" only and counts the EOS token. ``name_or_path``
    is required for "pretrained" and is passed to
    ``transformers.AutoTokenizer.from_pretrained`` (a hub name or a local directory).
    """

    kind: Literal["bpe", "pretrained"]
    vocab_size: int = 4096
    name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "bpe":
            if not MIN_BPE_VOCAB_SIZE <= self.vocab_size <= MAX_BPE_VOCAB_SIZE:
                raise ValueError(
                    f"bpe vocab_size {self.vocab_size} is invalid; use "
                    f"{MIN_BPE_VOCAB_SIZE} to {MAX_BPE_VOCAB_SIZE}"
                )
        elif self.kind == "pretrained":
            if not self.name_or_path:
                raise ValueError("a pretrained tokenizer needs name_or_path")
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}")


# Sources


def iter_documents(source: TextSource, split: Split) -> Iterator[str]:
    """Yield the documents of one split of ``source``, in a fixed order.

    bible: one document per chapter, verses joined by newlines and without their
    references. files: one document per block of lines separated by a blank line,
    files in the order of ``paths`` (glob matches sorted). c4_local and c4_hub: the
    "text" field of each record of the C4 "en" split. openwebtext_hub: the "text"
    field of each record of the only (train) split. Sources without a validation
    split hold out every `HELD_OUT_EVERY`-th document (see the module docstring).

    The first ``next()`` raises DataUnavailableError when the data is missing, and
    the message names the fix.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if source.kind == "bible":
        documents = _select_split(_bible_chapters(), split)
    elif source.kind == "files":
        documents = _select_split(_file_paragraphs(source.paths), split)
    elif source.kind == "c4_local":
        documents = _c4_local_documents(source.paths, split)
    elif source.kind == "c4_hub":
        documents = _hub_texts("allenai/c4", "en", split)
    else:
        documents = _select_split(
            _hub_texts("Skylion007/openwebtext", None, "train"), split
        )
    return itertools.islice(documents, source.max_documents)


def _select_split(documents: Iterable[str], split: Split) -> Iterator[str]:
    want_held_out = split == "validation"
    for index, document in enumerate(documents):
        held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        if held_out == want_held_out:
            yield document


def _read_bible_text() -> str:
    """Run ``bible -f`` over the whole King James Bible and return its output."""
    command = shutil.which("bible")
    if command is None:
        raise DataUnavailableError(
            "the `bible` command was not found on PATH. Install it with "
            "`apt-get install bible-kjv`, or set data.source to files and data.paths "
            "to your text files."
        )
    result = subprocess.run(
        [command, "-f", BIBLE_RANGE], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise DataUnavailableError(
            f"`{command} -f {BIBLE_RANGE}` failed with exit status {result.returncode}"
            f" and printed no verses ({result.stderr.strip()!r}). Reinstall it with "
            "`apt-get install --reinstall bible-kjv bible-kjv-text`."
        )
    return result.stdout


def _bible_chapters() -> Iterator[str]:
    chapter = None
    verses: list[str] = []
    for line in _read_bible_text().splitlines():
        match = _VERSE_LINE.match(line)
        if match is None:
            # A line without a reference continues the previous verse.
            if line.strip() and verses:
                verses[-1] = f"{verses[-1]} {line.strip()}"
            continue
        if match["chapter"] != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = match["chapter"]
        verses.append(match["text"].strip())
    if verses:
        yield "\n".join(verses)


def _expand_text_files(patterns: tuple[str, ...]) -> list[Path]:
    """Return the files named by ``patterns`` in order, without duplicates."""
    if not patterns:
        raise DataUnavailableError(
            "the files source has no paths. Set data.paths to text files or glob "
            "patterns such as 'corpus/*.txt'."
        )
    files: dict[Path, None] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if _GLOB_CHARACTERS.intersection(expanded):
            matches = [
                Path(match)
                for match in sorted(glob.glob(expanded, recursive=True))
                if Path(match).is_file()
            ]
            if not matches:
                raise DataUnavailableError(
                    f"no files match {pattern!r} in data.paths. Set data.paths to "
                    "existing text files or glob patterns."
                )
        else:
            path = Path(expanded)
            if path.is_dir():
                raise DataUnavailableError(
                    f"{pattern!r} in data.paths is a directory. Set data.paths to "
                    f"files or a glob pattern such as '{os.path.join(pattern, '*.txt')}'."
                )
            if not path.is_file():
                raise DataUnavailableError(
                    f"text file {pattern!r} in data.paths not found. Set data.paths "
                    "to existing text files or glob patterns."
                )
            matches = [path]
        for match in matches:
            files.setdefault(match.resolve(), None)
    return list(files)


def _file_paragraphs(patterns: tuple[str, ...]) -> Iterator[str]:
    for path in _expand_text_files(patterns):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataUnavailableError(
                f"text file {path} is not valid UTF-8 ({error.reason} at byte "
                f"{error.start}). Convert it to UTF-8, or remove it from data.paths."
            ) from None
        for block in _PARAGRAPH_BREAK.split(text):
            block = block.strip()
            if block:
                yield block


def _find_c4_shards(directories: tuple[str, ...], split: Split) -> list[Path]:
    """Return the ``c4-<split>.*.json.gz`` files under ``directories``, sorted."""
    fix = (
        "Set data.paths to the directories that contain the allenai/c4 'en' shards "
        "(c4-train.00000-of-01024.json.gz, ..., c4-validation.*.json.gz)."
    )
    if not directories:
        raise DataUnavailableError(f"the c4_local source has no directories. {fix}")
    shards: set[Path] = set()
    for directory in directories:
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise DataUnavailableError(
                f"C4 directory {directory!r} in data.paths not found. {fix}"
            )
        shards.update(root.rglob(f"c4-{split}.*.json.gz"))
    if not shards:
        raise DataUnavailableError(
            f"no c4-{split}.*.json.gz shards found under {', '.join(directories)}. {fix}"
        )
    return sorted(shards, key=lambda path: (path.name, str(path)))


def _c4_local_documents(directories: tuple[str, ...], split: Split) -> Iterator[str]:
    for shard in _find_c4_shards(directories, split):
        yield from _read_c4_shard(shard)


def _read_c4_shard(shard: Path) -> Iterator[str]:
    """Yield the "text" field of each line of a gzipped JSON-lines C4 shard.

    Raises DataUnavailableError naming the shard, and the line where one is at
    fault, when the file is not gzip, is truncated or corrupt, or has a line that
    is not a JSON object with a string "text" field.
    """
    fix = "Download the shard again, or remove it from the directories in data.paths."
    line_number = 0
    try:
        with gzip.open(shard, "rt", encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _c4_text(shard, line_number, line)
    except EOFError:
        raise DataUnavailableError(
            f"C4 shard {shard} is truncated: its gzip stream ends"
            f"{_after_line(line_number)}. {fix}"
        ) from None
    # BadGzipFile covers a missing gzip header and a failed CRC or length check.
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataUnavailableError(
            f"C4 shard {shard} is not a valid gzip file{_after_line(line_number)} "
            f"({one_line(error)}). {fix}"
        ) from None
    except UnicodeDecodeError as error:
        raise DataUnavailableError(
            f"C4 shard {shard} is not UTF-8 text{_after_line(line_number)} "
            f"({error.reason}). {fix}"
        ) from None


def _after_line(line_number: int) -> str:
    return f" after line {line_number}" if line_number else ""


def json_object_line(line: str, where: str, expected: str, fix: str = "") -> dict:
    """Parse one line of a JSON Lines file, named ``where`` (file:line) in the
    DataUnavailableError for invalid JSON (with ``fix``) or a non-object."""
    try:
        # Without the newline, the error's column counts within this line.
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        raise DataUnavailableError(
            f"{where} is not valid JSON ({error.msg} at column {error.colno}). "
            f"{expected}{fix}"
        ) from None
    if not isinstance(record, dict):
        raise DataUnavailableError(
            f"{where} is a JSON {_json_type(record)}, not an object. {expected}"
        )
    return record


def _c4_text(shard: Path, line_number: int, line: str) -> str:
    expected = 'Each line of a C4 shard must be a JSON object with a "text" string.'
    record = json_object_line(
        line,
        f"{shard}:{line_number}",
        expected,
        " Fix the line or download the shard again.",
    )
    if "text" not in record:
        keys = ", ".join(repr(key) for key in sorted(record)[:5]) or "none"
        raise DataUnavailableError(
            f'{shard}:{line_number} has no "text" field (its keys: {keys}). '
            f"{expected} Rename the field that contains the document to text."
        )
    if not isinstance(record["text"], str):
        raise DataUnavailableError(
            f'{shard}:{line_number} has a "text" field of JSON type '
            f"{_json_type(record['text'])}. {expected}"
        )
    return record["text"]


def _json_type(value: object) -> str:
    """Return the JSON name of the type of a value that json.loads returned."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}[type(value)]


def _hub_texts(name: str, config: str | None, split: str) -> Iterator[str]:
    # NOTE: the hub sources have only been run offline, where they raise
    # DataUnavailableError. Streaming allenai/c4 and Skylion007/openwebtext with
    # datasets 5.2 is untested.
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except OSError as error:
        # Offline, datasets 5.2 raises ConnectionError, a subclass of OSError.
        raise DataUnavailableError(
            f"could not reach the Hugging Face Hub dataset {name!r} "
            f"({one_line(error)}). Check "
            "network access, or use a local source: set data.source to c4_local and "
            "data.paths to the directories of the C4 shards, or data.source to files "
            "and data.paths to your text files."
        ) from error
    for record in dataset:
        yield record["text"]


# Tokenizers


@dataclass
class _Encoder:
    encode_batch: Callable[[list[str]], list[list[int]]]
    vocab_size: int
    eos_id: int


def _train_bpe(spec: TokenizerSpec, source: TextSource, directory: Path) -> _Encoder:
    """Train a byte-level BPE on the training split and save it as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[BPE_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = _limit_characters(iter_documents(source, "train"), BPE_TRAINING_MAX_CHARS)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in tokenizer.encode_batch_fast(texts)]

    return _Encoder(
        encode_batch=encode_batch,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eos_id=tokenizer.token_to_id(BPE_EOS_TOKEN),
    )


def _limit_characters(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


def _is_local_path(name: str) -> bool:
    """Return whether a tokenizer_path names a local path rather than a hub name.

    Hub names have the form "name" or "namespace/name", so an absolute path, one
    that starts with "." or "~", or one with two or more "/" is local. Other names
    are local only where they exist.
    """
    if name.startswith((".", "~", os.sep)) or name.count("/") > 1:
        return True
    return Path(name).exists()


def _check_tokenizer_path(spec: TokenizerSpec) -> None:
    """Raise DataUnavailableError when a local tokenizer_path is missing or is not
    a folder with tokenizer files. Hub names pass unchecked."""
    if spec.kind != "pretrained" or not _is_local_path(spec.name_or_path):
        return
    name = spec.name_or_path
    path = Path(name).expanduser()
    expected = " or ".join(TOKENIZER_FILES)
    fix = (
        "Set data.tokenizer_path to a folder saved with transformers' "
        f"save_pretrained, which contains {expected}, or to a Hugging Face Hub name "
        "such as google-t5/t5-base."
    )
    if path.is_file():
        if any((path.parent / file).is_file() for file in TOKENIZER_FILES):
            fix = f"Set data.tokenizer_path to the folder that contains it, {path.parent}."
        raise DataUnavailableError(
            f"data.tokenizer_path {name!r} is a file, not a folder. {fix}"
        )
    if not path.is_dir():
        raise DataUnavailableError(f"data.tokenizer_path {name!r} not found. {fix}")
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        present = sorted(entry.name for entry in path.iterdir())
        listing = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        contents = f"contains only {listing}" if present else "is empty"
        raise DataUnavailableError(
            f"data.tokenizer_path {name!r} is not a tokenizer folder: it has neither "
            f"{' nor '.join(TOKENIZER_FILES)} and {contents}. {fix}"
        )


def _load_pretrained(spec: TokenizerSpec) -> _Encoder:
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformers import AutoTokenizer

    name = spec.name_or_path
    local = _is_local_path(name)
    # NOTE: where huggingface.co cannot be resolved, huggingface_hub retries for
    # about 45 s and logs a warning per retry before raising (measured offline
    # with transformers 5.25). HF_HUB_OFFLINE=1 makes it fail at once.
    try:
        # transformers does not expand "~" itself.
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(name).expanduser()) if local else name
        )
    # Broken tokenizer files raise ValueError (json.JSONDecodeError among them),
    # and hub failures raise OSError.
    except (OSError, ValueError) as error:
        if local:
            message = (
                f"the tokenizer in data.tokenizer_path {name!r} cannot be loaded "
                f"({one_line(error)}). Save it again with transformers' "
                "save_pretrained."
            )
        elif _caused_by(error, LocalEntryNotFoundError):
            message = (
                f"data.tokenizer_path {name!r} is not a local folder (no "
                f"{Path(name).absolute()}), and the Hugging Face Hub could not be "
                "reached to download it. Set data.tokenizer_path to a local folder "
                "saved with transformers' save_pretrained, or run where "
                "huggingface.co is reachable."
            )
        else:
            message = (
                f"loading data.tokenizer_path {name!r} from the Hugging Face Hub "
                f"failed ({one_line(error)}). Check the name, or set "
                "data.tokenizer_path to a local folder saved with transformers' "
                "save_pretrained."
            )
        raise DataUnavailableError(message) from None
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataUnavailableError(
            f"the tokenizer of data.tokenizer_path {name!r} has no EOS token, which "
            "packing puts between documents. Set its eos_token and save it again "
            "with save_pretrained."
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:

        def encode_batch(texts: list[str]) -> list[list[int]]:
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
            return [encoding.ids for encoding in encodings]

    else:

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return tokenizer(
                texts, add_special_tokens=False, return_attention_mask=False
            )["input_ids"]

    return _Encoder(encode_batch=encode_batch, vocab_size=len(tokenizer), eos_id=eos_id)


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Return whether ``error`` or an exception it was raised from is a ``kind``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def shard_encoder(
    shards: TokenShards, spec: TokenizerSpec
) -> tuple[Callable[[list[str]], list[list[int]]], int]:
    """Return ``(encode_batch, eos_id)`` of the tokenizer that wrote ``shards``:
    the BPE saved beside them, or the pretrained tokenizer of ``spec``."""
    if spec.kind == "bpe":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(shards.directory / "tokenizer.json"))

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return [encoding.ids for encoding in tokenizer.encode_batch_fast(texts)]

        return encode_batch, shards.eos_id
    encoder = _load_pretrained(spec)
    return encoder.encode_batch, encoder.eos_id


def padded_vocab_size(vocab_size: int) -> int:
    """Round ``vocab_size`` up to the number of embedding rows the model allocates."""
    return -(-vocab_size // EMBEDDING_ROWS_MULTIPLE) * EMBEDDING_ROWS_MULTIPLE


def token_dtype(vocab_size: int) -> str:
    """Return the smallest unsigned dtype that can store every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


# Shards


@dataclass
class TokenShards:
    """Packed token ids of both splits in ``directory``, one flat array per split."""

    directory: Path
    vocab_size: int
    model_vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    eos_id: int

    def tokens(self, split: Split) -> np.memmap:
        """Map one split's token ids read-only."""
        if split not in _SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        count = self.train_tokens if split == "train" else self.val_tokens
        path = self.directory / _SPLIT_FILES[split]
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(count,))

    @classmethod
    def load(cls, directory: Path | str) -> TokenShards:
        """Read the shards that `prepare_token_shards` wrote to ``directory``."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise DataUnavailableError(
                f"no token shards in {directory} (meta.json not found). Build them "
                "with prepare_token_shards."
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"token shards in {directory} have format version "
                f"{meta.get('format_version')}, expected {CACHE_FORMAT_VERSION}. "
                "Delete the directory and prepare them again."
            )
        return cls(
            directory=directory,
            vocab_size=meta["vocab_size"],
            model_vocab_size=meta["model_vocab_size"],
            dtype=meta["dtype"],
            train_tokens=meta["train_tokens"],
            val_tokens=meta["val_tokens"],
            eos_id=meta["eos_id"],
        )


def prepare_token_shards(
    source: TextSource,
    tokenizer: TokenizerSpec,
    cache_root: Path,
    *,
    seq_len: int,
    val_tokens: int | None = None,
    max_train_tokens: int | None = None,
) -> TokenShards:
    """Tokenize ``source`` into packed shards under ``cache_root``, or reuse the cache.

    The cache directory is named by a hash of the source (including a fingerprint of
    the Bible text or the sizes and modification times of the input files), the
    tokenizer spec (including the local tokenizer files), ``val_tokens`` and
    ``max_train_tokens``. ``seq_len`` is not part of the key because the shards do not
    depend on it. It only has to fit: each split needs at least ``seq_len + 1``
    tokens. ``val_tokens`` fixes the validation split to exactly that many tokens,
    and ``max_train_tokens`` truncates the training split.

    The shards are built in a temporary directory under ``cache_root`` and renamed
    into place, and an exclusive lock on ``cache_root/.<name>.lock`` makes
    concurrent callers wait for one build instead of repeating it. A ``.tmp-*``
    directory left by a killed build can be deleted.

    Raises DataUnavailableError when the data is missing or too short.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    for name, value in (
        ("val_tokens", val_tokens),
        ("max_train_tokens", max_train_tokens),
    ):
        if value is not None and value < seq_len + 1:
            raise ValueError(
                f"{name}={value} is shorter than one window of seq_len + 1 = "
                f"{seq_len + 1} tokens"
            )
    _check_tokenizer_path(tokenizer)
    # An absolute directory stays valid in Ray Tune trials, which change the working
    # directory.
    cache_root = Path(cache_root).absolute()
    cache_root.mkdir(parents=True, exist_ok=True)
    key = _cache_key(source, tokenizer, val_tokens, max_train_tokens)
    directory = cache_root / f"{source.kind}-{tokenizer.kind}-{key[:20]}"

    build_once(
        directory,
        lambda build_directory: _build_shards(
            source, tokenizer, build_directory, directory, val_tokens, max_train_tokens
        ),
        "token shards",
    )

    shards = TokenShards.load(directory)
    for split, count in (
        ("train", shards.train_tokens),
        ("validation", shards.val_tokens),
    ):
        if count < seq_len + 1:
            raise DataUnavailableError(
                f"the {split} split of {source.kind} has {count} tokens, fewer than one "
                f"window of seq_len + 1 = {seq_len + 1}. Add text to the source or "
                "lower data.seq_len."
            )
    return shards


def write_token_shards(
    directory: Path | str,
    train: np.ndarray,
    validation: np.ndarray,
    *,
    vocab_size: int,
    eos_id: int,
) -> TokenShards:
    """Write packed token ids as shards in ``directory`` and return them loaded.

    For token streams made outside `prepare_token_shards`, such as the random
    tokens of a throughput benchmark. ``directory`` is created and its shard
    files are overwritten.

    Raises ValueError when a split is empty or an id is outside
    0..vocab_size - 1.
    """
    directory = Path(directory)
    dtype = token_dtype(vocab_size)
    counts = {}
    for split, tokens in (("train", train), ("validation", validation)):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError(
                f"the {split} tokens must be a non-empty 1-D array, got shape "
                f"{tokens.shape}"
            )
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(
                f"the {split} tokens contain ids outside 0..{vocab_size - 1}"
            )
        counts[split] = len(tokens)
    directory.mkdir(parents=True, exist_ok=True)
    np.asarray(train).astype(dtype).tofile(directory / _SPLIT_FILES["train"])
    np.asarray(validation).astype(dtype).tofile(directory / _SPLIT_FILES["validation"])
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "vocab_size": vocab_size,
        "model_vocab_size": padded_vocab_size(vocab_size),
        "dtype": dtype,
        "train_tokens": counts["train"],
        "val_tokens": counts["validation"],
        "eos_id": eos_id,
        "source": {"kind": "arrays"},
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return TokenShards.load(directory)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_key(
    source: TextSource,
    tokenizer: TokenizerSpec,
    val_tokens: int | None,
    max_train_tokens: int | None,
) -> str:
    description = {
        "format_version": CACHE_FORMAT_VERSION,
        "held_out_every": HELD_OUT_EVERY,
        "source": {
            "kind": source.kind,
            "paths": list(source.paths),
            "max_documents": source.max_documents,
            "fingerprint": _source_fingerprint(source),
        },
        "tokenizer": {
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size if tokenizer.kind == "bpe" else None,
            "bpe_training_max_chars": BPE_TRAINING_MAX_CHARS,
            "name_or_path": tokenizer.name_or_path,
            "fingerprint": _tokenizer_fingerprint(tokenizer),
        },
        "val_tokens": val_tokens,
        "max_train_tokens": max_train_tokens,
    }
    encoded = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()


def _file_stats(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    stats = []
    for path in paths:
        status = path.stat()
        stats.append((str(path.resolve()), status.st_size, status.st_mtime_ns))
    return stats


def _source_fingerprint(source: TextSource) -> object:
    if source.kind == "bible":
        return hashlib.sha256(_read_bible_text().encode()).hexdigest()
    if source.kind == "files":
        return _file_stats(_expand_text_files(source.paths))
    if source.kind == "c4_local":
        shards = _find_c4_shards(source.paths, "train")
        shards += _find_c4_shards(source.paths, "validation")
        return _file_stats(shards)
    # Hub datasets are identified by their name.
    return None


def _tokenizer_fingerprint(spec: TokenizerSpec) -> object:
    if spec.kind != "pretrained":
        return None
    root = Path(spec.name_or_path).expanduser()
    if not root.exists():
        return None
    files = (
        [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file())
    )
    return _file_stats(files)


def build_once(directory: Path, build: Callable[[Path], None], kind: str) -> None:
    """Build the cache folder ``directory`` unless it is complete (has meta.json).

    An exclusive lock on ``.<name>.lock`` beside it makes concurrent callers
    wait for one build. ``build`` writes the files, meta.json last, into a
    ``.tmp-*`` folder beside it, which is then renamed into place, so a killed
    build leaves only a ``.tmp-*`` folder that can be deleted. ``kind`` names
    the contents in the log line of a reuse.
    """
    with _exclusive_lock(directory.parent / f".{directory.name}.lock"):
        if (directory / "meta.json").is_file():
            logger.info("reusing %s in %s", kind, directory)
            return
        build_directory = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
        try:
            build(build_directory)
            try:
                os.rename(build_directory, directory)
            except OSError:
                # Another process finished first although the lock should prevent
                # that (flock may not be enforced on network filesystems). Its
                # files are equally valid.
                if not (directory / "meta.json").is_file():
                    raise
                shutil.rmtree(build_directory)
        except BaseException:
            shutil.rmtree(build_directory, ignore_errors=True)
            raise


def _build_shards(
    source: TextSource,
    spec: TokenizerSpec,
    build_directory: Path,
    directory: Path,
    val_tokens: int | None,
    max_train_tokens: int | None,
) -> None:
    """Tokenize ``source`` into ``build_directory``, which becomes ``directory``."""
    started = time.perf_counter()
    logger.info("building token shards for %s with %s in %s", source, spec, directory)
    if spec.kind == "bpe":
        encoder = _train_bpe(spec, source, build_directory)
    else:
        encoder = _load_pretrained(spec)
    dtype = token_dtype(encoder.vocab_size)
    train_count = _write_tokens(
        encoder,
        iter_documents(source, "train"),
        build_directory / _SPLIT_FILES["train"],
        dtype,
        max_train_tokens,
    )
    val_count = _write_tokens(
        encoder,
        iter_documents(source, "validation"),
        build_directory / _SPLIT_FILES["validation"],
        dtype,
        val_tokens,
    )
    for split, count in (("train", train_count), ("validation", val_count)):
        if count == 0:
            raise DataUnavailableError(
                f"the {split} split of {source.kind} contains no text. Check "
                "data.paths and data.max_documents."
            )
    if val_tokens is not None and val_count < val_tokens:
        raise DataUnavailableError(
            f"val_tokens={val_tokens} requested, but the validation split of "
            f"{source.kind} has only {val_count} tokens. Lower data.val_tokens or "
            "add text to the source."
        )
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "vocab_size": encoder.vocab_size,
        "model_vocab_size": padded_vocab_size(encoder.vocab_size),
        "dtype": dtype,
        "train_tokens": train_count,
        "val_tokens": val_count,
        "eos_id": encoder.eos_id,
        "source": {
            "kind": source.kind,
            "paths": list(source.paths),
            "max_documents": source.max_documents,
        },
        "tokenizer": {
            "kind": spec.kind,
            "vocab_size": spec.vocab_size,
            "name_or_path": spec.name_or_path,
        },
        "requested_val_tokens": val_tokens,
        "max_train_tokens": max_train_tokens,
    }
    (build_directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info(
        "built token shards in %s: %d train and %d validation tokens in %.1f s",
        directory,
        train_count,
        val_count,
        time.perf_counter() - started,
    )


def _write_tokens(
    encoder: _Encoder,
    documents: Iterable[str],
    path: Path,
    dtype: str,
    max_tokens: int | None,
) -> int:
    """Append each document's ids and an EOS to ``path``. Return the token count.

    Stops reading documents once ``max_tokens`` are written, so a streaming source is
    read only as far as needed.
    """
    written = 0
    eos = np.array([encoder.eos_id], dtype=np.int64)
    documents = iter(documents)
    with open(path, "wb") as output:
        while max_tokens is None or written < max_tokens:
            batch = list(itertools.islice(documents, ENCODE_BATCH_DOCUMENTS))
            if not batch:
                break
            pieces = []
            for ids in encoder.encode_batch(batch):
                if ids:
                    pieces.append(np.asarray(ids, dtype=np.int64))
                    pieces.append(eos)
            if not pieces:
                continue
            chunk = np.concatenate(pieces)
            if chunk.min() < 0 or chunk.max() >= encoder.vocab_size:
                raise ValueError(
                    f"the tokenizer returned ids outside 0..{encoder.vocab_size - 1}"
                )
            if max_tokens is not None:
                chunk = chunk[: max_tokens - written]
            output.write(chunk.astype(dtype).tobytes())
            written += len(chunk)
    return written


# Batches


# Streams of the generators seeded by (seed, stream, epoch) in TokenBatches.
_TRAIN_ORDER_STREAM = 1
_TRAIN_OFFSET_STREAM = 2
_FEISTEL_ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """Return SplitMix64's finalizer of uint64 `x`: every output bit depends on
    every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_permutation(
    indices: np.ndarray, size: int, key: tuple[int, ...]
) -> np.ndarray:
    """Map `indices` in [0, size) through a pseudo-random bijection of [0, size)
    chosen by `key`.

    A stored permutation of an epoch of C4 windows would have hundreds of
    millions of entries, so this computes any slice of one from the key alone.
    It is a balanced Feistel network on the smallest even number of bits that
    covers `size`, with cycle walking: an output of `size` or more is passed
    through the network again until it falls inside [0, size). The network
    domain is less than 4 x size, so few elements need more than one pass.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    values = np.asarray(indices, dtype=np.uint64)
    if values.size and int(values.max()) >= size:
        raise ValueError(f"indices must be below size {size}")
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = np.random.default_rng(key).integers(
        0, 2**63, size=_FEISTEL_ROUNDS, dtype=np.uint64
    )

    def network(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right + round_key) & mask)
        return (left << np.uint64(half)) | right

    values = network(values)
    outside = values >= size
    while outside.any():
        values[outside] = network(values[outside])
        outside = values >= size
    return values.astype(np.int64)


class TokenBatches:
    """Training and validation windows of ``seq_len + 1`` tokens from packed shards.

    Row ``w`` of a batch is the input ``w[:-1]`` and its next-token targets ``w[1:]``.
    """

    def __init__(self, shards: TokenShards, seq_len: int, seed: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.shards = shards
        self.seq_len = seq_len
        self.seed = seed
        self._train = shards.tokens("train")
        self._validation = shards.tokens("validation")
        for split, tokens in (("train", self._train), ("validation", self._validation)):
            if len(tokens) < seq_len + 1:
                raise ValueError(
                    f"the {split} split has {len(tokens)} tokens, fewer than one "
                    f"window of seq_len + 1 = {seq_len + 1}"
                )
        self._window_offsets = np.arange(seq_len + 1)

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Return the training windows of optimizer step `step`, shape
        [batch_size, seq_len + 1].

        The training split is read in epochs, without replacement. Epoch e cuts
        it into windows that start every seq_len tokens from an offset (0 in
        epoch 0, drawn from (seed, e) later) and visits them in a keyed
        pseudo-random order (`keyed_permutation`). Step s takes positions
        s * batch_size up to (s + 1) * batch_size of the concatenated epochs.
        A trial whose token budget equals the split therefore trains on every
        training token once, and a batch that crosses an epoch end continues
        with the next epoch. The batch is a pure function of (seed, step,
        batch_size), so a resumed run gets the same batches as an
        uninterrupted one.
        """
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        starts = np.empty(batch_size, dtype=np.int64)
        filled = 0
        position = step * batch_size
        while filled < batch_size:
            epoch, first = self._epoch_of(position)
            offset, windows = self._epoch_layout(epoch)
            count = min(batch_size - filled, windows - first)
            order = keyed_permutation(
                np.arange(first, first + count, dtype=np.int64),
                windows,
                (self.seed, _TRAIN_ORDER_STREAM, epoch),
            )
            starts[filled : filled + count] = offset + order * self.seq_len
            filled += count
            position += count
        windows = self._train[starts[:, None] + self._window_offsets]
        return torch.from_numpy(np.asarray(windows, dtype=np.int64))

    def _epoch_layout(self, epoch: int) -> tuple[int, int]:
        """Return the first window's start and the window count of `epoch`."""
        offset = 0
        if epoch > 0:
            generator = np.random.default_rng((self.seed, _TRAIN_OFFSET_STREAM, epoch))
            # An offset below the spare tokens keeps the epoch's window count.
            spare = (len(self._train) - 1) % self.seq_len
            offset = int(generator.integers(0, spare, endpoint=True))
        return offset, (len(self._train) - 1 - offset) // self.seq_len

    def _epoch_of(self, position: int) -> tuple[int, int]:
        """Return the epoch of training window number `position`, counted over
        all epochs, and its index within that epoch."""
        windows = self._epoch_layout(0)[1]
        # Every epoch has the same window count (see _epoch_layout).
        return position // windows, position % windows

    @property
    def val_windows(self) -> int:
        """Number of validation windows.

        Window i starts at token i * seq_len, so consecutive windows share one token
        and every validation token after the first is a target at most once. Only
        the tail after the last whole window, fewer than seq_len tokens, is unused.
        """
        return (len(self._validation) - 1) // self.seq_len

    def val_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield the validation windows in order, ``batch_size`` at a time.

        The last batch is smaller when ``val_windows`` is not a multiple of
        ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        total = self.val_windows
        for first in range(0, total, batch_size):
            count = min(batch_size, total - first)
            starts = (first + np.arange(count)) * self.seq_len
            windows = self._validation[starts[:, None] + self._window_offsets]
            yield torch.from_numpy(np.asarray(windows, dtype=np.int64))
