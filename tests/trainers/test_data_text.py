import gzip
import itertools
import json
import multiprocessing
import re
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trainers.data import DataUnavailableError
from trainers.data.text import (
    ENCODE_BATCH_DOCUMENTS,
    HELD_OUT_EVERY,
    TextSource,
    TokenBatches,
    TokenizerSpec,
    TokenShards,
    iter_documents,
    keyed_permutation,
    padded_vocab_size,
    prepare_token_shards,
)

BIBLE_CHAPTERS = 1189
VERSE_REFERENCE = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ", re.MULTILINE)
WORDS = [
    "river", "stone", "lantern", "orchard", "harbor", "meadow", "copper", "falcon",
    "thistle", "ember", "glacier", "willow", "anchor", "saffron", "quarry", "velvet",
]  # fmt: skip


def paragraph(index: int) -> str:
    """Return a short deterministic paragraph built from WORDS."""
    words = [WORDS[(index * 7 + offset * 3) % len(WORDS)] for offset in range(12)]
    return f"Paragraph {index}: " + " ".join(words) + "."


def write_text_files(
    directory: Path, files: int = 3, paragraphs: int = 20
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_index in range(files):
        blocks = [
            paragraph(file_index * paragraphs + index) for index in range(paragraphs)
        ]
        path = directory / f"part{file_index}.txt"
        path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def write_c4_shard(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as shard:
        for text in texts:
            record = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "x"}
            shard.write(json.dumps(record) + "\n")


def save_word_level_tokenizer(directory: Path, vocab_size: int) -> Path:
    """Save a WordLevel PreTrainedTokenizerFast whose WORDS get the highest ids."""
    vocab = {"<unk>": 0, "</s>": 1}
    first_word_id = vocab_size - len(WORDS) - 1
    for index in range(2, first_word_id):
        vocab[f"filler{index}"] = index
    for offset, word in enumerate(WORDS + ["Paragraph"]):
        vocab[word] = first_word_id + offset
    model = models.WordLevel(vocab, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(str(directory))
    return directory


def split_at(tokens: np.ndarray, separator: int) -> list[list[int]]:
    documents, current = [], []
    for token in tokens.tolist():
        if token == separator:
            documents.append(current)
            current = []
        else:
            current.append(token)
    assert current == [], "the last document is not followed by EOS"
    return documents


@pytest.fixture(scope="module")
def bible_shards(tmp_path_factory):
    cache_root = tmp_path_factory.mktemp("bible-cache")
    return prepare_token_shards(
        TextSource("bible"),
        TokenizerSpec("bpe"),
        cache_root,
        seq_len=64,
        val_tokens=65536,
    )


# Sources


def test_bible_yields_chapters_without_references():
    train = list(iter_documents(TextSource("bible"), "train"))
    validation = list(iter_documents(TextSource("bible"), "validation"))

    assert len(train) + len(validation) == BIBLE_CHAPTERS
    assert len(validation) == BIBLE_CHAPTERS // HELD_OUT_EVERY
    assert train[0].startswith("In the beginning God created the heaven and the earth.")
    assert train[-1].endswith(
        "The grace of our Lord Jesus Christ be with you all. Amen."
    )
    assert not any(VERSE_REFERENCE.search(chapter) for chapter in train + validation)


def test_bible_split_is_disjoint_and_spread():
    train = list(iter_documents(TextSource("bible"), "train"))
    validation = list(iter_documents(TextSource("bible"), "validation"))

    assert set(train).isdisjoint(validation)
    # Chapter index 9 is Genesis 10 and index 1179 is Revelation 13.
    assert validation[0].startswith("Now these are the generations of the sons of Noah")
    assert validation[-1].startswith("And I stood upon the sand of the sea")


def test_bible_max_documents():
    source = TextSource("bible", max_documents=3)

    assert len(list(iter_documents(source, "train"))) == 3
    assert len(list(iter_documents(source, "validation"))) == 3


def test_bible_missing_command_names_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(DataUnavailableError, match="apt-get install bible-kjv"):
        list(iter_documents(TextSource("bible"), "train"))
    with pytest.raises(DataUnavailableError, match="apt-get install bible-kjv"):
        prepare_token_shards(
            TextSource("bible"), TokenizerSpec("bpe"), tmp_path / "cache", seq_len=8
        )


def test_files_yield_paragraph_blocks(tmp_path):
    write_text_files(tmp_path / "corpus", files=3, paragraphs=20)
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))

    train = list(iter_documents(source, "train"))
    validation = list(iter_documents(source, "validation"))

    assert len(train) == 54
    assert len(validation) == 6
    assert train[0] == paragraph(0)
    assert validation[0] == paragraph(HELD_OUT_EVERY - 1)
    assert set(train).isdisjoint(validation)


