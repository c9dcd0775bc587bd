"""The adaptive order: after a first coarse pass in the campaign's own (farthest-point) order,
measure next the experiment the cost model is least sure about, per second of measuring.

Query by committee: the cross-validation folds' models (`estimate.cross_validated`) each predict
a pool of pending experiments (the next ones in the built-in order, for coverage, and as many
drawn from the rest); where they disagree most, the runs so far say least. Disagreement is the
spread of log predictions over the members, averaged over the judged metrics, counted double
where the members split on an SLO's verdict (the boundary a plan is chosen on), and divided by
what the run would cost: its predicted length plus what each run costs besides (loading,
warming up, probing; as measured so far), so a long run must be that much more telling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine import EngineConfig
from planner.costmodel.fit import CostModel
from planner.costmodel.fit_data import METRICS
from planner.costmodel.predict import Predictor
from planner.spec.slo import SLO
from planner.spec.workload import Workload
from planner.store.database import EngineConfigRow, Experiment, Store

POOL = 8  # pending experiments scored per refit from the built-in order's front, and as many at random


@dataclass(frozen=True)
class Scored:
    experiment_id: int
    score: float  # disagreement per predicted second of measuring; inf: the members cannot predict it
    spread: float  # mean over METRICS of the std of log predictions over the members
    seconds: float  # the members' median predicted length of the run


class AdaptiveOrder:
    """`rank` for `planner.measure.profiler.claim_next`; `update` gives it a new committee."""

    def __init__(self, store: Store, model_dir: str, workload: Workload, spec_name: str,
                 served: bool, slos: Sequence[SLO] | None = None, draft: str | None = None,
                 acceptance_rate: float | None = None, pool: int = POOL, seed: int = 0) -> None:
        self.store, self.model_dir, self.workload = store, model_dir, workload
        self.spec_name, self.served, self.slos = spec_name, served, list(slos or [])
        self.draft, self.acceptance_rate = draft, acceptance_rate
        self.pool, self.rng = pool, random.Random(seed)
        self.members: list[CostModel] = []
        # What a run costs beyond its own length (loading the engine, warming up, probing the
        # host, writing the store), as the profile has measured it so far.
        self.overhead_s = 0.0
        self.scores: dict[int, Scored] = {}  # the last pool's, while its experiments are pending
        self._configs: dict[int, EngineConfig] = {}

    def update(self, members: list[CostModel]) -> None:
        self.members, self.scores = members, {}

    def rank(self, candidates: list[Experiment]) -> list[Experiment]:
        """`candidates` (in position order) with the scored pool first, best first; the rest
        keep their order. Without a committee yet: the built-in order."""
        if len(self.members) < 2:
            return candidates
        pending = {e.id for e in candidates}
        if sum(1 for i in self.scores if i in pending) < 2:
            front = list(candidates[: self.pool])
            rest = list(candidates[self.pool:])
            picked = front + self.rng.sample(rest, min(self.pool, len(rest)))
            self.scores = {e.id: self.score(e) for e in picked}
        best = sorted((e for e in candidates if e.id in self.scores), key=lambda e: -self.scores[e.id].score)
        return best + [e for e in candidates if e.id not in self.scores]

    def score(self, experiment: Experiment) -> Scored:
        config = self._config(experiment.engine_config_id)
        predictions, seconds = [], []
        for member in self.members:
            predictor = Predictor(member, self.model_dir, self.workload, self.draft, served=self.served)
            try:
                prediction = predictor.predict(config, self.spec_name, experiment.load_kind,
                                               experiment.load_value, self.acceptance_rate)
            except ValueError:  # e.g. a draft with no measured acceptance: nothing known, measure it
                return Scored(experiment.id, float("inf"), float("inf"), float("nan"))
            metrics = prediction.metrics
            predictions.append(metrics)
            rate = metrics.get("request_rate", 0.0)
            seconds.append(self.workload.num_requests / rate if rate > 0 else float("inf"))
        logs = np.log(np.maximum([[p[m] for m in METRICS] for p in predictions], 1e-12))
        spread = float(np.mean(np.std(logs, axis=0)))
        split = 0.0
        for slo in self.slos:
            verdicts = [slo.met_by(p) for p in predictions]
            split = max(split, min(np.mean(verdicts), 1 - np.mean(verdicts)))  # 0.5: evenly split
        length = float(np.median(seconds))
        cost = max(length + self.overhead_s, 1e-3)
        return Scored(experiment.id, spread * (1 + 2 * split) / cost, spread, length)

    def _config(self, config_id: int) -> EngineConfig:
        if config_id not in self._configs:
            with self.store.session() as session:
                data = session.get(EngineConfigRow, config_id).config
            self._configs[config_id] = EngineConfig(model=self.model_dir, **data)
        return self._configs[config_id]
