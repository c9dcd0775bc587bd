"""Data parallelism: replicas in their own processes behind one front, tested end to end."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.core.client import _Tracked
from engine.llm_engine import InvalidRequestError
from engine.parallel.data_parallel import DataParallelEngine, replica_configs
from engine.sequence import RequestMetrics
from engine.tokenizer import IncrementalDetokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def dp(model_dir):
    with LLM(EngineConfig(model=model_dir, dtype="float32", data_parallel_size=2, num_threads=2)) as llm:
        yield llm


def test_replicas_share_the_work_and_match_one_engine(dp, model_dir):
    prompts = [list(range(300, 300 + n)) for n in (5, 40, 90, 17, 33, 8)]
    single = LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=1))
    expected = [o.token_ids for o in single.generate(prompts, GREEDY)]
    stats = []
    dp.engine.add_step_observer(stats.append)
    outs = dp.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert {s.replica for s in stats} == {0, 1}  # both replicas ran steps
    assert not dp.engine.requests


def test_bad_input_is_refused_by_name_and_the_front_keeps_serving(dp):
    with pytest.raises(InvalidRequestError) as err:
        dp.generate([[99999]], GREEDY)
    assert err.value.field == "prompt_token_ids[0]"
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        dp.generate(["x" * 5000], GREEDY)
    assert len(dp.generate(["still here"], GREEDY)[0].token_ids) == 12


def test_adding_a_request_never_waits_for_a_busy_replica(dp):
    """A replica reads new requests between steps; a front that waited for its reply would stall
    every other replica (and the server) for a step per request, and trickle prefills in one by
    one, which the planner's simulator does not do. A stopped replica is the busiest there is."""
    engine = dp.engine
    stopped = engine._cores[0].process.pid
    os.kill(stopped, signal.SIGSTOP)
    try:
        start = time.perf_counter()
        ids = [engine.add_request(None, [5, 6, 7, i + 10], GREEDY) for i in range(4)]
        assert time.perf_counter() - start < 1.0
    finally:
        os.kill(stopped, signal.SIGCONT)
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == set(ids)


def test_the_front_refuses_what_a_replica_would(model_dir):
    """A replica whose KV cache holds fewer tokens than the model's positions lowers its
    max_model_len; the front takes the replicas' limit, so it refuses such a prompt itself."""
    config = EngineConfig(model=model_dir, dtype="float32", data_parallel_size=2, num_threads=2,
                          num_kv_blocks=8)
    with LLM(config) as llm:
        assert llm.engine.max_model_len == 8 * config.block_size < llm.engine.model_config.max_position_embeddings
        with pytest.raises(InvalidRequestError, match="max_model_len=128") as err:
            llm.engine.add_request(None, list(range(1, 140)), GREEDY)
        assert err.value.field == "prompt_token_ids"
        assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 12


def test_a_replica_refusing_a_request_finishes_it_rather_than_the_front(dp):
    """The front validates first, so this takes a request sent around the front."""
    engine = dp.engine
    engine._cores[1].conn.send(("add", ("around", [99999], GREEDY, time.perf_counter(), 0)))
    engine.requests["around"] = _Tracked(1, None, [99999], IncrementalDetokenizer(engine.tokenizer),
                                         RequestMetrics(arrival_time=time.perf_counter()))
    engine._cores[1].outstanding.add("around")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("around", "abort")]
    assert len(dp.generate(["still serving"], GREEDY)[0].token_ids) == 12


def test_abort_stream_and_score(dp):
    engine = dp.engine
    request_id = engine.add_request(None, "a long one", SamplingParams(max_tokens=500, ignore_eos=True))
    engine.abort_request(request_id)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.finish_reason for o in finished if o.request_id == request_id] == ["abort"]
    tokens = list(dp.stream("stream me", SamplingParams(temperature=0, max_tokens=6)))
    assert len(tokens) == 6 and tokens[-1].finish_reason == "length"
    logits = dp.score([1, 2, 3, 4])
    assert logits.shape == (4, 512)


def test_replica_configs_divide_threads_and_memory(model_dir):
    config = EngineConfig(model=model_dir, data_parallel_size=2, num_threads=4, seed=3)
    first, second = replica_configs(config)
    assert first.num_threads == second.num_threads == 2
    assert first.data_parallel_size == second.data_parallel_size == 1
    assert first.kv_cache_memory_bytes == second.kv_cache_memory_bytes > 0
    assert (first.seed, second.seed) == (3, 4)
    fixed = replica_configs(config.model_copy(update={"num_kv_blocks": 50}))
    assert all(c.num_kv_blocks == 50 and c.kv_cache_memory_bytes is None for c in fixed)


def test_a_replica_that_cannot_start_is_reported(tmp_path):
    with pytest.raises(Exception, match="missing file|not found"):
        DataParallelEngine(EngineConfig(model=str(tmp_path), data_parallel_size=2))


def test_closing_stops_the_replicas(model_dir):
    llm = LLM(EngineConfig(model=model_dir, dtype="float32", data_parallel_size=2, num_threads=2))
    processes = [r.process for r in llm.engine._cores]
    llm.close()
    assert all(p.poll() is not None for p in processes)
