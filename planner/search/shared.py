"""A search on a study in a database server (PostgreSQL): Optuna's distributed optimization.

Several processes, on this machine (`--workers N`) or on others (`--study NAME` with the same
`--db`), ask and tell trials on the one study; each sampler sees every trial told so far. A
process scores its own trials, and those the others told are scored again here from their
parameters (a replay, not a measurement), so every process ranks the whole study. SQLite keeps
the study in memory while searching instead (planner/search/recommend.py): one file serializes
every writer, which would make the workers queue on each trial.
"""

from __future__ import annotations

import os
from concurrent.futures import as_completed
from typing import Callable

import optuna

from planner.search import trials as tr
from planner.search.candidate import OBJECTIVES, Candidate, RecommendError
from planner.search.parallel import can_fork, fork_pool, inherited
from planner.search.search import Search
from planner.store.database import fingerprint

CHUNK = 4  # trials a worker runs per task: progress comes back this often
# One storage (one connection pool) per process and URL: a storage per task would leave a pool
# of idle connections per task, and a server's connection limit is finite. Keyed by process too,
# since a forked worker must not use the connections it inherited.
_STORAGES: dict[tuple[int, str], optuna.storages.RDBStorage] = {}


def _storage(url: str) -> optuna.storages.RDBStorage:
    key = (os.getpid(), url)
    if key not in _STORAGES:
        _STORAGES[key] = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    return _STORAGES[key]


def is_server(storage: str | None) -> bool:
    return storage is not None and not storage.startswith("sqlite")


def open_study(search: Search, storage: str, name: str, trials: int, offset: int = 0) -> optuna.Study:
    """The study `name` in `storage`, made if missing. A study made for another model, workload
    or SLOs is refused: its trials would be scored against the wrong targets."""
    req = search.requirement
    key = fingerprint([search.base.model, search.workload.model_dump(mode="json"), [str(s) for s in req.slos],
                       req.objective, req.load_kind, req.load_value, sorted(search.specs)])
    study = optuna.create_study(storage=_storage(storage), study_name=name, load_if_exists=True,
                                sampler=tr.sampler(search, trials, offset),
                                direction=OBJECTIVES[req.objective])
    made_for = study.user_attrs.get("search")
    if made_for is None:
        study.set_user_attr("search", key)
        tr.enqueue_defaults(study, search)
    elif made_for != key:
        raise RecommendError(f"{name!r} in the store was made for another model, workload or SLOs; "
                             "name a new study", field="study")
    return study


def _run_trials(storage: str, name: str, count: int, trials: int, offset: int) -> dict[int, Candidate]:
    return run_trials(inherited(), storage, name, count, trials, offset)


def run_trials(search: Search, storage: str, name: str, count: int, trials: int,
               offset: int) -> dict[int, Candidate]:
    """`count` trials asked and told on the shared study; the candidates by trial number."""
    study = open_study(search, storage, name, trials, offset)
    scored: dict[int, Candidate] = {}
    for _ in range(count):
        trial = study.ask()
        candidate = search.evaluate(*tr.suggest(search, trial))
        study.tell(trial, tr.record(search, trial, candidate))
        scored[trial.number] = candidate
    return scored


def search_shared(search: Search, storage: str, name: str, trials: int, workers: int,
                  on_batch: Callable[[dict[int, Candidate]], None]) -> dict[int, Candidate]:
    """This process's `trials` on the study, in `workers` processes, then every complete trial
    of the study (others' too) as candidates by trial number."""
    open_study(search, storage, name, trials)  # made (or checked) once, before any worker asks
    chunks = [min(CHUNK, trials - start) for start in range(0, trials, CHUNK)]
    scored: dict[int, Candidate] = {}
    if workers > 1 and can_fork():
        with fork_pool(search, workers) as pool:  # each worker opens its own connections
            futures = [pool.submit(_run_trials, storage, name, n, trials, 1 + i) for i, n in enumerate(chunks)]
            for future in as_completed(futures):
                part = future.result()
                scored.update(part)
                on_batch(scored)
    else:
        for i, n in enumerate(chunks):
            scored.update(run_trials(search, storage, name, n, trials, 1 + i))
            on_batch(scored)
    study = optuna.load_study(study_name=name, storage=_storage(storage))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        job = tr.job_of(search, trial.params)
        if job is None:
            continue
        if trial.number in scored:  # a worker's: cached here as the parent had scored it
            search.remember(*job, scored[trial.number])
        else:  # another process's trial: its point scored here too
            candidate = search.evaluate(*job)
            candidate.trial = trial.number
            scored[trial.number] = candidate
    return scored