def test_files_missing_name_option(tmp_path):
    cases = [
        TextSource("files"),
        TextSource("files", paths=(str(tmp_path / "absent.txt"),)),
        TextSource("files", paths=(str(tmp_path / "*.txt"),)),
        TextSource("files", paths=(str(tmp_path),)),
    ]
    for source in cases:
        with pytest.raises(DataUnavailableError, match="data.paths"):
            list(iter_documents(source, "train"))


def test_c4_local_reads_split_shards(tmp_path):
    root = tmp_path / "c4" / "en"
    write_c4_shard(root / "c4-train.00000-of-01024.json.gz", ["train one", "train two"])
    write_c4_shard(root / "c4-train.00001-of-01024.json.gz", ["train three"])
    write_c4_shard(root / "c4-validation.00000-of-00008.json.gz", ["held out"])
    source = TextSource("c4_local", paths=(str(tmp_path / "c4"),))

    assert list(iter_documents(source, "train")) == [
        "train one",
        "train two",
        "train three",
    ]
    assert list(iter_documents(source, "validation")) == ["held out"]


def test_c4_local_missing_names_data_paths(tmp_path):
    write_c4_shard(tmp_path / "c4-train.00000-of-01024.json.gz", ["only train"])
    cases = [
        (TextSource("c4_local"), "train"),
        (TextSource("c4_local", paths=(str(tmp_path / "absent"),)), "train"),
        (TextSource("c4_local", paths=(str(tmp_path),)), "validation"),
    ]
    for source, split in cases:
        with pytest.raises(DataUnavailableError, match="data.paths"):
            list(iter_documents(source, split))


def test_hub_sources_offline_name_local_sources(monkeypatch):
    # datasets and huggingface_hub read HF_HUB_OFFLINE at import, so the test sets
    # the parsed values. Offline mode fails at once instead of retrying the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    for kind in ("c4_hub", "openwebtext_hub"):
        with pytest.raises(DataUnavailableError, match="c4_local") as raised:
            next(iter_documents(TextSource(kind), "validation"))
        assert "data.paths" in str(raised.value)


# Shards


def test_bible_shards_fit_default_validation(bible_shards):
    assert bible_shards.vocab_size == 4096
    assert bible_shards.model_vocab_size == 4096
    assert bible_shards.dtype == "uint16"
    assert bible_shards.val_tokens == 65536
    assert bible_shards.train_tokens > 800_000
    assert bible_shards.tokens("train").dtype == np.uint16


def test_bpe_shards_pack_documents_with_eos(tmp_path):
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))

    shards = prepare_token_shards(
        source, TokenizerSpec("bpe", vocab_size=300), tmp_path / "cache", seq_len=16
    )

    assert shards.dtype == "uint16"
    assert shards.tokens("train").dtype == np.uint16
    tokenizer = Tokenizer.from_file(str(shards.directory / "tokenizer.json"))
    assert tokenizer.token_to_id("<|endoftext|>") == shards.eos_id
    for split in ("train", "validation"):
        documents = split_at(shards.tokens(split), shards.eos_id)
        expected = list(iter_documents(source, split))
        assert [tokenizer.decode(ids) for ids in documents] == expected


