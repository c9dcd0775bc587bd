"""`pilot recommend` and `pilot schema` (registered by cli.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli import _fail, app, console, open_store


def _ms(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1000:.2g} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def candidates_table(title: str, candidates: list[Any], slos: list[Any], best: Any = None) -> Table:
    table = Table(title=title)
    for column in ("", "configuration", "replicas", *(s.key for s in slos), "$/M tok", "$/h"):
        table.add_column(column, justify="left" if column in ("", "configuration") else "right")
    for c in candidates:
        cells = []
        for slo in slos:
            value = c.prediction.metrics[slo.key] if c.prediction else math.nan
            ok = c.violations.get(slo.key, 1.0) <= 0
            cells.append(f"[{'green' if ok else 'red'}]{_ms(value)}[/]")
        table.add_row("*" if c is best else "", c.describe(short=True), str(c.replicas), *cells,
                      f"{c.cost_per_million:.3f}", f"{c.cost_per_hour:.2f}")
    return table


def print_result(result: Any, plan: Any) -> None:
    slos = result.slos
    console.print(candidates_table("Finalists (simulated on the whole workload)", result.finalists,
                                   slos, result.best))
    if result.pareto:
        console.print(candidates_table(f"Pareto front: cost vs {slos[0].key} (search sample)", result.pareto, slos,
                                       result.best))
    console.print(f"Searched {result.trials} trials ({len(result.candidates)} distinct deployments) "
                  f"of a space of {result.space_size:,} configurations in {result.seconds:.1f} s.")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    chance = f" (an estimated {plan.chance:.0%} chance of meeting every SLO)" if plan.chance is not None else ""
    if plan.feasible:
        console.print(f"[bold green]Plan:[/bold green] {result.best.describe()}{chance}")
    else:
        console.print(f"[bold red]No configuration meets every target.[/bold red] {plan.binding} binds; "
                      f"the one most likely to: {result.best.describe()}{chance}")
    for check in plan.checks:
        colour = "green" if check.met else "red"
        console.print(f"  {check.slo}: predicted {_ms(check.predicted_s)} "
                      f"({check.level:.0%} sure under {_ms(check.upper_s)}) [{colour}]{'ok' if check.met else 'missed'}[/]")
    console.print(f"  cost: ${plan.cost.per_hour_usd:.2f}/h, ${plan.cost.per_million_output_tokens_usd:.3f} "
                  f"per million output tokens; {'calibrated' if plan.hardware.calibrated else 'UNCALIBRATED'} "
                  f"on {plan.hardware.name}")
    if result.default is not None and result.default.prediction is not None:
        d = result.default
        console.print(f"  engine defaults: ${d.cost_per_million:.3f}/M tok, "
                      f"{'meets' if d.feasible else 'misses'} the targets ({d.describe()})")
    console.print(f"  vLLM:   {plan.launch['vllm']}")
    console.print(f"  SGLang: {plan.launch['sglang']}")


@app.command()
def recommend(
    model: Path = typer.Option(..., "--model", help="model directory (Hugging Face layout)"),
    slo: str = typer.Option(..., "--slo", help='targets, e.g. "ttft_p95<=500ms,itl_p95<=50ms"'),
    rate: Optional[float] = typer.Option(None, "--rate", help="required requests per second (Poisson)"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="clients in flight (closed loop)"),
    workload: Optional[Path] = typer.Option(None, "--workload", help="workload YAML or JSONL trace "
                                            "(lengths; --rate/--concurrency set the load)"),
    isl: str = typer.Option("32:256", "--isl", help="input lengths without --workload"),
    osl: str = typer.Option("16:128", "--osl", help="output lengths without --workload"),
    num_requests: int = typer.Option(300, "--num-requests", help="requests in the workload"),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="spec names, comma-separated; "
                                           "default: the hardware the cost model was measured on"),
    max_devices: int = typer.Option(8, "--max-devices", help="devices (GPUs or hosts) at most"),
    space: Optional[str] = typer.Option(None, "--space", help="search space file or built-in name; "
                                        "default: cpu or gpu by hardware kind"),
    trials: int = typer.Option(100, "--trials", help="Optuna trials"),
    objective: str = typer.Option("cost", "--objective", help="cost | throughput | latency"),
    confidence: float = typer.Option(0.8, "--confidence", help="the chance the plan meets every SLO "
                                     "when launched, by the cost model's held-out errors (0-1)"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="draft model for speculative decoding "
                                         "(its acceptance rate must be measured: pilot profile --draft)"),
    out: Path = typer.Option(Path("plan.yaml"), "--out", help="where the plan goes"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw the cost-latency front (PNG)"),
    verify: bool = typer.Option(False, "--verify", help="launch the plan here and measure it"),
    via: str = typer.Option("engine", "--via", help="--verify measures the engine in process "
                                                     "(engine) or through pilot serve (http)"),
    repeats: int = typer.Option(3, "--repeats", help="--verify runs the workload this many times "
                                "back to back and judges each metric's median"),
    fallbacks: int = typer.Option(2, "--fallbacks", help="--verify: while the plan measured misses an "
                                  "SLO, launch and measure up to this many next-best candidates (their "
                                  "predictions scaled by the misses) and keep the first that holds"),
    explore: int = typer.Option(0, "--explore", help="--verify: once a plan holds, launch up to this "
                                "many cheaper candidates the model doubted, and keep the cheapest "
                                "that holds on two launches (objective cost)"),
    host: str = typer.Option("typical", "--host-speed", help="predict this machine at a typical "
                             "moment (typical) or as fast as a probe finds it now (now)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON instead of tables"),
    seed: int = typer.Option(0, "--seed"),
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL; default sqlite:///pilot.db"),
) -> None:
    """Search for the cheapest configuration that meets the SLOs and write it as a plan."""
    from engine.model_config import CheckpointError
    from planner.costmodel import fit as cm
    from planner.costmodel.fit_data import measured_acceptance
    from planner.search.plan import make_plan
    from planner.search.recommend import RecommendError, Requirement, Search, run_search
    from planner.spec.search_space import SearchSpace, SearchSpaceError
    from planner.spec.slo import SLOError, parse_slos
    from planner.spec.workload import Workload, WorkloadError

    if (rate is None) == (concurrency is None):
        _fail("give exactly one of --rate or --concurrency")
    from planner.measure.profiler import VIA

    if via not in VIA:
        _fail(f"--via must be one of {', '.join(VIA)}, got {via!r}")
    if repeats < 1:
        _fail(f"--repeats: must be >= 1, got {repeats}")
    if fallbacks < 0:
        _fail(f"--fallbacks: must be >= 0, got {fallbacks}")
    if explore < 0:
        _fail(f"--explore: must be >= 0, got {explore}")
    if host not in ("typical", "now"):
        _fail(f"--host-speed must be typical or now, got {host!r}")
    for flag, path in (("--model", model), ("--draft", draft)):
        if path is not None and not path.is_dir():
            _fail(f"{flag}: model directory not found: {path}")
    store = open_store(db)
    fitted = cm.load(store)
    if fitted is None:
        _fail(f"no cost model in {store.url}: run `pilot profile` and `pilot fit` first")
    try:
        requirement = Requirement(parse_slos(slo), "rate" if rate is not None else "concurrency",
                                  float(rate if rate is not None else concurrency), objective,
                                  confidence)
        if num_requests < 1:
            raise RecommendError(f"--num-requests: must be >= 1, got {num_requests}")
        load = (Workload.from_file(workload) if workload is not None else
                Workload.from_flags(isl, osl, concurrency=1, num_requests=num_requests))
        acceptance = measured_acceptance(store, str(model), str(draft)) if draft else None
        search = Search(fitted, str(model), load, requirement,
                        hardware.split(",") if hardware else None,
                        SearchSpace.from_file(space) if space else None, max_devices,
                        str(draft) if draft else None, acceptance, seed,
                        host_slowdowns_now(fitted) if host == "now" else None)
    except (ValueError, FileNotFoundError, CheckpointError, SearchSpaceError, SLOError,
            WorkloadError, RecommendError) as err:
        _fail(str(err))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("searching", total=trials)

        def on_progress(done: int, total: int, best: Any) -> None:
            label = f"best ${best.cost_per_million:.3f}/M tok" if best is not None else "no feasible yet"
            progress.update(task, completed=done, description=f"searching ({label})")

        try:
            result = run_search(search, trials, storage=store.url, on_progress=on_progress)
        except (ValueError, RecommendError) as err:
            _fail(str(err))
    plan = make_plan(result, search, fitted)
    plan.write(out)
    if plot is not None:
        from planner.costmodel.plots import pareto_plot

        pareto_plot(result, requirement.slos[0].key, plot)
    if as_json:
        print(json.dumps(plan.model_dump(mode="json"), indent=2))
    else:
        print_result(result, plan)
        console.print(f"Wrote {out}" + (f" and {plot}" if plot else "") +
                      (f"; study {result.study_name} in {store.url} (optuna-dashboard {store.url})"
                       if result.study_name else ""))
    if not verify:
        if not plan.feasible:
            raise typer.Exit(1)
        return None
    chosen, attempts = verify_plans(store, search, result, fitted, out, via, repeats, fallbacks, explore)
    if not chosen.held:
        raise VerifyMissed((chosen, attempts))
    return chosen, attempts


class VerifyMissed(typer.Exit):
    """Exit 1: no plan launched held every SLO. Carries (chosen, attempts) for callers in process."""

    def __init__(self, verified: tuple[Any, list[Any]]) -> None:
        super().__init__(1)
        self.verified = verified


def host_slowdowns_now(fitted: Any) -> dict[str, float]:
    """This machine's speed now against its typical moment in the cost model's runs, keyed by
    its spec name; empty when the cost model has no probe readings of this machine."""
    from planner.spec import hardware as hw
    from planner.measure import host_speed

    spec = hw.detect().spec_name or "cpu-host"
    if not fitted.reads_host(spec):
        return {}
    return {spec: fitted.host_slowdown(spec, host_speed.probe(host_speed.PLANNING_SECONDS))}


def verify_plans(store: Any, search: Any, result: Any, fitted: Any, out: Path, via: str = "engine",
                 repeats: int = 3, fallbacks: int = 2, explore: int = 0) -> tuple[Any, list[Any]]:
    """Launch the plan, measure it and print measured against predicted; while it misses an SLO,
    the next candidates in turn, and once one holds, `explore` cheaper ones
    (`planner.search.verify.verify_in_turn`). A plan other than the search's that is chosen replaces
    the one at `out`. Returns the chosen `Attempt` and all of them."""
    from planner.search.verify import NARROW, VerifyError, shortfall, verify_in_turn, worst_ratio

    with Progress(TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("verifying: loading the engine")

        def on_progress(rank: int, label: str, elapsed: float) -> None:
            progress.update(task, description=f"verifying plan #{rank}: {label[:64]}")

        try:
            chosen, attempts = verify_in_turn(store, search, result, fitted, fallbacks, on_progress,
                                              via, repeats, explore)
        except VerifyError as err:
            _fail(str(err))
    for attempt in attempts:
        if attempt is chosen:
            continue
        kind = "cheaper plan" if attempt.cheaper else "plan"
        if attempt.held:
            console.print(f"[yellow]{kind} #{attempt.rank}[/yellow] ({attempt.candidate.describe(short=True)}) "
                          "held, and a cheaper one held too")
            continue
        console.print(f"[red]{kind} #{attempt.rank}[/red] ({attempt.candidate.describe(short=True)}) "
                      f"{shortfall(attempt)}")
    if chosen.confirmation is not None:
        why = ("a cheaper plan counts only if it holds twice" if chosen.cheaper else
               f"it held by under {NARROW:.0%} (worst SLO at {worst_ratio(chosen.result):.0%} of its limit)")
        console.print(f"plan #{chosen.rank} held on its first launch and was launched again, as {why}; "
                      "the second launch:")
    print_verified(chosen.deciding, chosen.rank)
    if chosen.too_little_room:
        console.print(f"[red]No plan held with room to count on.[/red] This one came closest: it {shortfall(chosen)}.")
    chosen.plan.write(out)  # with the notes on how it was chosen
    if chosen.rank > 1:
        why = ("cheaper than the plan that held first, held every SLO on two launches" if chosen.cheaper else
               f"the model's #{chosen.rank}, {'held every SLO' if chosen.held else 'came closest'}")
        console.print(f"Wrote {out} again: plan #{chosen.rank} ({chosen.candidate.describe(short=True)}), {why}")
    return chosen, attempts


def print_verified(result: Any, rank: int = 1) -> None:
    runs = (f"run {result.run_id}" if len(result.run_ids) <= 1
            else f"runs {', '.join(str(i) for i in result.run_ids)}, medians shown")
    title = "Verified on this machine" + (f", plan #{rank}" if rank > 1 else "")
    table = Table(title=f"{title} ({runs} in the store)")
    for column in ("metric", "predicted", "80% interval", "measured", "error", "in interval"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for c in result.comparisons:
        fmt = (lambda v: f"{v:.1f}") if c.metric.endswith("tok_s") or c.metric == "request_rate" else _ms
        interval = f"{fmt(c.low)} - {fmt(c.high)}" if c.low is not None else "-"
        inside = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[c.within]
        table.add_row(c.metric, fmt(c.predicted), interval, fmt(c.measured), f"{c.error:+.0%}", inside)
    console.print(table)
    for name, (limit, measured, met) in result.slos.items():
        console.print(f"  {name}: measured {_ms(measured)} "
                      f"[{'green' if met else 'red'}]{'held' if met else 'MISSED'}[/]")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print("Every SLO held." if result.all_met else "[red]Some SLO was missed.[/red] "
                  "The runs are in the store: `pilot fit` learns from them.")


@app.command()
def schema(
    kind: str = typer.Argument("plan", help="plan | engine | workload"),
) -> None:
    """Print the JSON Schema of a plan file (or an engine config, or a workload file)."""
    from planner.search.plan import PlanError
    from planner.search.plan import schema as get_schema

    try:
        print(json.dumps(get_schema(kind), indent=2))
    except PlanError as err:
        _fail(str(err))


# `pilot bench recommend`: registered on the bench group like `pilot bench sim` (cli_fit.py).
from planner.cli import bench_app  # noqa: E402


@bench_app.command("recommend")
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
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the results as JSON here"),
) -> None:
    """Recommendations on held-out workloads, launched and measured: how often they meet their
    SLOs and what they overspend against the cheapest configuration measured to meet them."""
    from rich.console import Console

    from planner.bench.recommend import run_recommend_benchmark
    from planner.bench.report import print_results
    from planner.cli.profile import parse_duration

    try:
        budget_s = parse_duration(budget) if budget is not None else None
        names = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("starting", total=None)

            def on_progress(text: str, done: int, total: int) -> None:
                progress.update(task, description=text[:90], completed=done, total=total)

            result = run_recommend_benchmark(preset, workdir, budget_s, grid, num_requests, trials,
                                             names, seed, out, on_progress, confidence, repeats,
                                             fallbacks, explore)
    except ValueError as err:
        _fail(str(err))
    print_results(result, Console())
    if out is not None:
        console.print(f"Wrote {out}")
