"""The `Scheduler` driven without a model, the way the planner's simulator drives it.

Each step: `out = scheduler.schedule(now)`, then `scheduler.update(out, sampled, now')` with a
made-up token for every scheduled sequence whose step completes its context, and None for one
that is still mid-prefill. Time is a virtual clock chosen by the test.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

EOS = 3
TOKEN = 7  # the made-up token every step "samples" unless a test says otherwise


def make_scheduler(num_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 16,
                   max_num_batched_tokens: int = 32, max_model_len: int = 256,
                   chunked: bool = True, policy: str = "fcfs", caching: bool = True,
                   eos: tuple[int, ...] = (EOS,), prefill_first: bool = False) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len, enable_chunked_prefill=chunked, policy=policy,
                          prefill_first=prefill_first)
    return Scheduler(cfg, bm, eos_token_ids=eos)


_counter = iter(range(10**9))


def make_seq(num_prompt: int | list[int], max_tokens: int | None = 4, arrival: float = 0.0,
             priority: int = 0, rid: str | None = None, **params) -> Sequence:
    n = next(_counter)
    tokens = (list(num_prompt) if isinstance(num_prompt, list)
              else [100 + (n * 31 + i) % 400 for i in range(num_prompt)])  # unique-ish content
    return Sequence(rid or f"r{n}", tokens, SamplingParams(max_tokens=max_tokens, **params),
                    arrival_time=arrival, priority=priority)


def step(sched: Scheduler, now: float = 0.0, token: int | Callable[[Sequence], int] = TOKEN,
         dt: float = 0.0) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule(now)
    sampled = []
    for item in out.scheduled:
        if item.samples:
            sampled.append(token(item.seq) if callable(token) else token)
        else:
            sampled.append(None)
    out.sampled_tokens = sampled  # `item.samples` reads the sequence, so record it before update
    finished = sched.update(out, sampled, now + dt)
    return out, finished


def run(sched: Scheduler, max_steps: int = 5000, check: Callable[[SchedulerOutput], None] | None = None,
        token: int | Callable[[Sequence], int] = TOKEN) -> list[SchedulerOutput]:
    outs = []
    t = 100.0  # after every arrival time the tests use
    while sched.has_unfinished():
        assert len(outs) < max_steps, "scheduler made no progress"
        out, _ = step(sched, t, token, dt=0.5)
        if check:
            check(out)
        outs.append(out)
        t += 1.0
    return outs


def assert_no_leak(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


# -- budget and caps ----------------------------------------------------------------------------


def test_token_budget_and_max_num_seqs_hold_every_step_and_budget_is_used():
    sched = make_scheduler(max_num_batched_tokens=24, max_num_seqs=3)
    rng = random.Random(0)
    seqs = [make_seq(rng.randrange(1, 60), max_tokens=rng.randrange(1, 12)) for _ in range(12)]
    for s in seqs:
        sched.add(s)

    def check(out: SchedulerOutput) -> None:
        assert 0 < out.num_batched_tokens <= 24
        assert len(out.scheduled) <= 3
        assert len(sched.running) <= 3
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
        for item in out.scheduled:
            assert item.num_new_tokens >= 1

    outs = run(sched, check=check)
    # The first step admits prompts in order until the budget or the seq cap is reached.
    assert outs[0].num_batched_tokens == min(24, sum(s.num_prompt_tokens for s in seqs[:3]))
    for s in seqs:
        assert s.is_finished and s.finish_reason == "length"
        assert s.num_output_tokens == s.params.max_tokens
    assert_no_leak(sched)


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=1000)
    seqs = [make_seq(5, max_tokens=3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    out, _ = step(sched)
    assert [i.seq for i in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    run(sched, check=lambda o: None if len(o.scheduled) <= 2 else pytest.fail("too many seqs"))
    assert all(s.num_output_tokens == 3 for s in seqs)


# -- chunked prefill ----------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=16)
    seq = make_seq(50, max_tokens=2)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        out, _ = step(sched)
        (item,) = out.scheduled
        chunks.append((item.start, item.num_new_tokens, out.sampled_tokens[0] is not None))
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert seq.num_output_tokens == 1 and seq.num_computed_tokens == 50
    out = sched.schedule(0.0)
    assert out.scheduled[0].is_decode and out.scheduled[0].start == 50
    finished = sched.update(out, [TOKEN], 0.0)
    assert finished == [seq] and seq.finish_reason == "length"
    assert_no_leak(sched)


def test_running_decodes_are_scheduled_before_a_new_prefill_chunk():
    sched = make_scheduler(max_num_batched_tokens=16)
    a, b = make_seq(4, max_tokens=20), make_seq(5, max_tokens=20)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefill whole
    long = make_seq(60, max_tokens=2)
    sched.add(long)
    prefilled = 0
    while long.num_computed_tokens < 60:
        out, _ = step(sched)
        kinds = [(i.seq, i.num_new_tokens) for i in out.scheduled]
        assert kinds[:2] == [(a, 1), (b, 1)]  # decodes first
        assert kinds[2][0] is long
        assert kinds[2][1] == min(14, 60 - prefilled)  # the rest of the budget
        assert out.num_batched_tokens <= 16
        prefilled += kinds[2][1]
    assert prefilled == 60


def test_prefill_first_pauses_decodes_while_a_prompt_can_run():
    """SGLang's schedule: a step prefills or decodes, never both; a new prompt goes first."""
    sched = make_scheduler(max_num_batched_tokens=16, prefill_first=True)
    a, b = make_seq(4, max_tokens=20), make_seq(5, max_tokens=20)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefill whole
    out, _ = step(sched)
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(a, 1), (b, 1)]  # nothing waits: decode
    long = make_seq(40, max_tokens=2)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 40:
        out, _ = step(sched)
        assert [i.seq for i in out.scheduled] == [long]  # the decodes wait
        chunks.append(out.scheduled[0].num_new_tokens)
    assert chunks == [16, 16, 8]  # the whole budget each step, chunk after chunk
    out, _ = step(sched)
    assert {i.seq for i in out.scheduled} == {a, b, long} and all(i.is_decode for i in out.scheduled)


