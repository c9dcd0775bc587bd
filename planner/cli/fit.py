"""`pilot fit`: fit the cost model from the store and print how accurate it is (registered by cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli import _fail, app, bench_app, console, open_store

NAMES = {"ttft_p50": "TTFT p50", "ttft_p95": "TTFT p95", "itl_p50": "ITL p50", "itl_p95": "ITL p95",
         "throughput_tok_s": "throughput"}


def _mark(value: float | None, ok: bool) -> str:
    if value is None:
        return "-"
    return f"[green]{value:.1%}[/green]" if ok else f"[red]{value:.1%}[/red]"


def report_table(title: str, section: dict[str, Any], targets: dict[str, Any]) -> Table:
    """One cross-validation's errors per metric, green where the target is met."""
    low, high = targets["coverage"]
    table = Table(title=title)
    for column in ("metric", "runs", "median APE", "p90 APE", "80% interval coverage"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows = [*section["metrics"].items(), ("overall", section["overall"]), ("(steps)", section["steps"])]
    for name, m in rows:
        coverage = m.get("coverage")
        table.add_row(
            NAMES.get(name, name), str(m.get("runs", "")),
            _mark(m["median_ape"], m["median_ape"] is not None and m["median_ape"] <= targets["median_ape"]),
            _mark(m["p90_ape"], m["p90_ape"] is not None and m["p90_ape"] <= targets["p90_ape"]),
            _mark(coverage, coverage is not None and low <= coverage <= high) if "coverage" in m else "")
    return table


def print_report(report: dict[str, Any]) -> None:
    data, targets = report["data"], report["targets"]
    console.print(f"Fitted on {data['runs']} runs ({data['steps']:,} steps) of "
                  f"{', '.join(data['models'])} on {', '.join(data['hardware'])}"
                  + (f", prompts up to {data['prompt_tokens']} tokens and sequences up to "
                     f"{data['sequence_tokens']} (longer workloads are extrapolated)."
                     if "prompt_tokens" in data else "."))
    console.print(report_table(f"Held-out runs ({report['by_run']['folds']}-fold cross-validation)",
                               report["by_run"], targets))
    if "by_model" in report:
        console.print(report_table(f"Held-out models (leave one of {report['by_model']['folds']} out)",
                                   report["by_model"], targets))
    else:
        console.print("Leave-one-model-out needs runs of two models or more; profile another model.")
    if "noise_floor" in report:
        floor, single = report["noise_floor"], report["by_run"]["single_runs"]
        console.print(
            f"Judged against the median of each measurement's repeats ({report['measurements']} "
            f"measurements of {data['runs']} runs). Against single runs, held-out runs err "
            f"{single['median_ape']:.1%} median, {single['p90_ape']:.1%} p90 ({single['coverage']:.0%} "
            f"covered); one run strays from its repeats' median by {floor['overall']['median_ape']:.1%} "
            f"median, {floor['overall']['p90_ape']:.1%} p90 (the noise floor of single runs here).")
        if report.get("median_noise_floor"):
            medians = report["median_noise_floor"]["overall"]
            console.print(
                f"A perfect model would still err about {medians['median_ape']:.1%} median, "
                f"{medians['p90_ape']:.1%} p90 against those medians (estimated by drawing each "
                f"measurement's repeats again from the pooled spread of runs): the floor the "
                f"held-out errors above stand on.")
        if report.get("sitting_noise_floor"):
            sittings = report["sitting_noise_floor"]
            console.print(
                f"Measured in later sittings ({sittings.get('measurements', sittings['pairs'])} measurements, "
                f"{sittings['pairs']} pairs of sittings), one sitting's median moved by about "
                f"{sittings['overall']['median_ape']:.1%} median, {sittings['overall']['p90_ape']:.1%} "
                f"p90 (the ratio of two sittings' medians, log over sqrt 2): the floor with the host's "
                f"spells in it, which repeats back to back share. Judged by the median of 3 sittings "
                f"it would be about {sittings['medians_of']['3']['median_ape']:.1%} / "
                f"{sittings['medians_of']['3']['p90_ape']:.1%}, of 5 about "
                f"{sittings['medians_of']['5']['median_ape']:.1%} / {sittings['medians_of']['5']['p90_ape']:.1%}.")
            judged = sittings.get("judged_by")
            if judged and judged["sittings"] > 1:
                console.print(
                    f"Those measurements are judged by the median of their {judged['sittings']} sittings: "
                    f"a perfect model would err about {judged['median_ape']:.1%} median, "
                    f"{judged['p90_ape']:.1%} p90 against them (the floor of the truth, estimated).")
    if "host_speed" in report:
        host = report["host_speed"]
        p10, _, p90 = host["slowdown_p10_p50_p90"]
        console.print(
            f"Host speed: {host['runs']} of {data['runs']} runs carry a probe reading; the host ran "
            f"{p10:.2f}x-{p90:.2f}x its typical probe time (p10-p90)"
            + (", {:.2f}x-{:.2f}x on every core at once. ".format(*host["parallel_slowdown_p10_p50_p90"][::2])
               if "parallel_slowdown_p10_p50_p90" in host else ". ")
            + "Each held-out run is predicted at its own readings; `pilot recommend --host-speed now` "
            "plans at the one-core reading taken then (every-core readings swing in spells of "
            "seconds, so plans take a typical one).")
    low, high = targets["coverage"]
    console.print(f"Targets: median APE <= {targets['median_ape']:.0%}, p90 <= {targets['p90_ape']:.0%}, "
                  f"80% intervals covering {low:.0%}-{high:.0%}.")
    eff = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in report["efficiency"].items()
                    if v != float("inf"))
    over = report["overheads_s"]
    console.print(f"Roofline efficiency (share of measured rate reached): {eff}. Overheads: "
                  f"{over['step'] * 1e6:.0f} us/forward pass, {over['seq'] * 1e6:.1f} us/sequence, "
                  f"{over['layer_pass'] * 1e6:.1f} us/layer."
                  + (f" Weight reads within {report['cache_mib']:.0f} MiB are priced as cached."
                     if report.get("cache_mib") else ""))
    work = report.get("work_flops", {})
    if work:
        items = {"int4_unpack_s": "int4 weight unpacked", "attention_scores_s": "attention score"}
        console.print("Work priced per item, in FLOPs at the matmul rate: "
                      + ", ".join(f"{value:.1f} per {items[name]}" for name, value in work.items()) + ".")