def test_bpe_shards_are_cached(tmp_path):
    paths = write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))
    spec = TokenizerSpec("bpe", vocab_size=300)
    cache_root = tmp_path / "cache"

    first = prepare_token_shards(source, spec, cache_root, seq_len=16)
    train_mtime = (first.directory / "train.bin").stat().st_mtime_ns
    second = prepare_token_shards(source, spec, cache_root, seq_len=16)

    assert second == first
    assert (second.directory / "train.bin").stat().st_mtime_ns == train_mtime
    assert sorted(path.name for path in cache_root.iterdir() if path.is_dir()) == [
        first.directory.name
    ]

    paths[0].write_text(paragraph(100) + "\n\n" + paragraph(101) + "\n")
    changed = prepare_token_shards(source, spec, cache_root, seq_len=16)

    assert changed.directory != first.directory
    assert changed.train_tokens < first.train_tokens


def test_shards_key_covers_options(tmp_path):
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))
    cache_root = tmp_path / "cache"

    base = prepare_token_shards(
        source, TokenizerSpec("bpe", 300), cache_root, seq_len=8
    )
    other_vocab = prepare_token_shards(
        source, TokenizerSpec("bpe", 320), cache_root, seq_len=8
    )
    other_seq_len = prepare_token_shards(
        source, TokenizerSpec("bpe", 300), cache_root, seq_len=4
    )

    assert other_vocab.directory != base.directory
    assert other_seq_len.directory == base.directory


def test_val_tokens_fixes_validation_size(tmp_path):
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))

    shards = prepare_token_shards(
        source,
        TokenizerSpec("bpe", vocab_size=300),
        tmp_path / "cache",
        seq_len=8,
        val_tokens=40,
        max_train_tokens=100,
    )

    assert shards.val_tokens == 40
    assert shards.train_tokens == 100
    assert (shards.directory / "val.bin").stat().st_size == 40 * 2
    assert len(shards.tokens("validation")) == 40


def test_max_train_tokens_stops_hub_stream(tmp_path, monkeypatch):
    read = {"train": 0, "validation": 0}

    def endless_stream(name, config=None, *, split, streaming):
        # Stands in for the hub's C4: a stream that never ends.
        for index in itertools.count():
            read[split] += 1
            yield {"text": paragraph(index)}

    monkeypatch.setattr(datasets, "load_dataset", endless_stream)
    tokenizer_dir = save_word_level_tokenizer(tmp_path / "tokenizer", vocab_size=500)

    shards = prepare_token_shards(
        TextSource("c4_hub"),
        TokenizerSpec("pretrained", name_or_path=str(tokenizer_dir)),
        tmp_path / "cache",
        seq_len=8,
        val_tokens=40,
        max_train_tokens=1000,
    )

    assert shards.train_tokens == 1000
    assert shards.val_tokens == 40
    # Documents are encoded in batches, so reading stops within one batch.
    assert read["train"] <= ENCODE_BATCH_DOCUMENTS
    assert read["validation"] <= ENCODE_BATCH_DOCUMENTS


def test_val_tokens_longer_than_held_out_text(tmp_path):
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))
    cache_root = tmp_path / "cache"
    available = prepare_token_shards(
        source, TokenizerSpec("bpe", 300), cache_root, seq_len=8
    ).val_tokens

    with pytest.raises(DataUnavailableError) as raised:
        prepare_token_shards(
            source, TokenizerSpec("bpe", 300), cache_root, seq_len=8, val_tokens=10_000
        )

    assert "10000" in str(raised.value)
    assert str(available) in str(raised.value)
    assert [
        path.name for path in cache_root.iterdir() if path.name.startswith(".tmp")
    ] == []


