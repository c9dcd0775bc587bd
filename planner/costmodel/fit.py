"""`pilot fit`: the step-time model fitted on the store's steps, judged by replaying held-out runs
through the simulator, and saved in the store with the accuracy it earned.

Cross-validation answers two questions: how well does the model predict a run it has not seen
(by held-out run), and a model it has not seen (leave-one-model-out, as LLM-Pilot evaluates)?
The out-of-fold errors of each also set the width of the intervals the planner quotes: split
conformal, so an 80% interval is as wide as 80% of held-out errors were.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from sqlalchemy import select

from planner.costmodel.delivery import DeliveryModel
from planner.costmodel.features import feature_matrix
from planner.costmodel.fit_data import (
    METRICS,
    RunData,
    data_version,
    host_key,
    host_references,
    length_coverage,
    load_runs,
    set_host_slowdown,
)
from planner.costmodel.noise_floor import median_noise_floor, noise_floor, sitting_noise_floor
from planner.costmodel.step_model import StepTimeModel
from planner.measure import host_speed
from planner.store.database import CostModelRow, Store

COVERAGE = 0.8
# The levels at which out-of-fold errors are kept, so an SLO can be held to any confidence.
QUANTILE_LEVELS = tuple(round(0.01 * i, 2) for i in range(1, 100))
# Held-out runs a process layout needs before its own errors set its bounds (else: all runs').
MIN_LAYOUT_RUNS = 20
TARGETS = {"median_ape": 0.08, "p90_ape": 0.20, "coverage": (0.75, 0.85)}
MAX_STEPS_PER_RUN = 150  # steps within a run are alike; more only slows fitting
Progress = Callable[[str, int, int], None]  # (stage, done, total)


class FitError(ValueError):
    """The store holds too little to fit from."""


def training_arrays(runs: list[RunData], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step features, measured step periods and each step's run id."""
    rng = np.random.default_rng(seed)
    xs, ys, groups = [], [], []
    for run in runs:
        n = len(run.steps["period_s"])
        keep = np.sort(rng.choice(n, MAX_STEPS_PER_RUN, replace=False)) if n > MAX_STEPS_PER_RUN else slice(None)
        xs.append(feature_matrix(run.deployment, run.device,
                                 {k: v[keep] for k, v in run.step_features().items()}))
        ys.append(run.steps["period_s"][keep])
        groups.append(np.full(len(ys[-1]), run.run_id))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)


def predict_run(model: StepTimeModel, run: RunData, delivery: DeliveryModel) -> np.ndarray:
    metrics = run.replay(model.step_time(run.deployment, run.device, host_slowdown=run.host_slowdown,
                                         host_parallel_slowdown=run.host_parallel_slowdown,
                                         served=run.served), delivery=delivery)
    return np.array([metrics[m] for m in METRICS])


def fold_model(train: list[RunData]) -> tuple[StepTimeModel, DeliveryModel]:
    """A fold's models, fitted on its training runs (no step intervals: the runs give the jitter)."""
    X, y, groups = training_arrays(train)
    return StepTimeModel(coverage=COVERAGE).fit(X, y, groups, calibrate=False), DeliveryModel().fit(train)


