"""`pilot bench serve`: load-test a running OpenAI-compatible server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli._common import Db, console, fail_error, open_store, parse_duration, resolve_model_option

_STATS = ("p50", "p90", "p99")
_METRICS = (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E"))


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2g}" if 0 < ms < 1 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _met(value: bool | None) -> str:
    return "" if value is None else "[green]yes[/]" if value else "[red]no[/]"


def latency_table(run: Any) -> Table:
    """One run's latency percentiles, a row per metric."""
    table = Table(title=f"{run.label}: latency (ms)")
    table.add_column("metric")
    for stat in (*_STATS, "mean"):
        table.add_column(stat, justify="right")
    for key, name in _METRICS:
        table.add_row(name, *(_ms(run.summary.latency.get(f"{key}_{stat}")) for stat in (*_STATS, "mean")))
    return table


def runs_table(bench: Any, latency: bool = True) -> Table:
    """A row per run (a sweep's rates), the highest rate meeting the SLOs marked."""
    best = bench.sweep.best_run if bench.sweep else None
    table = Table(title="pilot bench serve" + (" — sweep" if bench.sweep else ""))
    columns = ["", "run", "ok", "failed", "seconds", "req/s", "tok/s",
               *((f"{name} p50/p99 ms" for _, name in _METRICS) if latency else ()),
               "goodput", "attain", "SLOs"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("", "run") else "right")
    for i, run in enumerate(bench.runs):
        s, lat = run.summary, run.summary.latency
        cells = [f"{_ms(lat.get(f'{key}_p50'))} / {_ms(lat.get(f'{key}_p99'))}" for key, _ in _METRICS]
        table.add_row(
            "*" if i == best else "", run.label, str(s.completed), str(s.failed), f"{s.duration_s:.1f}",
            f"{s.request_rate:.2f}", f"{s.throughput_tok_s:.1f}", *(cells if latency else ()),
            "-" if s.goodput is None else f"{s.goodput:.2f}", _share(s.attainment), _met(s.slos_met))
    return table


def print_result(bench: Any) -> None:
    if bench.sweep is None:
        console.print(latency_table(bench.runs[0]))
    console.print(runs_table(bench, latency=bench.sweep is not None))
    for run in bench.runs:
        for message, count in list(run.summary.errors.items())[:5]:
            console.print(f"[yellow]{run.label}:[/yellow] {count} failed: {message}")
        if run.summary.max_send_lag_s > 0.05:
            console.print(f"[yellow]{run.label}:[/yellow] the client sent up to "
                          f"{run.summary.max_send_lag_s * 1000:.0f} ms late; it may be the bottleneck")
    for note in bench.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if bench.sweep is not None:
        sw = bench.sweep
        console.print(f"synchronous {sw.synchronous_rate:.3g} req/s, throughput {sw.throughput_rate:.3g} req/s")
        if sw.best_rate is not None:
            console.print(f"[bold green]highest rate meeting {', '.join(map(str, bench.slos))}:[/bold green] "
                          f"{sw.best_rate:.3g} req/s (Poisson)")
        else:
            console.print(f"[bold red]no rate measured meets {', '.join(map(str, bench.slos))}[/bold red]")


