"""One Optuna trial of the search: the point it suggests, what it records of the scored candidate,
and the way back from a stored trial's parameters to the point (for trials other processes told)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna

from engine import EngineConfig
from planner.search.candidate import OBJECTIVES, Candidate
from planner.search.search import Search

Job = tuple[str, dict[str, Any], bool]  # (hardware, knob values, on the whole workload)


def sampler(search: Search, trials: int, offset: int = 0) -> optuna.samplers.BaseSampler:
    """TPE over the knobs jointly; `offset` separates the seeds of processes sharing a study, which
    would otherwise propose the same points from the same history."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=search.seed + offset, multivariate=True, group=True,
                                          n_startup_trials=min(20, max(1, trials // 4)))


def suggest(search: Search, trial: optuna.Trial) -> Job:
    names = list(search.specs)
    hardware = trial.suggest_categorical("hardware", names) if len(names) > 1 else names[0]
    space = search.spaces[hardware]
    point = {k: trial.suggest_categorical(search.param(hardware, k), space.values(k)) for k in space.knobs}
    return hardware, point, False


def job_of(search: Search, params: dict[str, Any]) -> Job | None:
    """The point a stored trial scored, or None where its parameters are not of this search."""
    names = list(search.specs)
    hardware = params.get("hardware", names[0]) if len(names) > 1 else names[0]
    if hardware not in search.spaces:
        return None
    space = search.spaces[hardware]
    point = {}
    for knob in space.knobs:
        name = search.param(hardware, knob)
        if name not in params or params[name] not in space.values(knob):
            return None
        point[knob] = params[name]
    return hardware, point, False


def record(search: Search, trial: optuna.Trial, candidate: Candidate) -> float:
    """The trial's value, with each limit the candidate breaks as a named constraint and its
    cost and predicted SLO metrics as user attributes (what optuna-dashboard shows)."""
    req = search.requirement
    for constraint, value in candidate.violations.items():
        trial.set_constraint(constraint, float(value))
    trial.set_user_attr("replicas", candidate.replicas)
    trial.set_user_attr("cost_per_million_usd", finite(candidate.cost_per_million))
    if candidate.prediction is not None:
        for slo in req.slos:
            trial.set_user_attr(slo.key, finite(candidate.prediction.metrics[slo.key]))
    candidate.trial = trial.number
    value = candidate.score(req.objective, req.slos)
    if not math.isfinite(value):
        value = 1e12 if OBJECTIVES[req.objective] == "minimize" else 0.0
    return value


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def default_point(search: Search, hardware: str) -> dict[str, Any]:
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


def enqueue_defaults(study: optuna.Study, search: Search) -> None:
    """The engine's defaults on each hardware, always scored: the baseline to beat."""
    for hardware in search.specs:
        study.enqueue_trial(default_params(search, hardware), skip_if_exists=True)


def default_params(search: Search, hardware: str) -> dict[str, Any]:
    params = {search.param(hardware, k): v for k, v in default_point(search, hardware).items()}
    return ({"hardware": hardware} if len(search.specs) > 1 else {}) | params
