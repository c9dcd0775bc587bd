"""`pilot fit`: fit the cost model from the store and print how accurate it is (registered by cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli import _fail, app, console

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
                  f"{', '.join(data['models'])} on {', '.join(data['hardware'])}.")
    console.print(report_table(f"Held-out runs ({report['by_run']['folds']}-fold cross-validation)",
                               report["by_run"], targets))
    if "by_model" in report:
        console.print(report_table(f"Held-out models (leave one of {report['by_model']['folds']} out)",
                                   report["by_model"], targets))
    else:
        console.print("Leave-one-model-out needs runs of two models or more; profile another model.")
    low, high = targets["coverage"]
    console.print(f"Targets: median APE <= {targets['median_ape']:.0%}, p90 <= {targets['p90_ape']:.0%}, "
                  f"80% intervals covering {low:.0%}-{high:.0%}.")
    eff = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in report["efficiency"].items()
                    if v != float("inf"))
    over = report["overheads_s"]
    console.print(f"Roofline efficiency (share of measured rate reached): {eff}. Overheads: "
                  f"{over['step'] * 1e6:.0f} us/step, {over['seq'] * 1e6:.1f} us/sequence, "
                  f"{over['layer_pass'] * 1e6:.1f} us/layer.")


@app.command()
def fit(
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL; default sqlite:///pilot.db"),
    folds: int = typer.Option(5, "--folds", help="cross-validation folds by run"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw predicted vs measured (PNG)"),
) -> None:
    """Fit the step-time model from the store, cross-validate the simulator, save both."""
    from planner import cost_model
    from planner.store import Store

    if folds < 2:
        _fail(f"--folds: must be >= 2, got {folds}")
    try:
        store = Store(db)
    except ValueError as err:
        _fail(str(err))
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
        from planner.plots import accuracy_plot

        accuracy_plot(model.report, plot)
    if as_json:
        print(json.dumps({"id": model_id, "data_version": model.data_version, **model.report}, indent=2))
        return
    print_report(model.report)
    console.print(f"Saved as cost model {model_id} in {store.url}" + (f"; plot in {plot}" if plot else ""))
