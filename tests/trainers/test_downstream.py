"""Zero-shot downstream evaluation: prompts, tokenization, scoring and accuracy,
on benchmark files in the hub datasets' formats written by the tests."""

from __future__ import annotations

import json
import os
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.trainers.sample_data import (
    documents,
    downstream_records,
    save_t5_sized_tokenizer,
    tiny_bpe_shards,
    write_c4_shards,
    write_downstream_files,
)
from trainers.config import TrialConfig
from trainers.data.errors import DataUnavailableError
from trainers.data.text import TokenizerSpec, TokenShards, shard_encoder
from trainers.downstream import (
    TASK_NAMES,
    TASKS,
    Example,
    TaskRequests,
    cut_requests,
    load_examples,
    prepare_downstream,
    request_log_likelihoods,
    task_accuracy,
    tokenize_examples,
)
from trainers.loop import run_trial
from trainers.tables import DOWNSTREAM_COLUMNS, DownstreamTask
from trainers.workloads.lm import LanguageModelWorkload, build_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> dict:
    """Token shards and the prepared requests of 5 records per task."""
    root = tmp_path_factory.mktemp("downstream")
    data = tiny_bpe_shards(root, val_tokens=4 * 32 + 1)
    benchmarks = write_downstream_files(root / "benchmarks", 5)
    shards = TokenShards.load(data["shards_dir"])
    directory = prepare_downstream(
        {"tasks": list(TASK_NAMES), "dir": str(benchmarks), "max_examples": None},
        root / "cache",
        tokenizer_id=shards.directory.name,
        load_encoder=lambda: shard_encoder(shards, TokenizerSpec("bpe", 300)),
    )
    return {**data, "benchmarks": benchmarks, "requests": directory, "root": root}


