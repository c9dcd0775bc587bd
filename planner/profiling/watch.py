"""The watch over a profile: as runs finish it re-estimates the held-out error (at run counts
growing by a quarter, so estimating costs a bounded share of the profile), hands the fold models
to an adaptive order, and stops the profile once a stop rule has held at two checks in a row
(one estimate on few runs can be lucky). An adaptive order without a stop rule gets only its
committee, refitted at run counts growing by half, and the error is judged once at the end."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sqlalchemy import select

from planner.costmodel.fit_data import RunData
from planner.profiling.adaptive import AdaptiveOrder
from planner.profiling.estimate import Accuracy, campaign_run_ids, cross_validated
from planner.profiling.until import StopRule
from planner.spec.errors import FieldError
from planner.spec.slo import SLO
from planner.spec.workload import Workload
from planner.store.database import Campaign, Hardware, Run, Store

GROWTH = 1.25  # each check after the first waits for this many times the runs of the last
# With an adaptive order and no stop rule to answer: on a small model refitting the committee at
# every quarter took a third of the profile.
ADAPTIVE_GROWTH = 1.5


@dataclass(frozen=True)
class Checkpoint:
    runs: int  # of the model on this hardware in the store, when estimated
    elapsed_s: float  # of this profile, estimating included
    accuracy: Accuracy
    estimate_s: float  # what the estimate itself took


@dataclass
class AccuracyWatch:
    store: Store
    campaign_id: int
    until: StopRule | None = None
    order: AdaptiveOrder | None = None
    folds: int = 5
    growth: float = GROWTH
    on_estimate: Callable[[Checkpoint], None] | None = None
    history: list[Checkpoint] = field(default_factory=list)
    stopped_by_target: bool = False
    _next_check: int = 0
    _met_before: bool = False
    _seen: set[int] | None = None
    _last_elapsed: float = 0.0  # the profile's clock when the previous call returned
    _last_config: int | None = None  # the configuration of the previous run
    _scoring_seen: float = 0.0
    _final: bool = False  # the last estimate, on every run
    _runs: dict[int, RunData] = field(default_factory=dict)  # loaded by earlier checks
    # What runs cost beyond their own length: [on the configuration of the run before, on another]
    _besides: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))

    def __call__(self, elapsed_s: float) -> bool:
        """After a finished run: whether the profile should stop now."""
        run_ids = campaign_run_ids(self.store, self.campaign_id)
        self._count_new(run_ids, elapsed_s)
        self._last_elapsed = elapsed_s
        if len(run_ids) < self._next_check:
            return False
        began = time.monotonic()
        # An adaptive order alone needs its committee, not the error: judged with a stop rule,
        # and once when the profile ends.
        judge = self.until is not None or self._final
        found = cross_validated(self.store, run_ids, self.folds, judge=judge, cache=self._runs)
        if found is None:  # too few measurements to estimate from yet
            self._next_check = len(run_ids) + 1
            return False
        accuracy, committee = found
        if self.order is not None:
            self.order.update(committee)
        spent = time.monotonic() - began
        self._last_elapsed = elapsed_s + spent
        self._next_check = max(len(run_ids) + 1, math.ceil(self.growth * len(run_ids)))
        if accuracy is None:
            return False
        checkpoint = Checkpoint(len(run_ids), elapsed_s + spent, accuracy, spent)
        self.history.append(checkpoint)
        if self.on_estimate:
            self.on_estimate(checkpoint)
        met = self.until is not None and self.until.met(accuracy)
        self.stopped_by_target = met and self._met_before
        self._met_before = met
        return self.stopped_by_target

    def finish(self, elapsed_s: float) -> None:
        """After the profile: a last estimate on every run, where the last check came before
        the final runs (a budget or --max-runs ends a profile between checks)."""
        if self.history and self.history[-1].runs == len(campaign_run_ids(self.store, self.campaign_id)):
            return
        self._next_check, self._final = 0, True
        self(elapsed_s)

    def _count_new(self, run_ids: list[int], elapsed_s: float) -> None:
        """What the new run cost beyond its own length (its share of the profile's clock since the
        last call, less the order's scoring), kept apart for a run on the configuration of the
        run before and one that loaded another: the adaptive order's price of a run."""
        new = [i for i in run_ids if i not in self._seen] if self._seen is not None else run_ids[-1:]
        self._seen = set(run_ids)
        if not new:
            return
        scoring = self.order.scoring_s if self.order is not None else 0.0
        wall = elapsed_s - self._last_elapsed - (scoring - self._scoring_seen)
        self._scoring_seen = scoring
        with self.store.session() as session:
            rows = session.execute(select(Run.duration_s, Run.engine_config_id)
                                   .where(Run.id.in_(new)).order_by(Run.id)).all()
        for duration, config in rows:  # several only where other profilers share the campaign
            self._besides[config != self._last_config].append(max(0.0, wall / len(rows) - duration))
            self._last_config = config
        if self.order is not None:
            same, switch = (float(np.median(b)) if b else None for b in self._besides)
            self.order.same_config_s = same if same is not None else switch or 0.0
            self.order.switch_s = switch if switch is not None else same or 0.0

    @property
    def latest(self) -> Accuracy | None:
        return self.history[-1].accuracy if self.history else None

    @property
    def target(self) -> str | None:
        """Where the stop rule stands: "met" (at two checks in a row), "met once" (at the last
        check only), "not met"; None without a rule or an estimate."""
        if self.until is None or self.latest is None:
            return None
        return "met" if self.stopped_by_target else "met once" if self.until.met(self.latest) else "not met"


def outlook(history: list[Checkpoint], more: float = 2.0) -> tuple[int, float] | None:
    """What `more` times the runs would bring the median error to, on the power law
    error = c * runs^-s fitted to the checks so far (the learning curve's usual shape); None
    with fewer than three checks, or where the error no longer falls with more runs."""
    if len(history) < 3:
        return None
    runs = np.log([c.runs for c in history])
    error = np.log([max(c.accuracy.median_ape, 1e-6) for c in history])
    slope, intercept = np.polyfit(runs, error, 1)
    if slope >= 0:
        return None
    target = int(round(more * history[-1].runs))
    return target, float(np.exp(intercept + slope * np.log(target)))


ORDERS = ("builtin", "adaptive")


def watch_profile(store: Store, campaign_id: int, model_dir: str, workload: Workload, via: str,
                  until: StopRule | None = None, order: str = "builtin", slos: list[SLO] | None = None,
                  draft: str | None = None, on_estimate: Callable[[Checkpoint], None] | None = None,
                  ) -> AccuracyWatch | None:
    """The watch a profile needs for `until` and `order` (None: neither asks for one). Pass
    `watch` as the profile's `after_run` and `watch.order.rank` (where set) as its `rank`."""
    if order not in ORDERS:
        raise FieldError(f"must be one of {', '.join(ORDERS)}, got {order!r}", field="order")
    if until is None and order == "builtin":
        return None
    adaptive = None
    if order == "adaptive":
        with store.session() as session:
            spec_name = session.get(Hardware, session.get(Campaign, campaign_id).hardware_id).spec_name
        adaptive = AdaptiveOrder(store, model_dir, workload, spec_name, served=via == "http", slos=slos,
                                 draft=draft)
    return AccuracyWatch(store, campaign_id, until, adaptive, on_estimate=on_estimate,
                         growth=GROWTH if until is not None else ADAPTIVE_GROWTH)
