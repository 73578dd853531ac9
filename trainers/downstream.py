"""Zero-shot multiple-choice evaluation of a trained language model (Table 1 of
the GradPower paper).

Each task turns one benchmark record into requests, pairs of a context and a
continuation, one per answer choice. The model scores a request by the summed
log-probability of the continuation's tokens given the context, and picks the
choice with the highest score:

- ``acc``: the choice with the highest summed log-probability is the gold one;
- ``acc_norm``: the same after dividing each score by the answer text's
  length in characters (without the space that joins it to the context),
  which removes the bias towards short answers.

The prompts follow the zero-shot formats of EleutherAI's lm-evaluation-harness,
which the GradPower paper used: ``Question: ...\\nAnswer:`` for ARC and PIQA, the
question stem alone for OpenBookQA, the cleaned activity and context for
HellaSwag, and partial scoring for WinoGrande (each option fills the blank in
the context and the rest of the sentence is the scored continuation).

Benchmarks load through `datasets`: from the Hugging Face hub, or from a local
folder that holds ``<task>.jsonl`` (or ``.json``, ``.parquet``) files with the
hub datasets' fields. `prepare_downstream` tokenizes every request once per
(benchmark files, tokenizer) and caches the token ids, so trials only read
arrays and never load a tokenizer.

Requests are encoded without special tokens, as the training documents are:
packed and separated by EOS, with no BOS. The harness encodes with the
tokenizer's default special tokens, which adds a BOS for tokenizers that have
one (not T5's, GPT-2's or the trained BPE).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.data.errors import DataUnavailableError, one_line
from trainers.data.text import build_once, json_object_line
from trainers.tables import DOWNSTREAM_COLUMNS

logger = logging.getLogger(__name__)

# Bump when the request format or the cached arrays change.
DOWNSTREAM_FORMAT_VERSION = 1
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# The harness joins the context and each answer text with this delimiter, and
# acc_norm divides by the length of the answer text alone.
TARGET_DELIMITER = " "
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Example:
    """One benchmark question as scored requests: one (context, continuation)
    per answer choice, and the index of the correct choice."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    hub_path: str
    hub_config: str | None
    split: str
    fields: tuple[str, ...]
    """Field names that every record must contain."""
    build: Callable[[dict[str, Any]], Example]


def _text(record: dict[str, Any], field: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise TypeError(f"field {field!r} is missing or not text (found {value!r})")
    return value


def _index(record: dict[str, Any], field: str, choices: int) -> int:
    """Return the whole number in ``field``, an index into ``choices`` choices."""
    value = record[field]
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, str) and value.strip().isdigit():
        whole = True
    if not whole or not 0 <= int(value) < choices:
        raise ValueError(
            f"field {field!r} is {value!r}; expected a whole number from 0 to "
            f"{choices - 1}"
        )
    return int(value)


def _labelled_choices(record: dict[str, Any]) -> tuple[list[str], int]:
    """Return the texts of ``choices`` and the index of ``answerKey`` among its
    labels (ARC, OpenBookQA)."""
    choices = record["choices"]
    texts = choices.get("text") if isinstance(choices, dict) else None
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not isinstance(texts, list) or not isinstance(labels, list):
        raise TypeError(
            f"field 'choices' is {choices!r}; expected {{text: [...], label: [...]}}"
        )
    if len(texts) != len(labels):
        raise ValueError(
            f"field 'choices' has {len(texts)} texts and {len(labels)} labels; "
            "expected one label per text"
        )
    if not all(isinstance(text, str) for text in texts):
        raise TypeError(f"field 'choices' has texts that are not text: {texts!r}")
    labels = [str(label).strip() for label in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"field 'choices' repeats a label: {labels}")
    answer = str(record["answerKey"]).strip()
    if answer not in labels:
        raise ValueError(
            f"answerKey {answer!r} is not one of the choice labels {labels}"
        )
    return texts, labels.index(answer)