@app.command()
def fit(
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL; default sqlite:///pilot.db"),
    folds: int = typer.Option(5, "--folds", help="cross-validation folds by run"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw predicted vs measured (PNG)"),
) -> None:
    """Fit the step-time model from the store, cross-validate the simulator, save both."""
    from planner.costmodel import fit as cost_model

    if folds < 2:
        _fail(f"--folds: must be >= 2, got {folds}")
    store = open_store(db)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=as_json, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        try:
            model = cost_model.fit(store, folds=folds, on_progress=on_progress)
        except cost_model.FitError as err:
            _fail(str(err))
    model_id = cost_model.save(store, model)
    if plot is not None:
        from planner.costmodel.plots import accuracy_plot

        accuracy_plot(model.report, plot)
    if as_json:
        print(json.dumps({"id": model_id, "data_version": model.data_version, **model.report}, indent=2))
        return
    print_report(model.report)
    console.print(f"Saved as cost model {model_id} in {store.url}" + (f"; plot in {plot}" if plot else ""))


@bench_app.command("sim")
def bench_sim(
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL; default sqlite:///pilot.db"),
    model: Optional[Path] = typer.Option(None, "--model", help="model to simulate; default: the "
                                         "store's most recently profiled one"),
    num_requests: int = typer.Option(1000, "--requests", help="requests per simulation"),
) -> None:
    """Time the simulator: 1,000 requests through the fitted cost model, against 1 s."""
    from planner.costmodel import fit as cost_model
    from planner.bench.sim import TARGET_S, run_sim_benchmark

    if num_requests < 1:
        _fail(f"--requests: must be >= 1, got {num_requests}")
    store = open_store(db)
    fitted = cost_model.load(store)
    if fitted is None:
        _fail(f"no cost model in {store.url}: run `pilot fit` first")
    runs = store.runs()
    if model is None and not runs:
        _fail(f"--model: the store {store.url} has no runs to take a model from")
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


@bench_app.command("fit")
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
    from planner.cli.profile import parse_duration
    from planner.costmodel.fit import FitError

    names = [m.strip() for m in models.split(",") if m.strip()] if models else [*REFERENCE_MODELS, PAIR]
    if folds < 2:
        _fail(f"--folds: must be >= 2, got {folds}")
    if not 0 <= again <= 1:
        _fail(f"--again: must be a share from 0 to 1, got {again}")
    if repeats < 1:
        _fail(f"--repeats: must be >= 1, got {repeats}")
    if sittings < 1:
        _fail(f"--sittings: must be >= 1, got {sittings}")
    try:
        check_names(names)
        seconds = 0.0 if budget.strip() in ("0", "0s") else parse_duration(budget)
    except ValueError as err:
        _fail(str(err))
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
            _fail(str(err))
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

