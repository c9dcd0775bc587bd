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
from typer.testing import CliRunner

from engine import LLM, EngineConfig
from engine.model_zoo import make_checkpoint
from planner.cli import app
from planner.measure.quality import (
    GGUF_TYPES,
    measure_quality,
    perplexity,
    stored_quality,
    valid_gguf_types,
    valid_schemes,
)
from planner.search.request import RecommendRequest
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


def test_gguf_formats_are_measured_on_request_and_never_planned(model, sharegpt, tmp_path):
    """With gguf=True each llama.cpp block format is written, read back and measured, once; the
    finer formats lose less; a search's quality bound sees only the engine's own schemes."""
    store = Store(f"sqlite:///{tmp_path / 'q.db'}")
    engine_only = measure_quality(store, str(model))
    assert all(q.in_engine for q in engine_only)
    assert valid_gguf_types(str(model)) == list(GGUF_TYPES)
    both = measure_quality(store, str(model), gguf=True)
    formats = {q.scheme: q for q in both if not q.in_engine}
    assert set(formats) == {f"GGUF {t}" for t in GGUF_TYPES}
    assert all(q.group_size == 32 and q.reference_perplexity == engine_only[0].reference_perplexity
               for q in formats.values())
    assert abs(formats["GGUF Q8_0"].loss) < formats["GGUF Q4_0"].loss
    assert formats["GGUF Q5_1"].loss < formats["GGUF Q4_1"].loss
    # Q8_0 keeps a scale per 32 weights, the engine's int8 one per row: both near lossless.
    assert abs(formats["GGUF Q8_0"].loss) < 0.05
    assert len(measure_quality(store, str(model), gguf=True)) == len(both)  # stored, not measured again
    request = RecommendRequest(model=model, slo="ttft_p95<=1s", rate=1.0, max_quality_loss=1.0)
    limit = request.quality_limit(store)
    assert limit is not None and {q.scheme for q in limit.measured} == {q.scheme for q in engine_only}


def test_profile_prints_the_quality_table_with_gguf_formats(model, sharegpt, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: one\nknobs:\n  max_num_seqs: [2]\nfixed:\n  dtype: float32\n  num_threads: 1\n"
                     "load:\n  kind: concurrency\n  levels: [1]\n")
    db = f"sqlite:///{tmp_path / 'p.db'}"
    args = ["profile", "--model", str(model), "--space", str(space), "--isl", "8", "--osl", "4",
            "--num-requests", "2", "--max-runs", "1", "--db", db]
    result = CliRunner().invoke(app, [*args, "--quality-gguf"], terminal_width=200)
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index("perplexity on held-out"):]
    rows = [line for line in table.splitlines() if "%" in line]
    assert [row.split()[1] for row in rows] == ["int4", "int4", "int8", "GGUF", "GGUF", "GGUF", "GGUF", "GGUF"]
    with Store(db).session() as session:
        assert session.scalar(select(func.count()).select_from(QualityRow)) == 8
