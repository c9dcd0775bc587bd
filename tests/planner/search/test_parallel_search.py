"""Trials scored in forked worker processes come back as the same candidates a single process
would score: one per distinct deployment, cached in the parent, each with its prediction."""

from __future__ import annotations

import json

import pytest
from support.synthetic_cost_model import synthetic_cost_model

from planner.search.parallel import Evaluator
from planner.search.recommend import run_search
from planner.search.request import RecommendRequest
from planner.store.database import Store

# GPU trials are priced from the measured kernels (the test extra installs them).
pytest.importorskip("aiconfigurator_core")

SMALL_LLAMA = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
               "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}


@pytest.fixture
def search(tmp_path):
    model = tmp_path / "small"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMALL_LLAMA))
    store = Store(f"sqlite:///{tmp_path / 'pilot.db'}")
    request = RecommendRequest(model=model, slo="ttft_p95<=2s,itl_p95<=100ms", rate=2.0, isl="64:256",
                               osl="16:64", num_requests=16, hardware=("h100-sxm", "l40s"), trials=6)
    return request.search(store, synthetic_cost_model(store))


def test_workers_score_what_one_process_scores(search):
    points = [("h100-sxm", dict(p), False) for p in ({**_first(search, "h100-sxm"), "max_num_seqs": n}
                                                     for n in (16, 64))]
    with Evaluator(search, workers=2) as parallel:
        scored = parallel.evaluate(points)
    assert [c.prediction is not None for c in scored] == [True, True]
    assert all(search.is_cached(*job) for job in points)
    again = search.evaluate(*points[0])  # the parent's cache holds the workers' candidate
    assert again is scored[0]


def test_a_search_with_two_workers_finds_a_plan(search):
    result = run_search(search, trials=6, workers=2)
    assert result.trials == 6 and result.candidates
    assert result.best.prediction is not None and result.best.prediction.basis


def _first(search, hardware):
    space = search.spaces[hardware]
    return {k: space.values(k)[0] for k in space.knobs}
