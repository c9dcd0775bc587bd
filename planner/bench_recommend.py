"""`pilot bench recommend`: do recommendations meet their SLOs when launched, and at what cost?

LLM-Pilot's evaluation, on this machine (issue 6, "How we know it works"):

1. Calibration. Each model is profiled with ONE generic workload (the calibration workload
   below, at the cpu space's concurrency levels) over the built-in cpu space for a time budget,
   and the cost model is fitted on those runs. The scenario workloads are never profiled into
   this store: they are held out.
2. Ground truth. Per scenario (model x workload, closed-loop concurrency), a grid of the space's
   first N configurations in coverage order (always including the engine's defaults) is
   measured at the scenario's workload and load into a SEPARATE store the cost model never
   reads. Cost per million output tokens = host price per hour / measured output tokens/s.
   The scenario's SLOs are derived from the grid's measurements (`derive_slos`) before anything
   is recommended; the truly feasible set is the grid configurations that meet them, and the
   best is the cheapest of those.
3. Recommendation. `pilot recommend`'s search (one host) picks a plan, which is launched and
   measured exactly as `pilot recommend --verify` does (into the ground-truth store too).
   Success: the measurement meets every SLO. Overspend: measured cost of the plan / measured
   cost of the best truly feasible grid configuration - 1 (negative where the plan beats the
   grid; the headline clips it at 0). The engine's default configuration's measured cost is
   reported as a ratio to the best.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.table import Table
from sqlalchemy import select

from engine import EngineConfig
from engine.model_zoo import SHAPES, make_checkpoint
from planner import cost_model as cm
from planner import hardware as hw
from planner.plan import make_plan
from planner.profiler import (base_config, config_row, hardware_row, model_row, plan_campaign,
                              profile, workload_row)
from planner.recommend import Requirement, Search, run_search
from planner.search_space import SearchSpace
from planner.slo import SLO
from planner.store import Campaign, Experiment, Run, Store, fingerprint
from planner.verify import VerifyError, verify
from planner.workload import Workload

# The bar (DESIGN.md, "Where the bar is"): LLM-Pilot's result and ours.
ANCHOR_SUCCESS, TARGET_SUCCESS = 0.80, 0.95
ANCHOR_OVERSPEND, TARGET_OVERSPEND = 0.199, 0.05

# Models: the built-in tiny shape and a wider, deeper variant of it.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(SHAPES["tiny"]),
    "wide": {**SHAPES["tiny"], "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4},
}
# int4 groups the models' smallest input dimension (64 features) can hold, as the quickstart sets.
GROUP_SIZE = 32
DTYPE = "float32"  # of the checkpoint; the space runs it in bfloat16
# The one workload the cost model is calibrated on (at the cpu space's levels 1, 4, 16).
CALIBRATION = ("16:128", "8:64")
SLO_METRICS = ("ttft_p95", "itl_p95")
# The SLO rule's percentile range over the grid's measurements (see derive_slos).
SLO_QUANTILES = (0.25, 0.75)
MIN_FEASIBLE = 0.25  # share of the grid the rule aims to leave feasible
# A limit closer than this (log-ratio, about 8%) to a measurement is within run-to-run noise.
MIN_MARGIN = 0.08


@dataclass(frozen=True)
class ScenarioWorkload:
    """A held-out workload: lengths and the closed-loop concurrency the plan must serve."""

    name: str
    isl: str
    osl: str
    concurrency: int


# Held out from calibration in shape (prompt-heavy, decode-heavy) and in load (none of the
# concurrencies is a calibration level).
WORKLOADS = (
    ScenarioWorkload("chat", "32:96", "16:48", 8),
    ScenarioWorkload("prefill-heavy", "128:256", "4:16", 6),
    ScenarioWorkload("decode-heavy", "8:24", "48:96", 12),
)


@dataclass(frozen=True)
class Preset:
    budget_s: float  # calibration profiling per model
    grid_size: int  # configurations measured per scenario for the ground truth
    num_requests: int  # requests per scenario run (grid and verify)
    trials: int  # Optuna trials per recommendation
    calibration_requests: int = 48  # requests per calibration run
    folds: int = 5  # cost-model cross-validation
    models: tuple[str, ...] = ("tiny", "wide")
    # Tensor and data parallelism in the space (calibration, grid and search alike). Each such
    # configuration starts worker processes, seconds apiece on a small machine.
    parallel: bool = True
    confidence: float = 0.8  # `pilot recommend --confidence`


PRESETS = {
    # About 2 minutes on a 2-core machine: a smoke run of the whole procedure on a space without
    # parallelism; its numbers are noisy.
    "quick": Preset(budget_s=15, grid_size=5, num_requests=48, trials=20, calibration_requests=24,
                    folds=3, parallel=False),
    # The real measurement, about 12-15 minutes on a 2-core machine.
    "default": Preset(budget_s=150, grid_size=12, num_requests=192, trials=100,
                      calibration_requests=48, folds=5),
}

Progress = Callable[[str, int, int], None]  # (description, steps done, steps in all)


# ---------------------------------------------------------------- pure pieces (unit-tested)

def cost_per_million(price_per_hour: float, output_tokens_per_s: float) -> float:
    """USD per million output tokens of a deployment costing `price_per_hour` that produces
    `output_tokens_per_s`; infinite when it produces nothing."""
    if not (output_tokens_per_s > 0 and math.isfinite(output_tokens_per_s)):
        return math.inf
    return price_per_hour / (output_tokens_per_s * 3600) * 1e6


def overspend(recommended_cost: float, best_cost: float) -> float:
    """How much more the recommendation costs than the best truly feasible configuration (0.2:
    20% more; negative where it is cheaper). NaN when there is no finite best to compare with."""
    if not (math.isfinite(best_cost) and best_cost > 0):
        return math.nan
    return recommended_cost / best_cost - 1


def _round_up(value: float, digits: int = 3) -> float:
    """`value` rounded up to `digits` significant digits (an SLO a person would write)."""
    if value <= 0:
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale


def _gap_above(values: np.ndarray, value: float) -> float:
    """The geometric middle of the gap between `value` and the next larger of `values` (10%
    above `value` when none is larger): a limit as far from both measurements as it can be, so
    that measurement noise alone does not decide which side a configuration falls on."""
    larger = values[values > value * (1 + 1e-9)]
    return math.sqrt(value * float(larger.min())) if larger.size else value * 1.1


def _margin(values: np.ndarray, limit: float) -> float:
    """How far (as a log-ratio) `limit` sits from the nearest measurement."""
    return float(np.min(np.abs(np.log(values / limit))))


def derive_slos(grid: Sequence[dict[str, float]], metrics: Sequence[str] = SLO_METRICS,
                quantiles: tuple[float, float] = SLO_QUANTILES,
                min_feasible: float = MIN_FEASIBLE, min_margin: float = MIN_MARGIN) -> list[SLO]:
    """SLOs that bind on this grid of measurements (one dict of metrics per configuration).

    The rule, fixed before any recommendation is made (it reads only the ground-truth grid):
    each metric's limit goes into the gap just above one of its measurements whose rank lies in
    the `quantiles` band (ranks floor(q * (n - 1)) of n), at the gap's geometric middle
    (`_gap_above`), rounded up to 3 significant digits. Of those combinations of limits that
    leave a `min_feasible` share of the configurations (at least one) meeting every limit, the
    rule takes the one whose limits sit furthest from any measurement (the largest smallest
    margin): a configuration a hair under its limit would pass or fail on run-to-run noise
    alone, which would judge the noise and not the planner. Where no combination leaves anyone
    feasible, each limit that the configuration nearest to meeting them all (the smallest worst
    ratio of measured to limit) misses moves into the gap above its measurement. So a truly
    feasible configuration exists, and a part of the grid misses.
    """
    rows = [g for g in grid if all(math.isfinite(g.get(m, math.nan)) for m in metrics)]
    if not rows:
        raise ValueError("derive_slos: no grid configuration was measured")
    values = {m: np.sort(np.array([g[m] for g in rows])) for m in metrics}
    wanted = max(1, math.ceil(min_feasible * len(rows) - 1e-9))
    ranks = sorted({math.floor(q * (len(rows) - 1) + 1e-9) for q in quantiles})
    ranks = list(range(ranks[0], ranks[-1] + 1))
    options = {m: sorted({_round_up(_gap_above(values[m], float(values[m][r]))) for r in ranks})
               for m in metrics}
    best: tuple[tuple[bool, int, float], dict[str, float]] | None = None
    for chosen in itertools.product(*(options[m] for m in metrics)):
        limits = dict(zip(metrics, chosen))
        feasible = sum(all(g[m] <= limits[m] for m in metrics) for g in rows)
        if not feasible:
            continue
        # Clear of noise first, then as many feasible as wanted, then the widest margin; ties
        # go to the tighter limits.
        margin = min(_margin(values[m], limits[m]) for m in metrics)
        score = (margin >= min_margin, min(feasible, wanted), margin)
        if best is None or score > best[0]:
            best = (score, limits)
    if best is not None:
        limits = best[1]
    else:
        limits = {m: options[m][-1] for m in metrics}
        nearest = min(rows, key=lambda g: max(g[m] / limits[m] for m in metrics))
        limits = {m: limits[m] if nearest[m] <= limits[m] else
                  _round_up(_gap_above(values[m], nearest[m])) for m in metrics}
    out = []
    for m in metrics:
        metric, _, stat = m.partition("_")
        out.append(SLO(metric, stat, limits[m]))
    return out


def meets(measured: dict[str, float], slos: Sequence[SLO]) -> bool:
    return all(measured.get(s.key, math.inf) <= s.limit_s for s in slos)


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


# ---------------------------------------------------------------- results

@dataclass
class GridPoint:
    config: str  # short description
    measured: dict[str, float]  # ttft_p95, itl_p95, throughput_tok_s, ...
    cost_per_million: float
    feasible: bool = False
    default: bool = False
    error: str | None = None  # the engine refused it


def judge_grid(grid: Sequence[GridPoint], slos: Sequence[SLO]) -> GridPoint | None:
    """Mark the grid configurations measured to meet every SLO (the truly feasible set) and
    return the cheapest of them, None when there is none."""
    for g in grid:
        g.feasible = g.error is None and meets(g.measured, slos)
    feasible = [g for g in grid if g.feasible]
    return min(feasible, key=lambda g: g.cost_per_million) if feasible else None


@dataclass
class ScenarioResult:
    model: str
    workload: str
    concurrency: int
    slos: list[str]
    slo_margin: float  # how far (log-ratio) the nearest limit sits from a grid measurement
    grid: list[GridPoint]
    grid_feasible: int  # grid configurations that meet every SLO
    best_config: str | None  # the cheapest of those
    best_cost: float
    default_cost: float  # the engine's default configuration, measured
    default_feasible: bool
    default_ratio: float  # default_cost / best_cost
    recommended: str  # the plan's configuration
    replicas: int
    predicted_feasible: bool  # the search found a plan it predicts to hold
    binding: str  # the SLO nearest its limit in the prediction
    predicted: dict[str, float]  # of every SLO's metric and throughput, per replica
    measured: dict[str, float]  # the plan launched here
    predicted_cost: float
    measured_cost: float
    met: bool  # every SLO held when launched
    overspend: float  # raw: may be negative
    overspend_clipped: float
    search_s: float
    error: str | None = None  # the plan did not run


@dataclass
class BenchResult:
    preset: str
    settings: dict[str, Any]
    scenarios: list[ScenarioResult]
    calibration: dict[str, Any]  # runs per model, the fit's held-out accuracy
    success_rate: float
    # Over the scenarios whose plan met its SLOs (a plan that missed has no overspend to speak
    # of): clipped at 0 (the headline) and as measured.
    median_overspend: float
    mean_overspend: float
    median_overspend_raw: float
    mean_overspend_raw: float
    median_default_ratio: float
    seconds: float
    workdir: str
    anchors: dict[str, float] = field(default_factory=lambda: {
        "llm_pilot_success": ANCHOR_SUCCESS, "target_success": TARGET_SUCCESS,
        "llm_pilot_overspend": ANCHOR_OVERSPEND, "target_overspend": TARGET_OVERSPEND})

    def to_json(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summarize(preset: str, settings: dict[str, Any], scenarios: list[ScenarioResult],
              calibration: dict[str, Any], seconds: float, workdir: str) -> BenchResult:
    met = [s for s in scenarios if s.met]
    return BenchResult(
        preset=preset, settings=settings, scenarios=scenarios, calibration=calibration,
        success_rate=len(met) / len(scenarios) if scenarios else math.nan,
        median_overspend=_median([s.overspend_clipped for s in met]),
        mean_overspend=_mean([s.overspend_clipped for s in met]),
        median_overspend_raw=_median([s.overspend for s in met]),
        mean_overspend_raw=_mean([s.overspend for s in met]),
        median_default_ratio=_median([s.default_ratio for s in scenarios]),
        seconds=seconds, workdir=workdir)


# ---------------------------------------------------------------- the measurement

def describe_config(config: EngineConfig) -> str:
    parts = [config.quantization or ("bf16" if config.dtype == "bfloat16" else config.dtype),
             f"seqs{config.max_num_seqs}", f"tok{config.max_num_batched_tokens}"]
    if config.tensor_parallel_size > 1:
        parts.append(f"tp{config.tensor_parallel_size}")
    if config.data_parallel_size > 1:
        parts.append(f"dp{config.data_parallel_size}")
    if not config.enable_chunked_prefill:
        parts.append("nochunk")
    if not config.enable_prefix_caching:
        parts.append("nocache")
    if config.num_speculative_tokens:
        parts.append(f"k{config.num_speculative_tokens}")
    return " ".join(parts)


def bench_space(parallel: bool = True) -> SearchSpace:
    """The built-in cpu space, with int4 groups the tiny models allow and no draft model (and
    without tensor and data parallelism unless `parallel`)."""
    space = SearchSpace.from_file("cpu").without_drafts()
    knobs = dict(space.knobs)
    if not parallel:
        knobs.update(tensor_parallel_size=[1], data_parallel_size=[1])
    return space.model_copy(update={"knobs": knobs, "fixed": {**space.fixed,
                                                              "quantization_group_size": GROUP_SIZE}})


def default_config(space: SearchSpace, base: EngineConfig) -> EngineConfig:
    """The engine's default configuration (max_num_seqs 64, no quantization, no draft, chunked
    prefill, prefix caching), with the space's fixed settings (dtype) and the base's model."""
    defaults = EngineConfig(model=base.model)
    update = {k: getattr(defaults, k) for k in ("quantization", "max_num_seqs", "max_num_batched_tokens",
                                                "enable_chunked_prefill", "enable_prefix_caching",
                                                "tensor_parallel_size", "data_parallel_size")}
    return EngineConfig.model_validate({**base.model_dump(), **space.fixed, **update,
                                        "speculative_model": None, "num_speculative_tokens": None})


def grid_configs(space: SearchSpace, base: EngineConfig, size: int) -> tuple[list[EngineConfig], int]:
    """The space's first `size` configurations in coverage order, the default among them
    (first, if coverage order did not already start there); returns (configs, default index)."""
    configs = space.configs(base, max_parallel=os.cpu_count() or 1)
    default = default_config(space, base)
    same = [i for i, c in enumerate(configs) if c == default]
    if same and same[0] < size:
        return configs[:size], same[0]
    return [default, *[c for c in configs if c != default][:size - 1]], 0


def make_models(workdir: Path, names: Sequence[str]) -> dict[str, str]:
    out = {}
    for seed, name in enumerate(names):
        if name not in MODELS:
            raise ValueError(f"models: unknown {name!r}; choose from {', '.join(MODELS)}")
        shape = workdir / "models" / f"{name}.json"
        shape.parent.mkdir(parents=True, exist_ok=True)
        shape.write_text(json.dumps(MODELS[name]))
        out[name] = str(make_checkpoint(shape, workdir / "models" / name, seed=seed, dtype=DTYPE))
    return out


def scenario_workload(w: ScenarioWorkload, num_requests: int) -> Workload:
    return Workload.from_flags(w.isl, w.osl, concurrency=w.concurrency,
                               num_requests=num_requests).model_copy(update={"name": w.name})


def measure_grid(store: Store, model_dir: str, workload: Workload, concurrency: int,
                 configs: list[EngineConfig],
                 on_progress: Callable[[str, float], None] | None = None) -> list[tuple[dict[str, float] | None, str | None]]:
    """Measure every configuration at `concurrency` into `store` (a campaign of exactly these
    experiments, so it resumes like any profile); (measured metrics or None, error) each."""
    hardware, model, load = hardware_row(store), model_row(store, model_dir), workload_row(store, workload)
    rows = [config_row(store, c) for c in configs]
    key = fingerprint({"bench-recommend-grid": [r.fingerprint for r in rows], "model": model.fingerprint,
                       "workload": load.fingerprint, "hardware": hardware.fingerprint,
                       "concurrency": concurrency})
    campaign = store.get_or_create(Campaign, key, hardware_id=hardware.id, model_id=model.id,
                                   workload_id=load.id, space={"bench_recommend_grid": len(rows)})
    with store.session() as session, session.begin():
        if session.scalar(select(Experiment.id).where(Experiment.campaign_id == campaign.id).limit(1)) is None:
            session.add_all(Experiment(campaign_id=campaign.id, position=i, engine_config_id=row.id,
                                       load_kind="concurrency", load_value=concurrency)
                            for i, row in enumerate(rows))
    profile(store, campaign, workload, budget_s=math.inf, on_progress=on_progress)
    out: list[tuple[dict[str, float] | None, str | None]] = []
    with store.session() as session:
        experiments = list(session.scalars(select(Experiment).where(Experiment.campaign_id == campaign.id)
                                           .order_by(Experiment.position)))
        for exp in experiments:
            run = session.scalar(select(Run).where(Run.experiment_id == exp.id))
            if run is None:
                out.append((None, exp.error or exp.status))
            else:
                out.append(({**run.latency, "throughput_tok_s": run.throughput_tok_s,
                             "request_rate": run.request_rate}, None))
    return out


def _warm_process(model_dir: str) -> None:
    """A first engine in this process, unmeasured: the first one pays for loading the kernel
    library and starting thread pools, which would otherwise be charged to (and slow down) the
    first calibration run and eat its budget."""
    from engine import LLM, SamplingParams

    llm = LLM(EngineConfig(model=model_dir, dtype="bfloat16", max_model_len=64))
    try:
        llm.generate([[1, 2, 3, 4]] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    finally:
        llm.close()


def calibrate(store: Store, models: dict[str, str], preset: Preset,
              on_progress: Callable[[str], None] | None = None) -> tuple[cm.CostModel, dict[str, Any]]:
    """Profile each model on the calibration workload for the budget, then fit and save."""
    space = bench_space(preset.parallel)
    workload = Workload.from_flags(*CALIBRATION, concurrency=1, num_requests=preset.calibration_requests)
    workload = workload.model_copy(update={"name": "calibration"})
    _warm_process(next(iter(models.values())))
    runs = {}
    for name, model_dir in models.items():
        campaign = plan_campaign(store, model_dir, space, workload)
        result = profile(store, campaign, workload, budget_s=preset.budget_s,
                         on_progress=(lambda label, _e, n=name: on_progress(f"calibrating {n}: {label}"))
                         if on_progress else None)
        runs[name] = len(result.run_ids)
    if on_progress:
        on_progress("fitting the cost model")
    fitted = cm.fit(store, folds=min(preset.folds, max(2, sum(runs.values()))))
    cm.save(store, fitted)
    report = fitted.report
    accuracy = {section: {m: report[section]["metrics"][m]["median_ape"] for m in report[section]["metrics"]}
                for section in ("by_run", "by_model") if section in report}
    return fitted, {"runs": runs, "median_ape": accuracy, "workload": workload.describe()}


def run_scenario(fitted: cm.CostModel, truth: Store, model_name: str, model_dir: str,
                 w: ScenarioWorkload, preset: Preset, workdir: Path, seed: int = 0,
                 on_progress: Callable[[str], None] | None = None) -> ScenarioResult:
    tell = on_progress or (lambda _: None)
    space = bench_space(preset.parallel)
    workload = scenario_workload(w, preset.num_requests)
    base = base_config(model_dir, workload)
    configs, default_at = grid_configs(space, base, preset.grid_size)
    hardware = sorted(fitted.hardware)[0]
    price = hw.get_spec(hardware).price_per_hour_usd
    label = f"{model_name} / {w.name}"

    # 1. Ground truth: the grid, measured at the scenario's workload and load.
    measured = measure_grid(truth, model_dir, workload, w.concurrency, configs,
                            lambda text, _e: tell(f"{label}: grid {text}"))
    grid = [GridPoint(describe_config(c), m or {}, cost_per_million(price, m["throughput_tok_s"]) if m else math.inf,
                      default=i == default_at, error=err)
            for i, (c, (m, err)) in enumerate(zip(configs, measured))]
    # 2. SLOs from the grid alone, fixed before the search runs.
    slos = derive_slos([g.measured for g in grid if g.error is None])
    best = judge_grid(grid, slos)
    feasible = [g for g in grid if g.feasible]
    best_cost = best.cost_per_million if best else math.inf
    default = grid[default_at]

    # 3. The recommendation, launched and measured.
    tell(f"{label}: searching ({preset.trials} trials)")
    requirement = Requirement(slos, "concurrency", float(w.concurrency), confidence=preset.confidence)
    search = Search(fitted, model_dir, workload, requirement, hardware=[hardware], space=space,
                    max_devices=1, seed=seed)
    result = run_search(search, preset.trials)
    plan = make_plan(result, search, fitted)
    plan.write(workdir / "plans" / f"{model_name}-{w.name}.yaml")
    chosen = result.best
    keys = [s.key for s in slos]
    binding = chosen.binding if chosen.binding in keys else max(
        keys, key=lambda k: chosen.violations.get(k, -math.inf))
    predicted = ({k: chosen.prediction.metrics[k] for k in [*keys, "throughput_tok_s"]}
                 if chosen.prediction else {})
    tell(f"{label}: verifying {describe_config(plan.engine)}")
    error, got = None, {}
    try:
        verified = verify(truth, plan, lambda text, _e: tell(f"{label}: verify {text}"))
        got, met = verified.measured, verified.all_met
    except VerifyError as err:
        error, met = str(err), False
    measured_cost = (cost_per_million(plan.cost.per_hour_usd, got["throughput_tok_s"] * plan.replicas)
                     if got else math.inf)
    raw = overspend(measured_cost, best_cost)
    return ScenarioResult(
        model=model_name, workload=w.name, concurrency=w.concurrency, slos=[str(s) for s in slos],
        slo_margin=min(_margin(np.array([g.measured[s.key] for g in grid if g.error is None]), s.limit_s)
                       for s in slos),
        grid=grid, grid_feasible=len(feasible), best_config=best.config if best else None,
        best_cost=best_cost, default_cost=default.cost_per_million, default_feasible=default.feasible,
        default_ratio=(default.cost_per_million / best_cost if math.isfinite(best_cost) else math.nan),
        recommended=describe_config(plan.engine), replicas=plan.replicas,
        predicted_feasible=result.feasible, binding=binding, predicted=predicted,
        measured={k: v for k, v in got.items() if k in (*keys, "throughput_tok_s", "request_rate")},
        predicted_cost=chosen.cost_per_million, measured_cost=measured_cost, met=met,
        overspend=raw, overspend_clipped=max(0.0, raw) if math.isfinite(raw) else raw,
        search_s=result.seconds, error=error)


def run_recommend_benchmark(preset: str = "quick", workdir: str | Path | None = None,
                            budget_s: float | None = None, grid_size: int | None = None,
                            num_requests: int | None = None, trials: int | None = None,
                            models: Sequence[str] | None = None, seed: int = 0,
                            json_out: str | Path | None = None,
                            on_progress: Progress | None = None,
                            confidence: float | None = None) -> BenchResult:
    """Calibrate, then per scenario measure the grid, derive SLOs, recommend, launch and measure.
    Explicit sizes override the preset's. `workdir` gets the models, the two stores and the
    plans; it must not hold the stores of an earlier run (a fresh temporary folder by default)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    overrides = {"budget_s": budget_s, "grid_size": grid_size, "num_requests": num_requests,
                 "trials": trials, "models": tuple(models) if models is not None else None,
                 "confidence": confidence}
    p = Preset(**{**asdict(p), **{k: v for k, v in overrides.items() if v is not None}})
    if not p.budget_s > 0:
        raise ValueError(f"budget: must be > 0, got {p.budget_s}")
    for name in ("grid_size", "num_requests", "trials"):
        if getattr(p, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(p, name)}")
    if not 0.0 < p.confidence < 1.0:
        raise ValueError(f"confidence: must be between 0 and 1 (exclusive), got {p.confidence}")
    if not p.models:
        raise ValueError("models: name at least one")
    unknown = [m for m in p.models if m not in MODELS]
    if unknown:
        raise ValueError(f"models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="pilot-bench-recommend-"))
    work.mkdir(parents=True, exist_ok=True)
    for db in ("calibration.db", "truth.db"):
        if (work / db).exists():
            raise ValueError(f"workdir: {work / db} exists (an earlier run); give an empty folder")
    start = time.perf_counter()
    total = len(p.models) + 1 + len(p.models) * len(WORKLOADS)
    done = 0

    def tell(text: str) -> None:
        if on_progress:
            on_progress(text, done, total)

    tell("making models")
    model_dirs = make_models(work, p.models)
    calibration_store = Store(f"sqlite:///{(work / 'calibration.db').resolve()}")
    truth = Store(f"sqlite:///{(work / 'truth.db').resolve()}")

    def calibrating(text: str) -> None:
        nonlocal done
        if text == "fitting the cost model":
            done = len(p.models)
        tell(text)

    fitted, calibration = calibrate(calibration_store, model_dirs, p, calibrating)
    done = len(p.models) + 1
    scenarios = []
    for name, model_dir in model_dirs.items():
        for w in WORKLOADS:
            scenarios.append(run_scenario(fitted, truth, name, model_dir, w, p, work, seed, tell))
            done += 1
            tell(f"{name} / {w.name}: done")
    settings = {**asdict(p), "workloads": [asdict(w) for w in WORKLOADS], "seed": seed,
                "calibration_workload": {"isl": CALIBRATION[0], "osl": CALIBRATION[1]},
                "slo_quantiles": list(SLO_QUANTILES), "hardware": sorted(fitted.hardware)}
    out = summarize(preset, settings, scenarios, calibration, time.perf_counter() - start, str(work))
    if json_out is not None:
        Path(json_out).write_text(json.dumps(out.to_json(), indent=2))
    return out


# ---------------------------------------------------------------- the printed table

def _ms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1000:.3g} ms" if seconds < 10 else f"{seconds:.1f} s"