def test_prompts_follow_the_harness_formats(tmp_path):
    files = {
        "arc_easy": {
            "question": "Which gas do plants take in?",
            "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]},
            "answerKey": "B",
        },
        "piqa": {"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0},
        "openbookqa": {
            "question_stem": "The sun is a",
            "choices": {"text": ["star", "moon", "rock"], "label": ["1", "2", "3"]},
            "answerKey": "1",
        },
        "hellaswag": {
            "activity_label": "Baking",
            "ctx_a": "A man mixes flour.",
            "ctx_b": "he",
            "endings": ["bakes [title] the bread", "sings [step] loudly"],
            "label": "1",
        },
        "winogrande": {
            "sentence": "The cup fell on the plate and _ broke.",
            "option1": "the cup",
            "option2": "the plate",
            "answer": "2",
        },
    }
    for task, record in files.items():
        (tmp_path / f"{task}.jsonl").write_text(json.dumps(record) + "\n")

    arc = load_examples("arc_easy", tmp_path)[0]
    piqa = load_examples("piqa", tmp_path)[0]
    obqa = load_examples("openbookqa", tmp_path)[0]
    hellaswag = load_examples("hellaswag", tmp_path)[0]
    winogrande = load_examples("winogrande", tmp_path)[0]

    assert arc.contexts == ("Question: Which gas do plants take in?\nAnswer:",) * 2
    assert arc.continuations == (" oxygen", " carbon dioxide")
    assert arc.gold == 1
    assert piqa.contexts[0] == "Question: Open a jar\nAnswer:"
    assert piqa.continuations == (" twist", " shout")
    assert piqa.gold == 0
    assert obqa.contexts == ("The sun is a",) * 3
    assert obqa.gold == 0
    assert hellaswag.contexts[0] == "Baking: A man mixes flour. He"
    assert hellaswag.continuations == (" bakes. the bread", " sings loudly")
    assert hellaswag.gold == 1
    assert winogrande.contexts == (
        "The cup fell on the plate and the cup",
        "The cup fell on the plate and the plate",
    )
    assert winogrande.continuations == (" broke.", " broke.")
    assert winogrande.gold == 1


def test_continuation_tokens_follow_context_tokens(bpe):
    shards = TokenShards.load(bpe["shards_dir"])
    encode, eos = shard_encoder(shards, TokenizerSpec("bpe", 300))
    examples = load_examples("piqa", bpe["benchmarks"])
    requests = tokenize_examples(examples, encode, eos)

    assert requests.requests == 2 * len(examples)
    for index in range(requests.requests):
        example = examples[requests.example[index]]
        choice = index % 2
        ids = requests.tokens[requests.offsets[index] : requests.offsets[index + 1]]
        whole = encode([example.contexts[choice] + example.continuations[choice]])[0]
        assert ids.tolist() == whole
        tail = ids[len(ids) - requests.continuation_len[index] :].tolist()
        assert tail == whole[len(encode([example.contexts[choice]])[0]) :]
    assert requests.gold.tolist() == [e.gold for e in examples]


def test_trailing_context_whitespace_moves_to_continuation():
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return [[ord(c) for c in text] for text in texts]

    example = Example(("ask \n", ""), (" x", "yz"), 0)
    requests = tokenize_examples([example], encode, 7)

    assert seen[0] == ["ask", ""]
    assert seen[1] == ["ask \n x", "yz"]
    # The continuation " \n x" is scored, four characters here.
    assert requests.continuation_len.tolist() == [4, 2]
    # acc_norm divides by the answer text without the joining space.
    assert requests.continuation_chars.tolist() == [1, 2]
    # The empty context scores its continuation after the EOS token.
    second = requests.tokens[requests.offsets[1] : requests.offsets[2]].tolist()
    assert second == [7, ord("y"), ord("z")]


def _direct_log_likelihood(model, ids: list[int], scored: int, seq_len: int) -> float:
    """Score one request alone, without padding or batching."""
    ids = ids[-(seq_len + 1) :]
    scored = min(scored, len(ids) - 1)
    logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    log_probs = F.log_softmax(logits, dim=-1)
    positions = range(len(ids) - 1 - scored, len(ids) - 1)
    return sum(log_probs[p, ids[p + 1]].item() for p in positions)


@pytest.mark.parametrize("seq_len", [128, 40])
def test_batched_scores_equal_unbatched(bpe, seq_len):
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=320, seq_len=128).eval()
    requests = TaskRequests.load(bpe["requests"] / "hellaswag.npz")
    lengths = np.diff(requests.offsets)
    # seq_len 40 cuts every request from the left, 128 none.
    assert (lengths > 41).all()
    assert (lengths <= 129).all()

    with torch.no_grad():
        scores = request_log_likelihoods(model, requests, seq_len, 3, CPU)
        direct = [
            _direct_log_likelihood(
                model,
                requests.tokens[requests.offsets[i] : requests.offsets[i + 1]].tolist(),
                int(requests.continuation_len[i]),
                seq_len,
            )
            for i in range(requests.requests)
        ]

    np.testing.assert_allclose(scores, direct, rtol=1e-4, atol=1e-4)
    assert (scores < 0).all()


def test_accuracy_picks_best_choice():
    requests = TaskRequests(
        tokens=np.zeros(5, dtype=np.int64),
        offsets=np.arange(6),
        continuation_len=np.ones(5, dtype=np.int64),
        continuation_chars=np.array([1, 10, 2, 4, 4]),
        example=np.array([0, 0, 1, 1, 1]),
        gold=np.array([1, 2]),
    )
    # Example 0: raw prefers choice 0 (-2 > -5), per character choice 1
    # (-0.5 > -2). Example 1: both prefer choice 2 on a tie of the last two.
    scores = np.array([-2.0, -5.0, -8.0, -1.0, -1.0])

    assert task_accuracy(requests, scores) == {"acc": 0.0, "acc_norm": 0.5}
    assert task_accuracy(requests, np.array([-5.0, -2.0, -9.0, -9.0, -1.0])) == {
        "acc": 1.0,
        "acc_norm": 1.0,
    }


