"""planner.spec.workload: length distributions, arrival processes, traces, flags and prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from planner.spec.workload import (
    ClosedLoopArrival,
    ConstantArrival,
    EmpiricalLength,
    FixedLength,
    NormalLength,
    PoissonArrival,
    RequestSpec,
    TraceArrival,
    UniformLength,
    Workload,
    WorkloadError,
    parse_length,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- lengths ----

def test_fixed_length() -> None:
    values = FixedLength(value=128).sample(50, rng())
    assert values.dtype.kind == "i" and set(values.tolist()) == {128}
    assert FixedLength(value=128).mean() == 128.0


def test_uniform_length_is_inclusive_and_centred() -> None:
    dist = UniformLength(low=128, high=1024)
    values = dist.sample(20_000, rng())
    assert values.min() == 128 and values.max() == 1024  # both ends reachable
    assert dist.mean() == 576
    assert abs(values.mean() - 576) < 5


def test_normal_length_rounds_and_clips() -> None:
    dist = NormalLength(mean=512, std=128, min=300, max=600)
    values = dist.sample(20_000, rng())
    assert values.dtype.kind == "i"
    assert values.min() == 300 and values.max() == 600
    assert abs(values.mean() - dist.mean()) < 1.5


def test_normal_mean_accounts_for_clipping_at_one() -> None:
    # Half the bell lies below 1 token: the sampled mean is well above the nominal 5.
    dist = NormalLength(mean=5, std=10)
    values = dist.sample(50_000, rng())
    assert values.min() >= 1
    assert dist.mean() > 7
    assert abs(values.mean() - dist.mean()) < 0.1
    assert NormalLength(mean=40.4, std=0).sample(3, rng()).tolist() == [40, 40, 40]


def test_empirical_length_draws_only_given_values() -> None:
    dist = EmpiricalLength(values=[10, 20, 20, 50])
    values = dist.sample(20_000, rng())
    assert set(values.tolist()) == {10, 20, 50}
    assert dist.mean() == 25.0
    assert abs(values.mean() - 25.0) < 0.5


@pytest.mark.parametrize("bad", [
    {"kind": "fixed", "value": 0},
    {"kind": "uniform", "low": 10, "high": 5},
    {"kind": "normal", "mean": 10, "std": -1},
    {"kind": "normal", "mean": 10, "std": 1, "min": 20, "max": 10},
    {"kind": "empirical", "values": []},
    {"kind": "empirical", "values": [3, 0]},
    {"kind": "lognormal", "mean": 3},
])
def test_bad_lengths_are_rejected(bad: dict) -> None:
    base = {"output_tokens": {"kind": "fixed", "value": 1}, "arrival": {"kind": "poisson", "rate": 1}}
    with pytest.raises(ValidationError, match="input_tokens"):
        Workload.model_validate({**base, "input_tokens": bad})


# ---- arrivals ----

def test_poisson_mean_gap_is_one_over_rate() -> None:
    times = PoissonArrival(rate=4.0).arrival_times(20_000, rng())
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert times[0] > 0 and np.all(gaps > 0)
    assert abs(gaps.mean() - 0.25) < 0.01
    assert abs(gaps.std() - 0.25) < 0.01  # exponential: std equals mean


def test_constant_spacing_is_exact() -> None:
    times = ConstantArrival(rate=8.0).arrival_times(5, rng())
    assert times.tolist() == [0.0, 0.125, 0.25, 0.375, 0.5]


def test_closed_loop_has_no_arrival_times() -> None:
    arrival = ClosedLoopArrival(concurrency=8)
    assert arrival.arrival_times(10, rng()) is None
    assert arrival.concurrency == 8
    with pytest.raises(ValidationError, match="concurrency"):
        ClosedLoopArrival(concurrency=0)


def test_trace_arrival_normalises_and_cycles() -> None:
    trace = TraceArrival(offsets=[12.0, 10.0, 11.0])
    assert trace.offsets == [0.0, 1.0, 2.0]
    assert trace.arrival_times(2, rng()).tolist() == [0.0, 1.0]
    # The repeat starts one mean gap after the end, so no two requests share an instant.
    assert trace.arrival_times(7, rng()).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


# ---- sampling ----

def test_sample_is_deterministic_for_a_seed() -> None:
    workload = Workload.from_flags("128:1024", "normal:200,50", rate=2.0, num_requests=30)
    first, again = workload.sample(), workload.sample()
    assert first == again and len(first) == 30
    assert all(isinstance(r, RequestSpec) for r in first)
    assert [r.index for r in first] == list(range(30))
    other = workload.model_copy(update={"seed": 1}).sample()
    assert [r.input_tokens for r in other] != [r.input_tokens for r in first]
    assert all(b.arrival_time > a.arrival_time for a, b in zip(first, first[1:]))
    assert workload.sample(5) == first[:5]  # fewer requests: the same first ones
    longer = workload.model_copy(update={"output_tokens": FixedLength(value=7)}).sample()
    assert [(r.input_tokens, r.arrival_time) for r in longer] == [
        (r.input_tokens, r.arrival_time) for r in first]


def test_closed_loop_requests_have_no_arrival_time() -> None:
    requests = Workload.from_flags("64", "32", concurrency=4).sample(3)
    assert [r.arrival_time for r in requests] == [None, None, None]
    assert [(r.input_tokens, r.output_tokens) for r in requests] == [(64, 32)] * 3


# ---- traces and files ----

def write_trace(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_trace_round_trip(tmp_path) -> None:
    path = tmp_path / "chat.jsonl"
    write_trace(path, [
        {"input_tokens": 100, "output_tokens": 10, "arrival": 5.5},
        {"input_tokens": 300, "output_tokens": 30, "arrival": 5.0},
        {"input_tokens": 200, "output_tokens": 20, "arrival": 7.0, "user": "ignored"},
    ])
    workload = Workload.from_file(path)
    assert workload.name == "chat" and workload.num_requests == 3
    assert sorted(workload.input_tokens.values) == [100, 200, 300]
    assert workload.arrival.offsets == [0.0, 0.5, 2.0]
    assert [r.arrival_time for r in workload.sample()] == [0.0, 0.5, 2.0]
    again = tmp_path / "again.yaml"
    again.write_text(workload.to_yaml())
    assert Workload.from_file(again).model_dump() == workload.model_dump()


@pytest.mark.parametrize(("line", "field"), [
    ('{"input_tokens": 0, "output_tokens": 5, "arrival": 1.0}', "input_tokens"),
    ('{"input_tokens": 3.5, "output_tokens": 5, "arrival": 1.0}', "input_tokens"),
    ('{"input_tokens": 4, "arrival": 1.0}', "output_tokens"),
    ('{"input_tokens": 4, "output_tokens": 5, "arrival": "soon"}', "arrival"),
])
def test_bad_trace_line_names_file_line_and_field(tmp_path, line: str, field: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"input_tokens": 4, "output_tokens": 5, "arrival": 0.0}'
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(WorkloadError, match=rf"bad\.jsonl, line 3: {field}"):
        Workload.from_trace(path)


def test_trace_that_is_not_json(tmp_path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(WorkloadError, match=r"broken\.jsonl, line 1: .*JSON"):
        Workload.from_trace(path)
    path.write_text("\n\n")
    with pytest.raises(WorkloadError, match=r"broken\.jsonl: the trace has no requests"):
        Workload.from_trace(path)


def test_yaml_and_json_round_trip(tmp_path) -> None:
    workload = Workload(name="mixed", input_tokens=NormalLength(mean=512, std=128, max=2048),
                        output_tokens=UniformLength(low=16, high=256), arrival=ConstantArrival(rate=3.0),
                        num_requests=40, shared_prefix_fraction=0.25, seed=7)
    path = tmp_path / "w.yaml"
    path.write_text(workload.to_yaml())
    assert "mean: 512" in path.read_text()
    assert Workload.from_file(path) == workload
    as_json = tmp_path / "w.json"
    as_json.write_text(workload.model_dump_json())
    assert workload.model_dump()["input_tokens"]["mean"] == 512  # the name a user writes
    assert Workload.from_file(as_json) == workload


def test_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        Workload.from_file(tmp_path / "nowhere.yaml")
    path = tmp_path / "typo.yaml"
    path.write_text("input_tokens: {kind: fixed, value: 8}\noutput_tokens: {kind: fixed, value: 8}\n"
                    "arrival: {kind: poisson, rate: 1}\nnum_request: 5\n")
    with pytest.raises(WorkloadError, match=r"typo\.yaml: num_request"):
        Workload.from_file(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(WorkloadError, match=r"typo\.yaml: expected a mapping"):
        Workload.from_file(path)


# ---- flags ----

def test_from_flags_parses_each_form() -> None:
    assert parse_length("512", "isl") == FixedLength(value=512)
    assert parse_length(" 128:1024 ", "isl") == UniformLength(low=128, high=1024)
    assert parse_length("normal:512,128", "osl") == NormalLength(mean=512, std=128)
    workload = Workload.from_flags("128:1024", "128", rate=4.0)
    assert workload.arrival == PoissonArrival(rate=4.0)
    assert workload.describe() == (
        "poisson 4.0 req/s, input uniform 128..1024 (mean 576), output fixed 128, 100 requests")
    assert Workload.from_flags("8", "8", concurrency=16).arrival == ClosedLoopArrival(concurrency=16)


@pytest.mark.parametrize(("isl", "osl", "kwargs", "message"), [
    ("12x", "8", {"rate": 1.0}, r"isl '12x': expected"),
    ("8", "1:2:3", {"rate": 1.0}, r"osl '1:2:3': expected"),
    ("8", "normal:5", {"rate": 1.0}, r"osl 'normal:5': expected"),
    ("0", "8", {"rate": 1.0}, r"isl '0': .*greater than 0"),
    ("9:3", "8", {"rate": 1.0}, r"isl '9:3': .*high=3 is below low=9"),
    ("8", "normal:5,-1", {"rate": 1.0}, r"osl 'normal:5,-1': std"),
    ("8", "8", {}, r"exactly one of rate or concurrency"),
    ("8", "8", {"rate": 1.0, "concurrency": 2}, r"exactly one of rate or concurrency"),
    ("8", "8", {"rate": -2.0}, r"rate: .*got -2"),
    ("8", "8", {"concurrency": 0}, r"concurrency: .*got 0"),
    ("8", "8", {"rate": 1.0, "shared_prefix_fraction": 1.0}, r"shared_prefix_fraction"),
])
def test_flag_errors_name_the_flag(isl: str, osl: str, kwargs: dict, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        Workload.from_flags(isl, osl, **kwargs)


# ---- prompts ----

def test_shared_prefix_is_common_and_lengths_exact() -> None:
    workload = Workload.from_flags("100:400", "8", rate=1.0, num_requests=20, shared_prefix_fraction=0.5)
    requests = workload.sample()
    generator = rng(3)
    prompts = [workload.prompt_token_ids(r, 32_000, generator) for r in requests]
    assert [len(p) for p in prompts] == [r.input_tokens for r in requests]
    assert all(0 <= t < 256 for p in prompts for t in p)  # never the byte tokenizer's BOS/EOS
    shortest = min(round(0.5 * r.input_tokens) for r in requests)
    assert len({tuple(p[:shortest]) for p in prompts}) == 1
    for r, p in zip(requests, prompts):  # each request's own prefix is the start of the longest
        k = workload.shared_prefix_length(r.input_tokens)
        longest = max(prompts, key=len)
        assert p[:k] == longest[:k]
    # Past the prefix the prompts differ (the caller's rng draws the rest).
    assert len({tuple(p[shortest:shortest + 20]) for p in prompts}) > 1


def test_no_shared_prefix_and_small_vocab() -> None:
    workload = Workload.from_flags("50", "8", rate=1.0)
    a, b = (workload.prompt_token_ids(r, 10, rng(i)) for i, r in enumerate(workload.sample(2)))
    assert len(a) == len(b) == 50 and max(a + b) < 10
    assert a[:5] != b[:5]
    with pytest.raises(WorkloadError, match="vocab_size"):
        workload.prompt_token_ids(workload.sample(1)[0], 0, rng())
