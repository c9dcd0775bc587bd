"""The adaptive order: after a first coarse pass in the campaign's own (farthest-point) order,
half the runs keep that order and half go where the cost model is least sure, per second of
measuring.

Query by committee: the cross-validation folds' models (`estimate.cross_validated`) each predict
a pool of pending experiments (the next ones in the built-in order, those of the configuration
loaded now, and as many drawn from the rest); where they disagree most, the runs so far say
least. Disagreement is the spread of log predictions over the members, averaged over the judged
metrics, counted double where the members split on an SLO's verdict (the boundary a plan is
chosen on), and divided by what the run would cost: its predicted length plus what a run has
cost besides, measured apart for a run on the configuration already loaded and one that loads
another (loading, warming up, probing the host, writing the store).

Turns alternate by runs: a coverage turn takes the built-in order's next configuration with all
its load levels (one engine load), then the committee takes as many runs, also a configuration
at a time: the one holding the most telling experiment, where loading it is shared by all its
pending load levels (on a small model loading costs ten runs). Coverage alone spends runs where
the model is already right; the committee alone crowds the hard corners and leaves the typical
configurations thin (on llama-110m its p90 error halved while its median rose).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine import EngineConfig
from planner.costmodel.fit import CostModel
from planner.costmodel.fit_data import METRICS, measured_acceptance
from planner.costmodel.predict import Predictor
from planner.spec.slo import SLO
from planner.spec.workload import Workload
from planner.store.database import EngineConfigRow, Experiment, Store

POOL = 8  # pending experiments scored per committee from the built-in order's front, and as many at random
# The coarse first pass, in the built-in order: a committee fitted on a handful of runs disagrees
# everywhere, and its picks left llama-110m's one-minute model 2.5x worse than the built-in one's.
FIRST_PASS_CONFIGS = 8


@dataclass(frozen=True)
class Scored:
    experiment_id: int
    config_id: int
    spread: float  # mean over METRICS of the std of log predictions over the members; inf: unpredictable
    weight: float  # 2 where the members split evenly on an SLO's verdict, 1 where they agree
    seconds: float  # the members' median predicted length of the run


class AdaptiveOrder:
    """`rank` for `planner.measure.claims.claim_next` (which takes the first it is given);
    `update` gives it a new committee, and the watch sets what runs cost besides their length."""

    def __init__(self, store: Store, model_dir: str, workload: Workload, spec_name: str,
                 served: bool, slos: Sequence[SLO] | None = None, draft: str | None = None,
                 pool: int = POOL, first_pass: int = FIRST_PASS_CONFIGS, seed: int = 0) -> None:
        self.store, self.model_dir, self.workload = store, model_dir, workload
        self.spec_name, self.served, self.slos = spec_name, served, list(slos or [])
        self.draft, self.acceptance_rate = draft, None
        self.pool, self.first_pass, self.rng = pool, first_pass, random.Random(seed)
        self._first_configs: list[int] = []  # the configurations the first pass has taken up
        self.members: list[CostModel] = []
        # What a run costs beyond its own length, on the loaded configuration and on another.
        self.same_config_s = 0.0
        self.switch_s = 0.0
        self.scores: dict[int, Scored] = {}  # the last pool's, while its experiments are pending
        self.scoring_s = 0.0  # time spent predicting for the committee, all told
        self.loaded: int | None = None  # the configuration of the experiment ranked first last
        self.turn = "builtin"  # whose choice the last ranking was: builtin (no committee yet), coverage, committee
        self._covering: int | None = None  # the configuration a coverage turn is measuring
        self._chosen: int | None = None  # the configuration a committee turn is measuring
        self._pending_per_config: Counter[int] = Counter()
        self._coverage_runs = 0
        self._committee_runs = 0
        self._configs: dict[int, EngineConfig] = {}

    def update(self, members: list[CostModel]) -> None:
        self.members, self.scores = members, {}
        if self.draft:  # the pair's acceptance, once runs with drafts have measured it
            self.acceptance_rate = measured_acceptance(self.store, self.model_dir, self.draft)

    def rank(self, candidates: list[Experiment]) -> list[Experiment]:
        """`candidates` (in position order), the one to take first: the built-in order's on a
        coverage turn (and before there is a committee), else the committee's best."""
        ranked = self._rank(candidates)
        self.loaded = ranked[0].engine_config_id if ranked else self.loaded
        return ranked

    def _rank(self, candidates: list[Experiment]) -> list[Experiment]:
        front = candidates[0]
        in_first_pass = (len(self._first_configs) < self.first_pass
                         or bool(self._first_configs) and front.engine_config_id == self._first_configs[-1])
        if len(self.members) < 2 or (in_first_pass and self._committee_runs + self._coverage_runs == 0):
            self.turn = "builtin"
            if front.engine_config_id not in self._first_configs:
                self._first_configs.append(front.engine_config_id)
            return candidates
        chosen = [e for e in candidates if e.engine_config_id == self._chosen]
        if chosen:  # the rest of the committee turn's configuration
            self.turn = "committee"
            self._committee_runs += 1
            return chosen + [e for e in candidates if e.engine_config_id != self._chosen]
        self.turn, self._chosen = "coverage", None
        if self._covering is not None and front.engine_config_id == self._covering:
            self._coverage_runs += 1  # the rest of the coverage turn's load levels
            return candidates
        if self._committee_runs >= self._coverage_runs:
            self._covering = front.engine_config_id
            self._coverage_runs += 1
            return candidates
        self.turn, self._covering = "committee", None
        self._committee_runs += 1
        self._pending_per_config = Counter(e.engine_config_id for e in candidates)
        pending = {e.id for e in candidates}
        if sum(1 for i in self.scores if i in pending) < 2:
            self._score_pool(candidates)
        best = sorted((e for e in candidates if e.id in self.scores), key=lambda e: -self.value(self.scores[e.id]))
        if not best:
            return candidates
        self._chosen = best[0].engine_config_id
        return best[:1] + [e for e in candidates if e.id != best[0].id]

    def value(self, scored: Scored, loaded: int | None = None) -> float:
        """How telling a run is per second it costs, with `loaded` (default: the configuration
        loaded now) on the engine."""
        loaded = self.loaded if loaded is None else loaded
        # Loading another configuration is shared by the load levels the turn measures on it.
        levels = max(1, self._pending_per_config.get(scored.config_id, 1))
        besides = self.same_config_s if scored.config_id == loaded else self.switch_s / levels
        if not np.isfinite(scored.spread):
            return float("inf")
        return scored.spread * scored.weight / max(scored.seconds + besides, 1e-3)

    def _score_pool(self, candidates: list[Experiment]) -> None:
        began = time.monotonic()
        front = candidates[: self.pool]
        loaded = [e for e in candidates[self.pool:] if e.engine_config_id == self.loaded]
        rest = [e for e in candidates[self.pool:] if e.engine_config_id != self.loaded]
        picked = front + loaded + self.rng.sample(rest, min(self.pool, len(rest)))
        self.scores = {e.id: self.score(e) for e in picked}
        self.scoring_s += time.monotonic() - began

    def score(self, experiment: Experiment) -> Scored:
        config = self._config(experiment.engine_config_id)
        predictions, seconds = [], []
        for member in self.members:
            predictor = Predictor(member, self.model_dir, self.workload, self.draft, served=self.served)
            try:
                prediction = predictor.predict(config, self.spec_name, experiment.load_kind,
                                               experiment.load_value, self.acceptance_rate)
            except ValueError:  # e.g. a draft with no measured acceptance: nothing known, measure it
                return Scored(experiment.id, experiment.engine_config_id, float("inf"), 1.0, float("nan"))
            metrics = prediction.metrics
            predictions.append(metrics)
            rate = metrics.get("request_rate", 0.0)
            seconds.append(self.workload.num_requests / rate if rate > 0 else float("inf"))
        logs = np.log(np.maximum([[p[m] for m in METRICS] for p in predictions], 1e-12))
        split = 0.0
        for slo in self.slos:
            verdicts = [slo.met_by(p) for p in predictions]
            split = max(split, min(np.mean(verdicts), 1 - np.mean(verdicts)))  # 0.5: evenly split
        return Scored(experiment.id, experiment.engine_config_id, float(np.mean(np.std(logs, axis=0))),
                      1 + 2 * split, float(np.median(seconds)))

    def _config(self, config_id: int) -> EngineConfig:
        if config_id not in self._configs:
            with self.store.session() as session:
                data = session.get(EngineConfigRow, config_id).config
            self._configs[config_id] = EngineConfig(model=self.model_dir, **data)
        return self._configs[config_id]
