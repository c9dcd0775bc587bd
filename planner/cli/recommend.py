"""`pilot recommend` and `pilot schema`: search for a plan, write it, and optionally launch and
measure it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli._common import Db, console, fail, fail_error, open_store, parse_share, resolve_model_option


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
                      f"({check.level:.0%} sure under {_ms(check.upper_s)}) "
                      f"[{colour}]{'ok' if check.met else 'missed'}[/]")
    console.print(f"  cost: ${plan.cost.per_hour_usd:.2f}/h, ${plan.cost.per_million_output_tokens_usd:.3f} "
                  f"per million output tokens; {'calibrated' if plan.hardware.calibrated else 'UNCALIBRATED'} "
                  f"on {plan.hardware.name}")
    if plan.basis:
        console.print(f"  predictions: {plan.basis}")
    if result.default is not None and result.default.prediction is not None:
        d = result.default
        console.print(f"  engine defaults: ${d.cost_per_million:.3f}/M tok, "
                      f"{'meets' if d.feasible else 'misses'} the targets ({d.describe()})")
    console.print(f"  vLLM:   {plan.launch['vllm']}")
    console.print(f"  SGLang: {plan.launch['sglang']}")


def recommend(
    model: Path = typer.Option(..., "--model", callback=resolve_model_option,
                               help="model directory (Hugging Face layout), .gguf file, or a name "
                                    "from `pilot models list`"),
    slo: str = typer.Option(..., "--slo", help='targets, e.g. "ttft_p95<=500ms,itl_p95<=50ms"'),
    rate: Optional[float] = typer.Option(None, "--rate", help="required requests per second (Poisson)"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="clients in flight (closed loop)"),
    workload: Optional[Path] = typer.Option(None, "--workload", help="workload YAML, JSONL trace, or "
                                            "sharegpt / sharegpt-multi-turn (lengths and prompts; "
                                            "--rate/--concurrency set the load)"),
    isl: str = typer.Option("32:256", "--isl", help="input lengths without --workload"),
    osl: str = typer.Option("16:128", "--osl", help="output lengths without --workload"),
    num_requests: int = typer.Option(300, "--num-requests", help="requests in the workload"),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="spec names, comma-separated; "
                                           "default: the hardware the cost model was measured on"),
    max_devices: int = typer.Option(8, "--max-devices", help="devices (GPUs or hosts) at most"),
    space: Optional[str] = typer.Option(None, "--space", help="search space file or built-in name; "
                                        "default: cpu or gpu by hardware kind"),
    trials: int = typer.Option(100, "--trials", help="Optuna trials"),
    workers: int = typer.Option(1, "--workers", help="trials scored at once, in that many processes "
                                "(the plan then depends on the count as well as --seed)"),
    study: Optional[str] = typer.Option(None, "--study", help="the Optuna study's name in the store "
                                        "(default: a new one); with --db on PostgreSQL, every process "
                                        "naming one study searches it together"),
    objective: str = typer.Option("cost", "--objective", help="cost | throughput | latency"),
    confidence: float = typer.Option(0.8, "--confidence", help="the chance the plan meets every SLO "
                                     "when launched, by the cost model's held-out errors (0-1)"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="draft model for speculative decoding "
                                         "(its acceptance rate must be measured: pilot profile --draft)"),
    out: Path = typer.Option(Path("plan.yaml"), "--out", help="where the plan goes"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw the cost-latency front (PNG)"),
    verify: bool = typer.Option(False, "--verify", help="launch the plan here and measure it"),
    via: str = typer.Option("http", "--via", help="--verify measures through pilot serve, as the "
                                                   "plan's clients will (http), or the engine in "
                                                   "process (engine)"),
    repeats: int = typer.Option(3, "--repeats", help="--verify runs the workload this many times "
                                "back to back and judges each metric's median"),
    fallbacks: int = typer.Option(2, "--fallbacks", help="--verify: while the plan measured misses an "
                                  "SLO, launch and measure up to this many next-best candidates (their "
                                  "predictions scaled by the misses) and keep the first that holds"),
    explore: int = typer.Option(0, "--explore", help="--verify: once a plan holds, launch up to this "
                                "many cheaper candidates the model doubted, and keep the cheapest "
                                "that holds on two launches (objective cost)"),
    refine: int = typer.Option(0, "--refine", help="before writing the plan, launch its configuration "
                               "at its load (--via, --repeats), fit again and search again, up to this "
                               "many times, until the plan is a configuration measured at its load"),
    host: str = typer.Option("typical", "--host-speed", help="predict this machine at a typical "
                             "moment (typical) or as fast as a probe finds it now (now)"),
    backend: str = typer.Option("vllm", "--backend", help="what serves a GPU plan: vllm | sglang (its "
                                "kernels, measured on that GPU, price the plan)"),
    backend_version: Optional[str] = typer.Option(None, "--backend-version", help="the backend release whose "
                                                  "measured kernels price a GPU plan; default: the newest"),
    max_quality_loss: Optional[str] = typer.Option(None, "--max-quality-loss", help="keep weight "
                                                   "quantizations whose measured perplexity is at most "
                                                   "this much over the unquantized model's, e.g. 2%"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON instead of tables"),
    seed: int = typer.Option(0, "--seed"),
    db: Db = None,
) -> None:
    """Search for the cheapest configuration that meets the SLOs and write it as a plan."""
    from engine.model_config import CheckpointError
    from planner.costmodel import fit as cm
    from planner.search.candidate import RecommendError
    from planner.search.plan import make_plan
    from planner.search.recommend import run_search
    from planner.search.refine import refine as refine_plan
    from planner.search.request import RecommendRequest, VerifyRequest

    if (rate is None) == (concurrency is None):
        fail("give exactly one of --rate or --concurrency")
    if workers < 1:
        fail(f"--workers: must be >= 1, got {workers}")
    try:
        request = RecommendRequest(
            model=model, slo=slo, rate=rate, concurrency=concurrency, workload=workload, isl=isl,
            osl=osl, num_requests=num_requests,
            hardware=tuple(hardware.split(",")) if hardware else (), max_devices=max_devices,
            space=space, trials=trials, objective=objective, confidence=confidence, draft=draft,
            seed=seed, host_speed=host, backend=backend, backend_version=backend_version,
            max_quality_loss=parse_share(max_quality_loss, "max_quality_loss") if max_quality_loss else None)
        checks = VerifyRequest(via=via, repeats=repeats, fallbacks=fallbacks, explore=explore)
        if refine < 0:
            raise RecommendError(f"must be >= 0, got {refine}", field="refine")
        if verify or refine:  # before the search: a config-only directory plans but cannot launch
            request.check_launchable()
    except ValueError as err:
        fail_error(err)
    store = open_store(db)
    fitted = cm.load(store)
    if fitted is None:
        fail(f"no cost model in {store.where}: run `pilot profile` and `pilot fit` first")
    try:
        search = request.search(store, fitted)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        fail_error(err)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    refined = None
    with Progress(*columns, console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("searching", total=trials)

        def on_progress(done: int, total: int, best: Any) -> None:
            label = f"best ${best.cost_per_million:.3f}/M tok" if best is not None else "no feasible yet"
            progress.update(task, completed=done, description=f"searching ({label})")

        def say(text: str) -> None:
            progress.update(task, completed=0, description=text)
            if not as_json:
                progress.console.print(text)

        try:
            if refine:
                refined = refine_plan(store, request, fitted, refine, via, repeats, say, on_progress, search,
                                      workers)
                fitted, search, result = refined.cost_model, refined.search, refined.result
            else:
                result = run_search(search, trials, storage=store.url, study_name=study, on_progress=on_progress,
                                    workers=workers)
        except ValueError as err:
            fail_error(err)
    if refined is not None:  # on the search's notes, so a plan --verify picks instead says it too
        result.notes.insert(0, f"refined: {refined.stopped}")
    plan = make_plan(result, search, fitted)
    plan.write(out)
    if plot is not None:
        from planner.costmodel.plots import pareto_plot

        pareto_plot(result, search.requirement.slos[0].key, plot)
    if as_json:
        print(json.dumps(plan.model_dump(mode="json"), indent=2))
    else:
        print_result(result, plan)
        console.print(f"Wrote {out}" + (f" and {plot}" if plot else "") +
                      (f"; study {result.study_name} in {store.where} (optuna-dashboard {store.where})"
                       if result.study_name else ""))
    if not verify:
        if not plan.feasible:
            raise typer.Exit(1)
        return None
    chosen, attempts = verify_plans(store, search, result, fitted, out, checks)
    if not chosen.held:
        raise VerifyMissed((chosen, attempts))
    return chosen, attempts


class VerifyMissed(typer.Exit):
    """Exit 1: no plan launched held every SLO. Carries (chosen, attempts) for callers in process."""

    def __init__(self, verified: tuple[Any, list[Any]]) -> None:
        super().__init__(1)
        self.verified = verified


def verify_plans(store: Any, search: Any, result: Any, fitted: Any, out: Path,
                 checks: Any) -> tuple[Any, list[Any]]:
    """Launch the plan, measure it and print measured against predicted; while it misses an SLO,
    the next candidates in turn, and once one holds, cheaper ones (`checks`, a VerifyRequest)
    (`planner.search.verify.verify_in_turn`). A plan other than the search's that is chosen replaces
    the one at `out`. Returns the chosen `Attempt` and all of them."""
    from planner.search.verify import NARROW, VerifyError, shortfall, verify_in_turn, worst_ratio

    with Progress(TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("verifying: loading the engine")

        def on_progress(rank: int, label: str, elapsed: float) -> None:
            progress.update(task, description=f"verifying plan #{rank}: {label[:64]}")

        try:
            chosen, attempts = verify_in_turn(store, search, result, fitted, checks.fallbacks, on_progress,
                                              checks.via, checks.repeats, checks.explore)
        except VerifyError as err:
            fail_error(err)
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


def schema(
    kind: str = typer.Argument("plan", help="plan | engine | workload"),
) -> None:
    """Print the JSON Schema of a plan file (or an engine config, or a workload file)."""
    from planner.search.plan import PlanError
    from planner.search.plan import schema as get_schema

    try:
        print(json.dumps(get_schema(kind), indent=2))
    except PlanError as err:
        fail_error(err)
