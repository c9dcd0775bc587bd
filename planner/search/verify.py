"""`pilot recommend --verify`: launch a plan on this machine, replay its workload, and compare.

The measurement is profiling runs like any other (a campaign of one experiment per repeat), so
they land in the store with their requests and steps and the next `pilot fit` learns from them.
The plan is run `repeats` times back to back on one engine and judged on each metric's median
over the runs: on a shared host one slow spell (seconds long, a run is about that) moves a single
run's percentiles by 20% or more, and would otherwise decide the verdict. A plan of several
replicas is measured as one replica at its share of the load: replicas do not share anything, and
this machine is one of them.

`verify_in_turn` is `--fallbacks`: while the plan measured misses, the model's next candidate is
launched and measured, picked with its predictions scaled by how far the plans before it
measured above theirs, and the first that holds is kept; one that holds by less than `NARROW`
on some SLO is launched a second time and kept only if it holds again, with room over the two
(`room_needed`). With `--explore`, once a plan holds, cheaper candidates the model was not sure
enough of are launched too, and one is kept only if it holds on two measurements, with room.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import select

from engine.device import resolve_device
from planner.costmodel.fit import CostModel
from planner.measure import profiler
from planner.search.candidate import Candidate, closeness, rank
from planner.search.plan import Plan, make_plan
from planner.search.recommend import SearchResult
from planner.search.search import Search
from planner.spec.slo import parse_slos
from planner.store.database import Campaign, Experiment, Run, Store, fingerprint
from planner.store.records import config_row, hardware_row, model_row, workload_row


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
    run_id: int  # the first run
    campaign_id: int
    measured: dict[str, float]  # each metric's median over the runs
    comparisons: list[Comparison]
    slos: dict[str, tuple[float, float, bool]]  # slo -> (limit, measured, met)
    notes: list[str] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)

    @property
    def all_met(self) -> bool:
        return all(met for _, _, met in self.slos.values())


def run_metrics(run: Run) -> dict[str, float]:
    return {**run.latency, "throughput_tok_s": run.throughput_tok_s, "request_rate": run.request_rate}


def median_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's median over repeated runs of one configuration (metrics every run has)."""
    if not runs:
        raise ValueError("median_metrics: no runs")
    keys = set(runs[0]).intersection(*runs[1:])
    return {k: statistics.median(r[k] for r in runs) for k in sorted(keys)}


def check_launchable(plan: Plan) -> None:
    if plan.hardware.kind == "gpu" and resolve_device("auto").type != "cuda":
        raise VerifyError(f"hardware: the plan is for {plan.hardware.name} (a GPU) and this machine has "
                          "none; verify it where it will run")


def verify(store: Store, plan: Plan, on_progress: Callable[[str, float], None] | None = None,
           via: str = "engine", repeats: int = 3) -> VerifyResult:
    """Launch `plan.engine`, run the plan's workload at one replica's load `repeats` times, store
    and compare the medians; `via="http"` measures through `pilot serve` and the OpenAI API, as a
    client would."""
    if repeats < 1:
        raise VerifyError(f"repeats: must be >= 1, got {repeats}")
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
        session.add_all(Experiment(campaign_id=campaign.id, position=i, engine_config_id=row.id,
                                   load_kind=plan.load.kind, load_value=plan.load.per_replica)
                        for i in range(repeats))
    slos = parse_slos(",".join(plan.slos))
    result = profiler.profile(store, campaign, plan.workload, budget_s=math.inf, slos=slos,
                              on_progress=on_progress, via=via)
    if result.failed or not result.run_ids:
        error = result.failed[0][1] if result.failed else "no run was recorded"
        raise VerifyError(f"the plan did not run: {error}")
    with store.session() as session:
        runs = list(session.scalars(select(Run).where(Run.id.in_(result.run_ids))))
        measured = median_metrics([run_metrics(run) for run in runs])
    comparisons = [Comparison(k, p.value, p.low, p.high, measured[k])
                   for k, p in plan.predicted.items() if k in measured]
    checks = {str(s): (s.limit_s, measured[s.key], measured[s.key] <= s.limit_s) for s in slos}
    notes = []
    if len(runs) > 1:
        notes.append(f"measured {len(runs)} times back to back; each metric is the median of the runs")
    if plan.replicas > 1:
        notes.append(f"measured one replica of {plan.replicas} at its share of the load "
                     f"({plan.load.kind} {plan.load.per_replica:g})")
    measured_for = "client" if via == "http" else "engine"
    if measured_for != plan.predictions_for:
        how = "through pilot serve, as a client" if via == "http" else "in process"
        what = "what clients of pilot serve read" if plan.predictions_for == "client" else "the engine in process"
        effect = "add to" if via == "http" else "are missing from"
        notes.append(f"measured {how}, but the plan predicts {what}: the server's delays {effect} "
                     "what was measured")
    elif via == "http":
        notes.append("measured through pilot serve over HTTP on loopback, as the plan's clients will read it")
    if not plan.hardware.calibrated:
        notes.append(f"the plan's prediction for {plan.hardware.name} was uncalibrated")
    return VerifyResult(result.run_ids[0], campaign.id, measured, comparisons, checks, notes,
                        list(result.run_ids))