def test_split_shorter_than_window_raises(tmp_path):
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))

    with pytest.raises(DataUnavailableError, match="seq_len"):
        prepare_token_shards(
            source, TokenizerSpec("bpe", 300), tmp_path / "cache", seq_len=100_000
        )


def _prepare_in_child(corpus: str, cache_root: str) -> str:
    source = TextSource("files", paths=(corpus,))
    shards = prepare_token_shards(
        source, TokenizerSpec("bpe", 300), Path(cache_root), seq_len=8
    )
    return str(shards.directory)


def test_concurrent_preparation_builds_once(tmp_path):
    write_text_files(tmp_path / "corpus", files=2, paragraphs=200)
    corpus = str(tmp_path / "corpus" / "*.txt")
    cache_root = tmp_path / "cache"
    context = multiprocessing.get_context("fork")

    with context.Pool(2) as pool:
        directories = pool.starmap(_prepare_in_child, [(corpus, str(cache_root))] * 2)

    assert directories[0] == directories[1]
    assert [path.name for path in cache_root.iterdir() if path.is_dir()] == [
        Path(directories[0]).name
    ]


def test_pretrained_tokenizer_large_vocab_uses_uint32(tmp_path):
    write_c4_shard(
        tmp_path / "c4" / "c4-train.00000-of-01024.json.gz",
        [paragraph(index) for index in range(30)],
    )
    write_c4_shard(
        tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz",
        [paragraph(index) for index in range(100, 110)],
    )
    tokenizer_dir = save_word_level_tokenizer(tmp_path / "tokenizer", vocab_size=70_000)
    spec = TokenizerSpec("pretrained", name_or_path=str(tokenizer_dir))
    source = TextSource("c4_local", paths=(str(tmp_path / "c4"),))

    shards = prepare_token_shards(source, spec, tmp_path / "cache", seq_len=8)

    assert shards.vocab_size == 70_000
    assert shards.model_vocab_size == 70_016
    assert shards.dtype == "uint32"
    assert shards.eos_id == 1
    tokens = shards.tokens("train")
    assert tokens.dtype == np.uint32
    assert tokens.max() == 69_999
    wrapped = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    documents = split_at(shards.tokens("validation"), shards.eos_id)
    assert (
        documents[0] == wrapped(paragraph(100), add_special_tokens=False)["input_ids"]
    )
    assert len(documents) == 10


def test_pretrained_tokenizer_small_vocab_uses_uint16(tmp_path):
    write_c4_shard(
        tmp_path / "c4" / "c4-train.00000-of-01024.json.gz",
        [paragraph(index) for index in range(30)],
    )
    write_c4_shard(
        tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz",
        [paragraph(index) for index in range(100, 110)],
    )
    tokenizer_dir = save_word_level_tokenizer(tmp_path / "tokenizer", vocab_size=500)
    spec = TokenizerSpec("pretrained", name_or_path=str(tokenizer_dir))
    source = TextSource("c4_local", paths=(str(tmp_path / "c4"),))

    shards = prepare_token_shards(source, spec, tmp_path / "cache", seq_len=8)

    assert shards.vocab_size == 500
    assert shards.model_vocab_size == 512
    assert shards.dtype == "uint16"
    assert shards.tokens("train").max() == 499


def test_pretrained_tokenizer_missing_directory(tmp_path):
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))
    spec = TokenizerSpec("pretrained", name_or_path=str(tmp_path / "no-tokenizer"))

    with pytest.raises(DataUnavailableError, match="data.tokenizer_path"):
        prepare_token_shards(source, spec, tmp_path / "cache", seq_len=8)


def test_padded_vocab_size():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(32100) == 32128
    assert padded_vocab_size(4096) == 4096


def test_shards_load_round_trip(bible_shards, tmp_path):
    assert TokenShards.load(bible_shards.directory) == bible_shards
    with pytest.raises(DataUnavailableError, match="prepare_token_shards"):
        TokenShards.load(tmp_path)