def _question_answer(record: dict[str, Any]) -> Example:
    """ARC: the question in a Question/Answer frame, each choice's text after it."""
    choices, gold = _labelled_choices(record)
    context = f"Question: {_text(record, 'question')}\nAnswer:"
    texts = tuple(TARGET_DELIMITER + text for text in choices)
    return Example((context,) * len(texts), texts, gold)


def _piqa(record: dict[str, Any]) -> Example:
    context = f"Question: {_text(record, 'goal')}\nAnswer:"
    texts = tuple(TARGET_DELIMITER + _text(record, name) for name in ("sol1", "sol2"))
    return Example((context, context), texts, _index(record, "label", 2))


def _openbookqa(record: dict[str, Any]) -> Example:
    choices, gold = _labelled_choices(record)
    texts = tuple(TARGET_DELIMITER + text for text in choices)
    return Example((_text(record, "question_stem"),) * len(texts), texts, gold)


_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    """Remove the WikiHow markup of HellaSwag text: ' [title]' ends a sentence,
    other bracketed tags are dropped, and double spaces become single."""
    text = text.strip().replace(" [title]", ". ")
    return _BRACKETED.sub("", text).replace("  ", " ")


def _hellaswag(record: dict[str, Any]) -> Example:
    context = _text(record, "ctx_a") + " " + _text(record, "ctx_b").capitalize()
    query = _clean_hellaswag(f"{_text(record, 'activity_label')}: {context}")
    endings = record["endings"]
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise TypeError(f"field 'endings' is {endings!r}; expected a list of texts")
    texts = tuple(TARGET_DELIMITER + _clean_hellaswag(ending) for ending in endings)
    return Example((query,) * len(texts), texts, _index(record, "label", len(texts)))


def _winogrande(record: dict[str, Any]) -> Example:
    """Partial scoring: each option fills the blank, and the model scores the
    part of the sentence after the blank, which is the same for both.

    Both requests share one continuation, so acc_norm equals acc here; the
    harness reports only acc for WinoGrande.
    """
    sentence = _text(record, "sentence")
    if "_" not in sentence:
        raise ValueError(f"sentence {sentence!r} has no blank '_'")
    blank = sentence.index("_")
    options = [_text(record, name) for name in ("option1", "option2")]
    if not all(option.strip() for option in options):
        raise ValueError(f"options {options!r} include an empty one")
    contexts = tuple(sentence[:blank] + option for option in options)
    rest = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    if not rest.strip():
        raise ValueError(f"sentence {sentence!r} has nothing after the blank to score")
    answers = {"1": 0, "2": 1}
    if str(record["answer"]) not in answers:
        raise ValueError(f"answer {record['answer']!r} is invalid; expected '1' or '2'")
    return Example(contexts, (rest, rest), answers[str(record["answer"])])


_ARC_FIELDS = ("question", "choices", "answerKey")
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", _ARC_FIELDS,
            _question_answer,
        ),
        Task(
            "arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", _ARC_FIELDS,
            _question_answer,
        ),
        Task(
            "piqa", "baber/piqa", None, "validation",
            ("goal", "sol1", "sol2", "label"), _piqa,
        ),
        Task(
            "hellaswag", "Rowan/hellaswag", None, "validation",
            ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag,
        ),
        Task(
            "openbookqa", "allenai/openbookqa", "main", "test",
            ("question_stem", "choices", "answerKey"), _openbookqa,
        ),
        Task(
            "winogrande", "allenai/winogrande", "winogrande_xl", "validation",
            ("sentence", "option1", "option2", "answer"), _winogrande,
        ),
    )
}  # fmt: skip
TASK_NAMES = tuple(TASKS)


# Loading


def local_file(directory: Path, task: str) -> Path | None:
    """Return the task's file in ``directory``, ``<task>.jsonl``, ``.json`` or
    ``.parquet``, or None; raise DataUnavailableError when several exist."""
    found = [
        directory / f"{task}{suffix}"
        for suffix in LOCAL_SUFFIXES
        if (directory / f"{task}{suffix}").is_file()
    ]
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise DataUnavailableError(
            f"downstream task {task}: downstream.dir {str(directory)!r} contains "
            f"{names}. Keep one of them, so that the task reads one split."
        )
    return found[0] if found else None


