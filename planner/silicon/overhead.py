"""The serving framework's time outside the measured kernels, per backend: a time per step and
per sequence in it (scheduling, input preparation, sampling, detokenization), and a time per
request before its first token (HTTP, tokenization, queueing in the front end).

Kernel tables cannot show these, so they are fitted from end-to-end measurements (the silicon
sample's rows) and saved with the rows that trained them (planner/silicon/calibration.py). Whoever judges the
predictions must hold out by model: `fit_overheads(rows_of_other_models)` then predict the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from planner.silicon.step_time import StepOverhead


@dataclass(frozen=True)
class Baseline:
    """A row predicted with no framework overhead, and what the overheads would add to it."""

    backend: str
    model: str
    measured_ttft_s: float
    measured_tpot_s: float
    ttft_s: float
    tpot_s: float
    decode_batch: float  # mean sequences per decode step
    steps_to_first_token: float  # mean engine steps from a request's arrival to its first token


@dataclass(frozen=True)
class Overheads:
    per_step_s: float = 0.0
    per_seq_s: float = 0.0
    per_request_s: float = 0.0  # added to every request's time to first token
    rows: int = 0  # end-to-end rows they were fitted on
    models: tuple[str, ...] = ()  # the models of those rows

    @property
    def step(self) -> StepOverhead:
        return StepOverhead(self.per_step_s, self.per_seq_s)


def _l1(design: np.ndarray, target: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Least absolute deviations by iteratively reweighted least squares: a few rows whose
    measurement the kernels cannot explain (a prefix-cache hit, a different benchmark) pull an
    L1 fit far less than a squared one."""
    weights = np.ones(len(target))
    coef = np.zeros(design.shape[1])
    for _ in range(iterations):
        root = np.sqrt(weights)[:, None]
        coef = np.linalg.lstsq(design * root, target * root[:, 0], rcond=None)[0]
        weights = 1.0 / np.maximum(np.abs(design @ coef - target), 1e-3)
    return coef


def fit_overheads(baselines: Sequence[Baseline]) -> Overheads:
    """Least absolute relative error: TPOT gains the per-step time and the per-sequence time
    times the decode batch; TTFT gains the per-request time and the per-step time for each step
    before the first token. Negative fits (the kernels alone already too slow) clip to zero."""
    if not baselines:
        return Overheads()
    b = list(baselines)
    m = np.array([x.measured_tpot_s for x in b])
    design = np.column_stack([np.ones(len(b)), [x.decode_batch for x in b]]) / m[:, None]
    target = (m - np.array([x.tpot_s for x in b])) / m
    per_step, per_seq = _l1(design, target)
    if per_seq < 0:  # refit the constant alone
        per_seq, per_step = 0.0, float(_l1(design[:, :1], target)[0])
    if per_step < 0:
        per_step, per_seq = 0.0, max(float(_l1(design[:, 1:], target)[0]), 0.0)
    t = np.array([x.measured_ttft_s for x in b])
    shifted = np.array([x.ttft_s + per_step * x.steps_to_first_token for x in b])
    per_request = max(float(_l1(1 / t[:, None], (t - shifted) / t)[0]), 0.0)
    return Overheads(float(per_step), float(per_seq), per_request, len(b), tuple(sorted({x.model for x in b})))


def fit_by_backend(baselines: Sequence[Baseline], exclude_model: str | None = None) -> dict[str, Overheads]:
    """One fit per backend, leaving out `exclude_model`'s rows (to predict that model honestly)."""
    out = {}
    for backend in sorted({x.backend for x in baselines}):
        train = [x for x in baselines if x.backend == backend and x.model != exclude_model]
        if train:
            out[backend] = fit_overheads(train)
    return out
