"""`pilot bench recommend`: do recommendations meet their SLOs when launched, and at what cost?

LLM-Pilot's evaluation, on this machine (issue 6, "How we know it works"):

1. Calibration. Each model is profiled with ONE generic workload (the calibration workload
   below, at the cpu space's concurrency levels) over the built-in cpu space for a time budget,
   and the cost model is fitted on those runs. Its lengths span the scenarios' lengths, but the
   scenario workloads themselves (their length mixes and loads) are never profiled into this
   store: they are held out.
2. Ground truth. Per scenario (model x workload, closed-loop concurrency), a grid of the space's
   first N configurations in coverage order (always including the engine's defaults) is
   measured at the scenario's workload and load into a SEPARATE store the cost model never
   reads. Cost per million output tokens = host price per hour / measured output tokens/s.
   The scenario's SLOs are derived from the grid's measurements (`bench_truth.derive_slos`) before anything
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

import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from engine import EngineConfig
from engine.model_zoo import SHAPES, make_checkpoint
from planner.bench.truth import (
    SLO_QUANTILES,
    GridPoint,
    bench_space,
    cost_per_million,
    derive_slos,
    describe_config,
    grid_configs,
    judge_grid,
    limit_margin,
    measure_grid,
    overspend,
)
from planner.costmodel import fit as cm
from planner.measure import host_speed
from planner.measure.profiler import base_config, plan_campaign, profile
from planner.search.candidate import Requirement
from planner.search.plan import make_plan
from planner.search.recommend import run_search
from planner.search.search import Search
from planner.search.verify import VerifyError, verify, verify_in_turn
from planner.spec import hardware as hw
from planner.spec.workload import Workload
from planner.store.database import Store

# The bar (DESIGN.md, "Where the bar is"): LLM-Pilot's result and ours.
ANCHOR_SUCCESS, TARGET_SUCCESS = 0.80, 0.95
ANCHOR_OVERSPEND, TARGET_OVERSPEND = 0.199, 0.05

# Models: the built-in tiny shape and a wider, deeper variant of it.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(SHAPES["tiny"]),
    "wide": {**SHAPES["tiny"], "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4},
}
DTYPE = "float32"  # of the checkpoint; the space runs it in bfloat16


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


def _span(ranges: Sequence[str]) -> str:
    bounds = [tuple(int(x) for x in r.split(":")) for r in ranges]
    return f"{min(lo for lo, _ in bounds)}:{max(hi for _, hi in bounds)}"


# The one workload the cost model is calibrated on (at the cpu space's levels 1, 4, 16): one
# uniform mix whose lengths span the scenarios', as a user profiles the lengths their traffic
# has. Beyond them the step model extrapolates (`pilot recommend` says so): calibrated on
# 16:128-token prompts, it predicted 200-token prefills 1.5x too slow.
CALIBRATION = (_span([w.isl for w in WORKLOADS]), _span([w.osl for w in WORKLOADS]))


@dataclass(frozen=True)
class Preset:
    budget_s: float  # calibration profiling per model
    grid_size: int  # configurations measured per scenario for the ground truth
    num_requests: int  # requests per scenario run (grid and verify)
    trials: int  # Optuna trials per recommendation
    calibration_requests: int = 48  # requests per calibration run
    # Runs per calibration measurement (`pilot profile --repeats`): the cost model's bounds are
    # then set on medians, as the plans are judged.
    calibration_repeats: int = 3
    folds: int = 5  # cost-model cross-validation
    models: tuple[str, ...] = ("tiny", "wide")
    # Tensor and data parallelism in the space (calibration, grid and search alike). Each such
    # configuration starts worker processes, seconds apiece on a small machine.
    parallel: bool = True
    confidence: float = 0.8  # `pilot recommend --confidence`
    # `pilot recommend --verify --fallbacks`: next-best plans launched while the one measured
    # misses. A plan chosen that way is judged on a fresh measurement, not the one that chose it.
    fallbacks: int = 2
    # `pilot recommend --verify --explore`: once a plan holds, cheaper candidates launched; one
    # is kept only if it holds twice, and is then judged on a third measurement.
    explore: int = 2
    # Runs per grid configuration and per plan, judged on each metric's median (`pilot recommend
    # --repeats`): a single run on a shared host moves 10-20% with the host's slow spells.
    repeats: int = 3
    # Calibration runs per model at most (None: as many as `budget_s` holds).
    calibration_runs: int | None = None
    # How everything is measured: "http" through `pilot serve`, as a plan's clients see it (and
    # predicted so), or "engine" in process.
    via: str = "http"


PRESETS = {
    # About 2 minutes on a 2-core machine: a smoke run of the whole procedure on a space without
    # parallelism; its numbers are noisy.
    "quick": Preset(budget_s=15, grid_size=5, num_requests=48, trials=20, calibration_requests=24,
                    folds=3, parallel=False, repeats=1, calibration_repeats=1, fallbacks=1,
                    explore=0),
    # The real measurement, 30-45 minutes on a 2-core machine.
    "default": Preset(budget_s=300, grid_size=12, num_requests=192, trials=100,
                      calibration_requests=48, folds=5),
}

Progress = Callable[[str, int, int], None]  # (description, steps done, steps in all)


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def _clipped(values: Iterable[float]) -> list[float]:
    """Overspends clipped at 0, those not measured (NaN) left out rather than counted as 0."""
    return [max(0.0, v) for v in values if math.isfinite(v)]


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


# ---------------------------------------------------------------- results

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
    predicted_chance: float | None = None  # the plan's estimated chance of meeting every SLO
    # The grid's best measured again right after the plan, per SLO metric (again / in the grid):
    # how far the host itself moved between the ground truth and the verdict.
    host_drift: dict[str, float] = field(default_factory=dict)
    # The host's speed when the plan was made (planner.host_speed), which the plan was predicted
    # at: 1.0 a typical moment of the calibration runs.
    host_slowdown: float = 1.0
    # The search's own plan, before any fallback: what the model alone picked, and how it did.
    first_recommended: str = ""
    first_met: bool = False
    first_overspend: float = math.nan  # raw, as `overspend`
    tries: int = 1  # plans launched (1 + fallbacks used + cheaper ones explored)
    explored: int = 0  # cheaper plans launched once one held
    rank: int = 1  # the chosen plan's place in the model's order (1: the search's own)
    # The plan and the grid's best measured again in alternation, right after the verdict (raw,
    # as `overspend`): both in the same spells of the host. The verdict's measurement and the
    # grid's are minutes apart, and on this host the same configuration measured minutes apart
    # moved its throughput by up to 30%.
    paired_overspend: float = math.nan
    # Whether the grid's best met every SLO in that measurement again (None: not measured): the
    # ground truth's own repeatability, the ceiling a success rate on this host reads against.
    best_held_again: bool | None = None


@dataclass
class BenchResult:
    preset: str
    settings: dict[str, Any]
    scenarios: list[ScenarioResult]
    calibration: dict[str, Any]  # runs per model, the fit's held-out accuracy
    success_rate: float
    expected_success: float  # the plans' estimated chances, averaged: what success should be
    # Over the scenarios whose plan met its SLOs (a plan that missed has no overspend to speak
    # of): clipped at 0 (the headline) and as measured.
    median_overspend: float
    mean_overspend: float
    median_overspend_raw: float
    mean_overspend_raw: float
    median_default_ratio: float
    seconds: float
    workdir: str
    median_host_drift: float = math.nan  # of the scenarios' largest SLO-metric drift
    # The same, for the search's own plans alone (no measured fallback).
    first_success_rate: float = math.nan
    first_median_overspend: float = math.nan
    first_mean_overspend: float = math.nan
    # Over the plans that met, clipped at 0 (`ScenarioResult.paired_overspend`).
    paired_median_overspend: float = math.nan
    paired_mean_overspend: float = math.nan
    # Of the scenarios whose grid's best was measured again, the share where it met every SLO.
    best_success_rate: float = math.nan
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
        expected_success=_mean([s.predicted_chance for s in scenarios if s.predicted_chance is not None]),
        median_overspend=_median([s.overspend_clipped for s in met]),
        mean_overspend=_mean([s.overspend_clipped for s in met]),
        median_overspend_raw=_median([s.overspend for s in met]),
        mean_overspend_raw=_mean([s.overspend for s in met]),
        median_default_ratio=_median([s.default_ratio for s in scenarios]),
        seconds=seconds, workdir=workdir,
        median_host_drift=_median([max(s.host_drift.values()) for s in scenarios if s.host_drift]),
        first_success_rate=(sum(s.first_met for s in scenarios) / len(scenarios) if scenarios else math.nan),
        first_median_overspend=_median(_clipped(s.first_overspend for s in scenarios if s.first_met)),
        first_mean_overspend=_mean(_clipped(s.first_overspend for s in scenarios if s.first_met)),
        paired_median_overspend=_median(_clipped(s.paired_overspend for s in met)),
        paired_mean_overspend=_mean(_clipped(s.paired_overspend for s in met)),
        best_success_rate=_mean([float(s.best_held_again) for s in scenarios if s.best_held_again is not None]))


# ---------------------------------------------------------------- the measurement

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
        campaign = plan_campaign(store, model_dir, space, workload, repeats=preset.calibration_repeats)
        result = profile(store, campaign, workload, budget_s=preset.budget_s, max_runs=preset.calibration_runs,
                         via=preset.via,
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
                            lambda text, _e: tell(f"{label}: grid {text}"), preset.repeats, preset.via)
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
    # Planned for the host as it runs now: the plan is launched and judged right after.
    slowdown = fitted.host_slowdown(hardware, host_speed.probe(host_speed.PLANNING_SECONDS))
    search = Search(fitted, model_dir, workload, requirement, hardware=[hardware], space=space,
                    max_devices=1, seed=seed, host_slowdowns={hardware: slowdown})
    result = run_search(search, preset.trials)
    first = make_plan(result, search, fitted)
    tell(f"{label}: verifying {describe_config(first.engine)}")
    error, got, attempts = None, {}, []
    plan, chosen_candidate, rank = first, result.best, 1
    try:
        chosen, attempts = verify_in_turn(
            truth, search, result, fitted, preset.fallbacks,
            lambda rank, text, _e: tell(f"{label}: verify #{rank} {text}"), via=preset.via,
            repeats=preset.repeats, explore=preset.explore)
        plan, chosen_candidate, verdict, rank = chosen.plan, chosen.candidate, chosen.deciding, chosen.rank
        # Chosen among several, or on a second launch of its own, by measurement: a launch that
        # chose a plan is its luckiest, so the verdict is a fresh one.
        if rank > 1 or chosen.confirmation is not None:
            tell(f"{label}: measuring plan #{rank} again for the verdict")
            verdict = verify(truth, plan, via=preset.via, repeats=preset.repeats)
        got, met = verdict.measured, verdict.all_met
    except VerifyError as err:
        error, met = str(err), False
    plan.write(workdir / "plans" / f"{model_name}-{w.name}.yaml")
    keys = [s.key for s in slos]
    binding = chosen_candidate.binding if chosen_candidate.binding in keys else max(
        keys, key=lambda k: chosen_candidate.violations.get(k, -math.inf))
    predicted = ({k: chosen_candidate.prediction.metrics[k] for k in [*keys, "throughput_tok_s"]}
                 if chosen_candidate.prediction else {})
    measured_cost = (cost_per_million(plan.cost.per_hour_usd, got["throughput_tok_s"] * plan.replicas)
                     if got else math.inf)
    first_cost = (cost_per_million(first.cost.per_hour_usd,
                                   attempts[0].result.measured["throughput_tok_s"] * first.replicas)
                  if attempts else math.inf)
    drift: dict[str, float] = {}
    paired = math.nan
    best_held_again = None
    if best is not None:
        tell(f"{label}: measuring the plan and the grid's best again, in alternation")
        (mine, _), (again, _) = measure_grid(truth, model_dir, workload, w.concurrency,
                                             [plan.engine, configs[grid.index(best)]], repeats=preset.repeats,
                                             via=preset.via)
        drift = {k: again[k] / best.measured[k] for k in keys} if again else {}
        best_held_again = all(again[s.key] <= s.limit_s for s in slos) if again else None
        if mine and again:
            paired = overspend(cost_per_million(plan.cost.per_hour_usd, mine["throughput_tok_s"] * plan.replicas),
                               cost_per_million(price, again["throughput_tok_s"]))
    raw = overspend(measured_cost, best_cost)
    return ScenarioResult(
        model=model_name, workload=w.name, concurrency=w.concurrency, slos=[str(s) for s in slos],
        slo_margin=min(limit_margin(np.array([g.measured[s.key] for g in grid if g.error is None]), s.limit_s)
                       for s in slos),
        grid=grid, grid_feasible=len(feasible), best_config=best.config if best else None,
        best_cost=best_cost, default_cost=default.cost_per_million, default_feasible=default.feasible,
        default_ratio=(default.cost_per_million / best_cost if math.isfinite(best_cost) else math.nan),
        recommended=describe_config(plan.engine), replicas=plan.replicas,
        predicted_feasible=result.feasible, binding=binding, predicted=predicted,
        measured={k: v for k, v in got.items() if k in (*keys, "throughput_tok_s", "request_rate")},
        predicted_cost=chosen_candidate.cost_per_million, measured_cost=measured_cost, met=met,
        overspend=raw, overspend_clipped=max(0.0, raw) if math.isfinite(raw) else raw,
        search_s=result.seconds, error=error, predicted_chance=plan.chance, host_drift=drift,
        host_slowdown=slowdown, first_recommended=describe_config(first.engine),
        first_met=bool(attempts) and attempts[0].held,
        first_overspend=overspend(first_cost, best_cost), tries=max(1, len(attempts)), rank=rank,
        explored=sum(a.cheaper for a in attempts), paired_overspend=paired, best_held_again=best_held_again)


def run_recommend_benchmark(preset: str = "quick", workdir: str | Path | None = None,
                            budget_s: float | None = None, grid_size: int | None = None,
                            num_requests: int | None = None, trials: int | None = None,
                            models: Sequence[str] | None = None, seed: int = 0,
                            json_out: str | Path | None = None,
                            on_progress: Progress | None = None,
                            confidence: float | None = None,
                            repeats: int | None = None, fallbacks: int | None = None,
                            explore: int | None = None, via: str | None = None) -> BenchResult:
    """Calibrate, then per scenario measure the grid, derive SLOs, recommend, launch and measure.
    Explicit sizes override the preset's. `workdir` gets the models, the two stores and the
    plans; it must not hold the stores of an earlier run (a fresh temporary folder by default)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    overrides = {"budget_s": budget_s, "grid_size": grid_size, "num_requests": num_requests,
                 "trials": trials, "models": tuple(models) if models is not None else None,
                 "confidence": confidence, "repeats": repeats, "calibration_repeats": repeats,
                 "fallbacks": fallbacks, "explore": explore, "via": via}
    p = Preset(**{**asdict(p), **{k: v for k, v in overrides.items() if v is not None}})
    if not p.budget_s > 0:
        raise ValueError(f"budget: must be > 0, got {p.budget_s}")
    for name in ("grid_size", "num_requests", "trials", "repeats"):
        if getattr(p, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(p, name)}")
    for name in ("fallbacks", "explore"):
        if getattr(p, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(p, name)}")
    if p.via not in ("engine", "http"):
        raise ValueError(f"via: must be engine or http, got {p.via!r}")
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