def test_prefill_first_admits_a_burst_before_any_decode_and_keeps_it_in_step():
    """Clients that start together get their first tokens over several prefill steps, yet all
    decode in the same steps afterwards, so equal requests finish together (SGLang's lockstep)."""
    sched = make_scheduler(max_num_batched_tokens=16, prefill_first=True)
    burst = [make_seq(12, max_tokens=5) for _ in range(4)]
    for s in burst:
        sched.add(s)
    outs = run(sched)
    decode_steps = [o for o in outs if any(i.is_decode for i in o.scheduled)]
    assert all(all(i.is_decode for i in o.scheduled) for o in decode_steps)  # never mixed
    assert len({s.metrics.first_token_time for s in burst}) > 1  # prefilled over several steps
    assert len({s.metrics.finished_time for s in burst}) == 1  # yet they finish together
    assert_no_leak(sched)


def test_prefill_first_decodes_when_no_prompt_fits():
    sched = make_scheduler(max_num_seqs=1, prefill_first=True)
    a, b = make_seq(4, max_tokens=3), make_seq(4, max_tokens=3)
    sched.add(a)
    sched.add(b)
    outs = run(sched)
    # b waits for a's seat: a decodes meanwhile, then b runs.
    assert [[i.seq for i in o.scheduled] for o in outs] == [[a], [a], [a], [b], [b], [b]]
    assert_no_leak(sched)


def test_prefill_first_finishes_a_prompt_whose_last_chunk_is_one_token_before_decoding():
    sched = make_scheduler(max_num_batched_tokens=16, prefill_first=True)
    a = make_seq(4, max_tokens=20)
    sched.add(a)
    step(sched)
    long = make_seq(17, max_tokens=2)
    sched.add(long)
    outs = [step(sched)[0] for _ in range(3)]
    assert [[(i.seq, i.num_new_tokens) for i in o.scheduled] for o in outs] == [
        [(long, 16)], [(long, 1)], [(a, 1), (long, 1)]]  # the one-token tail is a prefill step


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_prefill_first_never_mixes_a_step_when_the_cache_is_full(policy):
    """Decodes growing into a full cache retract the prompt (it is recomputed later), but no
    step ever holds a prompt's chunk beside decodes, and everything finishes."""
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=4, policy=policy,
                           prefill_first=True)
    decodes = [make_seq(8, max_tokens=16, arrival=0.0, priority=1) for _ in range(2)]
    for s in decodes:
        sched.add(s)
    step(sched)
    prompt = make_seq(9, max_tokens=2, arrival=1.0, priority=0)
    sched.add(prompt)
    outs = run(sched)
    for o in outs:
        kinds = {i.is_decode for i in o.scheduled}
        assert len(kinds) == 1, [(i.seq.request_id, i.num_new_tokens, i.is_decode) for i in o.scheduled]
    assert prompt.num_output_tokens == 2 and all(s.num_output_tokens == 16 for s in decodes)
    assert_no_leak(sched)