def test_trial_reports_final_downstream_accuracy(bpe):
    data = {
        "shards_dir": bpe["shards_dir"],
        "seq_len": 32,
        "downstream": {"tasks": list(TASK_NAMES)},
        "downstream_dir": str(bpe["requests"]),
    }
    config = TrialConfig(
        workload="lm",
        batch_size=4,
        power=1.2,
        lr_max=3e-3,
        step_budget=3,
        target_value=None,
        model={"preset": "tiny"},
        data=data,
        device="cpu",
        eval_every_steps=2,
    )
    reports = []
    outcome = run_trial(config, reports.append)

    final = reports[-1]
    assert outcome.end_state == "complete"
    assert not any(key.startswith("downstream/") for key in reports[0])
    table_values = []
    for task in TASK_NAMES:
        assert final[f"downstream/{task}/examples"] == 5
        for metric in ("acc", "acc_norm"):
            value = final[f"downstream/{task}/{metric}"]
            # 5 examples: accuracies are multiples of 1/5.
            assert value * 5 == pytest.approx(round(value * 5))
        table_values.append(final[f"downstream/{task}/{DOWNSTREAM_COLUMNS[task][1]}"])
    assert final["downstream/average"] == pytest.approx(np.mean(table_values))
    assert final["time/final_eval_sec"] > 0


def test_cached_requests_reused_per_tokenizer(bpe, tmp_path):
    shards = TokenShards.load(bpe["shards_dir"])
    settings = {"tasks": ["piqa"], "dir": str(bpe["benchmarks"]), "max_examples": 3}

    def encoder():
        return shard_encoder(shards, TokenizerSpec("bpe", 300))

    def no_encoder():
        raise AssertionError("the cached requests should have been reused")

    first = prepare_downstream(settings, tmp_path, "shards-a", encoder)
    again = prepare_downstream(settings, tmp_path, "shards-a", no_encoder)
    other_tokenizer = prepare_downstream(settings, tmp_path, "shards-b", encoder)

    assert again == first
    assert other_tokenizer != first
    assert TaskRequests.load(first / "piqa.npz").gold.tolist() == [0, 1, 0]
    assert json.loads((first / "meta.json").read_text())["examples"] == {"piqa": 3}
    assert not list((tmp_path / "downstream").glob(".tmp-*"))


def test_pretrained_tokenizer_path(tmp_path):
    tokenizer = save_t5_sized_tokenizer(tmp_path / "t5")
    c4 = write_c4_shards(tmp_path / "c4", documents(20, seed=1), documents(6, seed=2))
    benchmarks = write_downstream_files(tmp_path / "benchmarks", 4, ["arc_easy"])
    data = {
        "source": "c4_local",
        "paths": [str(c4)],
        "tokenizer": "pretrained",
        "tokenizer_path": str(tokenizer),
        "seq_len": 64,
        "val_tokens": 200,
        "downstream": {"tasks": ["arc_easy"], "dir": str(benchmarks)},
    }

    prepared = LanguageModelWorkload.prepare(data, tmp_path / "cache")
    requests = TaskRequests.load(prepared["downstream_dir"] + "/arc_easy.npz")

    # The word tokenizer contains WORDS and maps "Question:" and "?" to <unk> (0).
    assert requests.requests == 16
    assert requests.tokens.max() < 32100
    assert (requests.continuation_len >= 2).all()


def _write(directory, task, records):
    directory.mkdir(exist_ok=True)
    lines = [json.dumps(record) for record in records]
    (directory / f"{task}.jsonl").write_text("\n".join(lines) + "\n")


def test_missing_file_names_the_expected_files(tmp_path):
    with pytest.raises(DataUnavailableError) as caught:
        load_examples("winogrande", tmp_path)
    message = str(caught.value)
    assert "winogrande.jsonl or winogrande.json or winogrande.parquet" in message
    assert "sentence, option1, option2, answer" in message