# The layout of a local file of each format, for error messages.
_LAYOUTS = {
    ".jsonl": "one JSON object per line",
    ".json": "a JSON array of objects, or one JSON object per line",
    ".parquet": "a Parquet table with one row per record",
}


def _check_local_file(task: Task, path: Path) -> None:
    """Raise DataUnavailableError for an empty file, or for a JSON Lines file
    with a line that is not a JSON object, because `datasets` does not name
    the line."""
    layout = f"{_LAYOUTS[path.suffix]} with the fields {', '.join(task.fields)}"
    if path.stat().st_size == 0:
        raise DataUnavailableError(
            f"downstream task {task.name}: {path} is empty. Write the task's "
            f"evaluation split into it as {layout}."
        )
    if path.suffix != ".jsonl":
        return
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                where = f"downstream task {task.name}: {path}:{number}"
                json_object_line(line, where, f"The file needs {layout}.")


def _expected_files(task: str) -> str:
    return " or ".join(f"{task}{suffix}" for suffix in LOCAL_SUFFIXES)


def _load_records(
    task: Task, directory: Path | None, cache_dir: Path | None
) -> tuple[Any, str]:
    """Load the task's evaluation split with `datasets`; return it and where it
    came from, for messages."""
    import datasets

    datasets.disable_progress_bars()
    cache = str(cache_dir) if cache_dir is not None else None

    if directory is not None:
        path = local_file(directory, task.name)
        if path is None:
            raise DataUnavailableError(
                f"downstream task {task.name}: no {_expected_files(task.name)} in "
                f"downstream.dir {str(directory)!r}. Add the file, with the fields of "
                f"the hub dataset {task.hub_path} ({', '.join(task.fields)}), or "
                "leave downstream.dir out to download the task from the hub."
            )
        _check_local_file(task, path)
        # A cache of its own: `datasets` would reuse the records of an earlier
        # file with the same path, size and modification time.
        try:
            with tempfile.TemporaryDirectory(prefix="downstream-") as scratch:
                records = datasets.load_dataset(
                    _LOADERS[path.suffix],
                    data_files=str(path),
                    split="train",
                    cache_dir=scratch,
                    keep_in_memory=True,
                )
        except Exception as error:  # noqa: BLE001 - datasets raises several types
            raise DataUnavailableError(
                f"downstream task {task.name}: {path} cannot be read as "
                f"{_LOADERS[path.suffix]} ({one_line(error)}). The file needs "
                f"{_LAYOUTS[path.suffix]} with the fields {', '.join(task.fields)}."
            ) from None
        return records, str(path)
    where = f"{task.hub_path}" + (f" ({task.hub_config})" if task.hub_config else "")
    try:
        records = datasets.load_dataset(
            task.hub_path, task.hub_config, split=task.split, cache_dir=cache
        )
    except Exception as error:  # noqa: BLE001 - offline, gated or renamed datasets
        raise DataUnavailableError(
            f"downstream task {task.name}: loading {where} split {task.split} from "
            f"the Hugging Face hub failed ({one_line(error)}). Set downstream.dir to "
            f"a folder with {_expected_files(task.name)} holding that split, or run "
            "where huggingface.co is reachable."
        ) from None
    return records, f"{where} split {task.split}"


def _choice_problem(example: Example) -> str | None:
    """Describe why ``example`` cannot be scored as a multiple-choice question,
    or return None."""
    count = len(example.continuations)
    if count < 2:
        return f"has {count} answer choice(s), and a question needs at least 2"
    for index, continuation in enumerate(example.continuations):
        if not continuation.strip():
            return f"has an empty answer choice (number {index + 1})"
    return None


