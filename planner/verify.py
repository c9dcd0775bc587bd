"""`pilot recommend --verify`: launch a plan on this machine, replay its workload, and compare.

The measurement is a profiling run like any other (a campaign of one experiment), so it lands in
the store with its requests and steps and the next `pilot fit` learns from it. A plan of several
replicas is measured as one replica at its share of the load: replicas do not share anything, and
this machine is one of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import select

from engine.model_runner import resolve_device
from planner import profiler
from planner.plan import Plan
from planner.profiler import config_row, hardware_row, model_row, workload_row
from planner.slo import parse_slos
from planner.store import Campaign, Experiment, Run, Store, fingerprint


class VerifyError(ValueError):
    """The plan cannot be launched here; the message says why."""


@dataclass
class Comparison:
    metric: str
    predicted: float
    low: float | None
    high: float | None
    measured: float

    @property
    def within(self) -> bool | None:
        if self.low is None or self.high is None:
            return None
        return self.low <= self.measured <= self.high

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1 if self.measured else math.inf


@dataclass
class VerifyResult:
    run_id: int
    campaign_id: int
    measured: dict[str, float]
    comparisons: list[Comparison]
    slos: dict[str, tuple[float, float, bool]]  # slo -> (limit, measured, met)
    notes: list[str] = field(default_factory=list)

    @property
    def all_met(self) -> bool:
        return all(met for _, _, met in self.slos.values())


def check_launchable(plan: Plan) -> None:
    if plan.hardware.kind == "gpu" and resolve_device("auto").type != "cuda":
        raise VerifyError(f"hardware: the plan is for {plan.hardware.name} (a GPU) and this machine has "
                          "none; verify it where it will run")


def verify(store: Store, plan: Plan, on_progress: Callable[[str, float], None] | None = None,
           via: str = "engine") -> VerifyResult:
    """Launch `plan.engine`, run the plan's workload at one replica's load, store and compare;
    `via="http"` measures through `pilot serve` and the OpenAI API, as a client would."""
    check_launchable(plan)
    model_dir = plan.engine.model
    config = plan.engine
    hardware, model, load = hardware_row(store), model_row(store, model_dir), workload_row(store, plan.workload)
    key = fingerprint({"verify": plan.model_dump(mode="json"), "at": time.time()})
    campaign = store.get_or_create(Campaign, key, hardware_id=hardware.id, model_id=model.id,
                                   workload_id=load.id,
                                   space={"verify": True, "plan_created_at": plan.created_at.isoformat()})
    row = config_row(store, config)
    with store.session() as session, session.begin():
        session.add(Experiment(campaign_id=campaign.id, position=0, engine_config_id=row.id,
                               load_kind=plan.load.kind, load_value=plan.load.per_replica))
    slos = parse_slos(",".join(plan.slos))
    result = profiler.profile(store, campaign, plan.workload, budget_s=math.inf, slos=slos,
                              on_progress=on_progress, via=via)
    if not result.run_ids:
        error = result.failed[0][1] if result.failed else "no run was recorded"
        raise VerifyError(f"the plan did not run: {error}")
    with store.session() as session:
        run = session.scalar(select(Run).where(Run.id == result.run_ids[0]))
        measured = {**run.latency, "throughput_tok_s": run.throughput_tok_s,
                    "request_rate": run.request_rate}
    comparisons = [Comparison(k, p.value, p.low, p.high, measured[k])
                   for k, p in plan.predicted.items() if k in measured]
    checks = {str(s): (s.limit_s, measured[s.key], measured[s.key] <= s.limit_s) for s in slos}
    notes = []
    if plan.replicas > 1:
        notes.append(f"measured one replica of {plan.replicas} at its share of the load "
                     f"({plan.load.kind} {plan.load.per_replica:g})")
    if via == "http":
        notes.append("measured through pilot serve over HTTP on loopback")
    if not plan.hardware.calibrated:
        notes.append(f"the plan's prediction for {plan.hardware.name} was uncalibrated")
    return VerifyResult(result.run_ids[0], campaign.id, measured, comparisons, checks, notes)
