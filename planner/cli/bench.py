"""`pilot bench ...`: pilot's self-benchmarks, each printing a table of ratios against its peer
or target (the load generator, `pilot bench serve`, lives in bench_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli._common import Db, console, fail, fail_error, open_store, parse_duration, resolve_model_option
from planner.cli.bench_gpu import bench_gpu
from planner.cli.bench_profile import bench_profile
from planner.cli.bench_serve import bench_serve
from planner.cli.fit import print_report

app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratio tables.")
app.command("serve")(bench_serve)
app.command("gpu")(bench_gpu)
app.command("profile")(bench_profile)


@app.command("engine")
def bench_engine(
    model: Optional[Path] = typer.Option(None, "--model", callback=resolve_model_option,
                                         help="checkpoint; default: make llama-110m"),
    dtypes: str = typer.Option("float32,bfloat16", help="comma-separated dtypes to measure"),
    decode_tokens: int = typer.Option(128, help="tokens generated in the batch-1 measurement"),
    num_requests: int = typer.Option(64, help="requests in the offline workload"),
    skip_hf: bool = typer.Option(False, "--skip-hf", help="do not run the transformers baseline"),
    out: Optional[Path] = typer.Option(None, help="also write the results as JSON here"),
) -> None:
    """Engine vs transformers: batch-1 decode, offline throughput, achieved bandwidth."""
    from engine.model_config import CheckpointError
    from planner.bench.engine import run_engine_benchmark

    try:
        run_engine_benchmark(model=model, dtypes=[d.strip() for d in dtypes.split(",") if d.strip()],
                             decode_tokens=decode_tokens, num_requests=num_requests,
                             with_hf=not skip_hf, json_out=out)
    except (ValueError, CheckpointError) as err:
        fail_error(err)


@app.command("llamacpp")
def bench_llamacpp(
    model: Path = typer.Option(..., "--model", callback=resolve_model_option,
                               help="a float llama or qwen2 model with a tokenizer (directory, .gguf or name)"),
    precisions: str = typer.Option("bf16,int8,int4", help="comma-separated: bf16 (against BF16), int8 "
                                   "(against Q8_0), int4 (groups of 32, against Q4_1)"),
    threads: int = typer.Option(2, help="threads for both engines"),
    decode_tokens: int = typer.Option(128, help="tokens generated per batch-1 run"),
    repeats: int = typer.Option(3, help="runs of each engine, interleaved; the best counts"),
    workdir: Path = typer.Option(Path("bench-llamacpp"), help="where the exported GGUF files go"),
    out: Optional[Path] = typer.Option(None, help="also write the results as JSON here"),
) -> None:
    """Engine vs llama.cpp on the same weights: batch-1 decode and prefill at each precision."""
    from engine.model_config import CheckpointError
    from planner.bench.llamacpp import print_llamacpp_report, run_llamacpp_benchmark

    if threads < 1 or decode_tokens < 1 or repeats < 1:
        fail(f"--threads, --decode-tokens and --repeats must be >= 1, got {threads}, {decode_tokens}, {repeats}")
    try:
        results = run_llamacpp_benchmark(model, [p.strip() for p in precisions.split(",") if p.strip()],
                                         workdir, threads, decode_tokens, repeats, out)
    except (ValueError, CheckpointError) as err:
        fail_error(err)
    print_llamacpp_report(results, threads, model.name)


@app.command("knobs")
def bench_knobs(
    model: Optional[Path] = typer.Option(None, "--model", callback=resolve_model_option,
                                         help="checkpoint; default: make llama-110m"),
    group_size: int = typer.Option(128, help="int4 group size"),
    decode_tokens: int = typer.Option(128, help="tokens generated per batch-1 run"),
    repeats: int = typer.Option(5, help="runs per engine (medians shown)"),
    pair: Optional[Path] = typer.Option(None, "--pair", help="`pilot models train` output for the "
                                        "speculative-decoding rows; default: train one (~5 min)"),
    skip_spec: bool = typer.Option(False, "--skip-spec", help="leave out speculative decoding"),
    skip_parallel: bool = typer.Option(False, "--skip-parallel",
                                       help="leave out data and tensor parallelism"),
    skip_compile: bool = typer.Option(False, "--skip-compile", help="leave out torch.compile"),
    num_requests: int = typer.Option(64, help="requests in the data-parallel offline workload"),
    out: Optional[Path] = typer.Option(None, help="also write the results as JSON here"),
) -> None:
    """What each serving knob does to speed here: int8/int4 against bf16 and speculative
    decoding against the target alone at batch 1; data-parallel replicas and tensor-parallel
    ranks against one process; torch.compile against the engine's kernels."""
    from engine.model_config import CheckpointError
    from planner.bench.knobs import run_knobs_benchmark

    try:
        run_knobs_benchmark(model=model, group_size=group_size, decode_tokens=decode_tokens,
                            repeats=repeats, json_out=out, pair=pair, with_spec=not skip_spec,
                            with_parallel=not skip_parallel, with_compile=not skip_compile,
                            num_requests=num_requests)
    except (ValueError, CheckpointError) as err:
        fail_error(err)