def _pct(value: float) -> str:
    return f"{value:+.1%}" if math.isfinite(value) else "-"


def results_table(result: BenchResult) -> Table:
    table = Table(title=f"Recommendations on held-out scenarios, launched and measured "
                        f"({result.preset} preset, grid of {result.settings['grid_size']} per scenario)")
    for column in ("model", "workload", "SLOs", "recommended", "binding SLO: predicted / measured",
                   "met", "overspend", "default / best", "grid feasible"):
        table.add_column(column, justify="right" if column in ("overspend", "default / best",
                                                               "grid feasible") else "left")
    for s in result.scenarios:
        predicted, measured = s.predicted.get(s.binding, math.nan), s.measured.get(s.binding, math.nan)
        met = "[green]yes[/]" if s.met else ("[red]no[/]" + (" (did not run)" if s.error else ""))
        over = _pct(s.overspend)
        if math.isfinite(s.overspend):
            colour = "green" if s.overspend <= TARGET_OVERSPEND else "red"
            over = f"[{colour}]{over}[/]"
        default = (f"{s.default_ratio:.2f}x" if math.isfinite(s.default_ratio) else "-") + \
            ("" if s.default_feasible else " (misses)")
        clear = f"\n(grid clear by {math.expm1(s.slo_margin):.0%})" if math.isfinite(s.slo_margin) else ""
        table.add_row(s.model, f"{s.workload} @{s.concurrency}", "\n".join(s.slos) + clear,
                      s.recommended + ("" if s.predicted_feasible else " [red](predicted infeasible)[/]"),
                      f"{s.binding}: {_ms(predicted)} / {_ms(measured)}", met, over, default,
                      f"{s.grid_feasible}/{len(s.grid)}")
    return table