def bench_serve(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="the server's base URL"),
    model: Optional[str] = typer.Option(None, "--model", help="model name; default: the first of GET /v1/models"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PILOT_API_KEY",
                                          help="sent as Authorization: Bearer"),
    workload: Optional[Path] = typer.Option(None, "--workload", help="workload YAML, JSONL trace, or "
                                            "sharegpt / sharegpt-multi-turn (real prompts; needs --tokenizer)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", callback=resolve_model_option,
                                             help="the served model (directory, .gguf or name) whose "
                                             "tokenizer counts a data set's tokens"),
    isl: str = typer.Option("32:256", "--isl", help="input lengths without --workload: N, LOW:HIGH or normal:MEAN,STD"),
    osl: str = typer.Option("16:128", "--osl", help="output lengths without --workload, as --isl"),
    profile: Optional[str] = typer.Option(None, "--profile", help="poisson | constant | concurrent | sweep; "
                                          "default: poisson with --rate, concurrent with --concurrency, "
                                          "else the workload file's arrivals"),
    rate: Optional[float] = typer.Option(None, "--rate", help="requests per second (poisson, constant)"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="requests in flight (concurrent; "
                                              "sweep: its throughput run)"),
    duration: Optional[str] = typer.Option(None, "--duration", help="send for this long (per run), "
                                           "e.g. 60s, 2m, 500ms"),
    requests: Optional[int] = typer.Option(None, "--requests", help="send this many (per run); default: "
                                           "the workload's num_requests, 100 with --isl/--osl"),
    slo: Optional[str] = typer.Option(None, "--slo", help='targets, e.g. "ttft_p95<=500ms,itl_p95<=50ms"'),
    endpoint: str = typer.Option("completions", "--endpoint", help="completions | chat"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="prompt token ids are below it; "
                                             "default: what a pilot server reports"),
    sweep_steps: int = typer.Option(5, "--sweep-steps", help="Poisson runs of the sweep's bisection"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the results (every request) here"),
    record: bool = typer.Option(False, "--record", help="store each run in --db"),
    db: Db = None,
    config: Optional[Path] = typer.Option(None, "--config", help="the server's engine config or plan file "
                                          "(for --record when the server is not pilot)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="workload seed (prompts, lengths, arrivals)"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds a request may take"),
) -> None:
    """Replay a workload against an OpenAI-compatible server and measure latency and goodput."""
    from planner.bench.serve import (
        check_flags,
        engine_config_for_record,
        fetch_server_info,
        record_http_run,
        run_bench_serve,
    )
    from planner.loadgen.http_load import BenchError
    from planner.spec.slo import parse_slos
    from planner.spec.workload import Workload

    try:
        seconds = parse_duration(duration, "duration") if duration is not None else None
        slos = parse_slos(slo) if slo else None
        if workload is not None:
            load = Workload.from_name_or_file(workload, tokenizer, requests or 100, seed or 0)
        else:
            if profile is None and rate is None and concurrency is None:
                raise BenchError("give --rate, --concurrency or --profile (with --isl/--osl the "
                                 "workload has no arrivals of its own)")
            load = Workload.from_flags(isl, osl, concurrency=1, num_requests=requests or 100)
        if urlparse(url).scheme not in ("http", "https"):
            raise BenchError(f"--url: expected http://HOST:PORT, got {url!r}")
        check_flags(load, profile, rate, concurrency, requests, seconds, slos or [], endpoint,
                    timeout, vocab_size, sweep_steps)  # before asking the server anything
        server = fetch_server_info(url, api_key, min(timeout, 30.0))
        engine = engine_config_for_record(server, config) if record else None
        store = open_store(db) if record else None
    except (ValueError, FileNotFoundError) as err:  # BenchError, SLOError, WorkloadError: ValueErrors
        fail_error(err)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(label: str, p: Any) -> None:
            if label not in tasks:
                total = (requests or load.num_requests) if seconds is None else seconds
                tasks[label] = progress.add_task(label, total=total, failed=0)
            if seconds is None:
                progress.update(tasks[label], completed=p.done, failed=p.failed)
            else:  # a duration bar: seconds sent for, then the stragglers
                progress.update(tasks[label], completed=min(p.elapsed_s, seconds), failed=p.failed,
                                description=f"{label} ({p.done}/{p.sent} done)")

        try:
            bench = run_bench_serve(url, load, profile, rate=rate, concurrency=concurrency, requests=requests,
                                    duration_s=seconds, slos=slos, endpoint=endpoint, model=model,
                                    api_key=api_key, vocab_size=vocab_size, timeout_s=timeout, seed=seed,
                                    sweep_steps=sweep_steps, server=server, on_progress=on_progress)
        except BenchError as err:
            fail_error(err)
    print_result(bench)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(bench.to_dict(), indent=2))
        console.print(f"wrote {json_out}")
    if store is not None:
        ids = []
        for run in bench.runs:
            if run.summary.completed:
                ids.append(record_http_run(store, run, engine, slos))
            else:
                console.print(f"[yellow]{run.label}:[/yellow] not recorded, every request failed")
        host = urlparse(url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1", os.uname().nodename):
            console.print(f"[yellow]note:[/yellow] recorded under this machine's hardware; the server at "
                          f"{host} should run on it")
        console.print(f"recorded run{'s' if len(ids) != 1 else ''} {', '.join(map(str, ids))} in {store.where}")
    if bench.sweep is None and any(r.summary.completed == 0 for r in bench.runs):
        raise typer.Exit(1)