@app.command("sim")
def bench_sim(
    db: Db = None,
    model: Optional[Path] = typer.Option(None, "--model", callback=resolve_model_option,
                                         help="model to simulate; default: the "
                                         "store's most recently profiled one"),
    num_requests: int = typer.Option(1000, "--requests", help="requests per simulation"),
) -> None:
    """Time the simulator: 1,000 requests through the fitted cost model, against 1 s."""
    from planner.bench.sim import TARGET_S, run_sim_benchmark
    from planner.costmodel import fit as cost_model

    if num_requests < 1:
        fail(f"--requests: must be >= 1, got {num_requests}")
    store = open_store(db)
    fitted = cost_model.load(store)
    if fitted is None:
        fail(f"no cost model in {store.where}: run `pilot fit` first")
    runs = store.runs()
    if model is None and not runs:
        fail(f"--model: the store {store.where} has no runs to take a model from")
    model_dir = str(model) if model is not None else _model_path(store, runs[-1].model_id)
    hardware = next(iter(fitted.hardware))
    table = Table(title=f"Simulator speed ({num_requests} requests, {Path(model_dir).name} on {hardware})")
    for column in ("scenario", "wall s", "vs 1 s target", "simulated s", "simulated tok/s"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for t in run_sim_benchmark(fitted, model_dir, hardware, num_requests):
        table.add_row(t.scenario, f"{t.wall_s:.3f}", f"{t.wall_s / TARGET_S:.2f}x",
                      f"{t.simulated_s:.1f}", f"{t.throughput_tok_s:.0f}")
    console.print(table)


def _model_path(store: Any, model_id: int) -> str:
    from planner.store.database import Model

    with store.session() as session:
        return session.get(Model, model_id).path


@app.command("fit")
def bench_fit(
    workdir: Path = typer.Option(Path("pilot-bench-fit"), "--workdir", help="models and the store "
                                 "(reference.db) go here; a second run continues the profiling"),
    budget: str = typer.Option("170s", "--budget", help="profiling time per model (0: fit the store as is)"),
    models: Optional[str] = typer.Option(None, "--models", help="comma-separated subset of the reference "
                                         "models (default: all nine)"),
    folds: int = typer.Option(5, "--folds", help="cross-validation folds by run"),
    repeats: int = typer.Option(3, "--repeats", help="runs of each measurement back to back in a sitting"),
    sittings: int = typer.Option(1, "--sittings", help="then measure each model's measurements again in "
                                 "this many sittings in all, each after every model's previous one, so "
                                 "a measurement's median spans the host's spells"),
    again: float = typer.Option(0.0, "--again", help="the share (0-1) of measurements the later sittings "
                                "take (0: all); alone, one later sitting of this share"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the report as JSON"),
) -> None:
    """The cost model's reference: profile nine models here, fit, and print the
    cross-validated errors against the targets and the host's noise floor."""
    from planner.bench.fit import PAIR, REFERENCE_MODELS, check_names, later_sittings, run_fit_benchmark
    from planner.costmodel.fit import FitError

    names = [m.strip() for m in models.split(",") if m.strip()] if models else [*REFERENCE_MODELS, PAIR]
    if folds < 2:
        fail(f"--folds: must be >= 2, got {folds}")
    if not 0 <= again <= 1:
        fail(f"--again: must be a share from 0 to 1, got {again}")
    if repeats < 1:
        fail(f"--repeats: must be >= 1, got {repeats}")
    if sittings < 1:
        fail(f"--sittings: must be >= 1, got {sittings}")
    try:
        check_names(names)
        seconds = parse_duration(budget, allow_zero=True)
    except ValueError as err:
        fail_error(err)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        # Each later sitting takes about its share of the first one's time.
        later, share = later_sittings(sittings, again)
        total = seconds * len(names) * (1 + later * share)
        task = progress.add_task("preparing models", total=total or None)
        spent: dict[str, float] = {}

        def on_progress(label: str, elapsed: float) -> None:
            spent[label.split(":")[0]] = elapsed
            progress.update(task, completed=min(sum(spent.values()), total), description=label[:60])

        try:
            result = run_fit_benchmark(workdir, seconds, names, folds=folds, repeats=repeats,
                                       again=again, sittings=sittings, on_progress=on_progress)
        except (ValueError, FitError) as err:
            fail_error(err)
    print_report(result.report)
    summary = result.summary()
    table = Table(title=f"Cost-model reference ({', '.join(result.report['data']['models'])})")
    for column in ("cross-validation", "median APE", "p90 APE", "80% coverage"):
        table.add_column(column, justify="left" if column == "cross-validation" else "right")
    targets = result.report["targets"]
    labels = {"by_run": "held-out runs", "by_model": "held-out model", "noise_floor": "noise floor (one run)",
              "median_noise_floor": "noise floor (medians, est.)",
              "sitting_noise_floor": "noise floor (one sitting)",
              "judged_noise_floor": "noise floor (all sittings)"}
    for section, figures in summary.items():
        table.add_row(labels[section], f"{figures['median_ape']:.1%}", f"{figures['p90_ape']:.1%}",
                      f"{figures['coverage']:.1%}" if "coverage" in figures else "")
    table.add_row("target", f"{targets['median_ape']:.0%}", f"{targets['p90_ape']:.0%}",
                  "{:.0%}-{:.0%}".format(*targets["coverage"]))
    console.print(table)
    console.print(f"{sum(result.runs.values())} new runs ({', '.join(f'{k} {v}' for k, v in result.runs.items())}) "
                  f"in {result.seconds:.0f} s; store: sqlite:///{workdir / 'reference.db'}")
    if out is not None:
        out.write_text(json.dumps({"summary": summary, "runs": result.runs, "seconds": result.seconds,
                                   "report": result.report}, indent=2))



@app.command("recommend")
def bench_recommend(
    preset: str = typer.Option("default", "--preset", help="quick (about 2 min: a smoke run) or "
                               "default (30-45 min on 2 cores: the measurement)"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="an empty folder for the models, "
                                           "stores and plans; default: a new temporary one"),
    budget: Optional[str] = typer.Option(None, "--budget", help="calibration profiling per model "
                                         "(e.g. 150s); default: the preset's"),
    grid: Optional[int] = typer.Option(None, "--grid", help="configurations measured per scenario "
                                       "for the ground truth; default: the preset's"),
    num_requests: Optional[int] = typer.Option(None, "--requests", help="requests per scenario run"),
    trials: Optional[int] = typer.Option(None, "--trials", help="Optuna trials per recommendation"),
    models: Optional[str] = typer.Option(None, "--models", help="comma-separated: tiny, wide"),
    confidence: Optional[float] = typer.Option(None, "--confidence", help="as pilot recommend's; "
                                               "default: the preset's"),
    fallbacks: Optional[int] = typer.Option(None, "--fallbacks", help="as pilot recommend --verify's; "
                                            "default: the preset's"),
    explore: Optional[int] = typer.Option(None, "--explore", help="as pilot recommend --verify's; "
                                          "default: the preset's"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="runs per calibration measurement, "
                                          "grid configuration and plan, judged on medians; default: "
                                          "the preset's"),
    via: Optional[str] = typer.Option(None, "--via", help="measure calibration, grid and plans through "
                                      "pilot serve, as clients of a plan see them (http, the "
                                      "default), or in process (engine)"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the results as JSON here"),
) -> None:
    """Recommendations on held-out workloads, launched and measured: how often they meet their
    SLOs and what they overspend against the cheapest configuration measured to meet them."""
    from rich.console import Console

    from planner.bench.recommend import run_recommend_benchmark
    from planner.bench.report import print_results

    try:
        budget_s = parse_duration(budget) if budget is not None else None
        names = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("starting", total=None)

            def on_progress(text: str, done: int, total: int) -> None:
                progress.update(task, description=text[:90], completed=done, total=total)

            result = run_recommend_benchmark(
                preset, workdir, budget_s=budget_s, grid_size=grid, num_requests=num_requests,
                trials=trials, models=names, seed=seed, json_out=out, on_progress=on_progress,
                confidence=confidence, repeats=repeats, fallbacks=fallbacks, explore=explore, via=via)
    except ValueError as err:
        fail_error(err)
    print_results(result, Console())
    if out is not None:
        console.print(f"Wrote {out}")
