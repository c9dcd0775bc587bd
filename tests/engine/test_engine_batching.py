"""Continuous batching on the real model: batching must not change what a request generates.

The reference is every request run alone on an engine without prefix caching. Each batching
configuration (chunked prefill, prefix-cache hits, preemption from a tiny KV cache, no chunked
prefill, the priority policy) must reproduce it token for token, and give every KV block back.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, EngineConfig, RequestOutput, SamplingParams, StepStats, StreamToken

VOCAB = 512
EOS = 257


def make_llm(model_dir: str, **kwargs) -> LLM:
    # One thread: the tiny model gains nothing from more, and the test machine is shared.
    kwargs.setdefault("num_threads", 1)
    return LLM(EngineConfig(model=model_dir, dtype="float32", device="cpu", **kwargs))


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    common = [rng.randrange(VOCAB) for _ in range(70)]

    def rand(n: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(n)]

    dup = rand(33)  # 2 full blocks + 1: a cache hit leaves exactly the last token to compute
    return [
        rand(5),
        rand(120),
        rand(37),
        common + rand(20),
        rand(17),
        common + rand(10),
        common + rand(30),
        rand(50),
        dup,
        list(dup),
    ]


PROMPTS = _prompts()
MAX_TOKENS = [3, 20, 1, 12, 8, 16, 5, 10, 6, 7]
SEEDED = {4: 11, 7: 12}  # index -> seed: sampled requests whose output must not depend on the batch
PRIORITIES = [3, 0, 7, 1, 5, 2, 0, 9, 4, 4]


def _params() -> list[SamplingParams]:
    params = []
    for i, m in enumerate(MAX_TOKENS):
        if i in SEEDED:
            params.append(SamplingParams(temperature=0.8, seed=SEEDED[i], max_tokens=m, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=i % 2 == 0))
    return params


PARAMS = _params()


@pytest.fixture(scope="module")
def reference(model_dir) -> list[RequestOutput]:
    """Every request alone, each in a fresh generate call, no prefix caching."""
    llm = make_llm(model_dir, enable_prefix_caching=False)
    outs = [llm.generate(p, sp)[0] for p, sp in zip(PROMPTS, PARAMS)]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    return outs


def run_batch(llm: LLM, prompts=PROMPTS, params=PARAMS, priorities=None,
              prefix: str = "r") -> list[RequestOutput]:
    """Add every request up front, then step the engine until all are done."""
    engine = llm.engine
    ids = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        prio = priorities[i] if priorities is not None else 0
        ids.append(engine.add_request(f"{prefix}{i}", p, sp, priority=prio))
    results: dict[str, RequestOutput] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.request_id not in results
                results[out.request_id] = out
    else:
        pytest.fail("the engine did not finish")
    return [results[i] for i in ids]


def spy_schedule(llm: LLM) -> list[list[tuple[str, int, int, bool]]]:
    """Record (request_id, start, num_new_tokens, samples) of every scheduled item, per step."""
    sched = llm.engine.scheduler
    original = sched.schedule
    records: list[list[tuple[str, int, int, bool]]] = []

    def schedule(now: float = 0.0):
        out = original(now)
        records.append([(it.seq.request_id, it.start, it.num_new_tokens, it.samples)
                        for it in out.scheduled])
        return out

    sched.schedule = schedule
    return records


def assert_no_leak(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.requests
    assert not llm.engine.has_unfinished_requests()


def assert_same_tokens(outs: list[RequestOutput], ref: list[RequestOutput]) -> None:
    assert len(outs) == len(ref)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.token_ids == r.token_ids, f"request {i} (prompt {len(PROMPTS[i])} tokens) differs"
        assert o.finish_reason == r.finish_reason
        assert o.text == r.text
        assert o.finished


# -- the reference itself -----------------------------------------------------------------------


def test_reference_is_sane(reference):
    for i, r in enumerate(reference):
        assert r.prompt_token_ids == PROMPTS[i]
        assert 1 <= len(r.token_ids) <= MAX_TOKENS[i]
        if PARAMS[i].ignore_eos:
            assert len(r.token_ids) == MAX_TOKENS[i] and r.finish_reason == "length"
        assert all(0 <= t < VOCAB for t in r.token_ids)
        assert r.metrics.num_cached_prompt_tokens == 0
    # Different prompts give different continuations: the comparison below is not vacuous.
    assert len({tuple(r.token_ids) for r in reference if len(r.token_ids) >= 5}) >= 5
    # The two identical prompts with identical (greedy) params agree with each other.
    assert reference[8].token_ids == reference[9].token_ids[:MAX_TOKENS[8]]


# -- batched == one at a time -------------------------------------------------------------------

VARIANTS = {
    "default": dict(),
    "chunked_prefill_16": dict(max_num_batched_tokens=16),
    "chunked_prefill_7_block_8": dict(max_num_batched_tokens=7, block_size=8),
    "max_num_seqs_2": dict(max_num_seqs=2),
    "preemption_tiny_cache": dict(num_kv_blocks=10, max_model_len=160),
    "preemption_tiny_cache_no_prefix_caching": dict(num_kv_blocks=10, max_model_len=160,
                                                    max_num_batched_tokens=32,
                                                    enable_prefix_caching=False),
    "preemption_chunked": dict(num_kv_blocks=20, block_size=8, max_model_len=160,
                               max_num_batched_tokens=24),
    "no_chunked_prefill": dict(enable_chunked_prefill=False, max_model_len=160,
                               max_num_batched_tokens=160),
    "priority": dict(scheduling_policy="priority", max_num_seqs=3),
    "priority_preemption": dict(scheduling_policy="priority", num_kv_blocks=10, max_model_len=160),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_generation_matches_one_at_a_time(model_dir, reference, variant):
    kwargs = VARIANTS[variant]
    llm = make_llm(model_dir, **kwargs)
    records = spy_schedule(llm)
    priorities = PRIORITIES if kwargs.get("scheduling_policy") == "priority" else None
    outs = run_batch(llm, priorities=priorities)
    assert_same_tokens(outs, reference)
    assert_no_leak(llm)

    sched, bm = llm.engine.scheduler, llm.engine.block_manager
    items = [it for step in records for it in step]
    budget = kwargs.get("max_num_batched_tokens", 2048)
    assert all(sum(n for _, _, n, _ in step) <= budget for step in records)
    assert all(len(step) <= kwargs.get("max_num_seqs", 64) for step in records)
    # More than one request ran in some step: this is really batched.
    assert max(len(step) for step in records) >= 2

    split = any(n > 1 and not samples for _, _, n, samples in items)
    if variant.startswith("chunked_prefill"):
        assert split, "no prompt was split across steps"
    if variant == "no_chunked_prefill":
        assert not split, "a prompt was split with enable_chunked_prefill=False"
        assert all(samples for _, _, _, samples in items)
    if "preemption" in variant:
        assert sched.num_preemptions > 0
        assert sum(o.metrics.num_preemptions for o in outs) == sched.num_preemptions
    else:
        assert sched.num_preemptions == 0
    if kwargs.get("enable_prefix_caching", True) and variant != "default":
        # Requests admitted in later steps reuse the shared prefix (or the duplicate prompt).
        assert bm.num_prefix_hits > 0
    if variant == "priority":
        first = [rid for rid, *_ in records[0]]
        assert first == ["r1", "r6", "r3"]  # priorities 0, 0 (later arrival), 1
    for o, p in zip(outs, PROMPTS):
        m = o.metrics
        assert m.first_token_time is not None and m.finished_time is not None
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert len(m.token_times) == len(o.token_ids)
        assert m.num_cached_prompt_tokens <= len(p) - 1 or m.num_preemptions > 0


def test_prefix_cache_hits_on_a_warm_engine_give_the_same_tokens(model_dir, reference):
    llm = make_llm(model_dir)
    bm = llm.engine.block_manager
    first = run_batch(llm, prefix="cold")
    assert_same_tokens(first, reference)
    hits_before = bm.num_prefix_hits
    second = run_batch(llm, prefix="warm")
    assert_same_tokens(second, reference)
    assert bm.num_prefix_hits > hits_before
    for i, o in enumerate(second):
        p = len(PROMPTS[i])
        if p > 16:
            # Every full block of a prompt seen before hits, except the one holding the last token.
            assert o.metrics.num_cached_prompt_tokens == (p - 1) // 16 * 16, i
    assert second[9].metrics.num_cached_prompt_tokens == 32  # 33-token prompt: last token recomputed
    assert_no_leak(llm)


def test_generate_all_at_once_through_the_llm_api(model_dir, reference):
    llm = make_llm(model_dir, max_num_batched_tokens=32)
    outs = llm.generate(PROMPTS, PARAMS)
    assert_same_tokens(outs, reference)
    assert_no_leak(llm)


# -- aborts -------------------------------------------------------------------------------------


def test_abort_midway_frees_blocks_and_leaves_the_rest_unchanged(model_dir, reference):
    llm = make_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=16)
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS)):
        engine.add_request(f"r{i}", p, sp)
    finished: dict[str, RequestOutput] = {}
    sched = engine.scheduler
    for _ in range(40):  # step until one request is mid-prefill, one decoding, one waiting
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        mid_prefill = [s for s in sched.running if s.is_prefill and s.num_computed_tokens > 0]
        decoding = [s for s in sched.running if not s.is_prefill]
        if mid_prefill and decoding and sched.waiting:
            break
    else:
        pytest.fail("never had a request mid-prefill, one decoding and one waiting at once")
    victims = [mid_prefill[0].request_id, decoding[0].request_id, sched.waiting[-1].request_id]
    for rid in victims:
        out = engine.abort_request(rid)
        assert out is not None and out.request_id == rid
        assert out.finished and out.finish_reason == "abort"
    assert engine.abort_request(victims[0]) is None  # already gone
    assert engine.abort_request("no-such-request") is None
    used = engine.block_manager.num_used_blocks
    assert used == sum(len(s.block_table) for s in sched.running)

    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert not set(victims) & set(finished)
    assert len(finished) == len(PROMPTS) - len(victims)
    for rid, out in finished.items():
        assert out.token_ids == reference[int(rid[1:])].token_ids, rid
    assert_no_leak(llm)


def test_abort_everything_with_a_tiny_cache_leaks_nothing(model_dir):
    llm = make_llm(model_dir, num_kv_blocks=10, max_model_len=160, max_num_batched_tokens=16)
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS)):
        engine.add_request(f"r{i}", p, sp)
    for _ in range(6):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    for i in range(len(PROMPTS)):
        engine.abort_request(f"r{i}")
    assert_no_leak(llm)
    # And the engine still serves.
    out = llm.generate(PROMPTS[0], PARAMS[0])[0]
    assert len(out.token_ids) == MAX_TOKENS[0]


# -- step observer ------------------------------------------------------------------------------

OBS_PROMPTS = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[5], PROMPTS[6]]
OBS_PARAMS = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (4, 9, 1, 6, 3, 7)]


@pytest.mark.parametrize("budget", [2048, 16])
def test_step_observer_counts_are_consistent(model_dir, budget):
    # Prompt lengths with (P - 1) % 16 != 0, so a cache hit always leaves >= 2 tokens to prefill.
    assert all((len(p) - 1) % 16 for p in OBS_PROMPTS)
    llm = make_llm(model_dir, max_num_batched_tokens=budget, max_num_seqs=8)
    stats: list[StepStats] = []
    llm.engine.add_step_observer(stats.append)
    for round_ in range(2):  # the second round hits the prefix cache
        stats.clear()
        steps_before = llm.engine.step_count
        outs = llm.generate(OBS_PROMPTS, OBS_PARAMS)
        assert len(stats) == llm.engine.step_count - steps_before
        assert [s.step for s in stats] == list(range(steps_before, llm.engine.step_count))

        cached = sum(o.metrics.num_cached_prompt_tokens for o in outs)
        if round_ == 1:
            assert cached > 0
        prompt_work = sum(len(p) for p in OBS_PROMPTS) - cached
        decode_work = sum(len(o.token_ids) - 1 for o in outs)  # the last token is never fed back
        assert sum(s.num_batched_tokens for s in stats) == prompt_work + decode_work
        if budget >= max(len(p) for p in OBS_PROMPTS):  # no prompt is split
            assert sum(s.num_prefill_tokens for s in stats) == prompt_work
            assert sum(s.num_decode_tokens for s in stats) == decode_work
            assert sum(s.num_prefill_seqs for s in stats) == len(OBS_PROMPTS)
        assert sum(s.num_finished for s in stats) == len(OBS_PROMPTS)
        assert stats[-1].num_running == stats[-1].num_waiting == 0
        assert all(s.num_preempted == 0 for s in stats)
        for s in stats:
            assert s.duration_s > 0 and 0 < s.forward_s <= s.duration_s
            assert s.num_seqs == s.num_prefill_seqs + s.num_decode_seqs > 0
            assert s.num_decode_tokens == s.num_decode_seqs
            assert s.num_prefill_tokens >= 2 * s.num_prefill_seqs
            assert 0 < s.num_batched_tokens <= budget
            assert s.context_tokens >= s.num_batched_tokens
            assert s.kv_blocks_total == llm.engine.block_manager.num_blocks
            assert 0 <= s.kv_blocks_used <= s.kv_blocks_total
            assert s.num_running <= 8
            assert set(s.to_dict()) >= {"step", "duration_s", "num_prefill_tokens"}
        assert all(a.start_time < b.start_time for a, b in zip(stats, stats[1:]))
        assert stats[-1].kv_blocks_used == 0


# -- streaming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Hello, world", PROMPTS[3]])
def test_stream_yields_one_token_per_generated_token(model_dir, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = make_llm(model_dir)
    expected = llm.generate(prompt, params)[0]
    tokens = list(llm.stream(prompt, params))
    assert all(isinstance(t, StreamToken) for t in tokens)
    assert [t.token_id for t in tokens] == expected.token_ids
    assert len(tokens) == 24
    assert "".join(t.text for t in tokens) == expected.text
    assert expected.text  # the comparison above is about real text
    assert [t.finish_reason for t in tokens] == [None] * 23 + ["length"]
    assert_no_leak(llm)


def test_stream_closed_early_aborts_the_request(model_dir):
    llm = make_llm(model_dir)
    stream = llm.stream(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    first = [next(stream) for _ in range(3)]
    assert len(first) == 3 and llm.engine.block_manager.num_used_blocks > 0
    stream.close()
    assert_no_leak(llm)


# -- sampling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return make_llm(model_dir)


SAMPLE_PROMPT = PROMPTS[2]


def test_same_seed_same_tokens_different_seed_different_tokens(llm):
    def sample(seed: int) -> list[int]:
        return llm.generate(SAMPLE_PROMPT, SamplingParams(temperature=1.0, seed=seed, max_tokens=16,
                                                          ignore_eos=True))[0].token_ids
    a1, a2, b = sample(1), sample(1), sample(2)
    assert a1 == a2
    assert a1 != b
    greedy = llm.generate(SAMPLE_PROMPT, SamplingParams(temperature=0.0, max_tokens=16,
                                                        ignore_eos=True))[0].token_ids
    assert a1 != greedy  # temperature 1 on a near-uniform random model really samples


def test_top_k_1_and_tiny_top_p_equal_greedy(llm):
    greedy = llm.generate(SAMPLE_PROMPT, SamplingParams(temperature=0.0, max_tokens=16,
                                                        ignore_eos=True))[0].token_ids
    for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True),
                   SamplingParams(temperature=0.7, top_k=1, seed=3, max_tokens=16, ignore_eos=True),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=16, ignore_eos=True),
                   SamplingParams(temperature=2.0, top_p=1e-6, top_k=50, seed=9, max_tokens=16,
                                  ignore_eos=True)):
        assert llm.generate(SAMPLE_PROMPT, params)[0].token_ids == greedy, params


def test_top_k_restricts_to_the_k_most_likely_tokens(llm):
    # Teacher-forced check: each sampled token is among the top-3 of the logits at its position.
    params = SamplingParams(temperature=5.0, top_k=3, seed=4, max_tokens=12, ignore_eos=True)
    out = llm.generate(SAMPLE_PROMPT, params)[0].token_ids
    logits = llm.score(SAMPLE_PROMPT + out[:-1])
    n = len(SAMPLE_PROMPT)
    for j, token in enumerate(out):
        top3 = logits[n - 1 + j].topk(3).indices.tolist()
        assert token in top3, (j, token, top3)
    # With temperature 5 the top-3 are near-equally likely: sampling did not collapse to greedy.
    assert any(t != logits[n - 1 + j].argmax().item() for j, t in enumerate(out))


def test_seeded_output_is_unaffected_by_other_requests_in_the_batch(llm):
    seeded = SamplingParams(temperature=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(SAMPLE_PROMPT, seeded)[0].token_ids
    others = [PROMPTS[1], SAMPLE_PROMPT, PROMPTS[0], PROMPTS[7]]
    params = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),  # unseeded
              seeded,
              SamplingParams(temperature=0.0, max_tokens=5),
              SamplingParams(temperature=1.3, seed=99, max_tokens=15, ignore_eos=True)]
    together = llm.generate(others, params)
    assert together[1].token_ids == alone
    # Same seed and prompt twice in one batch: both follow the seed.
    twice = llm.generate([SAMPLE_PROMPT, PROMPTS[5], SAMPLE_PROMPT], [seeded, params[0], seeded])
    assert twice[0].token_ids == twice[2].token_ids == alone


# -- scoring ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[3], [42]])
def test_score_shape_and_argmax_match_greedy(llm, prompt):
    logits = llm.score(prompt)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (len(prompt), VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert logits[-1].argmax().item() == greedy.token_ids[0]
    # Teacher forcing: scoring the prompt plus the greedy tokens predicts each next greedy token.
    forced = llm.score(prompt + greedy.token_ids[:-1])
    n = len(prompt)
    assert forced[n - 1:].argmax(-1).tolist() == greedy.token_ids
    # Scoring a prefix gives the same logits as the prefix rows of the longer score.
    torch.testing.assert_close(forced[:n], logits, rtol=1e-4, atol=1e-4)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