# ---------------------------------------------------------------- measured fallbacks


def worst_ratio(result: VerifyResult) -> float:
    """The largest measured/limit over the SLOs: under 1 when every one held."""
    return max((measured / limit for limit, measured, _ in result.slos.values()), default=0.0)


# A plan that holds with less headroom than this on some SLO is launched a second time. On this
# host the median of three runs still moves by about this much from launch to launch, so a plan
# a few percent under its limit holds or misses on the next launch by chance: a plan chosen on
# one such measurement was in a benchmark measured again at 7% over.
NARROW = 0.10


def held_narrowly(result: VerifyResult, narrow: float = NARROW) -> bool:
    """Every SLO held, and one by less than `narrow` (a share of its limit)."""
    return result.all_met and worst_ratio(result) > 1 - narrow


def room_needed(launches: int, narrow: float = NARROW) -> float:
    """The largest geometric mean of a plan's worst measured/limit ratios over `launches`
    launches that counts as a hold: 1 - `narrow` for one, and nearer 1 for more. A plan's true
    ratio is known better from more launches, but the next launch still moves by the host's
    spread: the bar keeps the chance that the next launch holds the same as one launch at
    1 - `narrow` gives it (a log-normal spread; the mean of n launches errs by 1/sqrt(n) of it)."""
    if narrow >= 1:  # every hold is narrow, and none has room
        return 0.0
    return math.exp(math.log(1 - narrow) * math.sqrt((1 + 1 / launches) / 2))


@dataclass
class Attempt:
    """One plan launched and measured while looking for one that holds its SLOs."""

    candidate: Candidate
    plan: Plan
    result: VerifyResult
    rank: int  # 1: the search's own choice; 2: the next the model ranks; ...
    # A cheaper candidate tried once a plan held (`--explore`); its second measurement, where
    # the first held and it is cheaper or held narrowly: then it is kept only if both held,
    # with room over the two (`held`).
    cheaper: bool = False
    confirmation: VerifyResult | None = None
    narrow: float = NARROW

    @property
    def launches(self) -> list[VerifyResult]:
        return [self.result] + ([self.confirmation] if self.confirmation is not None else [])

    @property
    def worst(self) -> float:
        """The geometric mean of the launches' worst measured/limit ratios."""
        ratios = [worst_ratio(r) for r in self.launches]
        return math.exp(statistics.fmean(math.log(max(r, 1e-12)) for r in ratios))

    @property
    def held(self) -> bool:
        """Every SLO held on the first launch with room (`narrow`); else, on a second launch too,
        with room over the two together (`room_needed`). Two launches each a hair under a limit
        do not count: the next launch misses about as often as it holds."""
        if not self.result.all_met:
            return False
        if self.confirmation is None:
            return not self.cheaper  # a cheaper plan always needs its second launch
        return self.confirmation.all_met and self.worst <= room_needed(2, self.narrow)

    @property
    def too_little_room(self) -> bool:
        """Every SLO held on every launch, but not with the room `held` asks."""
        return all(r.all_met for r in self.launches) and not self.held and self.confirmation is not None

    @property
    def deciding(self) -> VerifyResult:
        """The measurement that decided the verdict: the second where the first held."""
        return self.confirmation if self.result.all_met and self.confirmation is not None else self.result


