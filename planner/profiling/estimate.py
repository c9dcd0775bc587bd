"""How accurate a cost model fitted on a store's runs is, estimated by cross-validation as
`pilot fit` does (each run predicted by a model that never saw it, judged against the median of
its measurement's repeats), and the fold models, a committee whose disagreement says where the
runs are thin."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from planner.costmodel.fit import (
    CostModel,
    accuracy,
    by_measurement,
    cross_validate,
    fold_model,
    measurement_groups,
    run_folds,
)
from planner.costmodel.fit_data import METRICS, RunData, host_references, load_runs, set_host_slowdown
from planner.store.database import Campaign, Run, Store

# Below this many measurements a fold holds one or two runs and its error says little.
MIN_MEASUREMENTS = 6


@dataclass(frozen=True)
class Accuracy:
    """Held-out error over every metric of `planner.costmodel.fit_data.METRICS`."""

    runs: int
    measurements: int
    median_ape: float
    p90_ape: float
    coverage: float | None  # of 80% intervals set from the other folds' errors

    def describe(self) -> str:
        return (f"held-out error {self.median_ape:.1%} median, {self.p90_ape:.1%} p90 "
                f"({self.measurements} measurements)")


def campaign_run_ids(store: Store, campaign_id: int) -> list[int]:
    """The runs a plan for the campaign's model on its hardware would be fitted on: every run of
    that model on that hardware in the store, from this campaign or any other."""
    with store.session() as session:
        campaign = session.get(Campaign, campaign_id)
        return list(session.scalars(select(Run.id).where(Run.model_id == campaign.model_id,
                                                          Run.hardware_id == campaign.hardware_id)
                                    .order_by(Run.id)))


def cross_validated(store: Store, run_ids: list[int], folds: int = 5, seed: int = 0, judge: bool = True,
                    cache: dict[int, RunData] | None = None) -> tuple[Accuracy | None, list[CostModel]] | None:
    """The held-out accuracy of `run_ids` (None unless `judge`: predicting every run is half
    the cost) and the fold models as cost models (no intervals of their own); None with fewer
    than MIN_MEASUREMENTS measurements. `cache` keeps runs loaded by earlier calls."""
    runs = _load(store, run_ids, cache if cache is not None else {})
    groups = measurement_groups(runs) if runs else np.zeros(0, dtype=int)
    count = int(groups.max()) + 1 if len(groups) else 0
    if count < max(MIN_MEASUREMENTS, folds):
        return None
    reference = host_references(runs)
    set_host_slowdown(runs, reference)
    measured = np.array([[r.measured[m] for m in METRICS] for r in runs])
    fold_of = run_folds(runs, folds, seed)
    members: list = []
    found = None
    if judge:
        predicted, step_errors = cross_validate(runs, fold_of, "estimate", members=members)
        first = np.unique(groups, return_index=True)[1]
        report = accuracy(by_measurement(measured, groups), by_measurement(predicted, groups, np.mean),
                          fold_of[first], step_errors)["overall"]
        found = Accuracy(len(runs), count, report["median_ape"], report["p90_ape"], report["coverage"])
    else:
        members = [fold_model([r for r, f in zip(runs, fold_of) if f != fold]) for fold in np.unique(fold_of)]
    hardware = {r.spec_name: r.hardware_rates for r in runs}
    models = sorted({r.model_fingerprint for r in runs})
    no_intervals = {"run": {m: (0.0, 0.0) for m in METRICS}}
    committee = [CostModel(step, no_intervals, hardware, models, "", host_reference=reference, delivery=delivery)
                 for step, delivery in members]
    return found, committee


def _load(store: Store, run_ids: list[int], cache: dict[int, RunData]) -> list[RunData]:
    missing = [i for i in run_ids if i not in cache]
    if missing:
        cache.update((r.run_id, r) for r in load_runs(store, missing))
    return [cache[i] for i in run_ids if i in cache]