def test_record_that_does_not_fit_is_named(tmp_path):
    records = downstream_records("arc_challenge", 3)
    records[2]["answerKey"] = "E"
    _write(tmp_path, "arc_challenge", records)

    with pytest.raises(DataUnavailableError, match=r"record 3 of .*arc_challenge"):
        load_examples("arc_challenge", tmp_path)


def _drop_goal(records):
    del records[1]["goal"]


def _blank_choice(records):
    records[0]["choices"]["text"][2] = " "


def _fractional_label(records):
    records[0]["label"] = 0.7


def _extra_text(records):
    records[0]["choices"]["text"].append("spare")


def _one_choice(records):
    records[0]["choices"] = {"text": ["only"], "label": ["A"]}
    records[0]["answerKey"] = "A"


def _label_out_of_range(records):
    records[1]["label"] = "4"


def _empty_option(records):
    records[0]["option2"] = ""


def _blank_at_end(records):
    records[0]["sentence"] = "The cup fell because _"


def _repeated_label(records):
    records[0]["choices"]["label"] = ["A", "A", "B", "C"]


@pytest.mark.parametrize(
    ("task", "spoil", "record", "expected"),
    [
        ("piqa", _drop_goal, 2, "field 'goal' is missing or not text (found None)"),
        ("arc_easy", _blank_choice, 1, "has an empty answer choice (number 3)"),
        ("piqa", _fractional_label, 1, "field 'label' is 0.7; expected a whole"),
        ("openbookqa", _extra_text, 1, "has 5 texts and 4 labels"),
        ("arc_challenge", _one_choice, 1, "has 1 answer choice(s)"),
        ("hellaswag", _label_out_of_range, 2, "field 'label' is '4'; expected a whole"),
        ("winogrande", _empty_option, 1, "include an empty one"),
        ("winogrande", _blank_at_end, 1, "has nothing after the blank to score"),
        ("arc_easy", _repeated_label, 1, "repeats a label: ['A', 'A', 'B', 'C']"),
    ],
)
def test_bad_record_names_field(tmp_path, task, spoil, record, expected):
    records = downstream_records(task, 3)
    spoil(records)
    _write(tmp_path, task, records)

    with pytest.raises(DataUnavailableError) as caught:
        load_examples(task, tmp_path)

    message = str(caught.value)
    assert f"downstream task {task}: record {record} of " in message
    assert expected in message


def test_empty_file_is_named(tmp_path):
    (tmp_path / "piqa.jsonl").write_text("")

    with pytest.raises(DataUnavailableError, match=r"piqa.jsonl is empty"):
        load_examples("piqa", tmp_path)


def test_bad_json_line_is_named(tmp_path):
    lines = [json.dumps(r) for r in downstream_records("piqa", 3)]
    lines[1] = lines[1][:-1]
    (tmp_path / "piqa.jsonl").write_text("\n".join(lines) + "\n")

    with pytest.raises(DataUnavailableError, match=r"piqa.jsonl:2 is not valid JSON"):
        load_examples("piqa", tmp_path)


def test_two_files_for_one_task_are_rejected(tmp_path):
    write_downstream_files(tmp_path, 2, ["piqa"])
    (tmp_path / "piqa.json").write_text(json.dumps(downstream_records("piqa", 2)))

    with pytest.raises(DataUnavailableError, match="contains piqa.jsonl, piqa.json"):
        load_examples("piqa", tmp_path)