def load_examples(
    task_name: str,
    directory: Path | None,
    max_examples: int | None = None,
    cache_dir: Path | None = None,
) -> list[Example]:
    """Read a task's records and build its examples; raise DataUnavailableError
    that names the record and the field for a record that does not fit.

    ``cache_dir`` is where `datasets` keeps its download and Arrow caches
    (default: its own, under ~/.cache/huggingface).
    """
    task = TASKS[task_name]
    records, where = _load_records(task, directory, cache_dir)
    missing = [name for name in task.fields if name not in records.column_names]
    if missing:
        raise DataUnavailableError(
            f"downstream task {task.name}: {where} has no field(s) {missing}; its "
            f"records need {', '.join(task.fields)}, as in the hub dataset "
            f"{task.hub_path}."
        )
    examples = []
    for number, record in enumerate(records):
        if max_examples is not None and number >= max_examples:
            break
        try:
            example = task.build(record)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataUnavailableError(
                f"downstream task {task.name}: record {number + 1} of {where} does "
                f"not fit ({one_line(error)}); its fields must be as in the hub "
                f"dataset {task.hub_path}."
            ) from None
        problem = _choice_problem(example)
        if problem:
            raise DataUnavailableError(
                f"downstream task {task.name}: record {number + 1} of {where} "
                f"{problem}; fix or remove the record."
            )
        examples.append(example)
    if not examples:
        raise DataUnavailableError(
            f"downstream task {task.name}: {where} contains no records. Point "
            "downstream.dir at the task's evaluation split."
        )
    return examples


# Tokenized requests


@dataclass
class TaskRequests:
    """A task's requests as token ids: request r is ``tokens[offsets[r]:
    offsets[r + 1]]``, whose last ``continuation_len[r]`` tokens are scored."""

    tokens: np.ndarray
    offsets: np.ndarray
    continuation_len: np.ndarray
    continuation_chars: np.ndarray
    """Characters of each request's answer text, the divisor of acc_norm."""
    example: np.ndarray
    """Index of the example each request belongs to."""
    gold: np.ndarray
    """Correct choice per example, counted within the example's requests."""

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **vars(self))

    @classmethod
    def load(cls, path: Path) -> TaskRequests:
        with np.load(path) as arrays:
            return cls(**{name: arrays[name] for name in arrays.files})

    @property
    def requests(self) -> int:
        return len(self.continuation_len)


def tokenize_examples(
    examples: list[Example],
    encode_batch: Callable[[list[str]], list[list[int]]],
    eos_id: int,
) -> TaskRequests:
    """Tokenize each request as the harness does: the continuation's tokens are
    the tokens of context + continuation after those of the context alone, so
    that a merge across the boundary is encoded as in running text. Whitespace
    at the end of a context moves to its continuation, and an empty context
    becomes the EOS token."""
    contexts, continuations, example_of, characters = [], [], [], []
    for index, example in enumerate(examples):
        for context, continuation in zip(
            example.contexts, example.continuations, strict=True
        ):
            characters.append(len(continuation.removeprefix(TARGET_DELIMITER)))
            trailing = len(context) - len(context.rstrip())
            if trailing:
                continuation = context[-trailing:] + continuation
                context = context[:-trailing]
            contexts.append(context)
            continuations.append(continuation)
            example_of.append(index)

    context_ids = encode_batch(contexts)
    whole_ids = encode_batch([c + x for c, x in zip(contexts, continuations)])
    pieces, lengths = [], []
    for context, ids, whole in zip(contexts, context_ids, whole_ids):
        continuation_ids = whole[len(ids) :]
        if not context:
            ids = [eos_id]
        pieces.append(np.asarray([*ids, *continuation_ids], dtype=np.int64))
        lengths.append(len(continuation_ids))

    if min(lengths) < 1:
        raise DataUnavailableError(
            "a downstream request has a continuation that encodes to no tokens; "
            "check that every answer choice has text."
        )

    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(piece) for piece in pieces], out=offsets[1:])
    return TaskRequests(
        tokens=np.concatenate(pieces),
        offsets=offsets,
        continuation_len=np.asarray(lengths, dtype=np.int64),
        continuation_chars=np.asarray(characters, dtype=np.int64),
        example=np.asarray(example_of, dtype=np.int64),
        gold=np.asarray([example.gold for example in examples], dtype=np.int64),
    )


