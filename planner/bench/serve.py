"""`pilot bench serve`: one load level, or a sweep for the highest rate that meets the SLOs,
against a running OpenAI-compatible server; results as JSON and, optionally, in the store.

The sweep follows GuideLLM's: a synchronous run (one request at a time) and a throughput run
(many in flight) bound the request rates the server can take; Poisson runs between them then
bisect for the highest rate whose percentiles still meet every SLO.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from planner.loadgen.http_load import (
    ENDPOINTS,
    BenchError,
    LoadResult,
    LoadSummary,
    Progress,
    Target,
    error_message,
    run_load,
    summarize_records,
)
from planner.spec.slo import SLO
from planner.spec.workload import ClosedLoopArrival, ConstantArrival, PoissonArrival, TraceArrival, Workload

PROFILES = ("poisson", "constant", "concurrent", "sweep")
# In flight during the sweep's throughput run when neither --concurrency nor the server says
# how many sequences it batches.
DEFAULT_THROUGHPUT_CONCURRENCY = 64


@dataclass(frozen=True)
class ServerInfo:
    """What GET /v1/models says; `engine` and `vocab_size` only a pilot server reports."""

    model: str
    max_model_len: int | None = None
    engine: dict[str, Any] | None = None
    vocab_size: int | None = None


def fetch_server_info(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> ServerInfo:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=timeout_s)
    except httpx.InvalidURL as err:
        raise BenchError(f"{url!r} is not a URL ({err})", field="url") from None
    except httpx.HTTPError as err:
        raise BenchError(f"cannot reach {url} ({type(err).__name__}: {err}); "
                         f"is the server running?", field="url") from None
    if response.status_code in (401, 403):
        raise BenchError(f"{url} refused it (HTTP {response.status_code}: "
                         f"{error_message(response.content)})", field="api_key")
    if response.status_code >= 400:
        raise BenchError(f"GET {url}/v1/models answered HTTP {response.status_code}: "
                         f"{error_message(response.content)}", field="url")
    try:
        first = response.json()["data"][0]
        model = str(first["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{url}/v1/models is not an OpenAI model list: "
                         f"{response.text[:200]!r}", field="url") from None
    pilot = first.get("pilot") if isinstance(first.get("pilot"), dict) else {}
    vocab = pilot.get("vocab_size")
    return ServerInfo(model, first.get("max_model_len"), pilot.get("engine"),
                      int(vocab) if isinstance(vocab, int) else None)


@dataclass
class RunResult:
    label: str  # "poisson 2 req/s", "synchronous", ...
    profile: str  # poisson | constant | concurrent | trace
    load_kind: str  # rate | concurrency, as the store's runs say it
    load_value: float
    workload: Workload  # with the arrival process this run used
    started_at: dt.datetime
    load: LoadResult
    summary: LoadSummary

    @property
    def meets(self) -> bool | None:
        return self.summary.slos_met

    def to_dict(self, requests: bool = True) -> dict[str, Any]:
        s = self.summary
        out: dict[str, Any] = {
            "label": self.label, "profile": self.profile, "load_kind": self.load_kind,
            "load_value": self.load_value, "started_at": self.started_at.isoformat(),
            "duration_s": s.duration_s, "num_requests": s.num_requests, "completed": s.completed,
            "failed": s.failed, "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
            "throughput_tok_s": s.throughput_tok_s, "request_rate": s.request_rate,
            "goodput": s.goodput, "slo_attainment": s.attainment, "slos_met": s.slos_met,
            "max_send_lag_s": s.max_send_lag_s, "latency": s.latency, "errors": s.errors}
        if requests:
            out["requests"] = [_request_dict(r, self.load.start_time) for r in self.load.records]
        return out


def _request_dict(r: Any, start: float) -> dict[str, Any]:
    out = {"index": r.index, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
           "sent_s": r.send_time - start, "status": r.status, "finish_reason": r.finish_reason,
           "error": r.error}
    if r.ok:
        lat = r.latency()
        out |= {"ttft_s": lat.ttft_s, "tpot_s": lat.tpot_s, "itl_mean_s": lat.mean_itl_s,
                "e2e_s": lat.e2e_s, "chunks": len(r.chunk_times)}
    return out


@dataclass
class SweepOutcome:
    synchronous_rate: float  # completed req/s one at a time
    throughput_rate: float  # completed req/s with many in flight
    best_rate: float | None  # the highest Poisson rate measured that met every SLO
    best_run: int | None  # its index in BenchResult.runs


@dataclass
class BenchResult:
    url: str
    model: str
    endpoint: str
    profile: str
    slos: list[SLO]
    runs: list[RunResult]
    sweep: SweepOutcome | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self, requests: bool = True) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "endpoint": self.endpoint, "profile": self.profile,
                "slos": [str(s) for s in self.slos],
                "workload": self.runs[0].workload.model_dump(mode="json") if self.runs else None,
                "runs": [r.to_dict(requests) for r in self.runs],
                "sweep": None if self.sweep is None else vars(self.sweep).copy(), "notes": self.notes}


def resolve_load(workload: Workload, profile: str | None, rate: float | None,
                 concurrency: int | None) -> tuple[str, Workload, str, float]:
    """(profile, the workload with that arrival process, load kind, load value). Without a
    profile: --rate means Poisson, --concurrency a closed loop, neither the workload's own."""
    if profile is not None and profile not in PROFILES:
        raise BenchError(f"unknown profile {profile!r} — expected one of {', '.join(PROFILES)}", field="profile")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise BenchError(f"must be a positive number of requests per second, got {rate!r}", field="rate")
    if concurrency is not None and concurrency < 1:
        raise BenchError(f"must be >= 1, got {concurrency!r}", field="concurrency")
    if profile is None:
        if rate is not None and concurrency is not None:
            raise BenchError(f"give one of rate ({rate:g}) or concurrency ({concurrency}), not both", field="rate")
        profile = "poisson" if rate is not None else "concurrent" if concurrency is not None else None
    if profile in ("poisson", "constant"):
        if rate is None:
            raise BenchError(f"is required with profile {profile}", field="rate")
        if concurrency is not None:
            raise BenchError(f"{concurrency} does not apply to profile {profile} "
                             f"(an open loop at rate {rate:g})", field="concurrency")
        arrival = PoissonArrival(rate=rate) if profile == "poisson" else ConstantArrival(rate=rate)
        return profile, workload.model_copy(update={"arrival": arrival}), "rate", rate
    if profile == "concurrent":
        if concurrency is None:
            raise BenchError("is required with profile concurrent", field="concurrency")
        if rate is not None:
            raise BenchError(f"{rate:g} does not apply to profile concurrent "
                             f"(a closed loop of concurrency {concurrency})", field="rate")
        closed = workload.model_copy(update={"arrival": ClosedLoopArrival(concurrency=concurrency)})
        return profile, closed, "concurrency", float(concurrency)
    if profile == "sweep":
        raise BenchError("the sweep profile runs several loads: use run_bench_serve")
    arrival = workload.arrival  # the workload file's own
    if isinstance(arrival, ClosedLoopArrival):
        return "concurrent", workload, "concurrency", float(arrival.concurrency)
    if isinstance(arrival, TraceArrival):
        span = arrival.offsets[-1]
        return "trace", workload, "rate", (len(arrival.offsets) - 1) / span if span > 0 else 0.0
    return ("poisson" if isinstance(arrival, PoissonArrival) else "constant"), workload, "rate", arrival.rate