def cross_validate(runs: list[RunData], fold_of: np.ndarray, stage: str,
                   on_progress: Progress | None = None,
                   members: list[tuple[StepTimeModel, DeliveryModel]] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions of every run's METRICS, and of every step's period (each fold's
    model never saw the runs it predicts). Each fold's models are appended to `members`, where
    given: a committee whose disagreement says where the data are thin."""
    predictions = np.zeros((len(runs), len(METRICS)))
    step_errors: list[np.ndarray] = []
    folds = np.unique(fold_of)
    for done, fold in enumerate(folds):
        if on_progress:
            on_progress(stage, done, len(folds))
        model, delivery = fold_model([r for r, f in zip(runs, fold_of) if f != fold])
        if members is not None:
            members.append((model, delivery))
        for i in np.flatnonzero(fold_of == fold):
            predictions[i] = predict_run(model, runs[i], delivery)
            Xh, yh, _ = training_arrays([runs[i]])
            step_errors.append(np.abs(model.predict(Xh) / yh - 1))
    if on_progress:
        on_progress(stage, len(folds), len(folds))
    return predictions, np.concatenate(step_errors)


# Quantiles of held-out errors as split conformal prediction sets them: the k-th smallest of n
# covers a new error k / (n + 1) of the time ("weibull" in numpy's terms), so an interval is as
# wide as its sample warrants. Plain quantiles promise too much of a small sample: their 80%
# intervals covered 73% of held-out runs on a 36-run store, these 81%.
QUANTILE_METHOD = "weibull"


def conformal(residuals: np.ndarray, coverage: float = COVERAGE) -> tuple[float, float]:
    tail = (1 - coverage) / 2
    low, high = np.quantile(residuals, [tail, 1 - tail], method=QUANTILE_METHOD)
    return float(low), float(high)


def _log_ratio(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """log(measured / predicted), NaN where either is 0: with speculative decoding tokens
    accepted in one step arrive together, and a median gap of 0 has no percentage error."""
    valid = (measured > 0) & (predicted > 0)
    out = np.full(measured.shape, np.nan)
    out[valid] = np.log(measured[valid]) - np.log(predicted[valid])
    return out


def accuracy(measured: np.ndarray, predicted: np.ndarray, fold_of: np.ndarray,
             step_errors: np.ndarray) -> dict[str, Any]:
    """Per metric: median and p90 absolute percentage error, and how often an interval set from
    the other folds' errors (cross-conformal) covered the measurement."""
    residual = _log_ratio(measured, predicted)
    out: dict[str, Any] = {"metrics": {}}
    all_apes, all_covered = [], []
    for j, name in enumerate(METRICS):
        valid = ~np.isnan(residual[:, j])
        ape = np.abs(predicted[valid, j] / measured[valid, j] - 1)
        covered = []
        for fold in np.unique(fold_of):
            held, rest = valid & (fold_of == fold), valid & (fold_of != fold)
            if held.any() and rest.any():
                low, high = conformal(residual[rest, j])
                covered.extend((residual[held, j] >= low) & (residual[held, j] <= high))
        all_apes.extend(ape)
        all_covered.extend(covered)
        out["metrics"][name] = {
            "runs": int(valid.sum()), "median_ape": float(np.median(ape)) if len(ape) else None,
            "p90_ape": float(np.quantile(ape, 0.9)) if len(ape) else None,
            "coverage": float(np.mean(covered)) if covered else None}
    out["overall"] = {"median_ape": float(np.median(all_apes)), "p90_ape": float(np.quantile(all_apes, 0.9)),
                      "coverage": float(np.mean(all_covered)) if all_covered else None}
    out["steps"] = {"median_ape": float(np.median(step_errors)),
                    "p90_ape": float(np.quantile(step_errors, 0.9))}
    return out


def run_intervals(measured: np.ndarray, predicted: np.ndarray) -> dict[str, tuple[float, float]]:
    residual = _log_ratio(measured, predicted)
    return {m: conformal(residual[~np.isnan(residual[:, j]), j]) for j, m in enumerate(METRICS)}


def run_quantiles(measured: np.ndarray, predicted: np.ndarray) -> dict[str, list[float]]:
    """Per metric, log(measured / predicted) of held-out runs at every QUANTILE_LEVELS."""
    residual = _log_ratio(measured, predicted)
    return {m: np.quantile(residual[~np.isnan(residual[:, j]), j], QUANTILE_LEVELS,
                           method=QUANTILE_METHOD).tolist()
            for j, m in enumerate(METRICS)}


@dataclass
class CostModel:
    """The fitted step-time model, the run-level intervals cross-validation earned, and what it
    was fitted on (hardware it is calibrated for, models it has seen)."""

    step_model: StepTimeModel
    intervals: dict[str, dict[str, tuple[float, float]]]  # "run" | "model" -> metric -> log-ratios
    hardware: dict[str, dict[str, Any]]  # spec name -> rates, for the hardware it was measured on
    models: list[str]  # fingerprints of the models it has seen
    data_version: str
    report: dict[str, Any] = field(default_factory=dict)
    created_at: dt.datetime | None = None
    id: int | None = None
    # "run" | "model" -> metric -> log-ratios at QUANTILE_LEVELS (empty in models saved before)
    quantiles: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # fit_data.host_key -> the typical planner.host_speed reading of the runs it was fitted on
    host_reference: dict[str, float] = field(default_factory=dict)
    # fit_data.length_coverage of the runs it was fitted on (empty in models saved before)
    lengths: dict[str, int] = field(default_factory=dict)
    # What serving through `pilot serve` adds, from the served runs (unfitted without any).
    delivery: DeliveryModel = field(default_factory=DeliveryModel)

    def host_slowdown(self, spec_name: str, reading: float | None) -> float:
        """A probe reading taken on `spec_name` with no engine running (when planning) as the
        step model's host_slowdown feature: against the readings around one-process runs, the
        layout whose engine sits idle while the probe runs. 1.0, a typical moment, where the
        model has no such readings or there is no reading."""
        return host_speed.slowdown(reading, self._planning_reference(spec_name))

    def reads_host(self, spec_name: str) -> bool:
        """Whether `host_slowdown` has a reference for `spec_name` (else it is always 1.0)."""
        return self._planning_reference(spec_name) is not None

    def _planning_reference(self, spec_name: str) -> float | None:
        return self.host_reference.get(host_key(spec_name))  # one process: the engine idle

    def _kind(self, seen_model: bool, layout: str | None = None) -> str:
        if not seen_model and "model" in self.intervals:
            return "model"
        grouped = f"run/{layout}"
        return grouped if layout is not None and grouped in self.intervals else "run"

    def _log_normal(self, kind: str, metric: str) -> statistics.NormalDist:
        """For a model saved before the quantiles were: the errors as a normal in log space,
        through its stored interval."""
        low, high = self.intervals[kind][metric]
        sigma = (high - low) / 2 / statistics.NormalDist().inv_cdf(0.5 + COVERAGE / 2)
        return statistics.NormalDist((low + high) / 2, max(sigma, 1e-9))

    def interval(self, metric: str, value: float, seen_model: bool = True,
                 layout: str | None = None) -> tuple[float, float]:
        low, high = self.intervals[self._kind(seen_model, layout)][metric]
        return value * float(np.exp(low)), value * float(np.exp(high))

    def bound(self, metric: str, value: float, confidence: float, seen_model: bool = True,
              layout: str | None = None) -> float:
        """What `metric` (one of METRICS) stays under with probability `confidence`, given the
        prediction `value`: as often as the held-out runs' errors did (those of the same
        `layout_of` the configuration, where the store had enough of them)."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        kind = self._kind(seen_model, layout)
        levels = self.quantiles.get(kind, {}).get(metric)
        if levels is None:
            log_ratio = self._log_normal(kind, metric).inv_cdf(confidence)
        else:
            log_ratio = float(np.interp(confidence, QUANTILE_LEVELS, levels))
        return value * float(np.exp(log_ratio))

    def chance_under(self, metric: str, value: float, limit: float, seen_model: bool = True,
                     layout: str | None = None) -> float:
        """The chance `metric` stays under `limit` given the prediction `value` (the inverse of
        `bound`): 0 or 1 beyond the 1st and 99th percentiles of the held-out errors."""
        if not (value > 0 and limit > 0):
            return 1.0 if value <= limit else 0.0
        kind = self._kind(seen_model, layout)
        levels = self.quantiles.get(kind, {}).get(metric)
        log_ratio = float(np.log(limit / value))
        if levels is None:
            return self._log_normal(kind, metric).cdf(log_ratio)
        return float(np.interp(log_ratio, np.maximum.accumulate(levels), QUANTILE_LEVELS, left=0.0, right=1.0))

    def to_dict(self) -> dict[str, Any]:
        return {"step_model": self.step_model.to_dict(), "hardware": self.hardware,
                "intervals": {k: {m: list(v) for m, v in d.items()} for k, d in self.intervals.items()},
                "quantiles": self.quantiles, "host_reference": self.host_reference,
                "lengths": self.lengths, "delivery": self.delivery.to_dict()}


def layout_of(config: dict[str, Any]) -> str:
    """The process layout a configuration runs as, the group its held-out errors are pooled in."""
    if config.get("num_speculative_tokens"):
        return "speculative"
    if (config.get("data_parallel_size") or 1) > 1:
        return "data-parallel"
    if (config.get("tensor_parallel_size") or 1) > 1:
        return "tensor-parallel"
    return "single"


def served_layout(layout: str, served: bool) -> str:
    """The error group of a layout measured through `pilot serve`: its own, where it has enough
    runs, since the server's delays add errors of their own."""
    return f"{layout}/served" if served else layout


def layout_groups(runs: list[RunData], measured: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """The runs of each process layout that has its own held-out errors (a mask per layout).

    Group-conditional (Mondrian) errors: a data-parallel front or a tensor-parallel all-reduce on
    a busy host errs more, and more one-sidedly, than one process does, and a bound from the
    pooled errors would promise those layouts a chance they do not have. A layout needs
    MIN_LAYOUT_RUNS valid errors per metric; with one layout only, the pooled errors are its own."""
    layouts = np.array([served_layout(layout_of(r.config), r.served) for r in runs])
    out = {}
    for layout in np.unique(layouts):
        mine = layouts == layout
        valid = ~np.isnan(_log_ratio(measured[mine], predicted[mine]))
        if mine.sum() < len(runs) and valid.sum(axis=0).min() >= MIN_LAYOUT_RUNS:
            out[str(layout)] = mine
    return out


def measurement_groups(runs: list[RunData]) -> np.ndarray:
    """Each run's measurement: repeats of one (same model, hardware, configuration, load and
    requests: `pilot profile --repeats`, `pilot recommend --verify --repeats`) share an index."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(_measurement_key(r), len(index)) for r in runs], dtype=int)


def run_folds(runs: list[RunData], folds: int, seed: int = 0) -> np.ndarray:
    """Each run's cross-validation fold. Repeats of one measurement share a fold, or the
    held-out error would be one repeat predicted from its twin, not a run the model never saw."""
    group = measurement_groups(runs)
    return np.random.default_rng(seed).permutation(np.arange(group.max() + 1) % folds)[group]


def by_measurement(values: np.ndarray, groups: np.ndarray,
                   how: Callable[..., np.ndarray] = np.median) -> np.ndarray:
    """[groups, metrics] from [runs, metrics]: `how` over each measurement's repeats."""
    return np.array([how(values[groups == g], axis=0) for g in range(groups.max() + 1)])


def _measurement_key(run: RunData) -> str:
    lengths = [(len(q.prompt_token_ids), q.output_tokens) for q in run.requests]
    return json.dumps([run.model_fingerprint, run.spec_name, run.config, run.deployment, run.load_kind,
                       run.load_value, lengths], sort_keys=True, default=str)


def fit(store: Store, folds: int = 5, seed: int = 0, on_progress: Progress | None = None) -> CostModel:
    """Fit from every run in `store`; cross-validate by run and, with two models or more, by model."""
    runs = load_runs(store)
    if len(runs) < max(3, folds):
        raise FitError(f"the store {store.where} holds {len(runs)} usable runs; fitting needs at least "
                       f"{max(3, folds)} (run `pilot profile` first)")
    host_reference = host_references(runs)
    set_host_slowdown(runs, host_reference)
    measured = np.array([[r.measured[m] for m in METRICS] for r in runs])
    # Predictions are judged against each measurement's median over its repeats (a single run
    # where there are none): on a shared host one run strays from the next by tens of percent.
    groups = measurement_groups(runs)
    first = np.unique(groups, return_index=True)[1]  # each measurement's first run
    truth = by_measurement(measured, groups)
    repeated = len(first) < len(runs)
    by_run_folds = run_folds(runs, folds, seed)
    predicted, step_errors = cross_validate(runs, by_run_folds, "cross-validation by run", on_progress)
    predicted_g = by_measurement(predicted, groups, np.mean)
    report: dict[str, Any] = {"by_run": {"folds": folds, **accuracy(truth, predicted_g, by_run_folds[first],
                                                                    step_errors)}}
    if repeated:
        report["by_run"]["single_runs"] = accuracy(measured, predicted, by_run_folds, step_errors)["overall"]
        report["noise_floor"] = noise_floor(measured, groups)
        report["median_noise_floor"] = median_noise_floor(measured, groups, seed)
        sittings = np.array([-1 if r.sitting is None else r.sitting for r in runs])
        report["sitting_noise_floor"] = sitting_noise_floor(measured, groups, sittings)
    served = np.array([runs[i].served for i in first])
    if served.sum() >= 3:  # the served path's held-out accuracy on its own
        report["by_run"]["served"] = accuracy(truth[served], predicted_g[served], by_run_folds[first][served],
                                              step_errors)["overall"]
    report["measurements"] = len(first)
    read = [r.host_slowdown for r in runs if r.host_probe_s is not None]
    if read:
        # How far the host's speed moved over the runs: the swing the host_slowdown feature absorbs.
        report["host_speed"] = {"runs": len(read), "typical_probe_s": host_reference,
                                "slowdown_p10_p50_p90": np.quantile(read, [0.1, 0.5, 0.9]).tolist()}
        parallel = [r.host_parallel_slowdown for r in runs if r.host_probe_parallel_s is not None]
        if parallel:
            report["host_speed"]["parallel_slowdown_p10_p50_p90"] = np.quantile(
                parallel, [0.1, 0.5, 0.9]).tolist()
    intervals = {"run": run_intervals(truth, predicted_g)}
    quantiles = {"run": run_quantiles(truth, predicted_g)}
    for layout, mine in layout_groups([runs[i] for i in first], truth, predicted_g).items():
        intervals[f"run/{layout}"] = run_intervals(truth[mine], predicted_g[mine])
        quantiles[f"run/{layout}"] = run_quantiles(truth[mine], predicted_g[mine])
    model_ids = np.array([r.model_id for r in runs])
    if len(np.unique(model_ids)) >= 2:
        predicted_m, step_errors_m = cross_validate(runs, model_ids, "leave one model out", on_progress)
        predicted_m_g = by_measurement(predicted_m, groups, np.mean)
        report["by_model"] = {"folds": int(len(np.unique(model_ids))),
                              **accuracy(truth, predicted_m_g, model_ids[first], step_errors_m)}
        if repeated:
            report["by_model"]["single_runs"] = accuracy(measured, predicted_m, model_ids,
                                                         step_errors_m)["overall"]
        intervals["model"] = run_intervals(truth, predicted_m_g)
        quantiles["model"] = run_quantiles(truth, predicted_m_g)
    report["runs"] = [
        {"run_id": r.run_id, "model": r.model_name, "measurement": int(groups[i]),
         "measured": dict(zip(METRICS, measured[i])),
         "by_run": dict(zip(METRICS, predicted[i])),
         **({"by_model": dict(zip(METRICS, predicted_m[i]))} if "by_model" in report else {})}
        for i, r in enumerate(runs)]
    if on_progress:
        on_progress("final fit", 0, 1)
    X, y, groups = training_arrays(runs, seed)
    step_model = StepTimeModel(coverage=COVERAGE, random_state=seed).fit(X, y, groups)
    if on_progress:
        on_progress("final fit", 1, 1)
    lengths = length_coverage(runs)
    report["data"] = {"runs": len(runs), "steps": int(sum(len(r.steps["period_s"]) for r in runs)),
                      "models": sorted({r.model_name for r in runs}),
                      "hardware": sorted({r.spec_name for r in runs}), **lengths}
    report["targets"] = {"median_ape": TARGETS["median_ape"], "p90_ape": TARGETS["p90_ape"],
                         "coverage": list(TARGETS["coverage"])}
    report["efficiency"] = step_model.efficiency
    report["overheads_s"] = step_model.overheads_s
    report["work_flops"] = step_model.work_flops
    report["cache_mib"] = step_model.cache_bytes_ / 2**20
    report["step_interval"] = list(step_model.interval_)
    hardware = {r.spec_name: r.hardware_rates for r in runs}
    delivery = DeliveryModel().fit(runs)
    report["data"]["served_runs"] = delivery.num_runs
    return CostModel(step_model, intervals, hardware, sorted({r.model_fingerprint for r in runs}),
                     data_version(runs), report, quantiles=quantiles, host_reference=host_reference,
                     lengths=lengths, delivery=delivery)


def save(store: Store, model: CostModel) -> int:
    with store.session() as session, session.begin():
        row = CostModelRow(data_version=model.data_version, num_runs=model.report["data"]["runs"],
                           num_steps=model.report["data"]["steps"], hardware=sorted(model.hardware),
                           models=model.models, payload=model.to_dict(), report=model.report)
        session.add(row)
        session.flush()
        model.id, model.created_at = row.id, row.created_at
        return row.id


def load(store: Store, model_id: int | None = None) -> CostModel | None:
    """The newest saved cost model (or the one given); None when nothing was fitted yet."""
    with store.session() as session:
        query = select(CostModelRow).order_by(CostModelRow.id.desc())
        if model_id is not None:
            query = select(CostModelRow).where(CostModelRow.id == model_id)
        row = session.scalars(query.limit(1)).first()
    if row is None:
        return None
    payload = row.payload
    intervals = {k: {m: (float(v[0]), float(v[1])) for m, v in d.items()}
                 for k, d in payload["intervals"].items()}
    return CostModel(StepTimeModel.from_dict(payload["step_model"]), intervals, payload["hardware"],
                     list(row.models), row.data_version, row.report, row.created_at, row.id,
                     payload.get("quantiles", {}), payload.get("host_reference", {}),
                     payload.get("lengths", {}), DeliveryModel.from_dict(payload.get("delivery")))


def is_current(store: Store, model: CostModel) -> bool:
    """Whether the store still holds exactly the runs the model was fitted on."""
    return data_version(load_runs(store)) == model.data_version