def test_chunked_prefill_disabled_schedules_prompts_whole():
    sched = make_scheduler(max_num_batched_tokens=32, chunked=False)
    a, b = make_seq(20, max_tokens=3), make_seq(20, max_tokens=3)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(a, 20)]
    assert list(sched.waiting) == [b]  # 20 > the 12 tokens left: waits instead of chunking
    out, _ = step(sched)
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(a, 1), (b, 20)]

    def check(o: SchedulerOutput) -> None:
        for item, token in zip(o.scheduled, o.sampled_tokens):
            assert token is not None, f"a prompt was split: {item}"

    run(sched, check=check)
    assert a.num_output_tokens == b.num_output_tokens == 3


def test_chunked_prefill_enabled_fills_the_budget_with_a_partial_prompt():
    sched = make_scheduler(max_num_batched_tokens=32, chunked=True)
    a, b = make_seq(20, max_tokens=3), make_seq(20, max_tokens=3)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(a, 20), (b, 12)]
    assert out.sampled_tokens == [TOKEN, None]


# -- prefix caching through the scheduler -------------------------------------------------------


def test_prefix_cache_hit_starts_the_prompt_after_the_cached_blocks():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=64)
    shared = list(range(10, 23))  # 13 tokens: 3 full blocks
    a = make_seq(shared + [1], max_tokens=5)
    sched.add(a)
    step(sched)
    b = make_seq(shared + [2, 2, 2], max_tokens=2)
    sched.add(b)
    out, _ = step(sched)
    item = next(i for i in out.scheduled if i.seq is b)
    assert item.start == 12 and item.num_new_tokens == 4
    assert b.metrics.num_cached_prompt_tokens == 12
    assert b.block_table[:3] == a.block_table[:3]
    run(sched)
    assert_no_leak(sched)


# -- preemption ---------------------------------------------------------------------------------


def test_preemption_when_blocks_run_out_requeues_victim_at_the_front():
    # 6 blocks of 4 = 24 slots; two sequences of 8 + 10 tokens need 10 blocks between them.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=2, caching=False,
                           max_num_batched_tokens=64, max_model_len=24)
    a = make_seq(8, max_tokens=10, arrival=0.0)
    b = make_seq(8, max_tokens=10, arrival=1.0)
    c = make_seq(4, max_tokens=2, arrival=2.0)
    for s in (a, b, c):
        sched.add(s)
    preempt_out = None
    for _ in range(50):
        out, _ = step(sched)
        if out.preempted:
            preempt_out = out
            break
    assert preempt_out is not None, "no preemption happened"
    assert preempt_out.preempted == [b]  # the latest arrival goes
    assert b.status is SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.block_hashes == []
    assert b.metrics.num_preemptions == 1
    assert sched.num_preemptions == 1
    assert list(sched.waiting) == [b, c]  # in front of the request that was already waiting
    assert b not in sched.running and b.num_output_tokens > 0
    outputs_at_preemption = b.output_token_ids
    assert all(i.seq is not b for i in preempt_out.scheduled)

    outs = run(sched)
    # When b comes back, it recomputes prompt and generated tokens from scratch.
    readmit = next(o for o in outs if any(i.seq is b for i in o.scheduled))
    item = next(i for i in readmit.scheduled if i.seq is b)
    assert item.start == 0
    assert b.output_token_ids[:len(outputs_at_preemption)] == outputs_at_preemption
    for s in (a, b, c):
        assert s.is_finished and s.finish_reason == "length"
        assert s.num_output_tokens == s.params.max_tokens
    assert_no_leak(sched)


