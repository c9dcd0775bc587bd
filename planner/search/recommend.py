"""`pilot recommend`: an Optuna search for the cheapest deployment that meets the SLOs.

Each trial picks a hardware type and the engine knobs of that hardware's search space, and
`Search` (planner/search/search.py) scores the point. The constraints go to Optuna through
`Trial.set_constraint` (Optuna 5), one named constraint per SLO plus the request rate, the
memory fit and the configuration's validity, so the study in the store shows, trial by trial,
which limit each configuration broke. The finalists are scored again on the whole workload.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from engine import EngineConfig
from planner.search.candidate import OBJECTIVES, Candidate, RecommendError, closest, pareto_front, rank
from planner.search.parallel import Evaluator
from planner.search.search import Search
from planner.spec.slo import SLO

FINALISTS = 5
Progress = Callable[[int, int, "Candidate | None"], None]  # (done, total, best so far)


@dataclass
class SearchResult:
    best: Candidate  # the cheapest feasible, or the closest to feasible
    feasible: bool
    finalists: list[Candidate]
    pareto: list[Candidate]  # feasible candidates no other beats on both cost and latency
    default: Candidate | None  # the engine's default configuration, for comparison
    candidates: list[Candidate]  # every distinct deployment evaluated
    space_size: int
    trials: int
    seconds: float
    study_name: str | None
    notes: list[str]
    slos: list[SLO] = field(default_factory=list)


def run_search(search: Search, trials: int = 150, storage: str | None = None,
               study_name: str | None = None, on_progress: Progress | None = None,
               workers: int = 1) -> SearchResult:
    """Run the study, confirm the finalists on the whole workload, and pick the plan. With
    `workers` > 1, that many trials are asked at once and scored in parallel processes (the
    result then depends on the worker count as well as the seed)."""
    if trials < 1:
        raise RecommendError(f"must be >= 1, got {trials}", field="trials")
    start = time.perf_counter()
    req = search.requirement
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=search.seed, multivariate=True, group=True,
                                             n_startup_trials=min(20, max(1, trials // 4)))
    memory = optuna.storages.InMemoryStorage()
    # Named by model and time, with a random tail: two searches in one second must not collide.
    name = study_name or (f"recommend-{Path(search.base.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
                          f"-{uuid.uuid4().hex[:6]}")
    study = optuna.create_study(storage=memory, study_name=name, sampler=sampler,
                                direction=OBJECTIVES[req.objective])
    names = list(search.specs)
    for hardware in names:  # the engine's defaults are always scored: the baseline to beat
        study.enqueue_trial(_default_params(search, hardware), skip_if_exists=True)
    evaluated: dict[int, Candidate] = {}

    def suggest(trial: optuna.Trial) -> tuple[str, dict[str, Any], bool]:
        hardware = trial.suggest_categorical("hardware", names) if len(names) > 1 else names[0]
        space = search.spaces[hardware]
        point = {k: trial.suggest_categorical(search.param(hardware, k), space.values(k))
                 for k in space.knobs}
        return hardware, point, False

    def record(trial: optuna.Trial, candidate: Candidate) -> float:
        for constraint, value in candidate.violations.items():
            trial.set_constraint(constraint, float(value))
        trial.set_user_attr("replicas", candidate.replicas)
        trial.set_user_attr("cost_per_million_usd", _finite(candidate.cost_per_million))
        if candidate.prediction is not None:
            for slo in req.slos:
                trial.set_user_attr(slo.key, candidate.prediction.metrics[slo.key])
        candidate.trial = trial.number
        evaluated[trial.number] = candidate
        value = candidate.score(req.objective, req.slos)
        if not math.isfinite(value):
            value = 1e12 if OBJECTIVES[req.objective] == "minimize" else 0.0
        return value

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_progress:
            feasible = [c for c in evaluated.values() if c.feasible]
            on_progress(len(evaluated), trials, rank(feasible, req)[0] if feasible else None)

    with Evaluator(search, workers) as evaluator:
        done = 0
        while done < trials:
            asked = [study.ask() for _ in range(min(evaluator.workers, trials - done))]
            jobs = [suggest(trial) for trial in asked]
            for trial, candidate in zip(asked, evaluator.evaluate(jobs)):
                callback(study, study.tell(trial, record(trial, candidate)))
            done += len(asked)
        distinct = list({id(c): c for c in evaluated.values()}.values())
        feasible = rank([c for c in distinct if c.feasible], req)
        finalists = _confirm(evaluator, feasible[:FINALISTS]) if feasible else []
    confirmed = rank([c for c in finalists if c.feasible], req)
    if confirmed:
        best, ok = confirmed[0], True
    else:
        pool = finalists or [c for c in distinct if c.prediction is not None] or distinct
        best, ok = closest(pool, req.slos), False
    default = search.evaluate(names[0], _default_point(search, names[0]), full=True)
    if storage is not None:
        optuna.copy_study(from_study_name=name, from_storage=memory, to_storage=storage,
                          to_study_name=name)
    return SearchResult(best, ok, finalists, pareto_front(distinct, req.slos), default, distinct,
                        search.space_size, trials, time.perf_counter() - start,
                        name if storage is not None else None, list(search.notes), list(req.slos))


def _confirm(evaluator: Evaluator, candidates: list[Candidate]) -> list[Candidate]:
    """The finalists again, on the whole workload rather than the search's sample."""
    out = []
    for c, confirmed in zip(candidates, evaluator.evaluate([(c.hardware.name, c.params, True) for c in candidates])):
        confirmed.trial = c.trial
        out.append(confirmed)
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _default_point(search: Search, hardware: str) -> dict[str, Any]:
    """The engine's defaults where the space offers them, else the space's first value."""
    space, default = search.spaces[hardware], EngineConfig(model=search.base.model)
    point = {}
    for knob in space.knobs:
        values = space.values(knob)
        value = (default.num_speculative_tokens or 0) if knob == "num_speculative_tokens" else getattr(default, knob)
        if knob == "dtype" and value == "auto" and "bfloat16" in values:
            value = "bfloat16"
        point[knob] = value if value in values else values[0]
    return point


def _default_params(search: Search, hardware: str) -> dict[str, Any]:
    params = {search.param(hardware, k): v for k, v in _default_point(search, hardware).items()}
    return ({"hardware": hardware} if len(search.specs) > 1 else {}) | params