def deployment_key(candidate: Candidate) -> tuple[str, str, int]:
    """What makes two candidates the same launch: hardware, engine configuration, replicas."""
    return candidate.hardware.name, candidate.config.model_dump_json(), candidate.replicas


def measured_bias(attempts: list[Attempt], keys: list[str]) -> dict[str, float]:
    """How far the plans launched so far came out above their predictions: for each metric in
    `keys`, the geometric mean of measured/predicted over every measurement (second launches
    too), and never under 1. Fallbacks are looked for because plans missed; a metric that came
    in faster than predicted on them does not make the others safer."""
    logs: dict[str, list[float]] = {}
    for a in attempts:
        for r in a.launches:
            for c in r.comparisons:
                if c.metric in keys and c.predicted > 0 and c.measured > 0:
                    logs.setdefault(c.metric, []).append(math.log(c.measured / c.predicted))
    return {k: max(1.0, math.exp(statistics.fmean(v))) for k, v in logs.items()}


def twins(one: Candidate, other: Candidate, keys: list[str], tolerance: float = 0.01) -> bool:
    """The simulator cannot tell them apart: the same hardware and replicas, and every metric in
    `keys` and throughput predicted within `tolerance`. Knobs a workload never reaches (prefix
    caching without shared prefixes, a token budget above every step's tokens) make such pairs."""
    if (one.hardware.name, one.replicas) != (other.hardware.name, other.replicas):
        return False
    a, b = one.prediction, other.prediction
    return a is not None and b is not None and all(
        math.isclose(a.metrics[k], b.metrics[k], rel_tol=tolerance) for k in [*keys, "throughput_tok_s"])


def _tried_or_twins(result: SearchResult, tried: list[Candidate],
                    among: list[Candidate]) -> set[tuple[str, str, int]]:
    """The deployments `tried`, and those of `among` the simulator cannot tell from one of them
    (`twins`), compared with every scoring of those tried (the search's sample's and the whole
    workload's): launching one would be the same launch again."""
    gone = {deployment_key(c) for c in tried}
    keys = [s.key for s in result.slos]
    launched = [c for c in [*tried, *result.finalists, *result.candidates]
                if deployment_key(c) in gone and c.prediction is not None]
    return gone | {deployment_key(c) for c in among if any(twins(c, t, keys) for t in launched)}


def next_in_turn(result: SearchResult, search: Search, tried: list[Candidate],
                 bias: dict[str, float] | None = None) -> Candidate | None:
    """The candidate the model picks once those `tried` are gone: with each one's SLO metrics
    multiplied by `bias` (`measured_bias` of the plans launched) and judged again, the best by
    the objective of those then predicted to hold (`rank`), else the one most likely to hold
    (`closeness`). Only those that run and serve the load, and none the simulator cannot tell
    from one tried (`twins`): it would be the same launch again. A finalist's prediction, made
    on the whole workload, is used over the search's sample (and a candidate is compared with
    each version of those tried)."""
    versions = [c for c in [*result.finalists, *result.candidates] if c.prediction is not None and c.valid]
    seen = _tried_or_twins(result, tried, versions)
    pool: dict[tuple[str, str, int], Candidate] = {}
    for c in versions:
        if deployment_key(c) not in seen:
            pool.setdefault(deployment_key(c), c)
    judged = [search.rejudged(c, bias or {}) for c in pool.values()]
    feasible = [c for c in judged if c.feasible]
    if feasible:
        return rank(feasible, search.requirement)[0]
    return min(judged, key=lambda c: closeness(c, search.requirement.slos), default=None)


