"""How far the host's own noise keeps any model from the measurements it is judged by.

A perfect model of the engine would still err against measurements on a shared machine: one run
strays from the next. These floors say by how much, so the fit report's errors read against
what this host allows rather than against zero.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from planner.costmodel.fit_data import METRICS

DRAWS = 200  # re-drawn sets of repeats per measurement


def _summary(apes: list[float] | np.ndarray) -> dict[str, float]:
    return {"median_ape": float(np.median(apes)), "p90_ape": float(np.quantile(apes, 0.9))}


def noise_floor(measured: np.ndarray, groups: np.ndarray) -> dict[str, Any] | None:
    """How far one run strays from the median of its repeats' other runs, per metric: the error
    a perfect model would still show against single runs on this machine. None without repeats."""
    apes: dict[str, list[float]] = {m: [] for m in METRICS}
    sizes = np.bincount(groups)
    for i, g in enumerate(groups):
        if sizes[g] < 2:
            continue
        others = np.median(measured[(groups == g) & (np.arange(len(groups)) != i)], axis=0)
        for j, m in enumerate(METRICS):
            if measured[i, j] > 0 and others[j] > 0:
                apes[m].append(abs(measured[i, j] / others[j] - 1))
    every = [a for values in apes.values() for a in values]
    if not every:
        return None
    return {"measurements": int((sizes >= 2).sum()), "runs": int(sizes[sizes >= 2].sum()),
            "metrics": {m: _summary(a) for m, a in apes.items() if a}, "overall": _summary(every)}


def median_noise_floor(measured: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict[str, Any] | None:
    """How far the median of a measurement's repeats strays from what its configuration
    typically does, per metric: the error a perfect model would still show against the medians
    the fit report judges by. None without repeats.

    Each repeated measurement's runs are drawn again, as many as it has, from the pooled spread
    of runs about their measurement's mean log (widened by n / (n - 1) for the mean's own share,
    and centred on its median, the typical value a model predicts). Pooled because three
    repeats say little about their own spread; that assumes every configuration is as noisy as
    the typical one, which spreads the tails of the noisiest over all."""
    sizes = np.bincount(groups)
    members = [np.flatnonzero(groups == g) for g in np.flatnonzero(sizes >= 2)]
    if not members:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.where(measured > 0, measured, np.nan))
    rng = np.random.default_rng(seed)
    counts = sizes[sizes >= 2]
    apes: dict[str, np.ndarray] = {}
    for j, metric in enumerate(METRICS):
        deviations = []
        for runs in members:
            values = logs[runs, j]
            values = values[np.isfinite(values)]
            if len(values) >= 2:
                scale = np.sqrt(len(values) / (len(values) - 1))
                deviations.append((values - values.mean()) * scale)
        if not deviations:
            continue
        pool = np.concatenate(deviations)
        pool -= np.median(pool)
        medians = [np.median(rng.choice(pool, size=(DRAWS, n)), axis=1) for n in counts]
        apes[metric] = np.abs(np.expm1(np.concatenate(medians)))
    if not apes:
        return None
    return {"measurements": int(len(counts)), "draws": DRAWS,
            "metrics": {m: _summary(a) for m, a in apes.items()},
            "overall": _summary(np.concatenate(list(apes.values())))}


def sitting_noise_floor(measured: np.ndarray, groups: np.ndarray, sittings: np.ndarray,
                        seed: int = 0) -> dict[str, Any] | None:
    """How far the median of a measurement's runs in one sitting strays from the median of its
    runs in another (`pilot bench fit --sittings`, `--again`), per metric: the error a perfect
    model would show against one sitting's median. A sitting of a single run is paired only with
    others of a single run, and sittings of two runs or more with each other (a median of three
    against one run would mix two floors); a negative sitting is a run taken outside any
    campaign, and is left out. None without a measurement in two sittings.

    Unlike `median_noise_floor`, this needs no assumption about the spread: repeats back to back
    share the host's spell of the moment, which their own spread cannot show. If each sitting's
    median strays from the typical value by e (independently), two medians differ by about
    sqrt(2) times e, so the log of their ratio over sqrt(2) is a draw of e (taken with either
    sign, as the spell may slow the run or speed it).

    `medians_of` says what judging by the median of k sittings would leave (k draws of e, their
    median), assuming sittings independent; `judged_by` is that floor at the number of sittings
    the paired measurements typically have, the floor of the truth the fit report judges by."""
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    pairs, counts = 0, []
    for g in np.unique(groups):
        mine = groups == g
        by_size: dict[int, list[np.ndarray]] = {}
        for s in np.unique(sittings[mine & (sittings >= 0)]):
            runs = measured[mine & (sittings == s)]
            by_size.setdefault(min(len(runs), 2), []).append(np.median(runs, axis=0))
        for medians in by_size.values():
            if len(medians) >= 2:
                counts.append(len(medians))
            for a, b in itertools.combinations(medians, 2):
                pairs += 1
                for j, m in enumerate(METRICS):
                    if a[j] > 0 and b[j] > 0:
                        e = float(np.log(a[j] / b[j]) / np.sqrt(2))
                        draws[m] += [e, -e]
    drawn = {m: np.array(e) for m, e in draws.items() if e}
    if not drawn:
        return None
    rng = np.random.default_rng(seed)

    def floor(k: int) -> dict[str, Any]:
        apes = {m: np.abs(np.expm1(e if k == 1 else np.median(rng.choice(e, size=(DRAWS * 10, k)), axis=1)))
                for m, e in drawn.items()}
        return {"metrics": {m: _summary(a) for m, a in apes.items()},
                "overall": _summary(np.concatenate(list(apes.values())))}

    typical = int(np.median(counts))
    return {"pairs": pairs, "measurements": len(counts), **floor(1),
            "medians_of": {str(k): floor(k)["overall"] for k in (3, 5)},
            "judged_by": {"sittings": typical, **floor(typical)["overall"]}}
