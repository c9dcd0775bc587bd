"""`pilot profile` and `pilot runs ...`: the measurement side of the CLI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from planner.cli._common import Db, console, fail, fail_error, parse_duration, resolve_model_option

if TYPE_CHECKING:
    from planner.measure.profiler import ProfileResult
    from planner.profiling.watch import AccuracyWatch, Checkpoint

runs_app = typer.Typer(no_args_is_help=True, help="Inspect and export the measurement store.")

def profile(
    model: Path = typer.Option(..., "--model", callback=resolve_model_option,
                               help="model directory (Hugging Face layout), .gguf file, or a name "
                                    "from `pilot models list`"),
    space: Optional[str] = typer.Option(None, "--space", help="search space: a file, or a built-in "
                                        "name (cpu, gpu); default: the one for this machine"),
    workload: Optional[Path] = typer.Option(None, "--workload", help="workload YAML, JSONL trace, or a "
                                          "data set: sharegpt, sharegpt-multi-turn"),
    isl: str = typer.Option("32:256", "--isl", help="input lengths: N, LOW:HIGH or normal:MEAN,STD"),
    osl: str = typer.Option("16:128", "--osl", help="output lengths, as --isl"),
    num_requests: int = typer.Option(32, "--num-requests", help="requests per run"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="draft model for speculative knobs"),
    slo: Optional[str] = typer.Option(None, "--slo", help="also record goodput under these SLOs"),
    budget: str = typer.Option("10m", "--budget", help="wall-clock budget of this invocation"),
    max_runs: Optional[int] = typer.Option(None, "--max-runs", help="stop after this many runs (a "
                                           "count: the same profile on any host), or at --budget"),
    repeats: int = typer.Option(1, "--repeats", help="runs of each configuration and load level, back "
                                "to back; `pilot fit` judges predictions against their median"),
    via: str = typer.Option("http", "--via", help="measure through pilot serve and the OpenAI API, as "
                                                   "clients of a plan see it (http; what recommend "
                                                   "predicts), or the engine in process (engine)"),
    again: Optional[float] = typer.Option(None, "--again", help="instead of going on with the campaign, "
                                          "measure this share (0-1] of its finished measurements again: "
                                          "a later sitting, for `pilot fit`'s floor between sittings"),
    sitting: int = typer.Option(2, "--sitting", help="with --again, which sitting this is (the campaign "
                                "is the first): each later one measures the same share, so every "
                                "measurement in it gets a median over all its sittings"),
    until: Optional[str] = typer.Option(None, "--until", help="stop once the cross-validated error of the "
                                        "runs so far reaches these targets, e.g. \"median_ape<=8%,"
                                        "p90_ape<=20%\" (or at --budget / --max-runs, whichever comes first)"),
    order: str = typer.Option("builtin", "--order", help="which experiment next: builtin (the campaign's "
                              "farthest-point coverage order) or adaptive (after a first pass, where the "
                              "cost model's cross-validation folds disagree most per second of measuring)"),
    quality: bool = typer.Option(True, "--quality/--no-quality", help="also measure what each weight "
                                 "quantization costs in perplexity on held-out ShareGPT text (once "
                                 "per model; models with a tokenizer only)"),
    quality_gguf: bool = typer.Option(False, "--quality-gguf", help="with --quality, also llama.cpp's "
                                      "formats Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0: the model written to "
                                      "each as GGUF and read back (~30 s each for a 135M model)"),
    db: Db = None,
) -> Any:
    """Run the engine over a search space on this machine and store every run (resumable)."""
    # Returns the profile's AccuracyWatch (or None), for the quickstart's summary; typer reads the
    # annotations at run time, so the return type is spelled Any.
    from engine.model_config import CheckpointError
    from planner.measure.claims import heartbeat_s, stale_claim
    from planner.measure.profiler import VIA, plan_again, plan_campaign, space_for_this_host
    from planner.measure.profiler import profile as run_profile
    from planner.profiling.until import parse_until
    from planner.profiling.watch import watch_profile
    from planner.spec.search_space import SearchSpaceError
    from planner.spec.slo import SLOError, parse_slos
    from planner.spec.workload import Workload, WorkloadError
    from planner.store.database import Store

    if via not in VIA:
        fail(f"--via must be one of {', '.join(VIA)}, got {via!r}")
    if max_runs is not None and max_runs < 1:
        fail(f"--max-runs: must be >= 1, got {max_runs}")
    if repeats < 1:
        fail(f"--repeats: must be >= 1, got {repeats}")
    if again is not None and not 0 < again <= 1:
        fail(f"--again: must be a share in (0, 1], got {again}")
    if sitting < 2:
        fail(f"--sitting: must be >= 2 (the campaign itself is the first sitting), got {sitting}")
    if sitting != 2 and again is None:
        fail(f"--sitting: {sitting} needs --again (the share of measurements that sitting measures)")
    try:
        heartbeat_s(), stale_claim()  # the environment's, read now so a bad value stops nothing midway
        seconds = parse_duration(budget)
        slos = parse_slos(slo) if slo else None
        rule = parse_until(until) if until is not None else None
        load = (Workload.from_name_or_file(workload, model, num_requests) if workload is not None else
                Workload.from_flags(isl, osl, concurrency=1, num_requests=num_requests))
        if space is None:
            from planner.spec.hardware import detect

            space = "gpu" if detect().gpus else "cpu"
        search = space_for_this_host(space)
        if draft is None and any(search.values("num_speculative_tokens") if "num_speculative_tokens"
                                 in search.knobs else []):
            console.print("no --draft: speculative decoding is left out of the space")
            search = search.without_drafts()
        store = Store(db)
        with console.status("detecting hardware, planning the campaign"):
            campaign = plan_campaign(store, str(model), search, load, str(draft) if draft else None,
                                     repeats=repeats)
            if again is not None:
                campaign = plan_again(store, campaign, again, repeats, sitting=sitting)
            watch = watch_profile(store, campaign.id, str(model), load, via, rule, order, slos,
                                  str(draft) if draft else None)
    except (ValueError, FileNotFoundError, CheckpointError, SearchSpaceError, SLOError, WorkloadError) as err:
        fail_error(err)
    columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("left"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        # A count of runs has no time to fill: the bar then only shows it is working.
        task = progress.add_task("profiling", total=None if max_runs else seconds)

        estimate = [""]

        def on_progress(label: str, elapsed: float) -> None:
            progress.update(task, completed=min(elapsed, seconds), description=f"{label[:60]}{estimate[0]}")

        if watch is not None:
            def on_estimate(checkpoint: Checkpoint) -> None:
                a = checkpoint.accuracy
                estimate[0] = (f" | held-out {a.median_ape:.1%} median, {a.p90_ape:.1%} p90"
                               + (f" (target {watch.until})" if watch.until else ""))
            watch.on_estimate = on_estimate
        began = time.monotonic()
        try:
            result = run_profile(store, campaign, load, seconds, slos, on_progress, via=via, max_runs=max_runs,
                                 rank=watch.order.rank if watch is not None and watch.order else None,
                                 after_run=watch)
            if watch is not None and not result.stopped_by_rule:
                progress.update(task, description="estimating the held-out error on every run")
                watch.finish(time.monotonic() - began)
        except KeyboardInterrupt:
            progress.stop()
            console.print("interrupted: finished runs are kept; run the same command to continue")
            raise typer.Exit(130)
        progress.update(task, total=1, completed=1)
    console.print(f"campaign {result.campaign_id}: {len(result.run_ids)} new runs "
                  f"({result.done_before} from earlier invocations), {len(result.failed)} failed, "
                  f"{result.remaining} of {result.planned} experiments left; store: {store.where}")
    for experiment_id, error in result.failed[:5]:
        console.print(f"[yellow]experiment {experiment_id} failed:[/yellow] {error}")
    if watch is not None:
        print_accuracy(watch, result)
    if quality and again is None and (Path(model) / "tokenizer.json").is_file():
        print_quality(store, str(model), gguf=quality_gguf)
    return watch


def print_accuracy(watch: AccuracyWatch, result: ProfileResult) -> None:
    """Where the profile's cross-validated error stands, why it stopped, and what more would buy."""
    from planner.profiling.watch import outlook

    latest = watch.latest
    if latest is None:
        console.print("accuracy: too few measurements to cross-validate yet (run the same command to go on)")
        return
    if watch.target is not None:
        why = ("the target was met at two checks in a row" if watch.target == "met" else
               "the target was met at the last check, not yet at a second (run the same command to "
               "confirm it)" if watch.target == "met once" else
               "the target was NOT met: the campaign ran out" if not result.remaining else
               "the target was NOT met before the budget or --max-runs ended")
        console.print(f"stopped: {why} ({watch.until})")
    console.print(f"accuracy: {latest.describe()}, cross-validated on the store's runs of this model here")
    ahead = outlook(watch.history)
    if ahead is not None:
        runs, error = ahead
        console.print(f"outlook: about {error:.1%} median at {runs} runs, if the trend of the "
                      f"{len(watch.history)} checks so far holds (the host's noise floor bounds it: "
                      "`pilot profile --repeats 3` and `pilot fit` measure it); run the same command to go on")
    elif len(watch.history) >= 3:
        console.print("outlook: the error has stopped falling with more runs: the host's noise or the "
                      "model's form is the limit here, not the number of runs")