def verify_in_turn(store: Store, search: Search, result: SearchResult, cost_model: CostModel,
                   fallbacks: int = 2, on_progress: Callable[[int, str, float], None] | None = None,
                   via: str = "engine", repeats: int = 3, explore: int = 0,
                   narrow: float = NARROW) -> tuple[Attempt, list[Attempt]]:
    """Launch and measure the search's plan; while the one measured has not held, the next
    candidate (`next_in_turn`, corrected by `measured_bias`), up to `fallbacks` more. A plan
    that holds narrowly (`held_narrowly`) is measured again and has held only if it holds
    again, with room over the two launches (`Attempt.held`). Then, once one held, up to
    `explore` cheaper candidates (`explore_cheaper`; objective "cost" only). Returns the
    cheapest that held every SLO (else the one that came closest, by `Attempt.worst` over its
    launches) and every attempt in order.

    The model ranks by prediction, and a prediction is off by 10-20% on a workload it was not
    measured on; a measurement of the plan on the workload itself is not."""
    if fallbacks < 0:
        raise VerifyError(f"fallbacks: must be >= 0, got {fallbacks}")
    if explore < 0:
        raise VerifyError(f"explore: must be >= 0, got {explore}")
    attempts: list[Attempt] = []
    keys = [s.key for s in search.requirement.slos]
    tried: list[Candidate] = []
    for position in range(fallbacks + 1):
        bias = measured_bias(attempts, keys)
        candidate = next_in_turn(result, search, tried, bias) if position else result.best
        if candidate is None:
            break
        tried.append(candidate)
        if position:  # the search may have scored it on a sample of the workload: score the whole
            candidate = search.evaluate(candidate.hardware.name, candidate.params, full=True)
        plan = make_plan(result, search, cost_model, candidate)
        if position and result.feasible and not candidate.feasible:  # others were predicted to hold
            plan.notes.insert(0, f"predicted to miss ({candidate.binding} binds); launched because "
                                 "the plans ranked above it missed when measured")
        if any(b > 1 for b in bias.values()):
            plan.notes.insert(0, "picked with its predictions scaled by how far the plans before it measured "
                                 "above theirs: " + ", ".join(f"{k} x{b:.2f}" for k, b in bias.items() if b > 1))
        measured = _measure(store, plan, position + 1, on_progress, via, repeats, required=not position)
        if measured is None:
            continue
        attempt = Attempt(candidate, plan, measured, position + 1, narrow=narrow)
        if held_narrowly(measured, narrow):
            attempt.confirmation = _measure(store, plan, position + 1, on_progress, via, repeats)
        attempts.append(attempt)
        if attempt.held:
            break
    held = next((a for a in attempts if a.held), None)
    # Cheaper is what the objective "cost" asks for; the others are after something else.
    if held is not None and explore and search.requirement.objective == "cost":
        attempts += explore_cheaper(store, search, result, cost_model, held, attempts, explore,
                                    on_progress, via, repeats, narrow)
    chosen = min((a for a in attempts if a.held), key=lambda a: a.candidate.cost_per_million, default=None) \
        or min(attempts, key=lambda a: a.worst)
    if chosen.rank > 1 or (not chosen.held and len(attempts) > 1):
        chosen.plan.notes.insert(0, _chosen_note(chosen, attempts))
    elif chosen.held and chosen.confirmation is not None:
        chosen.plan.notes.insert(0, f"held every SLO on two launches (the first by under {narrow:.0%} on "
                                    "some SLO, so it was launched again)")
    elif chosen.too_little_room:
        chosen.plan.notes.insert(0, f"no plan held with room; this one came closest: it {shortfall(chosen)}")
    elif any(a.cheaper for a in attempts):
        chosen.plan.notes.insert(0, "no cheaper plan held when measured: " + "; ".join(
            f"#{a.rank} {a.candidate.describe(short=True)} {shortfall(a)}" for a in attempts if a.cheaper))
    return chosen, attempts


def _measure(store: Store, plan: Plan, rank: int, on_progress: Callable[[int, str, float], None] | None,
             via: str, repeats: int, required: bool = False) -> VerifyResult | None:
    """`verify`, or None when the plan does not run here and need not (`required`: it must)."""
    tell = (lambda label, elapsed: on_progress(rank, label, elapsed)) if on_progress else None
    try:
        return verify(store, plan, tell, via, repeats)
    except VerifyError:
        if required:  # the search's own plan must run; another that does not is passed over
            raise
        return None


MIN_SAVING = 0.03  # a candidate within 3% of the plan's cost is not worth a launch
# A candidate the model gives less than this chance of holding every SLO is not launched: its
# large saving would rank it first, and in two benchmark runs the first such launch (bf16 at 64
# sequences) missed ITL p95 by 3x, a launch the cheaper plans with better chances went without.
MIN_CHANCE = 0.25


