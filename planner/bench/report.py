"""The printed results of `pilot bench recommend`: a table per scenario and the summary line
that sets success and overspend against LLM-Pilot's figures and the targets."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from planner.bench.recommend import ANCHOR_OVERSPEND, ANCHOR_SUCCESS, TARGET_OVERSPEND, TARGET_SUCCESS, BenchResult


def _ms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1000:.3g} ms" if seconds < 10 else f"{seconds:.1f} s"


def _pct(value: float) -> str:
    return f"{value:+.1%}" if math.isfinite(value) else "-"


def results_table(result: BenchResult) -> Table:
    table = Table(title=f"Recommendations on held-out scenarios, launched and measured "
                        f"({result.preset} preset, grid of {result.settings['grid_size']} per scenario, "
                        f"medians of {result.settings.get('repeats', 1)} runs each)")
    for column in ("model", "workload", "SLOs", "recommended", "binding SLO: predicted / measured",
                   "met", "overspend", "default / best", "grid feasible"):
        table.add_column(column, justify="right" if column in ("overspend", "default / best",
                                                               "grid feasible") else "left")
    for s in result.scenarios:
        predicted, measured = s.predicted.get(s.binding, math.nan), s.measured.get(s.binding, math.nan)
        met = "[green]yes[/]" if s.met else ("[red]no[/]" + (" (did not run)" if s.error else ""))
        if s.host_drift:
            met += f"\n(host {max(s.host_drift.values()):.2f}x)"
        met += f"\n(planned at {s.host_slowdown:.2f}x)"
        over = _pct(s.overspend)
        if math.isfinite(s.overspend):
            colour = "green" if s.overspend <= TARGET_OVERSPEND else "red"
            over = f"[{colour}]{over}[/]"
        if math.isfinite(s.paired_overspend):
            over += f"\n(paired {_pct(s.paired_overspend)})"
        default = (f"{s.default_ratio:.2f}x" if math.isfinite(s.default_ratio) else "-") + \
            ("" if s.default_feasible else " (misses)")
        clear = f"\n(grid clear by {math.expm1(s.slo_margin):.0%})" if math.isfinite(s.slo_margin) else ""
        recommended = s.recommended + ("" if s.predicted_feasible else " [red](predicted infeasible)[/]")
        if s.rank > 1 and s.explored and s.first_met:
            recommended += f"\n(plan #{s.rank}, cheaper than #1 {s.first_recommended}; held twice)"
        elif s.rank > 1:
            recommended += f"\n(plan #{s.rank}, by measurement: #1 {s.first_recommended} missed)"
        table.add_row(s.model, f"{s.workload} @{s.concurrency}", "\n".join(s.slos) + clear, recommended,
                      f"{s.binding}: {_ms(predicted)} / {_ms(measured)}", met, over, default,
                      f"{s.grid_feasible}/{len(s.grid)}")
    return table


def summary_line(result: BenchResult) -> str:
    ok = result.success_rate >= TARGET_SUCCESS
    cheap = math.isfinite(result.median_overspend) and result.median_overspend <= TARGET_OVERSPEND
    predicted = sum(s.predicted_feasible for s in result.scenarios)
    return (f"Met every SLO when launched: [{'green' if ok else 'red'}]{result.success_rate:.0%}[/] of "
            f"{len(result.scenarios)} scenarios (LLM-Pilot {ANCHOR_SUCCESS:.0%}, target >= {TARGET_SUCCESS:.0%}; "
            f"the search predicted a feasible plan in {predicted}, and put the chance of success at "
            f"{result.expected_success:.0%} on average; its first plans alone met in "
            f"{result.first_success_rate:.0%}, and `--verify` launched "
            f"{sum(s.tries for s in result.scenarios) - len(result.scenarios)} more plans in all, "
            f"{sum(s.explored for s in result.scenarios)} of them cheaper ones explored). "
            f"Overspend vs the cheapest truly feasible grid configuration, over the plans that met: "
            f"median [{'green' if cheap else 'red'}]{_pct(result.median_overspend)}[/], mean "
            f"{_pct(result.mean_overspend)} clipped at 0 (as measured: median "
            f"{_pct(result.median_overspend_raw)}, mean {_pct(result.mean_overspend_raw)}; LLM-Pilot "
            f"{ANCHOR_OVERSPEND:.1%}, target <= {TARGET_OVERSPEND:.0%}). Paired (the plan and the grid's "
            f"best measured again in alternation after the verdict, so in the same spells of the host): "
            f"median {_pct(result.paired_median_overspend)}, mean {_pct(result.paired_mean_overspend)}. "
            f"Engine defaults cost "
            f"{result.median_default_ratio:.2f}x the best (median). The grid's best, measured again "
            f"after each plan, was {result.median_host_drift:.2f}x as slow as in the grid (median of "
            f"the slowest SLO metric: the host's own drift)"
            + (f", and met every SLO again in {result.best_success_rate:.0%} of the "
               f"{sum(s.best_held_again is not None for s in result.scenarios)} scenarios: the ground "
               f"truth's own repeatability, the ceiling for success on this host"
               if math.isfinite(result.best_success_rate) else "")
            + f". {result.seconds:.0f} s; work in {result.workdir}.")


def print_results(result: BenchResult, console: Any) -> None:
    """The table, the calibration it rests on, and the summary line."""
    console.print(results_table(result))
    cal = result.calibration
    ape = cal.get("median_ape", {})
    held = ", ".join(f"{section.replace('by_', 'held-out ')}: "
                     f"{', '.join(f'{m} {v:.0%}' for m, v in metrics.items() if v is not None)}"
                     for section, metrics in ape.items())
    console.print(f"Cost model calibrated on {', '.join(f'{n} {k} runs' for n, k in cal.get('runs', {}).items())} "
                  f"of one workload ({cal.get('workload', '?')}); median APE {held}.")
    console.print(summary_line(result))
