"""`StepTimeModel`: how long one engine step takes, from its composition and the configuration.

Physics first: the roofline terms of the step (planner/costmodel/roofline.py), plus per-step, per-sequence
and per-layer overheads, weighed by non-negative coefficients fitted to minimise relative error.
Their inverses are efficiency factors (what share of bandwidth and FLOP/s the engine gets), the
part that carries to hardware never measured. A gradient-boosted regressor (scikit-learn) then
learns what the roofline misses, as a log-ratio, and split-conformal quantiles of held-out steps
give every prediction an interval.

The fitted model is saved as plain numbers (coefficients and the boosted trees' node arrays), so
loading one from a store never unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from bisect import bisect_left
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import sklearn
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression

from engine.model_runner import prefills_row_by_row
from engine.observer import StepComposition
from planner.costmodel.roofline import TERMS, Deployment, Device, step_terms, weight_bytes_per_param

COMPOSITION = ("num_seqs", "num_prefill_seqs", "num_decode_seqs", "num_prefill_tokens",
               "num_decode_tokens", "context_tokens", "num_draft_tokens")
# "prefill_pass": a layer pass of the PyTorch path for a step that prefills through it. Decode-only
# steps, and steps whose prompts and chunks are short (`engine.model_runner.prefills_row_by_row`),
# run each layer in one fused C call; a step with longer ones runs them op by op, a fixed cost the
# roofline does not see. Measured here: a 16-token prefill beside 11 decodes
# cost 0.28 ms more than the decodes alone, as it did beside none. Left to the trees, which learn
# ratios, that cost was charged as 2.5x the whole step: mixed steps of many decodes came out 70%
# too slow. (A pass per prefilling sequence as well fitted held-out models a little better but
# was charged three times what a burst of a dozen short prompts costs.)
# "weights_cached_s": the share of the weight reads that the last-level cache serves
# (`StepTimeModel.cache_bytes_`), priced apart from the rest, which "weights_s" then holds.
# Measured on a 2-core EPYC (32 MiB L3), one-sequence decode steps took 0.75x the DRAM roofline
# of their weight reads for a 7 MB model and 2.1x for a 220 MB one. With one rate for both,
# such models held out of the fit came out 20-30% off.
# "int4_unpack_s": an int4 weight's parameters over the FLOP rate. Unpacking two weights from a
# byte, then scaling them and adding the group's minimum, is work per weight, not per byte read:
# one-sequence decode steps of int4 models took 2-4x what their bytes at the memory rate would.
# "attention_scores_s": attention's scores (layers x query heads x token pairs) over the FLOP
# rate (`roofline.step_terms`). The byte and FLOP terms priced a score by the head dimension, so
# models with narrow heads and long contexts came out fast and wide ones slow; priced apart,
# one score took about 2 ns on a 2-core EPYC, 2,850 FLOPs' time where its dot products count
# 4 per head dimension (256 at 64). Held-out models fitted 7.5% / 22.3% median / p90 without
# it and 6.9% / 21.4% with it; held-out runs, 4.6% / 14.1% and 4.4% / 13.6%.
PHYSICS = ("step", "seq", "layer_pass", *TERMS, "prefill_pass", "weights_cached_s", "int4_unpack_s",
           "attention_scores_s")
_DIRECT = PHYSICS[1:PHYSICS.index("weights_cached_s")]  # read straight from FEATURES
NOISE_LEVELS = np.linspace(0.005, 0.995, 100)
# "prefill_pass" came later than the other direct terms, so it sits further on in FEATURES.
FEATURES = (*_DIRECT[:-1], *COMPOSITION, "tensor_parallel_size", "data_parallel_size",
            "weight_bytes_per_param", "num_speculative_tokens", "num_layers", "hidden_size",
            "busy_peers",
            # How slow the host ran meanwhile against its typical moment (planner.host_speed):
            # one core, then every core at once. New features are appended, so trees saved before
            # them still index right.
            "host_slowdown", "host_parallel_slowdown", "prefill_pass",
            # Forward passes the step runs: the target's, and with a draft, k draft passes for
            # the decoding sequences. The per-step overhead is charged per pass (`per_pass_`).
            "forward_passes",
            # Weight bytes every process of the deployment holds at once (replicas x ranks):
            # what competes for the one cache of a CPU host.
            "resident_weight_bytes", "int4_unpack_s", "attention_scores_s")
_PHYSICS_COLUMNS = [FEATURES.index(name) for name in _DIRECT]
# What the residual trees see in place of FEATURES (`StepTimeModel.residual_inputs`): each
# physics term's share of the physics prediction first, then FEATURES with the roofline seconds
# and the model's size zeroed. A ratio the trees learn from shares (a step that is mostly weight
# reads at two ranks runs 20% over its roofline) carries to a model never fitted; one learned
# from seconds or widths is each model's own, and a model outside the fitted range took the
# offset of whichever one sat at the edge. On the nine-model reference (AMD EPYC, 2 cores),
# leaving one model out, median / p90 APE went from 6.4% / 20.3% to 6.1% / 17.0%, and holding
# out runs from 4.2% / 13.4% to 3.9% / 13.0%. Left out, llama-110m (the largest) had its bf16
# decode steps come out 14% and 26% fast at one and two ranks, where the physics alone erred
# +4% and -16%.
RESIDUAL_INPUTS = ("shares", "features")
_HIDDEN_FROM_TREES = np.isin(FEATURES, (*TERMS, "int4_unpack_s", "attention_scores_s",
                                        "num_layers", "hidden_size", "resident_weight_bytes"))
# Effective cache sizes `fit` chooses from (0: no cache term), by how well the physics alone fits.
# Effective, not the datasheet's: on a shared host the processes of other tenants hold part of it.
CACHE_GRID_BYTES = (0, *(2 ** k * 2 ** 20 for k in range(8)))
# A cache term must cut the physics' mean squared log error by this share to be kept.
CACHE_MIN_GAIN = 0.02
CACHE_TIE = 0.01  # losses within this share of the best count as a tie
CACHE_FIT_ROWS = 50_000

MIN_JITTER_RUNS = 10  # a process layout with fewer runs replays the jitter of all runs
MIN_JITTER_STEPS = 200  # and a duration band with fewer steps, its layout's whole spread
# Steps are also kept apart by their typical duration ("<key>@<band>", bands split at these
# seconds): a stall is a time the OS takes, not a share of the step, so short steps stray
# further. Measured p95/p50 of ITL for two replicas: 2.6 for 0.2 ms steps, 1.2-1.3 for 3 ms ones;
# one spread for all had predicted 1.75 for both.
DURATION_BANDS_S = (0.25e-3, 0.5e-3, 1e-3, 2e-3, 4e-3)
# Decode steps of this many sequences or more keep their own jitter ("<key>:wide"). Within a run,
# a tp1dp1 decode step of 16 sequences had a 98th percentile 1.27x its median, one of 1-4
# sequences 1.5-1.8x: the narrow steps' stalls, pooled, made ITL p95 at 16 clients 21% too slow.
WIDE_BATCH = 8
# A decode spread is the average of its runs' own quantiles (runs with this many steps in it,
# where there are enough such runs), not the quantiles of their steps pooled.
MIN_RUN_STEPS, MIN_SPREAD_RUNS = 20, 5


def duration_band(seconds: float) -> int:
    return bisect_left(DURATION_BANDS_S, seconds)


def jitter_class(data_parallel_size: float, tensor_parallel_size: float) -> str:
    """Which step-to-step jitter a deployment replays: by how its processes share the machine."""
    return f"dp{int(data_parallel_size)}-tp{int(tensor_parallel_size)}"


def feature_matrix(deployment: Deployment, device: Device,
                   steps: Mapping[str, np.ndarray]) -> np.ndarray:
    """[n, len(FEATURES)] for n steps of one deployment on one device. `steps` holds the
    COMPOSITION columns and, for data-parallel deployments, "busy_peers" (`fit_data.busy_peers`:
    how many other replicas were mid-step meanwhile; none if absent), and "host_slowdown" and
    "host_parallel_slowdown" (`planner.measure.host_speed.slowdown` of its two readings; 1.0, a typical
    moment, if absent)."""
    comp = {name: np.asarray(steps[name], dtype=float) for name in COMPOSITION}
    n = len(comp["num_seqs"])

    def optional(name: str, default: float) -> np.ndarray:
        return np.asarray(steps[name], dtype=float) if name in steps else np.full(n, default)

    terms = step_terms(deployment, device, comp["num_seqs"], comp["num_prefill_seqs"],
                       comp["num_prefill_tokens"], comp["num_decode_tokens"], comp["context_tokens"],
                       comp["num_draft_tokens"])
    decoding = (comp["num_decode_seqs"] > 0).astype(float)
    op_by_op = (comp["num_prefill_seqs"] > 0) & ~prefills_row_by_row(comp["num_prefill_seqs"],
                                                                      comp["num_prefill_tokens"])
    draft_layers = deployment.draft.num_layers if deployment.draft is not None else 0
    layer_pass = deployment.target.num_layers + decoding * deployment.num_speculative_tokens * draft_layers
    constants = {
        "tensor_parallel_size": deployment.tensor_parallel_size,
        "data_parallel_size": deployment.data_parallel_size,
        "weight_bytes_per_param": weight_bytes_per_param(deployment.dtype, deployment.quantization,
                                                         deployment.group_size),
        "num_speculative_tokens": deployment.num_speculative_tokens,
        "num_layers": deployment.target.num_layers, "hidden_size": deployment.target.hidden_size,
        "resident_weight_bytes": deployment.weight_bytes * deployment.tensor_parallel_size
                                 * deployment.data_parallel_size,
        "int4_unpack_s": (deployment.target.weight_params / deployment.tensor_parallel_size / device.flops
                          if deployment.quantization == "int4" else 0.0),
    }
    columns = {"seq": comp["num_seqs"], "layer_pass": layer_pass, **terms, **comp,
               "forward_passes": 1.0 + decoding * (deployment.num_speculative_tokens if deployment.draft else 0),
               "prefill_pass": op_by_op * float(deployment.target.num_layers),
               **{k: np.full(n, float(v)) for k, v in constants.items()},
               "busy_peers": optional("busy_peers", 0.0), "host_slowdown": optional("host_slowdown", 1.0),
               "host_parallel_slowdown": optional("host_parallel_slowdown", 1.0)}
    return np.column_stack([columns[name] for name in FEATURES])


def _physics_columns(X: np.ndarray, count: int = len(PHYSICS), per_pass: bool = True,
                     cache_bytes: float = 0.0) -> np.ndarray:
    """The first `count` PHYSICS columns (a model saved before the later ones has fewer).

    `per_pass`: the fixed overhead ("step") is paid once per forward pass, so a speculative
    step pays it k + 1 times. A draft's pass costs what any small model's pass costs (its
    launch, its layers, its sampling), so with it per pass, a model profiled without a draft
    prices one with a draft; charged once per step, only the draft term (fitted on profiled
    pairs alone) did, and a pair never profiled came out 1.4-2x too fast. Models saved before
    have it per step.

    `cache_bytes`: with all `count` columns, the weight reads are split by the share of every
    process's weights that fits in that much cache ("weights_cached_s") and the rest
    ("weights_s")."""
    first = X[:, FEATURES.index("forward_passes")] if per_pass else np.ones(len(X))
    columns = np.column_stack([first, X[:, _PHYSICS_COLUMNS[:count - 1]]])
    if count <= PHYSICS.index("weights_cached_s"):
        return columns
    weights = PHYSICS.index("weights_s")
    resident = np.maximum(X[:, FEATURES.index("resident_weight_bytes")], 1.0)
    cached = columns[:, weights] * np.minimum(1.0, cache_bytes / resident)
    columns[:, weights] -= cached
    columns = np.column_stack([columns, cached])
    later = [FEATURES.index(name) for name in PHYSICS[PHYSICS.index("int4_unpack_s"):count]]
    return np.column_stack([columns, X[:, later]])


def _physics_fit(columns: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising relative error."""
    physics = LinearRegression(fit_intercept=False, positive=True)
    physics.fit(columns, y, sample_weight=1.0 / y ** 2)
    return physics.coef_.copy()