def check_flags(workload: Workload, profile: str | None, rate: float | None,
                concurrency: int | None, requests: int | None, duration_s: float | None,
                slos: Sequence[SLO], endpoint: str, timeout_s: float | None,
                vocab_size: int | None, sweep_steps: int) -> None:
    """Raise BenchError naming the first bad flag: all that can be checked without the server."""
    if endpoint not in ENDPOINTS:
        raise BenchError(f"unknown endpoint {endpoint!r} — expected one of {', '.join(ENDPOINTS)}", field="endpoint")
    if requests is not None and duration_s is not None:
        raise BenchError(f"give one of requests ({requests}) or duration ({duration_s:g} s), not both",
                         field="requests")
    if requests is not None and requests < 1:
        raise BenchError(f"must be >= 1, got {requests}", field="requests")
    if timeout_s is None or not timeout_s > 0:
        raise BenchError(f"must be > 0 seconds, got {timeout_s!r}", field="timeout")
    if vocab_size is not None and vocab_size < 1:
        raise BenchError(f"must be >= 1, got {vocab_size}", field="vocab_size")
    if profile == "sweep":
        if not slos:
            raise BenchError("profile sweep needs SLOs: it looks for the highest rate that meets them "
                             "(e.g. 'ttft_p95<=500ms,itl_p95<=50ms')", field="slo")
        if rate is not None:
            raise BenchError(f"{rate:g} does not apply to profile sweep: the sweep finds the rate", field="rate")
        if concurrency is not None and concurrency < 1:
            raise BenchError(f"must be >= 1, got {concurrency!r}", field="concurrency")
        if sweep_steps < 1:
            raise BenchError(f"must be >= 1, got {sweep_steps}", field="sweep_steps")
    else:
        resolve_load(workload, profile, rate, concurrency)  # bad flags fail before any request