def test_preemption_with_prefix_caching_completes_and_leaks_nothing():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=4, caching=True,
                           max_num_batched_tokens=12, max_model_len=32)
    shared = list(range(40, 50))
    seqs = [make_seq(shared + [i], max_tokens=12, arrival=float(i)) for i in range(4)]
    for s in seqs:
        sched.add(s)

    def check(out: SchedulerOutput) -> None:
        assert out.num_batched_tokens <= 12
        for s in out.preempted:
            assert s.status is SequenceStatus.WAITING and s.num_computed_tokens == 0
            assert sched.waiting[0] is s or s in sched.waiting

    run(sched, check=check)
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.num_output_tokens == 12 and s.finish_reason == "length"
    assert sched.block_manager.num_prefix_hits > 0
    assert_no_leak(sched)


def test_cached_prompt_tokens_never_exceed_the_prompt_after_preemption():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=2, caching=True,
                           max_num_batched_tokens=64, max_model_len=24)
    a = make_seq(5, max_tokens=16, arrival=0.0)
    b = make_seq(5, max_tokens=16, arrival=1.0)
    sched.add(a)
    sched.add(b)
    run(sched)
    assert b.metrics.num_preemptions > 0
    for s in (a, b):
        assert s.metrics.num_cached_prompt_tokens <= s.num_prompt_tokens


# -- priority policy ----------------------------------------------------------------------------


def test_priority_policy_admits_lower_priority_value_first():
    sched = make_scheduler(policy="priority", max_num_seqs=1, max_num_batched_tokens=64)
    p5 = make_seq(6, max_tokens=2, arrival=0.0, priority=5)
    p1 = make_seq(6, max_tokens=2, arrival=1.0, priority=1)
    p3 = make_seq(6, max_tokens=2, arrival=2.0, priority=3)
    p1_late = make_seq(6, max_tokens=2, arrival=3.0, priority=1)  # ties go by arrival
    for s in (p5, p1, p3, p1_late):
        sched.add(s)
    assert list(sched.waiting) == [p1, p1_late, p3, p5]
    order = []

    def check(out: SchedulerOutput) -> None:
        for item in out.scheduled:
            if item.seq not in order:
                order.append(item.seq)

    run(sched, check=check)
    assert order == [p1, p1_late, p3, p5]


def test_fcfs_ignores_priority():
    sched = make_scheduler(policy="fcfs", max_num_seqs=1, max_num_batched_tokens=64)
    seqs = [make_seq(6, max_tokens=2, arrival=float(i), priority=p) for i, p in enumerate([5, 1, 3])]
    for s in seqs:
        sched.add(s)
    order = []
    run(sched, check=lambda out: [order.append(i.seq) for i in out.scheduled if i.seq not in order])
    assert order == seqs


@pytest.mark.parametrize("policy,expected_victim", [("priority", "low"), ("fcfs", "latest")])
def test_under_pressure_the_lowest_priority_running_seq_is_preempted(policy, expected_victim):
    # Arrival order: low-priority first, so FCFS and priority pick different victims.
    sched = make_scheduler(policy=policy, num_blocks=9, block_size=4, max_num_seqs=3,
                           max_num_batched_tokens=64, caching=False, max_model_len=36)
    low = make_seq(8, max_tokens=8, arrival=0.0, priority=9, rid="low")
    high = make_seq(8, max_tokens=8, arrival=1.0, priority=0, rid="high")
    mid = make_seq(8, max_tokens=8, arrival=2.0, priority=5, rid="latest")
    for s in (low, high, mid):
        sched.add(s)
    first = None
    for _ in range(50):
        out, _ = step(sched)
        if out.preempted:
            first = out.preempted[0]
            break
    assert first is not None, "no preemption happened"
    assert first.request_id == expected_victim
    run(sched)
    for s in (low, high, mid):
        assert s.num_output_tokens == 8
    assert_no_leak(sched)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_scheduler(policy="lifo")


# -- stop conditions ----------------------------------------------------------------------------


def test_max_tokens_stops_with_length():
    sched = make_scheduler()
    seq = make_seq(5, max_tokens=3)
    sched.add(seq)
    outs = run(sched)
    assert seq.output_token_ids == [TOKEN] * 3
    assert seq.finish_reason == "length" and seq.is_finished
    assert len(outs) == 3


