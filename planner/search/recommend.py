"""`pilot recommend`: an Optuna search for the cheapest deployment that meets the SLOs.

Each trial picks a hardware type and the engine knobs of that hardware's search space, and
`Search` (planner/search/search.py) scores the point. The constraints go to Optuna through
`Trial.set_constraint` (Optuna 5), one named constraint per SLO plus the request rate, the
memory fit and the configuration's validity, so the study in the store shows, trial by trial,
which limit each configuration broke. The finalists are scored again on the whole workload.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna

from planner.search import shared
from planner.search import trials as tr
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
    `workers` > 1, trials are scored in that many processes (the result then depends on the
    worker count as well as the seed). On a database server the study lives there while it runs
    and other processes may join it by name (planner/search/shared.py); on SQLite it is kept in
    memory and written to the store at the end."""
    if trials < 1:
        raise RecommendError(f"must be >= 1, got {trials}", field="trials")
    start = time.perf_counter()
    req = search.requirement
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Named by model and time, with a random tail: two searches in one second must not collide.
    name = study_name or (f"recommend-{Path(search.base.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
                          f"-{uuid.uuid4().hex[:6]}")

    def progress(evaluated: dict[int, Candidate]) -> None:
        if on_progress:
            feasible = [c for c in evaluated.values() if c.feasible]
            on_progress(min(len(evaluated), trials), trials, rank(feasible, req)[0] if feasible else None)

    memory = None
    with Evaluator(search, workers) as evaluator:  # one pool of workers for the trials and the finalists
        if shared.is_server(storage):
            evaluated = shared.search_shared(search, storage, name, trials, workers, progress)  # type: ignore[arg-type]
        else:
            memory, evaluated = _search_in_memory(search, evaluator, name, trials, progress)
        distinct = list({id(c): c for c in evaluated.values()}.values())
        feasible = rank([c for c in distinct if c.feasible], req)
        finalists = _confirm(evaluator, feasible[:FINALISTS]) if feasible else []
    confirmed = rank([c for c in finalists if c.feasible], req)
    if confirmed:
        best, ok = confirmed[0], True
    else:
        pool = finalists or [c for c in distinct if c.prediction is not None] or distinct
        best, ok = closest(pool, req.slos), False
    names = list(search.specs)
    default = search.evaluate(names[0], tr.default_point(search, names[0]), full=True)
    if storage is not None and memory is not None:
        optuna.copy_study(from_study_name=name, from_storage=memory, to_storage=storage, to_study_name=name)
    return SearchResult(best, ok, finalists, pareto_front(distinct, req.slos), default, distinct,
                        search.space_size, trials, time.perf_counter() - start,
                        name if storage is not None else None, list(search.notes), list(req.slos))


def _search_in_memory(search: Search, evaluator: Evaluator, name: str, trials: int,
                      progress: Callable[[dict[int, Candidate]], None],
                      ) -> tuple[optuna.storages.InMemoryStorage, dict[int, Candidate]]:
    """The study in this process's memory; with workers, as many trials asked at once and
    scored in forked processes."""
    memory = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=memory, study_name=name, sampler=tr.sampler(search, trials),
                                direction=OBJECTIVES[search.requirement.objective])
    tr.enqueue_defaults(study, search)
    evaluated: dict[int, Candidate] = {}
    done = 0
    while done < trials:
        asked = [study.ask() for _ in range(min(evaluator.workers, trials - done))]
        jobs = [tr.suggest(search, trial) for trial in asked]
        for trial, candidate in zip(asked, evaluator.evaluate(jobs)):
            study.tell(trial, tr.record(search, trial, candidate))
            evaluated[trial.number] = candidate
            progress(evaluated)
        done += len(asked)
    return memory, evaluated


def _confirm(evaluator: Evaluator, candidates: list[Candidate]) -> list[Candidate]:
    """The finalists again, on the whole workload rather than the search's sample."""
    out = []
    for c, confirmed in zip(candidates, evaluator.evaluate([(c.hardware.name, c.params, True) for c in candidates])):
        confirmed.trial = c.trial
        out.append(confirmed)
    return out