def print_quality(store, model: str, gguf: bool = False) -> None:
    """Measure (where the store has none) and print each quantization's perplexity cost."""
    from rich.table import Table

    from planner.measure.quality import measure_quality
    from planner.spec.dataset import DatasetError

    try:
        with console.status("measuring quantization quality") as status:
            measured = measure_quality(store, model, say=lambda message: status.update(message), gguf=gguf)
    except (DatasetError, ValueError) as err:
        console.print(f"[yellow]quality not measured:[/yellow] {err}")
        return
    table = Table(title=f"perplexity on held-out ShareGPT replies ({measured[0].tokens} tokens), float32 "
                        f"activations; unquantized: {measured[0].reference_perplexity:.3f}" if measured else "")
    for column in ("weights", "perplexity", "loss"):
        table.add_column(column, justify="left" if column == "weights" else "right")
    for q in sorted(measured, key=lambda q: (not q.in_engine, q.quantization, q.group_size)):
        table.add_row(q.scheme, f"{q.perplexity:.3f}", f"{q.loss:+.2%}")
    console.print(table)


def hardware_list(
    spec_dir: list[Path] = typer.Option([], "--dir", help="extra directory of spec YAML files"),
) -> None:
    """The hardware specs and prices pilot knows, and what this machine is."""
    from planner.spec.hardware import HardwareSpecError, detect, load_specs

    try:
        specs = load_specs(list(spec_dir) or None)
    except (HardwareSpecError, FileNotFoundError) as err:
        fail_error(err)
    table = Table(title="hardware specs (profiles/hardware)")
    for col in ("name", "memory GB", "GB/s", "bf16 TFLOPS", "$/hour"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for name, spec in sorted(specs.items()):
        table.add_row(name, f"{spec.memory_gb:g}", f"{spec.memory_bandwidth_gbs:g}",
                      f"{spec.peak_tflops['bf16']:g}", f"{spec.price_per_hour_usd:.2f}")
    console.print(table)
    found = detect()
    if found.gpus:
        console.print(f"this machine: {len(found.gpus)} x {found.gpus[0].name} "
                      f"({found.gpus[0].memory_gb:.0f} GB, driver {found.driver_version}) -> {found.spec_name}")
    else:
        cpu = found.cpu
        console.print(f"this machine: {cpu.model}, {cpu.usable_threads} threads, "
                      f"{cpu.memory_gb:.1f} GB, AVX-512 {'yes' if cpu.avx512 else 'no'} -> cpu-host")


@runs_app.command("list")
def runs_list(
    db: Db = None,
    limit: int = typer.Option(50, help="most recent runs shown"),
) -> None:
    """The stored runs: configuration, load and headline metrics."""
    from planner.measure.export import run_records
    from planner.store.database import Store

    try:
        records = run_records(Store(db))[-limit:]
    except ValueError as err:
        fail_error(err)
    table = Table(title=f"{len(records)} runs")
    for col in ("id", "model", "config", "load", "tok/s", "ttft p50", "itl p50", "e2e p95"):
        table.add_column(col, justify="right" if col not in ("model", "config", "load") else "left")
    for r in records:
        config = f"{r['quantization'] or r['dtype']} seqs={r['max_num_seqs']} tp={r['tensor_parallel_size']} " \
                 f"dp={r['data_parallel_size']}" \
                 + (f" k={r['num_speculative_tokens']}" if r['num_speculative_tokens'] else "")
        load = f"{'c' if r['load_kind'] == 'concurrency' else 'rate '}={r['load_value']:g}"
        table.add_row(str(r["run_id"]), r["model"], config, load,
                      f"{r['throughput_tok_s']:.1f}", f"{r['ttft_p50'] * 1e3:.0f} ms",
                      f"{r['itl_p50'] * 1e3:.1f} ms", f"{r['e2e_p95']:.2f} s")
    console.print(table)


@runs_app.command("export")
def runs_export(
    out: Path = typer.Option(..., "--out", help="file to write"),
    fmt: str = typer.Option("csv", "--format", help="csv or parquet"),
    table: str = typer.Option("runs", "--table", help="runs, requests or steps"),
    db: Db = None,
) -> None:
    """Write a table of the store to CSV or Parquet."""
    from planner.measure.export import export
    from planner.store.database import Store

    try:
        count = export(Store(db), out, fmt, table)
    except ValueError as err:
        fail_error(err)
    console.print(f"wrote {count} {table} to {out}")