def cheaper_in_turn(result: SearchResult, than: Candidate, tried: list[Candidate]) -> list[Candidate]:
    """Candidates cheaper than `than` that run and serve the load, not yet tried, and have at
    least `MIN_CHANCE` of holding, by the saving they are expected to bring: the model's chance
    that every SLO holds times the share of cost saved. A plan the model doubted can still hold,
    and only a measurement says which. None the simulator cannot tell from one tried (`twins`),
    whose score would equal its own."""
    seen = _tried_or_twins(result, tried, result.candidates)
    budget = than.cost_per_million
    cheaper: dict[tuple[str, str, int], Candidate] = {}
    for c in result.candidates:
        key = deployment_key(c)
        if (c.prediction is not None and c.valid and key not in seen and c.slo_chance >= MIN_CHANCE
                and c.cost_per_million < budget * (1 - MIN_SAVING)):
            cheaper.setdefault(key, c)
    return sorted(cheaper.values(), key=lambda c: -c.slo_chance * (1 - c.cost_per_million / budget))


def explore_cheaper(store: Store, search: Search, result: SearchResult, cost_model: CostModel,
                    held: Attempt, tried: list[Attempt], explore: int,
                    on_progress: Callable[[int, str, float], None] | None = None,
                    via: str = "engine", repeats: int = 3, narrow: float = NARROW) -> list[Attempt]:
    """Up to `explore` launches of candidates cheaper than the cheapest plan that held so far
    (`cheaper_in_turn`). One that holds is measured a second time and counts only if it holds
    again: picking the cheapest of several plans that held once would pick the luckiest
    measurement (the winner's curse), which the next launch does not repeat."""
    attempts: list[Attempt] = []
    passed_over: list[Candidate] = []  # would not run here
    best = held
    for launch in range(explore):
        pool = cheaper_in_turn(result, best.candidate, [a.candidate for a in [*tried, *attempts]] + passed_over)
        if not pool:
            break
        candidate = search.evaluate(pool[0].hardware.name, pool[0].params, full=True)
        plan = make_plan(result, search, cost_model, candidate)
        rank = len(tried) + launch + 1
        measured = _measure(store, plan, rank, on_progress, via, repeats)
        if measured is None:
            passed_over.append(pool[0])
            continue
        attempt = Attempt(candidate, plan, measured, rank, cheaper=True, narrow=narrow)
        if measured.all_met:
            attempt.confirmation = _measure(store, plan, rank, on_progress, via, repeats)
        attempts.append(attempt)
        if attempt.held:
            best = attempt
    return attempts


def shortfall(a: Attempt) -> str:
    """What kept `a` from holding: the SLOs it missed, or too little room over two launches."""
    if a.too_little_room:
        return (f"held twice by too little (worst SLO at {worst_ratio(a.result):.0%} and "
                f"{worst_ratio(a.deciding):.0%} of its limit; a hold needs under "
                f"{room_needed(2, a.narrow):.0%} over two launches)")
    result = a.deciding
    missed = ", ".join(f"{name} ({measured * 1e3:.3g} ms)" for name, (_, measured, met) in result.slos.items()
                       if not met)
    return f"missed {missed}" + (" on its second launch" if result is a.confirmation else "")


def _chosen_note(chosen: Attempt, attempts: list[Attempt]) -> str:
    others = "; ".join(f"#{a.rank} {a.candidate.describe(short=True)} {shortfall(a)}"
                       for a in attempts if a is not chosen and not a.held)
    if chosen.cheaper:
        replaced = next(a for a in attempts if a.held and not a.cheaper)
        return (f"chosen by measurement on this machine: cheaper than plan #{replaced.rank} "
                f"({replaced.candidate.describe(short=True)}), which held, it held every SLO on two launches"
                + (f"; {others}" if others else ""))
    verdict = ("held every SLO on two launches" if chosen.held and chosen.confirmation is not None
               else "held every SLO" if chosen.held else f"came closest: it {shortfall(chosen)}")
    return f"chosen by measurement on this machine: {others}; this plan (the model's #{chosen.rank}) {verdict}"