def _cache_bytes(X: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The effective cache that lets the physics fit these steps best (`CACHE_GRID_BYTES`), or 0
    where no cache term earns `CACHE_MIN_GAIN`."""
    rows = np.random.default_rng(seed).permutation(len(y))[:CACHE_FIT_ROWS]
    X, y = X[rows], y[rows]

    def loss(cache_bytes: float) -> float:
        columns = _physics_columns(X, cache_bytes=cache_bytes)
        return float(np.mean(np.log(np.maximum(columns @ _physics_fit(columns, y), 1e-7) / y) ** 2))

    losses = {c: loss(c) for c in CACHE_GRID_BYTES}
    # The smallest of those that fit about as well: a cache larger than every model but the
    # smallest is a constant for the rest, which the per-pass overhead fits as well, so the
    # steps cannot tell it from a smaller one, and the larger would price a model of a size
    # between at the cache's rate.
    best = min(c for c in CACHE_GRID_BYTES if losses[c] <= (1 + CACHE_TIE) * min(losses.values()))
    return float(best) if losses[best] < (1 - CACHE_MIN_GAIN) * losses[0] else 0.0


class TreeEnsemble:
    """A boosted ensemble of regression trees as flat arrays, evaluated with NumPy.

    Built from a fitted `HistGradientBoostingRegressor` (its documented prediction is the
    baseline plus the sum of one leaf per tree; a test checks the two agree), it predicts a
    single row in tens of microseconds where scikit-learn takes milliseconds, which is what lets
    the simulator price thousands of steps a second.
    """

    def __init__(self, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray,
                 right: np.ndarray, value: np.ndarray, roots: np.ndarray, baseline: float,
                 depth: int) -> None:
        self.feature, self.threshold = feature.astype(np.int64), threshold.astype(float)
        self.left, self.right = left.astype(np.int64), right.astype(np.int64)
        self.value, self.roots = value.astype(float), roots.astype(np.int64)
        self.baseline, self.depth = float(baseline), int(depth)

    @classmethod
    def from_sklearn(cls, model: HistGradientBoostingRegressor) -> TreeEnsemble:
        features, thresholds, lefts, rights, values, roots = [], [], [], [], [], []
        offset, depth = 0, 0
        for (predictor,) in model._predictors:  # one tree per iteration for a regressor
            nodes = predictor.nodes
            leaf = nodes["is_leaf"].astype(bool)
            index = np.arange(len(nodes)) + offset
            # A leaf points at itself and compares against +inf, so the walk can run a fixed
            # number of levels without branching on leaves.
            features.append(np.where(leaf, 0, nodes["feature_idx"]))
            thresholds.append(np.where(leaf, np.inf, nodes["num_threshold"]))
            lefts.append(np.where(leaf, index, nodes["left"] + offset))
            rights.append(np.where(leaf, index, nodes["right"] + offset))
            values.append(np.where(leaf, nodes["value"], 0.0))
            roots.append(offset)
            depth = max(depth, int(nodes["depth"].max()))
            offset += len(nodes)
        baseline = float(np.asarray(model._baseline_prediction).ravel()[0])
        return cls(np.concatenate(features), np.concatenate(thresholds), np.concatenate(lefts),
                   np.concatenate(rights), np.concatenate(values), np.array(roots), baseline, depth)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        if not np.isfinite(X).all():
            raise ValueError("features must be finite")
        rows = np.arange(len(X))[:, None]
        node = np.broadcast_to(self.roots, (len(X), len(self.roots)))
        for _ in range(self.depth):
            go_left = X[rows, self.feature[node]] <= self.threshold[node]
            node = np.where(go_left, self.left[node], self.right[node])
        return self.baseline + self.value[node].sum(axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature.tolist(), "threshold": [float(t) if np.isfinite(t) else None
                                                                  for t in self.threshold],
                "left": self.left.tolist(), "right": self.right.tolist(), "value": self.value.tolist(),
                "roots": self.roots.tolist(), "baseline": self.baseline, "depth": self.depth}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TreeEnsemble:
        threshold = np.array([np.inf if t is None else t for t in data["threshold"]], dtype=float)
        return cls(np.array(data["feature"]), threshold, np.array(data["left"]), np.array(data["right"]),
                   np.array(data["value"]), np.array(data["roots"]), data["baseline"], data["depth"])


class QuasiJitter:
    """Step-to-step jitter factors drawn from fitted log-quantiles (`StepTimeModel.noise_`), one
    randomly shifted golden-ratio sequence per stream: a kind of step (decoding only or
    prefilling, alone or beside working replicas, its duration band), whose quantiles
    `quantiles(stream)` gives when the stream is first drawn from.

    Why not independent draws: a run's TTFT p50 rests on a handful of prefill steps. Sixteen iid
    draws strayed 10% from the jitter's median, and with a fixed seed every conc-1 run of a
    profile shared that bad luck (held-out TTFT p50 came out 11% low across the board). Any run
    of consecutive terms of this sequence spreads evenly over the quantiles, so the few steps a
    percentile rests on see the distribution's shape, not one sample of it."""

    STEP = (5 ** 0.5 - 1) / 2
    BLOCK = 4096

    def __init__(self, quantiles: Callable[[Hashable], np.ndarray], seed: int) -> None:
        self.quantiles = quantiles
        self.rng = np.random.default_rng(seed)
        # stream -> [factors, shift, terms drawn, the current block]
        self.streams: dict[Hashable, list[Any]] = {}

    def __call__(self, stream: Hashable) -> float:
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = [np.exp(np.asarray(self.quantiles(stream), dtype=float)),
                                            self.rng.random(), 0, []]
        factors, shift, drawn, block = state
        if not block:  # filled a block at a time: one NumPy call per 4096 steps, not per step
            levels = (shift + (drawn + np.arange(self.BLOCK)) * self.STEP) % 1.0
            block.extend(np.interp(levels, NOISE_LEVELS, factors)[::-1].tolist())
            state[2] = drawn + self.BLOCK
        return block.pop()


@dataclass
class StepTimeModel:
    """`fit(X, y, groups)` on step features (`feature_matrix`) and measured step periods."""

    coverage: float = 0.8
    max_iter: int = 150
    max_depth: int = 6
    learning_rate: float = 0.1
    random_state: int = 0
    # What the residual trees see: "shares" (`_HIDDEN_FROM_TREES`), or "features": FEATURES as
    # they are, as models saved before shares did.
    residual_inputs: str = "shares"
    physics_coef_: np.ndarray | None = None
    per_pass_: bool = True  # the "step" overhead is per forward pass (`_physics_columns`)
    cache_bytes_: float = 0.0  # the effective cache that serves weight reads (`_cache_bytes`)
    residual_: TreeEnsemble | None = None
    interval_: tuple[float, float] = (0.0, 0.0)  # log-ratio quantiles of held-out steps
    # Quantiles (at NOISE_LEVELS) of how a step's log-time strays from its run's typical
    # residual: the step-to-step jitter the simulator replays, which sets ITL tails. Kept per
    # process layout (`jitter_class`): processes sharing the machine disturb each other's steps.
    noise_: dict[str, np.ndarray] | None = None

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
            calibrate: bool = True) -> StepTimeModel:
        X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
        if len(X) != len(y) or len(y) == 0:
            raise ValueError(f"need as many steps as durations, got {len(X)} and {len(y)}")
        if (y <= 0).any():
            raise ValueError("step durations must be > 0")
        if self.residual_inputs not in RESIDUAL_INPUTS:
            raise ValueError(f"residual_inputs: unknown {self.residual_inputs!r}; choose from "
                             f"{', '.join(RESIDUAL_INPUTS)}")
        groups = np.zeros(len(y)) if groups is None else np.asarray(groups)
        # Calibrate the interval on whole runs held out (steps within a run are alike).
        rng = np.random.default_rng(self.random_state)
        unique = np.unique(groups)
        self.noise_ = None
        if calibrate and len(unique) >= 5:
            held = rng.choice(unique, size=max(1, len(unique) // 5), replace=False)
            calibration = np.isin(groups, held)
            self._fit(X[~calibration], y[~calibration])
            residual = np.log(y[calibration]) - np.log(self.predict(X[calibration]))
            tail = (1 - self.coverage) / 2
            self.interval_ = (float(np.quantile(residual, tail)), float(np.quantile(residual, 1 - tail)))
        self._fit(X, y)
        typical = self.predict(X)
        self.noise_ = self._jitter(np.log(y) - np.log(typical), groups, X, typical)
        return self

    @staticmethod
    def _jitter(residual: np.ndarray, groups: np.ndarray, X: np.ndarray,
                typical: np.ndarray) -> dict[str, np.ndarray]:
        """Residuals less their run's mean (what varies from step to step, not run to run),
        for all runs and per process layout with enough runs of its own, and apart for steps
        that prefill ("prefill/<layout>").

        The mean, not the median: the regression predicts a step's mean log-time, and steps
        are skewed slow (a stall is long, a fast step is only a little fast). Centred on the
        median, the replayed steps' median came out at the mean, and ITL p50 6% slow.
        Prefill steps apart: they are long, so a stall is a smaller share of them (their 99th
        percentile is 1.7x the mean, a decode step's 2.4x). Given decode jitter, a run's few
        prefill steps made TTFT p95 swing with the seed by up to 2x.
        Decode steps of data-parallel layouts also apart by whether other replicas were working
        ("<layout>/busy") or not ("<layout>/alone"): two replicas on two cores jitter each
        other's steps. One spread for both made ITL p95 at one client (a replica alone) 23% too
        slow, and at 4 and 16 clients 6-7% too fast. (Prefill steps split the same way made
        TTFT p95 at 4 and 16 clients further too fast, so they keep the layout's spread.)
        Decode steps of `WIDE_BATCH` sequences or more also apart ("<layout>:wide", busy or
        alone likewise): at 16 clients one step's stall delays 16 gaps at once, so ITL p95 is
        about the 98th percentile of the steps, and wide steps stall less than narrow ones.
        Each of these also per duration band of the steps' typical time ("<key>@<band>",
        `DURATION_BANDS_S`) where the band has enough steps and runs.
        A decode spread averages its runs' own quantiles: a run's ITL p95 is that run's tail,
        and runs differ in how often they stall (the host's spells). Pooled, the stalliest
        runs and the longest (one client: 600 steps, against 50 at 16) set every run's tail;
        averaged, held-out ITL p95 erred 9.5% (median) instead of 10.2%."""
        order = np.argsort(groups, kind="stable")
        residual, groups, X, typical = residual[order], groups[order], X[order], typical[order]
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        lengths = np.diff(np.r_[starts, len(residual)])
        run_of = np.repeat(np.arange(len(starts)), lengths)
        prefilling = X[:, FEATURES.index("num_prefill_seqs")] > 0
        # A run has one layout: name it once per run, not once per step.
        parallel = X[starts][:, [FEATURES.index("data_parallel_size"), FEATURES.index("tensor_parallel_size")]]
        run_layouts = np.array([jitter_class(dp, tp) for dp, tp in parallel])
        replicated = parallel[:, 0] > 1
        busy = X[:, FEATURES.index("busy_peers")] > 0
        wide = X[:, FEATURES.index("num_seqs")] >= WIDE_BATCH
        bands = np.searchsorted(DURATION_BANDS_S, typical)
        noise: dict[str, np.ndarray] = {}
        for prefix, kind in (("", ~prefilling), ("prefill/", prefilling)):
            runs = run_of[kind]
            if len(runs) == 0:
                continue
            sums, counts = np.bincount(runs, residual[kind], len(starts)), np.bincount(runs, None, len(starts))
            within = residual[kind] - (sums / np.maximum(counts, 1))[runs]
            step_layouts, step_bands = run_layouts[runs], bands[kind]

            def spread(steps: np.ndarray) -> np.ndarray:
                if prefix:  # a run has few prefill steps: pooled
                    return np.quantile(within[steps], NOISE_LEVELS)
                values, owners = within[steps], runs[steps]
                per_run = [np.quantile(values[owners == r], NOISE_LEVELS)
                           for r in np.flatnonzero(np.bincount(owners) >= MIN_RUN_STEPS)]
                if len(per_run) < MIN_SPREAD_RUNS:
                    return np.quantile(values, NOISE_LEVELS)
                return np.mean(per_run, axis=0)

            def keep(key: str, steps: np.ndarray, min_runs: int = MIN_JITTER_RUNS) -> None:
                if len(np.unique(runs[steps])) < min_runs:
                    return
                noise[key] = spread(steps)
                for band in np.unique(step_bands[steps]):
                    mine = steps & (step_bands == band)
                    if mine.sum() >= MIN_JITTER_STEPS and len(np.unique(runs[mine])) >= MIN_JITTER_RUNS:
                        noise[f"{key}@{band}"] = spread(mine)

            every = np.ones(len(runs), dtype=bool)
            keep(f"{prefix}all", every, min_runs=1)
            widths = [("", every)] + ([] if prefix else [(":wide", wide[kind])])
            for name in np.unique(run_layouts):
                for suffix, width in widths:
                    keep(f"{prefix}{name}{suffix}", (step_layouts == name) & width)
                    if prefix or not replicated[run_layouts == name].any():
                        continue
                    for state, steps in (("busy", busy[kind]), ("alone", ~busy[kind])):
                        keep(f"{prefix}{name}/{state}{suffix}", (step_layouts == name) & steps & width)
        return noise

    def jitter_quantiles(self, layout: str, busy: bool | None = None,
                         band: int | None = None, wide: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(decode, prefill) log-quantiles of step jitter for a process layout: its own where it
        had enough runs, else all runs'; a model saved before prefill jitter was kept apart
        replays its one distribution for both. `busy` True or False: for steps taken while
        other replicas work, or alone, where the layout had enough runs of such steps. `band`
        (`duration_band`): for steps of that typical duration, where there were enough. `wide`:
        for decode steps of `WIDE_BATCH` sequences or more, where there were enough."""
        if self.noise_ is None:
            raise RuntimeError("StepTimeModel has no jitter (fit it with calibrate, or load one)")
        decode_keys = [layout, "all"]
        if busy is not None:
            decode_keys.insert(0, f"{layout}/{'busy' if busy else 'alone'}")
        prefill_keys = [f"prefill/{key}" for key in decode_keys]
        if wide:
            decode_keys = [f"{key}:wide" for key in decode_keys[:-1]] + decode_keys
        decode = self._most_specific(decode_keys, band)
        prefill = self._most_specific(prefill_keys, band)
        return decode, (decode if prefill is None else prefill)

    def _most_specific(self, keys: list[str], band: int | None) -> np.ndarray | None:
        assert self.noise_ is not None
        for key in keys:
            if band is not None and f"{key}@{band}" in self.noise_:
                return self.noise_[f"{key}@{band}"]
            if key in self.noise_:
                return self.noise_[key]
        return None

    def _fit(self, X: np.ndarray, y: np.ndarray) -> StepTimeModel:
        self.per_pass_ = True
        self.cache_bytes_ = _cache_bytes(X, y, self.random_state)
        columns = _physics_columns(X, cache_bytes=self.cache_bytes_)
        self.physics_coef_ = _physics_fit(columns, y)
        draft, weights = PHYSICS.index("draft_s"), PHYSICS.index("weights_s")
        if not columns[:, draft].any():
            # No step here ran a draft, so its coefficient is 0 by default and a draft would
            # cost only its passes' overheads. A draft pass is a small model's decode: price its
            # roofline as the target's weight reads from memory are priced.
            self.physics_coef_[draft] = self.physics_coef_[weights]
        parts = self._physics_parts(X)
        residual = np.log(y) - np.log(np.maximum(parts.sum(axis=1), 1e-7))
        booster = HistGradientBoostingRegressor(
            max_iter=self.max_iter, max_depth=self.max_depth, learning_rate=self.learning_rate,
            early_stopping=False, random_state=self.random_state)
        booster.fit(self._tree_inputs(X, parts), residual)
        self.residual_ = TreeEnsemble.from_sklearn(booster)
        return self

    def _physics_parts(self, X: np.ndarray) -> np.ndarray:
        """[n, terms]: each physics term's seconds, as fitted."""
        if self.physics_coef_ is None:
            raise RuntimeError("StepTimeModel is not fitted")
        columns = _physics_columns(np.asarray(X, dtype=float), len(self.physics_coef_), self.per_pass_,
                                   self.cache_bytes_)
        return columns * self.physics_coef_

    def predict_physics(self, X: np.ndarray) -> np.ndarray:
        """The roofline-and-overheads part alone: what carries to unmeasured hardware."""
        return np.maximum(self._physics_parts(X).sum(axis=1), 1e-7)

    def _tree_inputs(self, X: np.ndarray, parts: np.ndarray) -> np.ndarray:
        """What the trees read for steps X, whose physics terms came to `parts`."""
        if self.residual_inputs == "features":
            return X
        shares = parts / np.maximum(parts.sum(axis=1, keepdims=True), 1e-12)
        return np.column_stack([shares, np.where(_HIDDEN_FROM_TREES, 0.0, X)])

    def predict(self, X: np.ndarray, calibrated: bool = True) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        parts = self._physics_parts(X)
        base = np.maximum(parts.sum(axis=1), 1e-7)
        if not calibrated or self.residual_ is None:
            return base
        return base * np.exp(self.residual_.predict(self._tree_inputs(X, parts)))

    def predict_interval(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, low, high): the interval covers `coverage` of held-out steps."""
        mid = self.predict(X)
        return mid, mid * np.exp(self.interval_[0]), mid * np.exp(self.interval_[1])

    def _coefficients(self) -> dict[str, float]:
        """The physics coefficients by term name (a model saved before later terms has fewer)."""
        if self.physics_coef_ is None:
            raise RuntimeError("StepTimeModel is not fitted")
        return dict(zip(PHYSICS, self.physics_coef_))

    @property
    def efficiency(self) -> dict[str, float]:
        """Share of the roofline throughput each term achieves (1 / its coefficient)."""
        coef = self._coefficients()
        return {name: (1.0 / coef[name] if coef[name] > 0 else float("inf"))
                for name in (*TERMS, "weights_cached_s") if name in coef}

    @property
    def work_flops(self) -> dict[str, float]:
        """Work priced per item rather than per byte or FLOP, in FLOPs of the matmul rate: per
        int4 weight unpacked, per attention score."""
        coef = self._coefficients()
        return {name: float(coef[name]) for name in ("int4_unpack_s", "attention_scores_s") if name in coef}

    @property
    def overheads_s(self) -> dict[str, float]:
        coef = self._coefficients()
        return {name: float(coef[name]) for name in ("step", "seq", "layer_pass", "prefill_pass")
                if name in coef}

    def step_time(self, deployment: Deployment, device: Device, calibrated: bool = True,
                  seed: int | None = 0, host_slowdown: float = 1.0,
                  host_parallel_slowdown: float = 1.0) -> Callable[[StepComposition, int], float]:
        """A fast function of one step's composition, and of how many other replicas are
        working meanwhile, for one deployment (the simulator's clock) on a host running
        `host_slowdown` times its typical probe time (and `host_parallel_slowdown` times its
        typical parallel one):
        the typical time times a jitter drawn from the fitted step-to-step spread (`seed`
        None: no jitter).

        Predictions are memoised by composition, with the context rounded to 1/64 of itself:
        decode steps repeat with slowly growing contexts."""
        memo: dict[tuple[int, ...], tuple[float, int]] = {}
        jitter = None
        if seed is not None and calibrated and self.noise_ is not None:
            layout = jitter_class(deployment.data_parallel_size, deployment.tensor_parallel_size)
            replicated = deployment.data_parallel_size > 1

            def quantiles(stream: tuple[bool, bool, int, bool]) -> np.ndarray:
                prefilling, busy, band, wide = stream
                return self.jitter_quantiles(layout, busy if replicated else None, band, wide)[prefilling]

            jitter = QuasiJitter(quantiles, seed)

        def predict(c: StepComposition, busy_peers: int = 0) -> float:
            context = c.context_tokens
            key = (c.num_seqs, c.num_prefill_seqs, c.num_prefill_tokens, c.num_decode_tokens,
                   c.num_draft_tokens, context >> max(0, context.bit_length() - 6), busy_peers)
            known = memo.get(key)
            if known is None:
                row = feature_matrix(deployment, device, {
                    **{name: np.array([getattr(c, name)]) for name in COMPOSITION},
                    "busy_peers": np.array([busy_peers]), "host_slowdown": np.array([host_slowdown]),
                    "host_parallel_slowdown": np.array([host_parallel_slowdown])})
                seconds = float(self.predict(row, calibrated)[0])
                known = memo[key] = (seconds, duration_band(seconds))
            seconds, band = known
            if jitter is None:
                return seconds
            return seconds * jitter((c.num_prefill_seqs > 0, busy_peers > 0, band, c.num_seqs >= WIDE_BATCH))

        return predict

    def to_dict(self) -> dict[str, Any]:
        if self.physics_coef_ is None or self.residual_ is None:
            raise RuntimeError("StepTimeModel is not fitted")
        return {"features": list(FEATURES), "physics": list(PHYSICS),
                "physics_coef": self.physics_coef_.tolist(), "cache_bytes": self.cache_bytes_,
                "residual": self.residual_.to_dict(), "residual_inputs": self.residual_inputs,
                "interval": list(self.interval_), "coverage": self.coverage,
                "noise": None if self.noise_ is None else {k: v.tolist() for k, v in self.noise_.items()},
                "sklearn_version": sklearn.__version__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepTimeModel:
        stored = list(data.get("features", []))
        # Features are only ever appended, and a tree saved before one existed never splits on
        # it: such a model predicts as if at the feature's neutral value (idle peers, a typical
        # host moment).
        if not stored or stored != list(FEATURES[:len(stored)]):
            raise ValueError("the stored step-time model has other features than this version of "
                             "pilot computes; run `pilot fit` again")
        model = cls(coverage=float(data["coverage"]))
        model.physics_coef_ = np.array(data["physics_coef"], dtype=float)
        model.per_pass_ = "forward_passes" in stored
        model.cache_bytes_ = float(data.get("cache_bytes", 0.0))
        model.residual_ = TreeEnsemble.from_dict(data["residual"])
        model.residual_inputs = str(data.get("residual_inputs", "features"))
        if model.residual_inputs not in RESIDUAL_INPUTS:
            raise ValueError(f"residual_inputs: unknown {model.residual_inputs!r}; run `pilot fit` again")
        model.interval_ = (float(data["interval"][0]), float(data["interval"][1]))
        noise = data.get("noise")
        if isinstance(noise, list):  # saved before jitter was kept per process layout
            noise = {"all": noise}
        model.noise_ = None if noise is None else {k: np.array(v, dtype=float) for k, v in noise.items()}
        return model