# Batches


def test_train_batch_shape_and_windows(bible_shards):
    batches = TokenBatches(bible_shards, seq_len=64, seed=3)
    train = np.asarray(bible_shards.tokens("train"), dtype=np.int64)

    batch = batches.train_batch(step=5, batch_size=16)

    assert batch.shape == (16, 65)
    assert batch.dtype == torch.int64
    for row in batch.numpy():
        starts = np.flatnonzero(train[: len(train) - 64] == row[0])
        assert any(np.array_equal(train[start : start + 65], row) for start in starts)


def test_train_batch_is_deterministic(bible_shards):
    batches = TokenBatches(bible_shards, seq_len=64, seed=3)
    resumed = TokenBatches(bible_shards, seq_len=64, seed=3)
    other_seed = TokenBatches(bible_shards, seq_len=64, seed=4)

    batch = batches.train_batch(step=7, batch_size=8)

    assert torch.equal(batch, resumed.train_batch(step=7, batch_size=8))
    assert not torch.equal(batch, batches.train_batch(step=8, batch_size=8))
    assert not torch.equal(batch, other_seed.train_batch(step=7, batch_size=8))


def _counting_shards(directory: Path, train_tokens: int) -> TokenShards:
    """Shards whose training token i has id i, so a window names its start."""
    directory.mkdir()
    np.arange(train_tokens, dtype=np.int32).tofile(directory / "train.bin")
    np.arange(16, dtype=np.int32).tofile(directory / "val.bin")
    return TokenShards(
        directory=directory,
        vocab_size=train_tokens,
        model_vocab_size=train_tokens,
        dtype="int32",
        train_tokens=train_tokens,
        val_tokens=16,
        eos_id=0,
    )


def test_train_epochs_without_replacement(tmp_path):
    # 10 windows of 8 + 1 tokens and 4 spare tokens; batches of 3 cross epochs.
    shards = _counting_shards(tmp_path / "shards", 10 * 8 + 1 + 4)
    batches = TokenBatches(shards, seq_len=8, seed=5)
    rows = torch.cat([batches.train_batch(step, 3) for step in range(10)]).numpy()

    np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # contiguous
    epoch_zero, epoch_one, epoch_two = rows[:10, 0], rows[10:20, 0], rows[20:, 0]
    assert sorted(epoch_zero) == list(range(0, 80, 8))
    # Every training token but the first is a target once per epoch.
    assert sorted(rows[:10, 1:].reshape(-1)) == list(range(1, 81))
    assert epoch_zero.tolist() != sorted(epoch_zero)
    for later in (epoch_one, epoch_two[:10]):
        offset = later.min()
        assert 0 <= offset <= 4
        assert sorted(later) == list(range(offset, offset + 80, 8))
    assert epoch_one.tolist() != epoch_zero.tolist()


def test_keyed_permutation_is_a_bijection():
    for size in (1, 2, 3, 7, 64, 1000, 4099):
        order = keyed_permutation(np.arange(size), size, (0, 1, 2))
        assert sorted(order) == list(range(size))
    first = keyed_permutation(np.arange(1000), 1000, (0, 1, 0))
    assert (
        first.tolist() != keyed_permutation(np.arange(1000), 1000, (1, 1, 0)).tolist()
    )
    np.testing.assert_array_equal(
        keyed_permutation(np.arange(300, 310), 1000, (0, 1, 0)), first[300:310]
    )
    with pytest.raises(ValueError, match="below size 10"):
        keyed_permutation(np.array([10]), 10, (0,))


