"""`pilot bench serve`: the HTTP load generator's parts on hand-made input, then whole runs
against a real pilot server on loopback (a tiny random model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from engine import EngineConfig
from engine.model_zoo import make_checkpoint
from planner.bench.serve import (
    BenchResult,
    RunResult,
    ServerInfo,
    engine_config_for_record,
    fetch_server_info,
    record_http_run,
    resolve_load,
    run_bench_serve,
    sweep,
)
from planner.cli import app
from planner.loadgen.http_load import (
    BenchError,
    LineSplitter,
    LoadResult,
    LoadSummary,
    RequestRecord,
    RequestSource,
    SSEDecoder,
    carries_output,
    chat_prompt,
    error_message,
    event_text,
    parse_event,
    summarize_records,
)
from planner.spec.slo import RequestLatency, parse_slos, summarize
from planner.spec.workload import Workload
from planner.store.database import RequestRow, Run, Store

runner = CliRunner()


# ---- server-sent events ----

def _decode(lines: list[str]) -> list[str]:
    decoder, out = SSEDecoder(), []
    for line in lines:
        if (data := decoder.feed(line)) is not None:
            out.append(data)
    if (data := decoder.flush()) is not None:
        out.append(data)
    return out


def test_sse_events_end_at_blank_lines():
    lines = [': a comment', 'data: {"a": 1}', '', 'event: ping', 'data:{"b": 2}\r', '', '',
             'data: [DONE]', '']
    assert _decode(lines) == ['{"a": 1}', '{"b": 2}', "[DONE]"]


def test_sse_multiline_data_and_unterminated_last_event():
    assert _decode(['data: {"a":', 'data: 1}', '', 'data: [DONE]']) == ['{"a":\n1}', "[DONE]"]


def test_line_splitter_joins_reads_and_split_characters():
    lines = LineSplitter()
    euro = "€".encode()
    assert lines.feed(b'data: {"t": "a') == []
    assert lines.feed(b'"}\r\n\r\ndata: ' + euro[:1]) == ['data: {"t": "a"}\r', "\r"]
    assert lines.feed(euro[1:] + b"\n\ndata: [DONE]") == ["data: €", ""]
    assert lines.rest() == "data: [DONE]" and lines.rest() == ""


def test_which_chunks_carry_output():
    assert carries_output({"choices": [{"text": "", "finish_reason": None}]})  # a textless token
    assert not carries_output({"choices": [], "usage": {"completion_tokens": 2}})
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    finish = {"choices": [{"delta": {}, "finish_reason": "length"}]}
    assert not carries_output(role, first=True)
    assert carries_output({"choices": [{"delta": {"content": "x"}}]})
    assert not carries_output(finish) and carries_output(finish, first=True)


def test_parse_event_and_text():
    assert parse_event(" [DONE]") is None
    assert event_text(parse_event('{"choices": [{"text": "hi", "finish_reason": null}]}')) == "hi"
    assert event_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert event_text({"choices": [{"delta": {"content": "yo"}}]}) == "yo"
    assert event_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    with pytest.raises(ValueError):
        parse_event("[1, 2]")
    with pytest.raises(ValueError):
        parse_event("{not json")


def test_error_message_reads_openai_bodies():
    body = {"error": {"message": "prompt: too long", "type": "invalid_request_error"}}
    assert error_message(json.dumps(body).encode()) == "prompt: too long"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"upstream exploded") == "upstream exploded"
    assert error_message(b"") == "(empty body)"


def test_record_counts_chunks_with_text_and_reads_usage():
    record = RequestRecord(0, 10, 4)
    record.send_time = 100.0
    record.take({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, 100.05)  # no token
    record.take({"choices": [{"text": "a", "finish_reason": None}]}, 100.2)
    record.take({"choices": [{"text": "bc", "finish_reason": None}]}, 100.3)
    record.take({"choices": [{"text": "d", "finish_reason": "length"}]}, 100.5)
    record.take({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5,
                                           "prompt_tokens_details": {"cached_tokens": 4}}}, 100.6)
    assert record.ok and record.chunk_times == [100.2, 100.3, 100.5]
    assert (record.output_tokens, record.input_tokens, record.cached_tokens) == (5, 11, 4)
    assert record.finish_reason == "length"
    lat = record.latency()
    assert lat.ttft_s == pytest.approx(0.2) and lat.e2e_s == pytest.approx(0.5)
    assert lat.itl_s == pytest.approx([0.1, 0.2])
    # TPOT over the 5 tokens the server counted, not the 3 chunks that carried them
    assert lat.output_tokens == 5 and lat.tpot_s == pytest.approx(0.3 / 4)


def test_record_without_usage_counts_chunks_and_stream_errors_fail_it():
    record = RequestRecord(0, 10, 4)
    record.take({"choices": [{"text": "a"}]}, 1.0)
    record.take({"choices": [{"text": "b"}]}, 1.5)
    assert record.output_tokens == 2 and record.input_tokens == 10
    record.take({"error": {"message": "engine died", "type": "server_error"}}, 2.0)
    assert not record.ok and "engine died" in record.error


def _record(index: int, send: float, times: list[float], tokens: int | None = None,
            error: str | None = None) -> RequestRecord:
    r = RequestRecord(index, 8, len(times), send_time=send, chunk_times=times, completion_tokens=tokens,
                      error=error, end_time=times[-1] if times else send)
    return r


def test_summary_math_on_hand_made_timings():
    records = [_record(0, 0.0, [0.1, 0.2, 0.3]),          # ttft 100 ms, itl 100 ms
               _record(1, 1.0, [1.5, 1.6, 1.7, 1.8]),      # ttft 500 ms, itl 100 ms
               _record(2, 2.0, [], error="HTTP 429: overloaded")]
    slos = parse_slos("ttft_p50<=1s,itl_p90<=150ms")
    s = summarize_records(records, duration_s=2.0, slos=slos)
    expected = summarize([RequestLatency.from_token_times(0.0, [0.1, 0.2, 0.3]),
                          RequestLatency.from_token_times(1.0, [1.5, 1.6, 1.7, 1.8])])
    assert s.latency == pytest.approx(expected)
    assert s.latency["ttft_p50"] == pytest.approx(0.3) and s.latency["e2e_mean"] == pytest.approx(0.55)
    assert (s.num_requests, s.completed, s.failed) == (3, 2, 1)
    assert s.output_tokens == 7 and s.throughput_tok_s == pytest.approx(3.5)
    assert s.request_rate == pytest.approx(1.0)
    assert s.goodput == pytest.approx(1.0)  # both completed requests meet, over 2 s
    assert s.attainment == pytest.approx(2 / 3)  # the failed one counts against
    assert s.slos_met is False  # percentiles fine, but a request failed
    assert s.errors == {"HTTP 429: overloaded": 1}
    strict = summarize_records(records[:2], 2.0, parse_slos("ttft_p50<=200ms"))
    # one request meets on its own (100 ms), the p50 of 100 and 500 ms (300 ms) does not
    assert strict.attainment == pytest.approx(0.5) and strict.slos_met is False
    loose = summarize_records(records[:2], 2.0, parse_slos("ttft_p99<=600ms"))
    assert loose.slos_met is True and loose.attainment == 1.0
    assert summarize_records(records[:2], 2.0).goodput is None


def test_summary_of_only_failures_has_no_latency():
    s = summarize_records([_record(0, 0.0, [], error="x")], 1.0, parse_slos("ttft_p50<=1s"))
    assert s.completed == 0 and s.latency == {} and s.slos_met is False and s.attainment == 0.0


# ---- requests and arrival schedules ----

def test_request_source_sends_what_the_in_process_load_sends():
    workload = Workload.from_flags("8:64", "4:16", rate=3.0, num_requests=10, shared_prefix_fraction=0.25)
    rng = np.random.default_rng(workload.seed)
    specs = workload.sample(150)
    expected = [workload.prompt_token_ids(s, 512, rng) for s in specs]
    source = RequestSource(workload, 512)
    # past the workload's num_requests and past the first block of 64: the same requests
    assert [source.spec(i) for i in range(150)] == specs
    assert [source.prompt(i) for i in range(150)] == expected


def test_arrival_schedules():
    base = Workload.from_flags("16", "4", concurrency=1, num_requests=2000).model_copy(update={"seed": 3})
    name, poisson, kind, value = resolve_load(base, "poisson", 4.0, None)
    times = np.array([s.arrival_time for s in poisson.sample()])
    assert (name, kind, value) == ("poisson", "rate", 4.0)
    gaps = np.diff(times)
    assert (gaps > 0).all() and gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() == pytest.approx(0.25, rel=0.15)  # exponential: std = mean
    again = resolve_load(base, "poisson", 4.0, None)[1].sample()
    assert [s.arrival_time for s in again] == list(times)  # seeded
    _, constant, _, _ = resolve_load(base, "constant", 4.0, None)
    assert [s.arrival_time for s in constant.sample(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    name, closed, kind, value = resolve_load(base, "concurrent", None, 6)
    assert (name, kind, value) == ("concurrent", "concurrency", 6.0)
    assert closed.sample(1)[0].arrival_time is None
    # no profile: the flags pick it, else the workload's own arrivals
    assert resolve_load(base, None, 2.0, None)[0] == "poisson"
    assert resolve_load(base, None, None, 3)[0] == "concurrent"
    assert resolve_load(base, None, None, None)[2:] == ("concurrency", 1.0)


@pytest.mark.parametrize("profile, rate, concurrency, message", [
    ("poisson", None, None, "rate: is required with profile poisson"),
    ("constant", None, None, "rate: is required with profile constant"),
    ("concurrent", None, None, "concurrency: is required"),
    ("concurrent", None, 0, "concurrency: must be >= 1, got 0"),
    ("poisson", -1.0, None, "rate: must be a positive"),
    ("poisson", 2.0, 4, "concurrency: 4 does not apply to profile poisson"),
    ("concurrent", 2.0, 4, "rate: 2 does not apply"),
    (None, 2.0, 4, "not both"),
    ("bursty", None, None, "profile: unknown profile 'bursty'"),
])
def test_resolve_load_names_the_bad_flag(profile, rate, concurrency, message):
    base = Workload.from_flags("16", "4", concurrency=1)
    with pytest.raises(BenchError, match=message.replace("(", r"\(")):
        resolve_load(base, profile, rate, concurrency)


def _bisect(capacity: float, sync_rate: float, peak_rate: float, steps: int) -> tuple[BenchResult, list]:
    """The sweep over a made-up server: a run meets the SLOs when its rate is within
    `capacity` (closed-loop runs report the rates given)."""
    calls = []

    def measure(label, profile, rate, concurrency):
        calls.append((profile, rate, concurrency))
        achieved = {1: sync_rate}.get(concurrency, peak_rate) if rate is None else rate
        met = (rate or sync_rate) <= capacity
        summary = LoadSummary(10, 10, 0, 100, 100, 1.0, 100.0, achieved, {"ttft_p50": 0.1}, None, None, met)
        return RunResult(label, profile, "rate", rate or 0.0, None, None, LoadResult([], 0.0, 1.0, 0.0), summary)

    bench = BenchResult("http://x", "m", "completions", "sweep", parse_slos("ttft_p50<=1s"), [])
    sweep(bench, measure, 16, steps)
    return bench, calls


def test_sweep_bisects_between_synchronous_and_peak_rates():
    bench, calls = _bisect(capacity=30.0, sync_rate=10.0, peak_rate=50.0, steps=4)
    assert calls[:2] == [("concurrent", None, 1), ("concurrent", None, 16)]
    # 50 misses, 30 = (10+50)/2 meets, 40 misses, 35 misses
    assert [rate for _, rate, _ in calls[2:]] == pytest.approx([50.0, 30.0, 40.0, 35.0])
    assert bench.sweep.best_rate == pytest.approx(30.0) and bench.sweep.best_run == 3
    assert (bench.sweep.synchronous_rate, bench.sweep.throughput_rate) == (10.0, 50.0)
    # every Poisson probe misses: the best stays unknown, and the note says the floor met
    bench, calls = _bisect(capacity=10.0, sync_rate=10.0, peak_rate=50.0, steps=3)
    assert [rate for _, rate, _ in calls[2:]] == pytest.approx([50.0, 30.0, 20.0])
    assert bench.sweep.best_rate is None and "one request at a time (10 req/s) did" in bench.notes[0]


def test_chat_prompt_length():
    ids = list(range(40))
    assert len(chat_prompt(ids, 256)) == 40  # one byte per token on a byte-level vocabulary
    assert len(chat_prompt(ids, 32000).split()) == 40  # one common word per token otherwise


def test_record_needs_an_engine_config():
    with pytest.raises(BenchError, match="record: .*pass --config FILE"):
        engine_config_for_record(ServerInfo("m"), None)
    with pytest.raises(BenchError, match="config: config file not found"):
        engine_config_for_record(ServerInfo("m"), "/nonexistent/plan.yaml")


def test_unreachable_url_is_a_clear_error():
    with pytest.raises(BenchError, match=r"url: cannot reach http://127\.0\.0\.1:9 "):
        fetch_server_info("http://127.0.0.1:9", timeout_s=5)


# ---- against a real server ----

@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> EngineConfig:
    model = make_checkpoint("tiny", tmp_path_factory.mktemp("bench-serve") / "tiny", seed=0, dtype="float32")
    return EngineConfig(model=str(model), dtype="float32", num_threads=1, max_num_seqs=8,
                        max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def server(tiny_config):
    from engine.serving import start_server

    with start_server(tiny_config) as running:
        yield running


def _workload(n: int = 12, isl: str = "8:48", osl: str = "2:8") -> Workload:
    return Workload.from_flags(isl, osl, concurrency=1, num_requests=n).model_copy(update={"seed": 5})


def _max_in_flight(records) -> int:
    return max(sum(1 for o in records if o.send_time <= r.send_time < o.end_time) for r in records)


def test_concurrent_run_keeps_c_in_flight_and_gets_every_token(server):
    bench = run_bench_serve(server.url, _workload(12), "concurrent", concurrency=3)
    run = bench.runs[0]
    s = run.summary
    assert (s.completed, s.failed) == (12, 0), s.errors
    planned = [r.planned_output_tokens for r in run.load.records]
    assert [r.output_tokens for r in run.load.records] == planned  # ignore_eos: as planned
    assert s.output_tokens == sum(planned)
    assert [r.input_tokens for r in run.load.records] == [r.planned_input_tokens for r in run.load.records]
    assert all(r.finish_reason == "length" for r in run.load.records)
    assert _max_in_flight(run.load.records) <= 3
    assert s.latency["ttft_p50"] > 0 and s.latency["e2e_p99"] >= s.latency["ttft_p99"]
    assert s.throughput_tok_s == pytest.approx(s.output_tokens / s.duration_s)
    assert bench.model == server.engine.config.model  # the first of /v1/models


def test_poisson_and_constant_runs_send_on_schedule(server):
    for profile in ("poisson", "constant"):
        bench = run_bench_serve(server.url, _workload(8), profile, rate=10.0)
        run = bench.runs[0]
        assert run.summary.completed == 8, run.summary.errors
        scheduled = [s.arrival_time for s in run.workload.sample(8)]
        sent = [r.send_time - run.load.start_time for r in run.load.records]
        # loose enough for a busy machine, tight against sending early or all at once
        assert sent == pytest.approx(scheduled, abs=0.1) and min(np.subtract(sent, scheduled)) >= 0
        assert run.summary.max_send_lag_s < 0.1
    assert np.diff(scheduled) == pytest.approx(0.1)  # constant: even gaps at 10 req/s


def test_duration_limits_sending_not_answering(server):
    bench = run_bench_serve(server.url, _workload(4), "concurrent", concurrency=2, duration_s=0.6)
    run = bench.runs[0]
    assert run.summary.num_requests > 4  # the workload's num_requests does not cap a timed run
    assert run.summary.failed == 0
    assert all(r.send_time - run.load.start_time < 0.6 for r in run.load.records)
    assert run.summary.duration_s >= 0.6  # those in flight at the deadline finished


def test_chat_endpoint(server):
    bench = run_bench_serve(server.url, _workload(4), "concurrent", concurrency=2, endpoint="chat")
    run = bench.runs[0]
    assert run.summary.completed == 4, run.summary.errors
    assert [r.output_tokens for r in run.load.records] == [r.planned_output_tokens for r in run.load.records]


def test_failed_requests_are_counted_not_fatal(server):
    # prompts longer than the model's 512-token context: the server answers 400 to each
    bench = run_bench_serve(server.url, _workload(3, isl="600", osl="4"), "concurrent", concurrency=3)
    s = bench.runs[0].summary
    assert (s.completed, s.failed) == (0, 3)
    [(message, count)] = s.errors.items()
    assert count == 3 and message.startswith("HTTP 400: ") and "prompt" in message


def test_sweep_finds_the_peak_when_it_meets_the_slos(server):
    bench = run_bench_serve(server.url, _workload(6), "sweep", requests=6, sweep_steps=2,
                            slos=parse_slos("e2e_p99<=60s"))
    labels = [r.label for r in bench.runs]
    assert labels[0] == "synchronous" and labels[1] == "throughput (16 in flight)"  # 2 x max_num_seqs
    sw = bench.sweep
    assert sw.throughput_rate >= sw.synchronous_rate > 0
    assert sw.best_rate == pytest.approx(sw.throughput_rate) and sw.best_run == 2
    assert bench.runs[2].profile == "poisson" and len(bench.runs) == 3


def test_sweep_bisects_and_reports_when_nothing_meets(server):
    bench = run_bench_serve(server.url, _workload(4), "sweep", requests=4, sweep_steps=2,
                            slos=parse_slos("ttft_p50<=0.001ms"))
    assert bench.sweep.best_rate is None and len(bench.runs) == 2
    assert "even one request at a time misses" in bench.notes[0]


def test_sweep_needs_slos(server):
    with pytest.raises(BenchError, match="slo: profile sweep needs SLOs"):
        run_bench_serve(server.url, _workload(4), "sweep")


def test_record_stores_the_run_and_its_requests(server, tmp_path):
    store = Store(f"sqlite:///{tmp_path}/pilot.db")
    info = fetch_server_info(server.url)
    assert info.vocab_size == 512 and info.engine["max_num_seqs"] == 8
    slos = parse_slos("ttft_p99<=10s")
    bench = run_bench_serve(server.url, _workload(5), "poisson", rate=30.0, slos=slos, server=info)
    config = engine_config_for_record(info, None)
    run_id = record_http_run(store, bench.runs[0], config, slos)
    with store.session() as session:
        run = session.get(Run, run_id)
        count = session.scalar(select(func.count()).select_from(RequestRow).where(RequestRow.run_id == run_id))
        assert run.experiment_id is None and run.load_kind == "rate" and run.load_value == 30.0
        assert run.num_requests == count == bench.runs[0].summary.completed == 5
        assert run.engine_config.max_num_seqs == 8 and run.slos == "ttft_p99<=10s"
        assert run.latency == pytest.approx(bench.runs[0].summary.latency)
        assert run.workload.spec["arrival"] == {"kind": "poisson", "rate": 30.0}


def test_api_key_is_sent_and_checked(tiny_config):
    from engine.serving import start_server

    with start_server(tiny_config, api_key="sesame") as secured:
        with pytest.raises(BenchError, match="api_key: .* refused it \\(HTTP 401"):
            run_bench_serve(secured.url, _workload(2), "concurrent", concurrency=1)
        bench = run_bench_serve(secured.url, _workload(2), "concurrent", concurrency=1, api_key="sesame")
        assert bench.runs[0].summary.completed == 2


# ---- the command ----

def test_cli_writes_json_and_records(server, tmp_path):
    out, db = tmp_path / "bench.json", f"sqlite:///{tmp_path}/cli.db"
    result = runner.invoke(app, ["bench", "serve", "--url", server.url, "--isl", "8:32", "--osl", "2:6",
                                 "--concurrency", "2", "--requests", "6", "--slo", "ttft_p99<=10s",
                                 "--json", str(out), "--record", "--db", db])
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.output and "recorded run" in result.output
    data = json.loads(out.read_text())
    [run] = data["runs"]
    assert run["completed"] == 6 and run["slos_met"] is True and run["slo_attainment"] == 1.0
    assert len(run["requests"]) == 6 and all(r["ttft_s"] > 0 for r in run["requests"])
    assert data["slos"] == ["ttft_p99<=10s"] and run["load_kind"] == "concurrency"
    assert len(Store(db).runs()) == 1


def test_cli_sweep_calls_out_the_best_rate(server, tmp_path):
    result = runner.invoke(app, ["bench", "serve", "--url", server.url, "--isl", "8", "--osl", "2",
                                 "--profile", "sweep", "--requests", "4", "--sweep-steps", "1",
                                 "--slo", "e2e_p99<=60s", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "highest rate meeting e2e_p99<=60s" in result.output
    assert json.loads((tmp_path / "s.json").read_text())["sweep"]["best_rate"] > 0


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "0"], "--concurrency: must be >= 1, got 0"),
    (["--profile", "poisson"], "--rate: is required with profile poisson"),
    (["--rate", "2", "--duration", "soon"], "--duration: cannot read 'soon'"),
    (["--rate", "2", "--requests", "0"], "--requests: must be >= 1, got 0"),
    (["--profile", "sweep"], "--slo: profile sweep needs SLOs"),
    (["--rate", "2", "--slo", "ttft<=1s"], "unknown stat"),
    (["--rate", "2", "--endpoint", "embeddings"], "--endpoint: unknown endpoint 'embeddings'"),
    (["--isl", "0", "--rate", "2"], "isl '0'"),
    ([], "give --rate, --concurrency or --profile"),
    (["--rate", "2", "--workload", "/nonexistent.yaml"], "workload file not found"),
])
def test_cli_bad_flags_exit_2_naming_them(server, args, message):
    result = runner.invoke(app, ["bench", "serve", "--url", server.url, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_cli_unreachable_or_malformed_url():
    result = runner.invoke(app, ["bench", "serve", "--url", "http://127.0.0.1:9", "--rate", "1"])
    assert result.exit_code == 2 and "--url: cannot reach http://127.0.0.1:9" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["bench", "serve", "--url", "localhost:8000", "--rate", "1"])
    assert result.exit_code == 2 and "--url: expected http://HOST:PORT" in result.output
