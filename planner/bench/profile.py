"""`pilot bench profile`: learning curves, held-out error against minutes of profiling.

For each model, on this machine in one run: a test set of measurements is drawn at random from
the campaign's experiments and measured twice back to back; then each order profiles a fresh
store for the longest checkpoint (which goes first alternates by model); then the test set is
measured twice again, so its truth (the median of four runs) spans the spells the profiles ran
in, and their spread is the host's noise floor. At every checkpoint the cost model is fitted on
the runs that had finished by then (the profile's own time, the adaptive order's refits
included) and judged on the test set, which no order ever measured into its store, as
`pilot fit` judges.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from engine.hub import pull
from engine.model_zoo import make_checkpoint
from planner.costmodel.fit import by_measurement, fold_model, measurement_groups, predict_run
from planner.costmodel.fit_data import (
    METRICS,
    RunData,
    device_for,
    host_references,
    load_runs,
    set_host_slowdown,
)
from planner.costmodel.noise_floor import median_noise_floor
from planner.measure.profiler import plan_again, plan_campaign, profile, space_for_this_host
from planner.profiling.watch import ORDERS, watch_profile
from planner.spec.errors import FieldError
from planner.spec.search_space import SearchSpace
from planner.spec.workload import Workload
from planner.store.database import Experiment, Run, Store

MODELS = ("tiny", "llama-110m")
# Each model's traffic: short enough that a run takes seconds on two cores.
TRAFFIC = {"tiny": ("16:128", "8:64"), "llama-110m": ("16:128", "8:32"), "smollm2-135m": ("16:128", "8:32")}
PRETRAINED = ("smollm2-135m",)  # pulled (engine.hub), not made from random weights
NUM_REQUESTS = 16
TEST_MEASUREMENTS, TEST_REPEATS = 12, 2
MIN_TRAIN_RUNS = 3
Say = Callable[[str], None]


@dataclass
class Curve:
    model: str
    order: str
    points: list[dict[str, Any]] = field(default_factory=list)  # minutes, runs, median_ape, p90_ape


@dataclass
class LearningCurves:
    minutes: list[float]
    via: str
    curves: list[Curve]
    noise_floor: dict[str, dict[str, float]]  # model -> median_ape, p90_ape of a perfect model
    test_measurements: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"minutes": self.minutes, "via": self.via, "noise_floor": self.noise_floor,
                "test_measurements": self.test_measurements,
                "curves": [{"model": c.model, "order": c.order, "points": c.points} for c in self.curves]}


def bench_space() -> SearchSpace:
    """The built-in CPU space without drafts, int4 in groups of 32 (what tiny's 64 features hold)."""
    space = space_for_this_host("cpu").without_drafts()
    return space.model_copy(update={"fixed": {**space.fixed, "quantization_group_size": 32}})


def learning_curves(workdir: Path, models: Sequence[str] = MODELS, orders: Sequence[str] = ORDERS,
                    minutes: Sequence[float] = (1, 2, 5), via: str = "engine",
                    test_measurements: int = TEST_MEASUREMENTS, seed: int = 0,
                    say: Say | None = None) -> LearningCurves:
    for name in models:
        if name not in TRAFFIC:
            raise FieldError(f"{name!r} is not one of {', '.join(TRAFFIC)}", field="models")
    for order in orders:
        if order not in ORDERS:
            raise FieldError(f"{order!r} is not one of {', '.join(ORDERS)}", field="orders")
    if not minutes or min(minutes) <= 0:
        raise FieldError(f"must be positive, got {list(minutes)}", field="minutes")
    say = say or (lambda message: None)
    checkpoints = sorted(float(m) for m in minutes)
    curves, floors, tests = [], {}, {}
    space = bench_space()
    for index, name in enumerate(models):
        model_dir = workdir / "models" / name
        if name in PRETRAINED:
            model_dir = pull(name, say=say)
        elif not (model_dir / "config.json").is_file():
            make_checkpoint(name, model_dir, seed=0, dtype="float32" if name == "tiny" else "bfloat16")
        isl, osl = TRAFFIC[name]
        workload = Workload.from_flags(isl, osl, concurrency=1, num_requests=NUM_REQUESTS)
        test_store = Store(f"sqlite:///{workdir / f'{name}-test.db'}")
        say(f"{name}: measuring {test_measurements} test measurements x{TEST_REPEATS}")
        measure_test_set(test_store, str(model_dir), space, workload, via, test_measurements, seed)
        finished: dict[str, tuple[Store, list[tuple[int, float]]]] = {}
        # Which order profiles first alternates by model: a host's speed drifts over minutes, and
        # the profile nearer the test set's second sitting would otherwise always be the same one.
        for order in (orders if index % 2 == 0 else list(reversed(orders))):
            say(f"{name}: profiling in the {order} order for {checkpoints[-1]:g} min")
            path = workdir / f"{name}-{order}.db"
            path.unlink(missing_ok=True)  # each curve starts from nothing
            store = Store(f"sqlite:///{path}")
            finished[order] = store, _profile(store, str(model_dir), space, workload, via, order,
                                              60 * checkpoints[-1])
        say(f"{name}: measuring the test set again, after the profiles")
        test = measure_test_set(test_store, str(model_dir), space, workload, via, test_measurements, seed,
                                sitting=2)
        groups = measurement_groups(test)
        tests[name] = int(groups.max()) + 1
        floor = median_noise_floor(np.array([[r.measured[m] for m in METRICS] for r in test]), groups, seed)
        floors[name] = dict(floor["overall"]) if floor else {}
        for order in orders:
            store, times = finished[order]
            curve = Curve(name, order)
            for limit in checkpoints:
                ids = [run_id for run_id, elapsed in times if elapsed <= 60 * limit]
                point = {"minutes": limit, "runs": len(ids)}
                if len(ids) >= MIN_TRAIN_RUNS:
                    point.update(held_out_error(load_runs(store, ids), test))
                curve.points.append(point)
            curves.append(curve)
    return LearningCurves(checkpoints, via, curves, floors, tests)


def measure_test_set(store: Store, model_dir: str, space: SearchSpace, workload: Workload, via: str,
                     count: int, seed: int, sitting: int = 1) -> list[RunData]:
    """`count` measurements drawn at random from the campaign, each run TEST_REPEATS times back
    to back; resumed where a test store exists. `sitting` 2 measures them all again (after the
    profiles: the host's speed drifts over minutes, and the truth should span the spells the
    profiles ran in, as `pilot fit` judges by sittings)."""
    campaign = plan_campaign(store, model_dir, space, workload, repeats=TEST_REPEATS)
    if sitting > 1:
        again = plan_again(store, campaign, 1.0, TEST_REPEATS, seed=seed, sitting=sitting)
        profile(store, again, workload, float("inf"), via=via)
        return load_runs(store)
    rng = random.Random(seed)
    keys: dict[tuple[int, str, float], float] = {}

    def shuffled(candidates: list[Experiment]) -> list[Experiment]:
        # A random measurement first, its repeats together.
        for e in candidates:
            keys.setdefault((e.engine_config_id, e.load_kind, e.load_value), rng.random())
        return sorted(candidates, key=lambda e: (keys[(e.engine_config_id, e.load_kind, e.load_value)],
                                                 e.position))

    with store.session() as session:
        done = session.scalar(select(func.count()).select_from(Run).where(Run.model_id == campaign.model_id))
    wanted = count * TEST_REPEATS - done
    if wanted > 0:
        profile(store, campaign, workload, float("inf"), via=via, max_runs=wanted, rank=shuffled)
    return load_runs(store)


def _profile(store: Store, model_dir: str, space: SearchSpace, workload: Workload, via: str, order: str,
             budget_s: float) -> list[tuple[int, float]]:
    """Profile a fresh campaign for `budget_s`; each run's id and when it finished."""
    campaign = plan_campaign(store, model_dir, space, workload)
    watch = watch_profile(store, campaign.id, model_dir, workload, via, order=order)
    finished: list[tuple[int, float]] = []

    def after_run(elapsed_s: float) -> bool:
        with store.session() as session:
            latest = session.scalar(select(func.max(Run.id)))
        if watch is not None:
            watch(elapsed_s)
        finished.append((int(latest), elapsed_s))
        return False

    profile(store, campaign, workload, budget_s, via=via,
            rank=watch.order.rank if watch is not None and watch.order is not None else None,
            after_run=after_run)
    return finished


def held_out_error(train: list[RunData], test: list[RunData]) -> dict[str, float]:
    """The test set's error, median and p90 over every metric, of a model fitted on `train`,
    against the median of each test measurement's repeats."""
    groups = measurement_groups(test)
    truth = by_measurement(np.array([[r.measured[m] for m in METRICS] for r in test]), groups)
    # Each store measures the host's rates once, when it first sees it, and one reading of a
    # shared host's bandwidth can be 40% off another's: judged on the rates the model was
    # fitted with, as a plan from that store would be.
    rates = {r.spec_name: r.hardware_rates for r in train}
    for run in test:
        if run.spec_name in rates:
            run.hardware_rates = rates[run.spec_name]
            run.device = device_for(run.hardware_rates, run.deployment)
    reference = host_references(train)
    set_host_slowdown(train, reference)
    set_host_slowdown(test, reference)
    model, delivery = fold_model(train)
    predicted = by_measurement(np.array([predict_run(model, run, delivery) for run in test]), groups, np.mean)
    valid = (truth > 0) & (predicted > 0)
    ape = np.abs(predicted[valid] / truth[valid] - 1)
    return {"median_ape": float(np.median(ape)), "p90_ape": float(np.quantile(ape, 0.9))}


def plot_curves(curves: LearningCurves, path: Path) -> None:
    """Median and p90 held-out error against minutes, a panel per model, the noise floor dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c.model for c in curves.curves))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        for curve in (c for c in curves.curves if c.model == name):
            points = [p for p in curve.points if "median_ape" in p]
            x = [p["minutes"] for p in points]
            line, = ax.plot(x, [100 * p["median_ape"] for p in points], marker="o", label=f"{curve.order} median")
            ax.plot(x, [100 * p["p90_ape"] for p in points], marker="s", linestyle=":", color=line.get_color(),
                    label=f"{curve.order} p90")
        floor = curves.noise_floor.get(name) or {}
        if "median_ape" in floor:
            ax.axhline(100 * floor["median_ape"], color="grey", linestyle="--", label="noise floor (median)")
        ax.set(title=name, xlabel="minutes of profiling", ylabel="held-out error (%)", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