def run_bench_serve(url: str, workload: Workload, profile: str | None = None, *,
                    rate: float | None = None, concurrency: int | None = None,
                    requests: int | None = None, duration_s: float | None = None,
                    slos: Sequence[SLO] | None = None, endpoint: str = "completions",
                    model: str | None = None, api_key: str | None = None,
                    vocab_size: int | None = None, timeout_s: float = 600.0, seed: int | None = None,
                    sweep_steps: int = 5, server: ServerInfo | None = None,
                    on_progress: Callable[[str, Progress], None] | None = None) -> BenchResult:
    """Measure `url` under `workload` at one load, or sweep (`profile="sweep"`, SLOs needed).
    Without `requests` or `duration_s`, each run sends the workload's num_requests."""
    slos = list(slos or [])
    check_flags(workload, profile, rate, concurrency, requests, duration_s, slos, endpoint,
                timeout_s, vocab_size, sweep_steps)
    if seed is not None:
        workload = workload.model_copy(update={"seed": seed})
    if requests is None and duration_s is None:
        requests = workload.num_requests
    server = server or fetch_server_info(url, api_key, min(timeout_s, 30.0))
    vocab = vocab_size or server.vocab_size
    if vocab is None:
        raise BenchError(f"{url} does not report its vocabulary size (only a pilot server "
                         f"does); pass --vocab-size", field="vocab_size")
    target = Target(url.rstrip("/"), model or server.model, endpoint, api_key, timeout_s)  # type: ignore[arg-type]

    def measure(label: str, prof: str | None, r: float | None, c: int | None) -> RunResult:
        name, load, kind, value = resolve_load(workload, prof, r, c)
        started = dt.datetime.now(dt.timezone.utc)
        report = (lambda p: on_progress(label, p)) if on_progress else None
        in_flight = int(value) if kind == "concurrency" else None
        result = run_load(target, load, vocab, in_flight, requests, duration_s, report)
        summary = summarize_records(result.records, result.duration_s, slos, result.max_send_lag_s)
        return RunResult(label, name, kind, value, load, started, result, summary)

    bench = BenchResult(target.url, target.model, endpoint, profile or "", slos, [])
    if profile != "sweep":
        name, _, kind, value = resolve_load(workload, profile, rate, concurrency)
        bench.profile = name
        label = f"{name} {value:g} {'in flight' if kind == 'concurrency' else 'req/s'}"
        bench.runs.append(measure(label, profile, rate, concurrency))
        return bench
    in_flight = concurrency or (2 * int(server.engine["max_num_seqs"]) if server.engine and
                                server.engine.get("max_num_seqs") else DEFAULT_THROUGHPUT_CONCURRENCY)
    sweep(bench, measure, in_flight, sweep_steps)
    return bench


