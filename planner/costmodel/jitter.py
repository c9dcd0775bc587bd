"""Step-to-step jitter: how a step's time strays from its typical one, fitted per kind of step
(`fit_jitter`) and replayed by the simulator (`QuasiJitter`), which sets latency tails."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Hashable

import numpy as np

from planner.costmodel.features import FEATURES

NOISE_LEVELS = np.linspace(0.005, 0.995, 100)
MIN_JITTER_RUNS = 10  # a process layout with fewer runs replays the jitter of all runs
MIN_JITTER_STEPS = 200  # and a duration band with fewer steps, its layout's whole spread
# Steps are also kept apart by their typical duration ("<key>@<band>", bands split at these
# seconds): a stall is a time the OS takes, not a share of the step, so short steps stray further.
DURATION_BANDS_S = (0.25e-3, 0.5e-3, 1e-3, 2e-3, 4e-3)
# Decode steps of this many sequences or more keep their own jitter ("<key>:wide"): wide steps
# stall less than narrow ones, and one stall delays every sequence's token at once.
WIDE_BATCH = 8
# A decode spread is the average of its runs' own quantiles (runs with this many steps in it,
# where there are enough such runs), not the quantiles of their steps pooled.
MIN_RUN_STEPS, MIN_SPREAD_RUNS = 20, 5


def duration_band(seconds: float) -> int:
    return bisect_left(DURATION_BANDS_S, seconds)


def jitter_class(data_parallel_size: float, tensor_parallel_size: float) -> str:
    """Which step-to-step jitter a deployment replays: by how its processes share the machine."""
    return f"dp{int(data_parallel_size)}-tp{int(tensor_parallel_size)}"


def fit_jitter(residual: np.ndarray, groups: np.ndarray, X: np.ndarray,
            typical: np.ndarray) -> dict[str, np.ndarray]:
    """Residuals less their run's mean: what varies from step to step, not run to run.

    Kept for all runs, per process layout with enough runs ("<layout>"), apart for steps
    that prefill ("prefill/<layout>": long steps, where a stall is a smaller share), for
    data-parallel decode steps by whether other replicas were working ("/busy", "/alone"),
    for decode steps of `WIDE_BATCH` sequences or more (":wide"), and per duration band
    ("@<band>"), each where it has enough steps and runs. Centred on the mean, as the
    regression predicts a step's mean log-time; a decode spread averages its runs' own
    quantiles, since a run's ITL tail is its own and runs differ in how often they stall."""
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


class QuasiJitter:
    """Step-to-step jitter factors drawn from fitted log-quantiles (`StepTimeModel.noise_`), one
    randomly shifted golden-ratio sequence per stream (a kind of step), whose quantiles
    `quantiles(stream)` gives when the stream is first drawn from.

    Not independent draws: a run's TTFT p50 rests on a handful of prefill steps, and a few iid
    draws stray far from the jitter's median. Consecutive terms of this sequence spread evenly
    over the quantiles, so the few steps a percentile rests on see the distribution's shape."""

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
