"""The simulator drives the engine's own Scheduler: same requests, same steps as the real engine."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, EngineConfig
from engine.observer import StepComposition
from engine.scheduler import Scheduler, SchedulerConfig
from planner.costmodel.simulator import SimRequest, Simulator, per_position_acceptance, unique_prompts
from planner.measure.in_process import run_load
from planner.spec.workload import Workload

FIELDS = ("num_seqs", "num_prefill_seqs", "num_decode_seqs", "num_prefill_tokens",
          "num_decode_tokens", "context_tokens", "num_draft_tokens")


def _real_and_simulated(model_dir: str, config: dict, concurrency: int) -> tuple[list, list]:
    """Step compositions of a real closed-loop run and of its simulation."""
    workload = Workload.from_flags("20:90", "3:12", concurrency=1, num_requests=10)
    engine_config = EngineConfig(model=model_dir, dtype="float32", num_threads=1, **config)
    llm = LLM(engine_config)
    try:
        result = run_load(llm.engine, workload, "concurrency", concurrency, llm.engine.model_config.vocab_size)
        engine = llm.engine
        simulator = Simulator(lambda c, peers: 1e-3, SchedulerConfig.for_engine(engine_config, engine.max_model_len),
                              engine.block_manager.num_blocks, engine_config.block_size,
                              engine_config.enable_prefix_caching)
    finally:
        llm.close()
    rng = np.random.default_rng(workload.seed)
    requests = [SimRequest(tuple(workload.prompt_token_ids(s, 512, rng)), len(o.token_ids))
                for s, o in zip(result.specs, result.outputs)]
    simulated = simulator.run(requests, concurrency=concurrency, record=True).compositions
    real = [tuple(getattr(s, f) for f in FIELDS) for s in result.steps]
    return real, [tuple(getattr(c, f) for f in FIELDS) for c in simulated]


@pytest.mark.parametrize("config, concurrency", [
    ({}, 4),
    ({"max_num_batched_tokens": 64, "max_num_seqs": 3}, 5),  # chunked prefill, capped batch
    ({"enable_chunked_prefill": False, "max_num_batched_tokens": 512, "max_num_seqs": 2}, 3),
    ({"num_kv_blocks": 14, "block_size": 16}, 6),  # a cache too small: preemptions
])
def test_the_simulator_takes_the_engines_steps(model_dir, config, concurrency):
    real, simulated = _real_and_simulated(model_dir, config, concurrency)
    assert len(real) > 10
    assert simulated == real


def test_a_change_to_the_engines_batching_changes_the_simulation(model_dir, monkeypatch):
    """No second copy of scheduling logic: patch the engine's admission rule and the simulator
    follows it step for step."""
    before, _ = _real_and_simulated(model_dir, {}, 4)
    original = Scheduler._admit_waiting

    def one_at_a_time(self, out, budget, now):  # admit at most one new request per step
        cap = self.config.max_num_seqs
        self.config.max_num_seqs = min(cap, len(self.running) + 1)
        try:
            original(self, out, budget, now)
        finally:
            self.config.max_num_seqs = cap

    monkeypatch.setattr(Scheduler, "_admit_waiting", one_at_a_time)
    real, simulated = _real_and_simulated(model_dir, {}, 4)
    assert simulated == real
    assert real != before and max(step[1] for step in real) == 1  # one prefill per step now


def _simulator(step_s: float = 0.01, **kwargs) -> Simulator:
    config = SchedulerConfig(max_num_seqs=kwargs.pop("max_num_seqs", 8), max_num_batched_tokens=256,
                             max_model_len=512,
                             num_lookahead_tokens=kwargs.get("num_speculative_tokens", 0))
    return Simulator(lambda c, peers: step_s, config, num_kv_blocks=256, **kwargs)


def test_latencies_on_a_constant_step_time():
    # A 32-token prompt prefilled in one step (first token), then 4 decode steps.
    result = _simulator().run([SimRequest(tuple(range(32)), 5)], concurrency=1)
    latency = result.latencies[0]
    assert latency.ttft_s == pytest.approx(0.01)
    assert latency.e2e_s == pytest.approx(0.05)
    assert result.metrics()["itl_p50"] == pytest.approx(0.01)
    assert result.throughput_tok_s == pytest.approx(5 / 0.05)


def test_open_loop_waits_for_arrivals_and_queues_behind_a_busy_engine():
    requests = [SimRequest(tuple(range(1, 20)), 3, 0.0), SimRequest(tuple(range(2, 21)), 3, 1.0),
                SimRequest(tuple(range(3, 22)), 3, 1.005)]
    result = _simulator(max_num_seqs=1).run(requests)
    first, second, third = result.latencies
    assert first.ttft_s == pytest.approx(0.01)
    assert second.ttft_s == pytest.approx(0.01)  # the engine was idle: no wait
    # The third arrives mid-step of the second and waits for its 3 steps (max_num_seqs=1).
    assert third.ttft_s == pytest.approx(1.0 + 0.03 + 0.01 - 1.005)
    assert result.duration_s == pytest.approx(1.0 + 0.06)


def test_data_parallel_replicas_serve_side_by_side():
    requests = [SimRequest(tuple(range(i, i + 16)), 10) for i in range(2)]
    one = _simulator(max_num_seqs=1).run(requests, concurrency=2)
    two = _simulator(max_num_seqs=1, data_parallel_size=2).run(requests, concurrency=2)
    assert one.duration_s == pytest.approx(0.2)  # one after the other
    assert two.duration_s == pytest.approx(0.1)  # one on each replica


def test_a_replica_step_is_timed_knowing_how_many_peers_work_meanwhile():
    # Replicas share the machine: the step-time model is told how many other replicas are busy.
    peers_seen: list[int] = []
    sim = _simulator(max_num_seqs=1, data_parallel_size=2)
    sim.step_time = lambda c, peers: peers_seen.append(peers) or 0.01
    requests = [SimRequest(tuple(range(i, i + 16)), 10 * (i + 1)) for i in range(2)]
    sim.run(requests, concurrency=2)
    # Both work for the first request's 10 steps, then the second's replica is alone for 10.
    assert peers_seen.count(1) == 20 and peers_seen.count(0) == 10
    alone = _simulator(max_num_seqs=1, data_parallel_size=2)
    alone.step_time = lambda c, peers: peers_seen.append(peers) or 0.01
    peers_seen.clear()
    alone.run(requests, concurrency=1)  # one request at a time: a peer is never busy
    assert set(peers_seen) == {0}


@pytest.mark.parametrize("rate, tokens_per_step", [(1.0, 5), (0.0, 1)])
def test_speculative_decoding_accepts_at_the_given_rate(rate, tokens_per_step):
    sim = _simulator(num_speculative_tokens=4, acceptance_rate=rate)
    result = sim.run([SimRequest(tuple(range(16)), 41)], concurrency=1, record=True)
    decodes = [c for c in result.compositions if c.num_decode_seqs]
    assert all(c.num_draft_tokens == 4 for c in decodes[:-4])  # fewer near max_tokens
    # First token from the prefill, then tokens_per_step per verifying step.
    assert result.num_steps == 1 + -(-40 // tokens_per_step)


def test_acceptance_rate_matches_on_average():
    sim = _simulator(num_speculative_tokens=3, acceptance_rate=0.6, seed=1)
    result = sim.run([SimRequest(tuple(range(i, i + 8)), 200) for i in range(8)], concurrency=8,
                     record=True)
    drafted = sum(c.num_draft_tokens for c in result.compositions)
    produced = result.output_tokens - 8  # minus one token from each prefill
    verify_steps = sum(c.num_decode_seqs for c in result.compositions)
    accepted = produced - verify_steps
    assert accepted / drafted == pytest.approx(0.6, abs=0.05)


def test_per_position_acceptance_inverts_the_mean():
    for k in (1, 2, 4, 6):
        for rate in (0.1, 0.5, 0.84, 0.95):
            p = per_position_acceptance(rate, k)
            assert sum(p ** j for j in range(1, k + 1)) / k == pytest.approx(rate, abs=1e-9)


def test_kv_pressure_is_reported():
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512)
    sim = Simulator(lambda c, peers: 0.001, config, num_kv_blocks=12, block_size=16)
    result = sim.run([SimRequest(p, 40) for p in unique_prompts([60] * 6)], concurrency=6)
    assert result.kv_peak_fraction == pytest.approx(1.0, abs=0.1)
    assert result.num_preemptions > 0
    assert len(result.latencies) == 6 and all(lat.e2e_s > 0 for lat in result.latencies)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_speculative_tokens": 2}, "acceptance_rate"),
    ({"num_speculative_tokens": 2, "acceptance_rate": 1.5}, "acceptance_rate"),
    ({"data_parallel_size": 0}, "data_parallel_size"),
])
def test_bad_simulator_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _simulator(**kwargs)


def test_open_loop_needs_arrival_times():
    with pytest.raises(ValueError, match="arrival_s"):
        _simulator().run([SimRequest((1, 2, 3), 2)])


def test_step_time_sees_the_step_composition():
    seen: list[StepComposition] = []
    sim = Simulator(lambda c, peers: seen.append(c) or 0.001,
                    SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256), 64)
    sim.run([SimRequest(tuple(range(100)), 2)], concurrency=1)
    # 100 prompt tokens in chunks of 64: a partial prefill, the rest (first token), one decode.
    assert [(c.num_prefill_tokens, c.num_decode_tokens, c.context_tokens) for c in seen] == [
        (64, 0, 64), (36, 0, 100), (0, 1, 101)]