def _file_digest(path: Path) -> str:
    """Return the SHA-256 of a benchmark file's contents, so that any edit, even
    one that keeps its size and modification time, builds the requests again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(
    tasks: list[str],
    directory: Path | None,
    max_examples: int | None,
    tokenizer_id: str,
) -> str:
    sources: dict[str, object] = {}
    for name in tasks:
        task = TASKS[name]
        if directory is None:
            sources[name] = [task.hub_path, task.hub_config, task.split]
        else:
            path = local_file(directory, name)
            sources[name] = _file_digest(path) if path else None
    payload = {
        "version": DOWNSTREAM_FORMAT_VERSION,
        "sources": sources,
        "max_examples": max_examples,
        "tokenizer": tokenizer_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare_downstream(
    settings: dict[str, Any],
    cache_root: Path,
    tokenizer_id: str,
    load_encoder: Callable[[], tuple[Callable[[list[str]], list[list[int]]], int]],
    seq_len: int | None = None,
) -> Path:
    """Tokenize the requests of ``settings["tasks"]`` once and return their folder.

    ``settings`` contains ``tasks``, ``dir`` (None for the hub) and
    ``max_examples``. ``tokenizer_id`` names the tokenizer in the cache key (the
    token-shard folder, whose name covers source and tokenizer), and
    ``load_encoder`` returns ``(encode_batch, eos_id)`` when a build is needed.
    The folder is built as the token shards are (`build_once`). With
    ``seq_len``, a warning names the tasks whose requests the model's context
    cuts.
    """
    tasks = list(settings["tasks"])
    directory = settings.get("dir")
    directory = Path(directory).expanduser().absolute() if directory else None
    if directory is not None and not directory.is_dir():
        raise DataUnavailableError(
            f"downstream.dir {str(directory)!r} is not a folder. Set it to the "
            f"folder that contains {', '.join(t + '.jsonl' for t in tasks)}, or "
            "leave it out to download the tasks from the hub."
        )
    max_examples = settings.get("max_examples")
    root = Path(cache_root).absolute() / "downstream"
    root.mkdir(parents=True, exist_ok=True)
    key = _cache_key(tasks, directory, max_examples, tokenizer_id)
    target = root / f"{'-'.join(sorted(tasks))[:60]}-{key[:20]}"

    def build(folder: Path) -> None:
        encode_batch, eos_id = load_encoder()
        counts = {}
        for name in tasks:
            examples = load_examples(
                name, directory, max_examples, cache_dir=root / "hf-datasets"
            )
            requests = tokenize_examples(examples, encode_batch, eos_id)
            requests.save(folder / f"{name}.npz")
            counts[name] = len(examples)
            logger.info(
                "downstream %s: %d examples, %d requests",
                name,
                len(examples),
                requests.requests,
            )
        meta = {"version": DOWNSTREAM_FORMAT_VERSION, "examples": counts}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))

    build_once(target, build, "downstream requests")
    missing = [name for name in tasks if not (target / f"{name}.npz").is_file()]
    if missing:
        raise DataUnavailableError(
            f"the downstream requests in {target} are incomplete (no "
            f"{', '.join(name + '.npz' for name in missing)}). Delete that folder "
            "and run the command again to prepare them anew."
        )
    if seq_len is not None:
        for name in tasks:
            _warn_when_cut(name, TaskRequests.load(target / f"{name}.npz"), seq_len)
    return target


def cut_requests(requests: TaskRequests, seq_len: int) -> tuple[int, int]:
    """Count the requests longer than ``seq_len + 1`` tokens, which scoring cuts
    from the left, and those among them whose answer alone is longer than
    ``seq_len`` tokens, so that part of the answer goes unscored."""
    lengths = np.diff(requests.offsets)
    cut = int((lengths > seq_len + 1).sum())
    answers = int((requests.continuation_len > seq_len).sum())
    return cut, answers


def _warn_when_cut(task: str, requests: TaskRequests, seq_len: int) -> None:
    cut, answers = cut_requests(requests, seq_len)
    if not cut:
        return
    message = (
        f"downstream task {task}: {cut} of {requests.requests} requests are longer "
        f"than seq_len + 1 = {seq_len + 1} tokens and are scored without the start "
        "of their context"
    )
    if answers:
        message += f", {answers} of them without the start of the answer"
    logger.warning("%s. A larger data.seq_len keeps them whole.", message)


# Scoring


def _windows(
    requests: TaskRequests, seq_len: int
) -> Iterator[tuple[int, list[int], int]]:
    """Yield (request, input ids, scored positions) with each request cut from
    the left to ``seq_len`` input tokens, the model's trained context."""
    for index in range(requests.requests):
        ids = requests.tokens[requests.offsets[index] : requests.offsets[index + 1]]
        ids = ids[-(seq_len + 1) :]
        scored = min(int(requests.continuation_len[index]), len(ids) - 1)
        yield index, ids.tolist(), scored


