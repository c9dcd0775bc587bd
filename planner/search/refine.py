"""`pilot recommend --refine N`: measure the plan's own configuration before promising it.

A profile measures a sample of the space, and the plan is usually a configuration it never ran:
its predictions are then an extrapolation. Refining launches the search's plan at its load
(as `verify` does, through `pilot serve` by default), fits the cost model again with those runs,
and searches again, until the plan is a configuration already measured at its load on its
workload, or `rounds` launches were made. The plan finally written rests on a measurement of
itself; `--verify` then judges it on fresh runs the model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqlalchemy import select

from planner.costmodel import fit as cost_model_fit
from planner.costmodel.fit import CostModel
from planner.search.plan import Plan, make_plan
from planner.search.recommend import SearchResult, run_search
from planner.search.request import RecommendRequest
from planner.search.search import Search
from planner.search.verify import VerifyError, VerifyResult, check_launchable, verify
from planner.spec.slo import parse_slos
from planner.store.database import Run, Store
from planner.store.records import config_row, hardware_row, workload_row

Say = Callable[[str], None]


@dataclass
class Refinement:
    """One round: the plan searched for, and its measurement (None: it was measured before)."""

    plan: Plan
    measured: VerifyResult | None


@dataclass
class Refined:
    cost_model: CostModel  # fitted again on every launch made
    search: Search
    result: SearchResult  # the last search, whose plan is the one to write
    rounds: list[Refinement]
    stopped: str  # why refining ended, in a sentence


def measured_runs(store: Store, plan: Plan) -> list[int]:
    """Runs on this machine of the plan's engine configuration, on its workload at one replica's
    share of its load."""
    with store.session() as session:
        return list(session.scalars(select(Run.id).where(
            Run.hardware_id == hardware_row(store).id,
            Run.engine_config_id == config_row(store, plan.engine).id,
            Run.workload_id == workload_row(store, plan.workload).id,
            Run.load_kind == plan.load.kind,
            Run.load_value == plan.load.per_replica).order_by(Run.id)))


def runs_here(store: Store, plan: Plan) -> str | None:
    """Why the plan cannot be launched on this machine, or None if it can."""
    here = hardware_row(store).spec_name
    if plan.hardware.name != here:
        return f"the plan is for {plan.hardware.name}, and this machine is {here}"
    try:
        check_launchable(plan)
    except VerifyError as err:
        return str(err)
    return None


def refine(store: Store, request: RecommendRequest, cost_model: CostModel, rounds: int,
           via: str = "http", repeats: int = 3, say: Say | None = None,
           on_search: Callable[[int, int, object], None] | None = None,
           search: Search | None = None, workers: int = 1) -> Refined:
    """Search (`search`, if the caller has built it over `cost_model` already; `workers`
    processes); while the plan's configuration has no run at its load and `rounds` allow, launch
    it (`repeats` runs `via` the server or in process), fit again and search again."""
    if rounds < 0:
        raise VerifyError(f"refine: must be >= 0, got {rounds}")
    tell = say or (lambda _text: None)
    folds = int(cost_model.report.get("by_run", {}).get("folds", 5))
    done: list[Refinement] = []
    while True:
        search = search if search is not None and not done else request.search(store, cost_model)
        result = run_search(search, request.trials, storage=store.url, on_progress=on_search, workers=workers)
        plan = make_plan(result, search, cost_model)
        seen = measured_runs(store, plan)
        if seen:
            done.append(Refinement(plan, None))
            stopped = (f"the plan's configuration was measured at its load before "
                       f"({_runs(seen)}); its predictions rest on that")
            break
        if len(done) == rounds:
            stopped = (f"the plan's configuration has not been measured at its load: {rounds} refining "
                       "launches were made" if rounds else "refining was not asked for")
            break
        blocked = runs_here(store, plan)
        if blocked is not None:
            stopped = f"the plan cannot be measured here: {blocked}"
            break
        tell(f"refine {len(done) + 1}/{rounds}: launching {result.best.describe(short=True)} at "
             f"{plan.load.kind} {plan.load.per_replica:g}")
        measured = verify(store, plan, None, via, repeats)
        done.append(Refinement(plan, measured))
        slos = {slo.key for slo in parse_slos(",".join(plan.slos))}
        against = ", ".join(f"{c.metric} {c.measured * 1e3:.1f} ms ({c.predicted * 1e3:.1f} ms predicted)"
                            for c in measured.comparisons if c.metric in slos)
        tell(f"refine {len(done)}/{rounds}: measured {against} ({_runs(measured.run_ids)}); fitting again")
        cost_model = cost_model_fit.fit(store, folds=folds)
        cost_model_fit.save(store, cost_model)
    return Refined(cost_model, search, result, done, stopped)


def _runs(ids: list[int]) -> str:
    return f"run {ids[0]}" if len(ids) == 1 else f"runs {', '.join(str(i) for i in ids)}"
