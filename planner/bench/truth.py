"""The ground truth of `pilot bench recommend`: the grid of configurations measured per scenario,
the SLOs derived from it before anything is recommended, and what counts as meeting them.

The SLO rule reads only the grid (`derive_slos`); the truly feasible set is the grid's
configurations measured to meet every limit (`judge_grid`), and the best is the cheapest of them.
Cost per million output tokens = host price per hour / measured output tokens/s.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sqlalchemy import select

from engine import EngineConfig
from engine.model_config import ModelConfig
from planner.measure.profiler import profile
from planner.search.verify import median_metrics, run_metrics
from planner.spec.search_space import SearchSpace
from planner.spec.slo import SLO
from planner.spec.workload import Workload
from planner.store.database import Campaign, Experiment, Run, Store, fingerprint
from planner.store.records import config_row, hardware_row, model_row, workload_row

# int4 groups the models' smallest input dimension (64 features) can hold, as the quickstart sets.
GROUP_SIZE = 32
SLO_METRICS = ("ttft_p95", "itl_p95")
# The SLO rule's percentile range over the grid's measurements (see derive_slos).
SLO_QUANTILES = (0.25, 0.75)
MIN_FEASIBLE = 0.25  # share of the grid the rule aims to leave feasible
# A limit closer than this (log-ratio, about 8%) to a measurement is within run-to-run noise.
MIN_MARGIN = 0.08


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


def limit_margin(values: np.ndarray, limit: float) -> float:
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
        margin = min(limit_margin(values[m], limits[m]) for m in metrics)
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
    configs = space.configs(base, max_parallel=os.cpu_count() or 1, model=ModelConfig.from_dir(base.model))
    default = default_config(space, base)
    same = [i for i, c in enumerate(configs) if c == default]
    if same and same[0] < size:
        return configs[:size], same[0]
    return [default, *[c for c in configs if c != default][:size - 1]], 0


def measure_grid(store: Store, model_dir: str, workload: Workload, concurrency: int,
                 configs: list[EngineConfig],
                 on_progress: Callable[[str, float], None] | None = None,
                 repeats: int = 1, via: str = "engine") -> list[tuple[dict[str, float] | None, str | None]]:
    """Measure every configuration at `concurrency` `repeats` times into `store` (a campaign of
    exactly these experiments, so it resumes like any profile); (each metric's median over the
    repeats or None, error) per configuration, as `verify` judges a plan.

    The repeats go in rounds (every configuration once, then again), not back to back: a slow
    or fast spell of the host then lands on one repeat of several configurations, which their
    medians shrug off, rather than on every repeat of one. Back to back, one scenario's grid was
    measured at host readings of 0.73-1.31x the typical one, and the cheapest configuration
    that held was partly the one measured in the fastest spell. It costs an engine start per
    run instead of per configuration."""
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    hardware, model, load = hardware_row(store), model_row(store, model_dir), workload_row(store, workload)
    rows = [config_row(store, c) for c in configs]
    key = fingerprint({"bench-recommend-grid": [r.fingerprint for r in rows], "model": model.fingerprint,
                       "workload": load.fingerprint, "hardware": hardware.fingerprint,
                       "concurrency": concurrency, "repeats": repeats, "order": "rounds"})
    campaign = store.get_or_create(Campaign, key, hardware_id=hardware.id, model_id=model.id,
                                   workload_id=load.id, space={"bench_recommend_grid": len(rows)})
    with store.session() as session, session.begin():
        if session.scalar(select(Experiment.id).where(Experiment.campaign_id == campaign.id).limit(1)) is None:
            session.add_all(Experiment(campaign_id=campaign.id, position=r * len(rows) + i,
                                       engine_config_id=row.id, load_kind="concurrency",
                                       load_value=concurrency)
                            for i, row in enumerate(rows) for r in range(repeats))
    profile(store, campaign, workload, budget_s=math.inf, on_progress=on_progress, via=via)
    out: list[tuple[dict[str, float] | None, str | None]] = []
    with store.session() as session:
        experiments = list(session.scalars(select(Experiment).where(Experiment.campaign_id == campaign.id)
                                           .order_by(Experiment.position)))
        for i in range(len(rows)):
            repeated = experiments[i::len(rows)]
            runs = [session.scalar(select(Run).where(Run.experiment_id == exp.id)) for exp in repeated]
            missing = [exp for exp, run in zip(repeated, runs) if run is None]
            if missing:
                out.append((None, missing[0].error or missing[0].status))
            else:
                out.append((median_metrics([run_metrics(run) for run in runs]), None))
    return out
