"""`pilot fit`: fit the cost model from the store and print how accurate it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli._common import Db, console, fail, fail_error, open_store

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
    if "served" in report["by_run"]:
        served = report["by_run"]["served"]
        console.print(
            f"Of those, the {data.get('served_runs', 0)} runs measured through pilot serve, predicted as "
            f"their clients saw them: {served['median_ape']:.1%} median, {served['p90_ape']:.1%} p90"
            + (f", {served['coverage']:.0%} covered." if served.get("coverage") is not None else "."))
    elif not data.get("served_runs"):
        console.print("No run was measured through pilot serve: plans are predicted for the engine "
                      "in process (profile with --via http).")
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


def fit(
    db: Db = None,
    folds: int = typer.Option(5, "--folds", help="cross-validation folds by run"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw predicted vs measured (PNG)"),
) -> None:
    """Fit the step-time model from the store, cross-validate the simulator, save both."""
    from planner.costmodel import fit as cost_model

    if folds < 2:
        fail(f"--folds: must be >= 2, got {folds}")
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
            fail_error(err)
    model_id = cost_model.save(store, model)
    if plot is not None:
        from planner.costmodel.plots import accuracy_plot

        accuracy_plot(model.report, plot)
    if as_json:
        print(json.dumps({"id": model_id, "data_version": model.data_version, **model.report}, indent=2))
        return
    print_report(model.report)
    console.print(f"Saved as cost model {model_id} in {store.where}" + (f"; plot in {plot}" if plot else ""))
