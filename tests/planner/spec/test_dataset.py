"""Real traffic from ShareGPT-format conversations: prompts and reply lengths counted by the
model's tokenizer, paired as recorded, filtered, seeded; every turn with its history when asked;
a file cut off mid-record read up to its last whole record."""

from __future__ import annotations

import json
import shutil

import pytest
from support.gguf_files import train_tokenizer
from tokenizers import Tokenizer

from planner.spec.dataset import DatasetError, DatasetSource, conversations, dataset_requests
from planner.spec.workload import ClosedLoopArrival, Workload, WorkloadError

QUESTIONS = ["How do I read a file in Python?", "你好，请介绍一下你自己。", "Write a haiku 😀 about the sea",
             "What is 12345 * 678?", "Explain os.path.join in detail, with examples."]


def _conversation(i: int, turns: int = 2) -> dict:
    messages = []
    for t in range(turns):
        messages.append({"from": "human", "value": f"{QUESTIONS[(i + t) % len(QUESTIONS)]} (case {i}, turn {t})"})
        messages.append({"from": "gpt", "value": "Sure. " * (3 + (i * 7 + t) % 40) + "Done."})
    return {"id": str(i), "conversations": messages}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharegpt")
    model = root / "model"
    model.mkdir()
    shutil.copy(train_tokenizer(512, root), model / "tokenizer.json")
    text = json.dumps([_conversation(i) for i in range(60)], ensure_ascii=False, indent=1)
    data = root / "sharegpt.json"
    data.write_text(text[: len(text) - 200], encoding="utf-8")  # cut off inside the last record
    return model, data


def _source(files, **fields) -> DatasetSource:
    model, data = files
    return DatasetSource(tokenizer=str(model), path=str(data), **fields)


def test_a_cut_off_file_is_read_up_to_its_last_whole_record(files):
    records = list(conversations(files[1]))
    assert len(records) == 59 and records[0][0] == ("human", "How do I read a file in Python? (case 0, turn 0)")


def test_requests_are_the_recorded_prompts_and_reply_lengths(files):
    tokenizer = Tokenizer.from_file(str(files[0] / "tokenizer.json"))
    records = list(conversations(files[1]))
    for request in dataset_requests(_source(files), seed=0)[:20]:
        human, reply = records[request.conversation][0][1], records[request.conversation][1][1]
        assert list(request.prompt_token_ids) == tokenizer.encode(human).ids
        assert request.output_tokens == len(tokenizer.encode(reply).ids) and request.turn == 0


def test_the_order_is_seeded_and_the_filters_hold(files):
    first, again, other = (dataset_requests(_source(files), seed) for seed in (0, 0, 1))
    assert first == again and [r.conversation for r in first] != [r.conversation for r in other]
    narrow = dataset_requests(_source(files, max_output_tokens=30, min_input_tokens=12), seed=0)
    assert narrow and all(r.output_tokens <= 30 and len(r.prompt_token_ids) >= 12 for r in narrow)
    assert len(narrow) < len(first)
    with pytest.raises(DatasetError, match="no ShareGPT request passes the filters"):
        dataset_requests(_source(files, min_output_tokens=900), seed=0)


def test_every_turn_carries_the_conversation_so_far(files):
    tokenizer = Tokenizer.from_file(str(files[0] / "tokenizer.json"))
    requests = dataset_requests(_source(files, turns="all"), seed=0)
    second = next(r for r in requests if r.turn == 1)
    first = next(r for r in requests if r.conversation == second.conversation and r.turn == 0)
    reply = list(conversations(files[1]))[second.conversation][1][1]
    history = list(first.prompt_token_ids) + tokenizer.encode(reply).ids
    assert list(second.prompt_token_ids[:len(history)]) == history  # what prefix caching reuses


def test_a_workload_samples_the_requests_paired_and_sends_their_prompts(files):
    source = _source(files)
    workload = Workload.from_dataset(source, ClosedLoopArrival(concurrency=2), num_requests=80, seed=0)
    pool = dataset_requests(source, 0)
    specs = workload.sample()
    assert len(specs) == 80 and len(pool) < 80  # cycles through the pool
    for spec in specs:
        request = pool[spec.index % len(pool)]
        assert (spec.input_tokens, spec.output_tokens) == (len(request.prompt_token_ids), request.output_tokens)
        assert workload.prompt_token_ids(spec, 512, None) == list(request.prompt_token_ids)
    assert "ShareGPT first turns" in workload.describe() and "input mean" in workload.describe()


def test_a_workload_file_with_a_dataset_round_trips(files, tmp_path):
    workload = Workload.from_dataset(_source(files, turns="all"), ClosedLoopArrival(concurrency=1), 30, seed=3)
    path = tmp_path / "w.yaml"
    path.write_text(workload.to_yaml())
    again = Workload.from_file(path)
    assert again == workload and again.sample() == workload.sample()


def test_bad_names_and_models_are_named(files, tmp_path):
    with pytest.raises(WorkloadError, match=r"'sharegtp': no such file, nor a data set \(sharegpt, "):
        Workload.from_name_or_file("sharegtp", files[0])
    with pytest.raises(WorkloadError, match="needs a model"):
        Workload.from_name_or_file("sharegpt", None)
    with pytest.raises(DatasetError, match="has no tokenizer.json; real traffic needs a model with a real"):
        dataset_requests(DatasetSource(tokenizer=str(tmp_path), path=str(files[1])), 0)
    with pytest.raises(ValueError, match="min_input_tokens 50 > max_input_tokens 10"):
        DatasetSource(tokenizer="x", min_input_tokens=50, max_input_tokens=10)
    with pytest.raises(DatasetError, match="dataset.path: no such file"):
        dataset_requests(DatasetSource(tokenizer=str(files[0]), path=str(tmp_path / "none.json")), 0)