def test_val_batches_cover_validation_in_order(bible_shards):
    batches = TokenBatches(bible_shards, seq_len=64, seed=0)
    validation = np.asarray(bible_shards.tokens("validation"), dtype=np.int64)

    chunks = list(batches.val_batches(batch_size=100))

    assert batches.val_windows == (65536 - 1) // 64
    assert [len(chunk) for chunk in chunks] == [100] * 10 + [23]
    windows = torch.cat(chunks).numpy()
    assert windows.shape == (1023, 65)
    targets = windows[:, 1:].reshape(-1)
    np.testing.assert_array_equal(targets, validation[1 : 1 + 1023 * 64])
    np.testing.assert_array_equal(windows[0], validation[:65])


def test_token_batches_reject_long_windows(bible_shards):
    with pytest.raises(ValueError, match="seq_len"):
        TokenBatches(bible_shards, seq_len=70_000, seed=0)


# Unreadable shards and tokenizer folders


def _read_c4(directory: Path) -> list[str]:
    return list(
        iter_documents(TextSource("c4_local", paths=(str(directory),)), "train")
    )


def _raw_c4_shard(directory: Path, lines: list[str]) -> Path:
    """Write ``lines`` as a gzipped training shard and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "c4-train.00000-of-00001.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as shard:
        shard.write("".join(f"{line}\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            '{"content": "a", "url": "u"}',
            "has no \"text\" field (its keys: 'content', 'url')",
        ),
        ('{"text": "a"', "is not valid JSON (Expecting ',' delimiter at column 13)"),
        ('["text", "a"]', "is a JSON array, not an object"),
        ('{"text": null}', 'has a "text" field of JSON type null'),
    ],
    ids=["no_text", "invalid_json", "array", "null_text"],
)
def test_c4_bad_line_names_file_and_line(tmp_path, line, problem):
    shard = _raw_c4_shard(tmp_path / "c4", ['{"text": "fine"}', line])

    with pytest.raises(DataUnavailableError) as raised:
        _read_c4(tmp_path / "c4")

    message = str(raised.value)
    assert message.startswith(f"{shard}:2 {problem}. ")
    assert 'must be a JSON object with a "text" string' in message
    assert "\n" not in message


def test_c4_truncated_shard_names_file(tmp_path):
    texts = [paragraph(index) * 20 for index in range(200)]
    shard = _raw_c4_shard(tmp_path / "c4", [json.dumps({"text": t}) for t in texts])
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    with pytest.raises(DataUnavailableError) as raised:
        _read_c4(tmp_path / "c4")

    message = str(raised.value)
    assert re.fullmatch(
        rf"C4 shard {re.escape(str(shard))} is truncated: its gzip stream ends after "
        r"line \d+\. Download the shard again, or remove it from the directories in "
        r"data\.paths\.",
        message,
    )


def test_c4_shard_not_gzip_names_file(tmp_path):
    shard = tmp_path / "c4" / "c4-train.00000-of-00001.json.gz"
    shard.parent.mkdir()
    shard.write_text('{"text": "plain JSON lines, not compressed"}\n')

    with pytest.raises(DataUnavailableError) as raised:
        _read_c4(tmp_path / "c4")

    message = str(raised.value)
    assert message.startswith(f"C4 shard {shard} is not a valid gzip file (")
    assert message.endswith("Download the shard again, or remove it from the "
                            "directories in data.paths.")  # fmt: skip


def test_c4_shard_bad_crc_names_file(tmp_path):
    shard = _raw_c4_shard(tmp_path / "c4", ['{"text": "one"}', '{"text": "two"}'])
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF  # The gzip trailer: CRC-32, then the length.
    shard.write_bytes(bytes(data))

    with pytest.raises(DataUnavailableError) as raised:
        _read_c4(tmp_path / "c4")

    assert str(raised.value).startswith(
        f"C4 shard {shard} is not a valid gzip file after line 2 (CRC check failed"
    )


def test_files_source_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))

    with pytest.raises(DataUnavailableError) as raised:
        list(iter_documents(TextSource("files", paths=(str(path),)), "train"))

    assert str(raised.value) == (
        f"text file {path} is not valid UTF-8 (invalid continuation byte at byte 3)."
        " Convert it to UTF-8, or remove it from data.paths."
    )


TOKENIZER_FIX = (
    "Set data.tokenizer_path to a folder saved with transformers' save_pretrained, "
    "which contains tokenizer.json or tokenizer_config.json, or to a Hugging Face "
    "Hub name such as google-t5/t5-base."
)


def test_tokenizer_path_missing_or_not_folder(tmp_path):
    saved = save_word_level_tokenizer(tmp_path / "saved", vocab_size=500)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a tokenizer")
    cases = {
        tmp_path / "absent": "not found. " + TOKENIZER_FIX,
        saved / "tokenizer.json": (
            f"is a file, not a folder. Set data.tokenizer_path to the folder that "
            f"contains it, {saved}."
        ),
        tmp_path / "empty": (
            "is not a tokenizer folder: it has neither tokenizer.json nor "
            f"tokenizer_config.json and is empty. {TOKENIZER_FIX}"
        ),
        tmp_path / "other": (
            "is not a tokenizer folder: it has neither tokenizer.json nor "
            f"tokenizer_config.json and contains only notes.txt. {TOKENIZER_FIX}"
        ),
    }
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))

    for path, problem in cases.items():
        spec = TokenizerSpec("pretrained", name_or_path=str(path))
        with pytest.raises(DataUnavailableError) as raised:
            prepare_token_shards(source, spec, tmp_path / "cache", seq_len=8)
        assert str(raised.value) == f"data.tokenizer_path {str(path)!r} {problem}"
    # The path is checked before the cache is touched.
    assert not (tmp_path / "cache").exists()


def test_tokenizer_folder_unloadable_or_without_eos(tmp_path):
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("not JSON")
    without_eos = tmp_path / "without_eos"
    without_eos.mkdir()
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
        str(without_eos / "tokenizer.json")
    )
    cases = {
        broken: (
            f"the tokenizer in data.tokenizer_path {str(broken)!r} cannot be loaded "
            "(Expecting value: line 1 column 1 (char 0)). Save it again with "
            "transformers' save_pretrained."
        ),
        without_eos: (
            f"the tokenizer of data.tokenizer_path {str(without_eos)!r} has no EOS "
            "token, which packing puts between documents. Set its eos_token and save "
            "it again with save_pretrained."
        ),
    }

    for path, expected in cases.items():
        spec = TokenizerSpec("pretrained", name_or_path=str(path))
        with pytest.raises(DataUnavailableError) as raised:
            prepare_token_shards(source, spec, tmp_path / "cache", seq_len=8)
        assert str(raised.value) == expected


def test_hub_tokenizer_unreachable(tmp_path, monkeypatch):
    # Offline mode fails at once, as an unreachable hub does after its retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))
    spec = TokenizerSpec("pretrained", name_or_path="google-t5/t5-base")

    with pytest.raises(DataUnavailableError) as raised:
        prepare_token_shards(source, spec, tmp_path / "cache", seq_len=8)

    assert str(raised.value) == (
        "data.tokenizer_path 'google-t5/t5-base' is not a local folder (no "
        f"{tmp_path}/google-t5/t5-base), and the Hugging Face Hub could not be "
        "reached to download it. Set data.tokenizer_path to a local folder saved "
        "with transformers' save_pretrained, or run where huggingface.co is "
        "reachable."
    )


def test_tokenizer_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_word_level_tokenizer(tmp_path / "tokenizer", vocab_size=500)
    write_text_files(tmp_path / "corpus")
    source = TextSource("files", paths=(str(tmp_path / "corpus" / "*.txt"),))
    spec = TokenizerSpec("pretrained", name_or_path="~/tokenizer")

    shards = prepare_token_shards(source, spec, tmp_path / "cache", seq_len=8)

    assert shards.vocab_size == 500