def sweep(bench: BenchResult, measure: Callable[[str, str | None, float | None, int | None], RunResult],
          in_flight: int, steps: int) -> None:
    """Add the sweep's runs to `bench`: `measure(label, profile, rate, concurrency)` runs one
    load; at most `steps` Poisson runs after the synchronous and throughput ones."""
    sync = measure("synchronous", "concurrent", None, 1)
    bench.runs.append(sync)
    peak = measure(f"throughput ({in_flight} in flight)", "concurrent", None, in_flight)
    bench.runs.append(peak)
    low, high = sync.summary.request_rate, max(peak.summary.request_rate, sync.summary.request_rate)
    bench.sweep = SweepOutcome(low, high, None, None)
    if low <= 0:
        bench.notes.append("no request completed one at a time; nothing to sweep")
        return
    if not sync.meets:
        bench.notes.append("even one request at a time misses the SLOs: no rate meets them")
        return
    # `feasible` is the rate one request at a time sustained (it met the SLOs); `infeasible` the
    # lowest Poisson rate seen to miss them. The first probe is the peak itself.
    feasible, infeasible, rate = low, None, high
    for _ in range(steps):
        run = measure(f"poisson {rate:.3g} req/s", "poisson", rate, None)
        bench.runs.append(run)
        if run.meets:
            feasible = rate
            bench.sweep.best_rate, bench.sweep.best_run = rate, len(bench.runs) - 1
            if infeasible is None:  # the peak rate itself meets them: nothing higher to find
                break
        else:
            infeasible = rate
        rate = (feasible + infeasible) / 2
    if bench.sweep.best_rate is None:
        bench.notes.append(f"no Poisson rate tried met the SLOs; one request at a time "
                           f"({low:.3g} req/s) did")


def engine_config_for_record(server: ServerInfo | None, config_file: Path | None) -> Any:
    """The served engine config to record the run under: --config if given, else what a pilot
    server reports. Checked before the benchmark runs, so a run is never measured for nothing."""
    from engine import EngineConfig

    if config_file is not None:
        try:
            config = EngineConfig.from_file(config_file)
        except (FileNotFoundError, ValueError) as err:
            raise BenchError(f"{err}", field="config") from None
    elif server is not None and server.engine:
        try:
            config = EngineConfig.model_validate(server.engine)
        except ValueError as err:
            raise BenchError(f"the server's engine config does not validate ({err}); "
                             f"pass --config FILE", field="record") from None
    else:
        raise BenchError("the server does not report its engine config (only a pilot server "
                         "does); pass --config FILE with the engine config or plan it runs", field="record")
    if not (Path(config.model) / "config.json").is_file():
        raise BenchError(f"the model directory {config.model!r} of the engine config is not "
                         f"on this machine; the store describes a model by its config.json", field="record")
    return config


def record_http_run(store: Any, run: RunResult, config: Any, slos: Sequence[SLO] | None = None) -> int:
    """Store one measured run: a Run (no experiment, no steps: a server's steps are not seen
    from outside) and a RequestRow per completed request. Hardware is this machine's, so record
    from the host the server runs on. Returns the run's id."""
    from planner.store.database import RequestRow, Run
    from planner.store.records import config_row, engine_version, git_revision, hardware_row, model_row, workload_row

    s = run.summary
    if not s.completed:
        raise BenchError(f"{run.label}: nothing to record, every request failed")
    hardware, model = hardware_row(store, measure=False), model_row(store, config.model)
    engine, load = config_row(store, config), workload_row(store, run.workload)
    done = [r for r in run.load.records if r.ok]
    with store.session() as session, session.begin():
        row = Run(experiment_id=None, hardware_id=hardware.id, model_id=model.id,
                  engine_config_id=engine.id, workload_id=load.id, load_kind=run.load_kind,
                  load_value=run.load_value, started_at=run.started_at, duration_s=s.duration_s,
                  num_requests=s.completed, output_tokens=s.output_tokens,
                  throughput_tok_s=s.throughput_tok_s, request_rate=s.request_rate, goodput=s.goodput,
                  slos=",".join(str(x) for x in slos) if slos else None, latency=s.latency,
                  engine_version=engine_version(), git_revision=git_revision())
        session.add(row)
        session.flush()
        for r in done:
            lat = r.latency()
            session.add(RequestRow(
                run_id=row.id, position=r.index, input_tokens=r.input_tokens,
                output_tokens=r.output_tokens, arrival_s=r.send_time - run.load.start_time,
                ttft_s=lat.ttft_s, tpot_s=lat.tpot_s, itl_mean_s=lat.mean_itl_s, e2e_s=lat.e2e_s,
                num_preemptions=0, num_cached_prompt_tokens=r.cached_tokens or 0,
                acceptance_rate=None, finish_reason=r.finish_reason))
        return row.id