@torch.no_grad()
def request_log_likelihoods(
    model: nn.Module,
    requests: TaskRequests,
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Summed log-probability of each request's continuation, in nats.

    Requests run in batches of similar length, padded on the right; a causal
    model's predictions at real positions do not see the padding after them.
    Each batch copies its scores back to the host once.
    """
    windows = sorted(_windows(requests, seq_len), key=lambda item: -len(item[1]))
    scores = np.zeros(requests.requests, dtype=np.float64)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = len(chunk[0][1]) - 1
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        # Every scored token of the chunk: its row (the request it belongs to),
        # the position that predicts it and the token itself.
        rows, positions, targets = [], [], []
        for row, (_, ids, scored) in enumerate(chunk):
            end = len(ids) - 1
            inputs[row, :end] = torch.as_tensor(ids[:-1])
            rows += [row] * scored
            positions += range(end - scored, end)
            targets += ids[end - scored + 1 :]
        logits = model(input_ids=inputs.to(device)).logits
        row_index = torch.as_tensor(rows, device=device)
        position_index = torch.as_tensor(positions, device=device)
        picked = logits[row_index, position_index].float()
        log_probs = F.log_softmax(picked, dim=-1)
        target_index = torch.as_tensor(targets, device=device)
        token_scores = log_probs.gather(1, target_index[:, None])[:, 0]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        sums.index_add_(0, row_index, token_scores.double())
        indices = [index for index, _, _ in chunk]
        scores[indices] = sums.cpu().numpy()
    return scores


def task_accuracy(requests: TaskRequests, scores: np.ndarray) -> dict[str, float]:
    """Return acc and acc_norm over the task's examples; ties go to the first
    choice."""
    correct = {"acc": 0, "acc_norm": 0}
    normalized = scores / np.maximum(requests.continuation_chars, 1)
    boundaries = np.flatnonzero(np.diff(requests.example)) + 1
    for index, (raw, norm) in enumerate(
        zip(np.split(scores, boundaries), np.split(normalized, boundaries), strict=True)
    ):
        gold = requests.gold[index]
        correct["acc"] += int(np.argmax(raw) == gold)
        correct["acc_norm"] += int(np.argmax(norm) == gold)
    examples = len(requests.gold)
    return {name: count / examples for name, count in correct.items()}


def evaluate_downstream(
    model: nn.Module,
    directory: Path,
    tasks: list[str],
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Score every task in ``directory`` and return metrics keyed
    ``downstream/<task>/acc``, ``downstream/<task>/acc_norm`` and
    ``downstream/<task>/examples``, ``downstream/<task>/cut`` (requests cut to
    the model's context) and ``downstream/average``: the mean over the tasks of
    the metric each task's table column shows."""
    metrics: dict[str, float] = {}
    table_values = []
    for name in tasks:
        requests = TaskRequests.load(Path(directory) / f"{name}.npz")
        scores = request_log_likelihoods(model, requests, seq_len, batch_size, device)
        accuracy = task_accuracy(requests, scores)
        for metric, value in accuracy.items():
            metrics[f"downstream/{name}/{metric}"] = value
        metrics[f"downstream/{name}/examples"] = float(len(requests.gold))
        metrics[f"downstream/{name}/cut"] = float(cut_requests(requests, seq_len)[0])
        table_values.append(accuracy[DOWNSTREAM_COLUMNS[name][1]])
    metrics["downstream/average"] = float(np.mean(table_values))
    return metrics