def test_edit_keeping_size_and_time_rebuilds(bpe, tmp_path):
    benchmarks = write_downstream_files(tmp_path / "benchmarks", 4, ["piqa"])
    path = benchmarks / "piqa.jsonl"
    shards = TokenShards.load(bpe["shards_dir"])
    settings = {"tasks": ["piqa"], "dir": str(benchmarks)}

    def encoder():
        return shard_encoder(shards, TokenizerSpec("bpe", 300))

    first = prepare_downstream(settings, tmp_path, "shards", encoder)
    stat = path.stat()
    path.write_text(path.read_text().replace('"label": 0', '"label": 1'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = prepare_downstream(settings, tmp_path, "shards", encoder)

    assert path.stat().st_size == stat.st_size
    assert second != first
    assert TaskRequests.load(first / "piqa.npz").gold.tolist() == [0, 1, 0, 1]
    assert TaskRequests.load(second / "piqa.npz").gold.tolist() == [1, 1, 1, 1]


def test_cut_requests_are_counted_and_reported(bpe, caplog):
    shards = TokenShards.load(bpe["shards_dir"])
    settings = {"tasks": ["hellaswag"], "dir": str(bpe["benchmarks"])}
    directory = prepare_downstream(
        settings,
        bpe["root"] / "cache",
        shards.directory.name,
        lambda: shard_encoder(shards, TokenizerSpec("bpe", 300)),
        seq_len=40,
    )
    requests = TaskRequests.load(directory / "hellaswag.npz")
    lengths = np.diff(requests.offsets)

    cut, answers = cut_requests(requests, 40)

    assert cut == int((lengths > 41).sum())
    assert answers == int((requests.continuation_len > 40).sum())
    assert cut == requests.requests
    assert f"{cut} of {requests.requests} requests are longer than" in caplog.text
    assert cut_requests(requests, 200) == (0, 0)


def test_missing_field_is_named(tmp_path):
    records = [
        {key: value for key, value in record.items() if key != "endings"}
        for record in downstream_records("hellaswag", 2)
    ]
    _write(tmp_path, "hellaswag", records)

    with pytest.raises(DataUnavailableError, match=r"no field\(s\) \['endings'\]"):
        load_examples("hellaswag", tmp_path)


def test_incomplete_request_cache_is_named(bpe, tmp_path):
    shards = TokenShards.load(bpe["shards_dir"])
    settings = {"tasks": ["piqa", "winogrande"], "dir": str(bpe["benchmarks"])}

    def encoder():
        return shard_encoder(shards, TokenizerSpec("bpe", 300))

    directory = prepare_downstream(settings, tmp_path, "shards", encoder)
    (directory / "winogrande.npz").unlink()

    with pytest.raises(DataUnavailableError) as caught:
        prepare_downstream(settings, tmp_path, "shards", encoder)

    assert f"requests in {directory} are incomplete" in str(caught.value)
    assert "(no winogrande.npz)" in str(caught.value)


def test_downstream_dir_must_be_a_folder(tmp_path):
    with pytest.raises(DataUnavailableError, match="is not a folder"):
        prepare_downstream(
            {"tasks": ["piqa"], "dir": str(tmp_path / "absent")},
            tmp_path,
            "shards",
            lambda: None,
        )


def test_every_task_has_one_table_column():
    titles = [title for title, _ in DOWNSTREAM_COLUMNS.values()]
    assert list(DOWNSTREAM_COLUMNS) == list(TASKS) == list(get_args(DownstreamTask))
    assert len(set(titles)) == len(titles) == 6
    assert {metric for _, metric in DOWNSTREAM_COLUMNS.values()} == {"acc", "acc_norm"}


def test_offline_hub_error_names_local_fix(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the variable once, at import, and earlier tests may
    # have imported them; offline mode fails at once instead of retrying.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    with pytest.raises(DataUnavailableError) as caught:
        load_examples("openbookqa", None, cache_dir=tmp_path)

    message = str(caught.value)
    assert "allenai/openbookqa (main) split test" in message
    assert "Set downstream.dir to a folder with openbookqa.jsonl" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_equal_cpu_scores(bpe):
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=320, seq_len=128).eval()
    requests = TaskRequests.load(bpe["requests"] / "winogrande.npz")
    cuda = torch.device("cuda")

    with torch.no_grad():
        on_cpu = request_log_likelihoods(model, requests, 128, 4, CPU)
        on_cuda = request_log_likelihoods(model.to(cuda), requests, 128, 4, cuda)

    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-3, atol=1e-3)
