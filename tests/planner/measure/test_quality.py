"""What a weight quantization costs in perplexity, on held-out text no workload sends: the
perplexity matches transformers' on the same model and text, each scheme is measured once per
model and stored, and the held-out conversations never become requests."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sqlalchemy import func, select
from support.gguf_files import tiny_with_tokenizer

from engine import LLM, EngineConfig
from engine.model_zoo import make_checkpoint
from planner.measure.quality import measure_quality, perplexity, stored_quality, valid_schemes
from planner.spec.dataset import HELD_OUT_EVERY, DatasetSource, dataset_requests, heldout_texts
from planner.store.database import QualityRow, Store

transformers = pytest.importorskip("transformers")


def _conversation(i: int) -> dict:
    reply = " ".join(f"word{(i * 7 + j) % 50} is number {j}." for j in range(40))
    return {"id": str(i), "conversations": [{"from": "human", "value": f"Tell me about item {i}."},
                                             {"from": "gpt", "value": reply}]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_with_tokenizer(tmp_path_factory.mktemp("quality"))


@pytest.fixture
def sharegpt(tmp_path, monkeypatch):
    """A ShareGPT-format file in the dataset cache, standing where the fetched one would."""
    monkeypatch.setenv("PILOT_DATASET_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "datasets").mkdir()
    path = tmp_path / "datasets" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    path.write_text(json.dumps([_conversation(i) for i in range(400)]))
    return path


def test_perplexity_matches_transformers(model):
    ids = [[(i * 13 + j * 7) % 500 + 5 for j in range(60)] for i in range(3)]
    with LLM(EngineConfig(model=str(model), dtype="float32", num_threads=1)) as llm:
        ours, tokens = perplexity(llm, ids)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for text in ids:
            logits = reference(torch.tensor([text])).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(text[1:]), reduction="sum"))
    assert tokens == 3 * 59 and ours == pytest.approx(math.exp(total / tokens), rel=1e-4)


def test_each_scheme_is_measured_once_and_stored(model, sharegpt, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'q.db'}")
    assert valid_schemes(str(model)) == [("int8", 0), ("int4", 32), ("int4", 64)]  # 64 features: no g128
    first = measure_quality(store, str(model))
    assert {(q.quantization, q.group_size) for q in first} == set(valid_schemes(str(model)))
    assert all(math.isfinite(q.perplexity) and q.reference_perplexity > 1 for q in first)
    assert abs(next(q for q in first if q.quantization == "int8").loss) < 0.05
    again = measure_quality(store, str(model))
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(QualityRow)) == len(first)
    assert sorted(again, key=lambda q: q.scheme) == sorted(first, key=lambda q: q.scheme)
    assert stored_quality(store, str(model)) == again


def test_held_out_conversations_are_never_requests(model, sharegpt):
    requests = dataset_requests(DatasetSource(tokenizer=str(model)), seed=0)
    assert requests and all(r.conversation % HELD_OUT_EVERY != HELD_OUT_EVERY - 1 for r in requests)
    texts = heldout_texts(str(model), count=5, max_tokens=100)
    assert len(texts) == 5 and all(64 <= len(t) <= 100 for t in texts)


def test_a_model_without_a_tokenizer_is_named(tmp_path):
    bare = make_checkpoint("tiny", tmp_path / "bare", seed=0, dtype="float32")
    with pytest.raises(ValueError, match="has no tokenizer.json; quality is measured on real text"):
        measure_quality(Store(f"sqlite:///{tmp_path / 'q.db'}"), str(bare))
