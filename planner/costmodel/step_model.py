"""`StepTimeModel`: how long one engine step takes, from its composition and the configuration.

Physics first: the roofline terms of the step (`features.PHYSICS`), plus per-step, per-sequence
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
from typing import Any, Callable, Mapping

import numpy as np
import sklearn
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression

from engine.observer import StepComposition
from planner.costmodel.features import COMPOSITION, DIRECT, FEATURES, PHYSICS, feature_matrix
from planner.costmodel.jitter import (
    WIDE_BATCH,
    QuasiJitter,
    duration_band,
    fit_jitter,
    jitter_class,
)
from planner.costmodel.roofline import TERMS, Deployment, Device
from planner.costmodel.trees import TreeEnsemble

_PHYSICS_COLUMNS = [FEATURES.index(name) for name in DIRECT]

# What the residual trees see (`StepTimeModel.residual_inputs`): each physics term's share of
# the step, then FEATURES with roofline seconds and the model's size zeroed. A correction keyed
# to shares carries to a model never fitted; one keyed to seconds or widths names its model.
RESIDUAL_INPUTS = ("shares", "features")
HOST_SPEED = ("host_slowdown", "host_parallel_slowdown")
SCHEMA = 2  # saved models name their terms and the features their trees split on
_HIDDEN_FROM_TREES = np.isin(FEATURES, (*TERMS, "int4_unpack_s", "attention_scores_s",
                                        "num_layers", "hidden_size", "resident_weight_bytes"))
# Effective cache sizes `fit` chooses from (0: no cache term), by how well the physics alone fits.
# Effective, not the datasheet's: on a shared host the processes of other tenants hold part of it.
CACHE_GRID_BYTES = (0, *(2 ** k * 2 ** 20 for k in range(8)))
# A cache term must cut the physics' mean squared log error by this share to be kept.
CACHE_MIN_GAIN = 0.02
CACHE_TIE = 0.01  # losses within this share of the best count as a tie
CACHE_FIT_ROWS = 50_000

def _physics_columns(X: np.ndarray, count: int = len(PHYSICS), per_pass: bool = True,
                     cache_bytes: float = 0.0) -> np.ndarray:
    """The first `count` PHYSICS columns (a model saved before the later ones has fewer).

    `per_pass`: the fixed overhead ("step") is paid once per forward pass, so a speculative
    step pays it k + 1 times and a model profiled without a draft prices one with a draft
    (models saved before forward passes were counted have it per step).

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
        self.noise_ = fit_jitter(np.log(y) - np.log(typical), groups, X, typical)
        return self

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
        inputs = self._tree_inputs(X, parts)
        # A slow moment of the host stretches every step alike: its readings may not interact
        # with the step's composition, so a slowdown seen on some configurations is not priced
        # as a property of them (and it can only lengthen a step).
        names = tree_input_names(self.residual_inputs, len(self.physics_coef_))
        host = [names.index(name) for name in HOST_SPEED]
        booster = HistGradientBoostingRegressor(
            max_iter=self.max_iter, max_depth=self.max_depth, learning_rate=self.learning_rate,
            early_stopping=False, random_state=self.random_state,
            interaction_cst=[host, [i for i in range(inputs.shape[1]) if i not in host]],
            monotonic_cst=[1 if i in host else 0 for i in range(inputs.shape[1])])
        booster.fit(inputs, residual)
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
                  host_parallel_slowdown: float = 1.0, served: bool = False
                  ) -> Callable[[StepComposition, int], float]:
        """A fast function of one step's composition, and of how many other replicas are
        working meanwhile, for one deployment (the simulator's clock) on a host running
        `host_slowdown` times its typical probe time (and `host_parallel_slowdown` times its
        typical parallel one), in process or `served` through `pilot serve`:
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
                    "host_parallel_slowdown": np.array([host_parallel_slowdown]),
                    "served": np.array([float(served)])})
                seconds = float(self.predict(row, calibrated)[0])
                known = memo[key] = (seconds, duration_band(seconds))
            seconds, band = known
            if jitter is None:
                return seconds
            return seconds * jitter((c.num_prefill_seqs > 0, busy_peers > 0, band, c.num_seqs >= WIDE_BATCH))

        return predict

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, by name: the physics terms' coefficients, and the feature each tree node
        splits on, so a later version computing its features in another order still reads it."""
        if self.physics_coef_ is None or self.residual_ is None:
            raise RuntimeError("StepTimeModel is not fitted")
        names = tree_input_names(self.residual_inputs, len(self.physics_coef_))
        residual = self.residual_.to_dict()
        residual["feature"] = [None if left == node else names[column] for node, (column, left)
                               in enumerate(zip(residual["feature"], residual["left"]))]
        return {"schema": SCHEMA, "features": list(FEATURES),
                "physics_coef": dict(zip(PHYSICS, self.physics_coef_.tolist())),
                "per_pass": self.per_pass_, "cache_bytes": self.cache_bytes_,
                "residual": residual, "residual_inputs": self.residual_inputs,
                "interval": list(self.interval_), "coverage": self.coverage,
                "noise": None if self.noise_ is None else {k: v.tolist() for k, v in self.noise_.items()},
                "sklearn_version": sklearn.__version__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepTimeModel:
        """A saved model: by name (`SCHEMA`), or one saved before names, whose coefficients
        follow PHYSICS and whose trees index its own list of features by position."""
        model = cls(coverage=float(data["coverage"]))
        model.residual_inputs = str(data.get("residual_inputs", "features"))
        if model.residual_inputs not in RESIDUAL_INPUTS:
            raise ValueError(f"residual_inputs: unknown {model.residual_inputs!r}; run `pilot fit` again")
        coef, residual = data["physics_coef"], dict(data["residual"])
        if isinstance(coef, Mapping):
            terms = list(coef)
            model.per_pass_ = bool(data.get("per_pass", True))
            split_on = residual["feature"]
        else:  # saved before names: positions in its own lists
            terms = list(PHYSICS[:len(coef)])
            coef = dict(zip(terms, coef))
            stored = list(data.get("features", []))
            model.per_pass_ = "forward_passes" in stored
            shares = [f"share:{t}" for t in terms] if model.residual_inputs == "shares" else []
            saved_names = shares + stored
            split_on = [None if left == node else saved_names[column] for node, (column, left)
                        in enumerate(zip(residual["feature"], residual["left"]))]
        # Terms only ever extend PHYSICS; a model saved before one predicts without it.
        if terms != list(PHYSICS[:len(terms)]):
            raise ValueError(f"the stored step-time model has physics terms {terms} that this version "
                             "of pilot does not compute; run `pilot fit` again")
        index = {name: i for i, name in enumerate(tree_input_names(model.residual_inputs, len(terms)))}
        named = {*data.get("features", []), *(name for name in split_on if name is not None)}
        unknown = sorted(name for name in named if name not in index)
        if unknown:
            raise ValueError(f"the stored step-time model reads {', '.join(unknown)}, which this "
                             "version of pilot does not compute; run `pilot fit` again")
        residual["feature"] = [0 if name is None else index[name] for name in split_on]
        model.physics_coef_ = np.array([coef[t] for t in terms], dtype=float)
        model.cache_bytes_ = float(data.get("cache_bytes", 0.0))
        model.residual_ = TreeEnsemble.from_dict(residual)
        model.interval_ = (float(data["interval"][0]), float(data["interval"][1]))
        noise = data.get("noise")
        if isinstance(noise, list):  # saved before jitter was kept per process layout
            noise = {"all": noise}
        model.noise_ = None if noise is None else {k: np.array(v, dtype=float) for k, v in noise.items()}
        return model


def tree_input_names(residual_inputs: str, terms: int) -> list[str]:
    """The names of the columns the residual trees read, for a model with `terms` physics terms:
    each term's share of the step ("share:<term>") then FEATURES, or FEATURES alone."""
    shares = [f"share:{t}" for t in PHYSICS[:terms]] if residual_inputs == "shares" else []
    return [*shares, *FEATURES]