@pytest.mark.parametrize("ignore_eos,expected", [(False, ("stop", 3)), (True, ("length", 6))])
def test_eos_stops_unless_ignore_eos(ignore_eos, expected):
    sched = make_scheduler()
    seq = make_seq(5, max_tokens=6, ignore_eos=ignore_eos)
    sched.add(seq)
    tokens = iter([TOKEN, TOKEN, EOS, TOKEN, TOKEN, TOKEN])
    run(sched, token=lambda s: next(tokens))
    assert (seq.finish_reason, seq.num_output_tokens) == expected
    assert seq.output_token_ids[-1] == (EOS if not ignore_eos else TOKEN)


def test_stop_token_ids_stop_even_with_ignore_eos():
    sched = make_scheduler()
    seq = make_seq(5, max_tokens=10, ignore_eos=True, stop_token_ids=[42])
    sched.add(seq)
    tokens = iter([TOKEN, EOS, 42, TOKEN])
    run(sched, token=lambda s: next(tokens))
    assert seq.output_token_ids == [TOKEN, EOS, 42]
    assert seq.finish_reason == "stop"


def test_max_model_len_stops_with_length():
    sched = make_scheduler(max_model_len=16)
    seq = make_seq(10, max_tokens=None)
    sched.add(seq)
    run(sched)
    assert seq.num_tokens == 16 and seq.num_output_tokens == 6
    assert seq.finish_reason == "length"


def test_finished_sequences_leave_running_and_return_from_update():
    sched = make_scheduler()
    short, long = make_seq(4, max_tokens=1), make_seq(4, max_tokens=3)
    sched.add(short)
    sched.add(long)
    _, finished = step(sched)
    assert finished == [short]
    assert sched.running == [long]
    assert sched.num_unfinished == 1


# -- abort --------------------------------------------------------------------------------------


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_seq(9, max_tokens=10), make_seq(9, max_tokens=10)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)
    assert a.block_table and sched.block_manager.num_used_blocks == len(a.block_table)
    aborted = sched.abort(a.request_id)
    assert aborted is a and a.finish_reason == "abort" and a.is_finished
    assert a.block_table == [] and a not in sched.running
    assert sched.block_manager.num_used_blocks == 0
    assert sched.abort(b.request_id) is b and not sched.waiting
    assert sched.abort("nope") is None
    assert not sched.has_unfinished()
    assert_no_leak(sched)


def test_abort_while_a_step_runs_discards_its_token():
    sched = make_scheduler()
    a, b = make_seq(6, max_tokens=5), make_seq(6, max_tokens=5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule(0.0)
    sched.abort(a.request_id)
    finished = sched.update(out, [TOKEN if i.samples else None for i in out.scheduled], 1.0)
    assert finished == []
    assert a.num_output_tokens == 0 and a.finish_reason == "abort"
    assert b.num_output_tokens == 1
    run(sched)
    assert_no_leak(sched)


# -- virtual clock ------------------------------------------------------------------------------


def test_metrics_use_the_virtual_clock_passed_in(monkeypatch):
    def no_clock(*args, **kwargs):
        raise AssertionError("the scheduler read a real clock")

    for name in ("time", "perf_counter", "monotonic", "time_ns", "perf_counter_ns", "monotonic_ns"):
        monkeypatch.setattr(time, name, no_clock)

    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(12, max_tokens=3, arrival=5000.0)
    sched.add(seq)
    clock = 5000.0
    starts, ends = [], []
    while sched.has_unfinished():
        clock += 1.0
        starts.append(clock)
        out = sched.schedule(clock)
        clock += 0.25
        ends.append(clock)
        sched.update(out, [TOKEN if i.samples else None for i in out.scheduled], clock)
    m = seq.metrics
    # Steps: prefill 8, prefill 4 (+ token 1), decode (+ token 2), decode (+ token 3).
    assert starts == [5001.0, 5002.25, 5003.5, 5004.75]
    assert ends == [5001.25, 5002.5, 5003.75, 5005.0]
    assert m.arrival_time == 5000.0
    assert m.first_scheduled_time == 5001.0
    assert m.first_token_time == 5002.5
    assert m.token_times == [5002.5, 5003.75, 5005.0]
    assert m.finished_time == 5005.0
    assert m.ttft == pytest.approx(2.5)
    assert m.e2e == pytest.approx(5.0)
    assert m.itls == pytest.approx([1.25, 1.25])
    assert m.tpot == pytest.approx(1.25)
