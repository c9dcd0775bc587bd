"""Scoring a search's deployments in several processes at once. Each replay is pure Python and
holds the GIL, so threads would take turns; forked workers inherit the search (its predictors,
kernel tables and caches as they were at the fork) and send back the scored candidates."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planner.search.candidate import Candidate
    from planner.search.search import Search

Job = tuple[str, dict[str, Any], bool]  # (hardware, knob values, on the whole workload)
_SEARCH: Search | None = None  # the search a forked worker inherited


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def fork_pool(search: Search, workers: int) -> ProcessPoolExecutor:
    """`workers` processes forked from this one, each inheriting `search` as it is at the fork
    (`inherited()` in a worker)."""
    global _SEARCH
    _SEARCH = search
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def inherited() -> Search:
    """In a worker of `fork_pool`: the search it inherited."""
    assert _SEARCH is not None, "a worker without a search"
    return _SEARCH


def _evaluate(job: Job) -> Candidate:
    hardware, point, full = job
    return inherited().evaluate(hardware, point, full)


class Evaluator:
    """`search.evaluate` for many points: in this process, or in `workers` forked ones (where
    the platform can fork). Results land in the search's own cache, so a point scored twice is
    one candidate."""

    def __init__(self, search: Search, workers: int = 1) -> None:
        self.search = search
        self.workers = workers if workers > 1 and can_fork() else 1
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def evaluate(self, jobs: list[Job]) -> list[Candidate]:
        todo = [job for job in jobs if not self.search.is_cached(*job)]
        if self.workers > 1 and len(todo) > 1:
            for job, candidate in zip(todo, self._workers().map(_evaluate, todo)):
                self.search.remember(*job, candidate)
        return [self.search.evaluate(*job) for job in jobs]

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = fork_pool(self.search, self.workers)
        return self._pool