def summary_line(result: BenchResult) -> str:
    ok = result.success_rate >= TARGET_SUCCESS
    cheap = math.isfinite(result.median_overspend) and result.median_overspend <= TARGET_OVERSPEND
    predicted = sum(s.predicted_feasible for s in result.scenarios)
    return (f"Met every SLO when launched: [{'green' if ok else 'red'}]{result.success_rate:.0%}[/] of "
            f"{len(result.scenarios)} scenarios (LLM-Pilot {ANCHOR_SUCCESS:.0%}, target >= {TARGET_SUCCESS:.0%}; "
            f"the search predicted a feasible plan in {predicted}). "
            f"Overspend vs the cheapest truly feasible grid configuration, over the plans that met: "
            f"median [{'green' if cheap else 'red'}]{_pct(result.median_overspend)}[/], mean "
            f"{_pct(result.mean_overspend)} clipped at 0 (as measured: median "
            f"{_pct(result.median_overspend_raw)}, mean {_pct(result.mean_overspend_raw)}; LLM-Pilot "
            f"{ANCHOR_OVERSPEND:.1%}, target <= {TARGET_OVERSPEND:.0%}). Engine defaults cost "
            f"{result.median_default_ratio:.2f}x the best (median). {result.seconds:.0f} s; work in "
            f"{result.workdir}.")


def print_results(result: BenchResult, console: Any) -> None:
    """The table, the calibration it rests on, and the summary line."""
    console.print(results_table(result))
    cal = result.calibration
    ape = cal.get("median_ape", {})
    held = ", ".join(f"{section.replace('by_', 'held-out ')}: {', '.join(f'{m} {v:.0%}' for m, v in metrics.items() if v is not None)}"
                     for section, metrics in ape.items())
    console.print(f"Cost model calibrated on {', '.join(f'{n} {k} runs' for n, k in cal.get('runs', {}).items())} "
                  f"of one workload ({cal.get('workload', '?')}); median APE {held}.")
    console.print(summary_line(result))
