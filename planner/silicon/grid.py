"""Interpolation in measured kernel tables: between measured shapes in log space (latency grows
as a power of each dimension, so log-log is close to linear), and past the largest measured
shape at the measured efficiency (time in proportion to the work), flagged as extrapolated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# (x, y) -> how much work a kernel of that shape does, in any unit: extrapolation keeps
# latency / work at its value on the nearest measured shape.
Work = Callable[[float, float], float]


def _bracket(axis: np.ndarray, value: float) -> tuple[int, int, float]:
    """Indices of the grid points around `value` (clamped to the axis) and the weight of the upper
    one, in log space."""
    if value <= axis[0]:
        return 0, 0, 0.0
    if value >= axis[-1]:
        last = len(axis) - 1
        return last, last, 0.0
    hi = int(np.searchsorted(axis, value))
    lo = hi - 1
    weight = (np.log(value) - np.log(axis[lo])) / (np.log(axis[hi]) - np.log(axis[lo]))
    return lo, hi, float(weight)


@dataclass
class Curve:
    """Latency against one dimension (m of a GEMM of fixed n and k, say), in seconds."""

    xs: np.ndarray  # increasing
    seconds: np.ndarray

    def __post_init__(self) -> None:
        keep = np.isfinite(self.seconds) & (self.seconds > 0)
        self.xs, self.seconds = self.xs[keep], self.seconds[keep]
        if not len(self.xs):
            raise ValueError("a curve needs at least one measured point")
        self._log_x, self._log_s = np.log(self.xs), np.log(self.seconds)

    @property
    def largest(self) -> float:
        return float(self.xs[-1])

    def __call__(self, x: float) -> float:
        """Below the smallest shape the smallest one's time (a kernel launch does not get
        cheaper); above the largest, its time per unit of x."""
        if x > self.xs[-1]:
            return float(self.seconds[-1] * x / self.xs[-1])
        return float(np.exp(np.interp(np.log(max(x, self.xs[0])), self._log_x, self._log_s)))

    def many(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        inside = np.exp(np.interp(np.log(np.clip(x, self.xs[0], self.xs[-1])), self._log_x, self._log_s))
        return np.where(x > self.xs[-1], self.seconds[-1] * x / self.xs[-1], inside)


class Surface:
    """Latency over two dimensions (batch and context length of an attention kernel), measured
    on a grid that may miss cells (shapes that did not fit in memory when measured)."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, seconds: np.ndarray, work: Work) -> None:
        self.xs, self.ys, self.work = np.asarray(xs, float), np.asarray(ys, float), work
        self.seconds = np.asarray(seconds, float)  # [len(xs), len(ys)], NaN where not measured
        if not np.isfinite(self.seconds).any():
            raise ValueError("a surface needs at least one measured point")
        self._log = np.log(np.where(self.seconds > 0, self.seconds, np.nan))
        self._cache: dict[tuple[float, float], tuple[float, bool]] = {}

    @classmethod
    def from_points(cls, xs: np.ndarray, ys: np.ndarray, seconds: np.ndarray, work: Work) -> Surface:
        """From scattered (x, y, seconds) measurements; a repeated shape keeps its fastest time."""
        ux, uy = np.unique(xs), np.unique(ys)
        grid = np.full((len(ux), len(uy)), np.inf)
        np.minimum.at(grid, (np.searchsorted(ux, xs), np.searchsorted(uy, ys)), seconds)
        grid[np.isinf(grid)] = np.nan
        return cls(ux, uy, grid, work)

    def extrapolates(self, x: float, y: float) -> bool:
        """Whether (x, y) lies past the measured shapes (its time is scaled, not interpolated)."""
        return self.lookup(x, y)[1]

    def __call__(self, x: float, y: float) -> float:
        return self.lookup(x, y)[0]

    def lookup(self, x: float, y: float) -> tuple[float, bool]:
        """(seconds, whether extrapolated), cached: a simulation asks for the same shapes often."""
        key = (x, y)
        if key not in self._cache:
            if len(self._cache) > 100_000:
                self._cache.clear()
            i, _, _ = _bracket(self.xs, x)
            j, _, _ = _bracket(self.ys, y)
            outside = x > self.xs[-1] or y > self.ys[-1] or not np.isfinite(self.seconds[i:i + 2, j:j + 2]).all()
            self._cache[key] = (self._value(x, y), bool(outside))
        return self._cache[key]

    def _value(self, x: float, y: float) -> float:
        xc = min(max(x, self.xs[0]), self.xs[-1])
        yc = min(max(y, self.ys[0]), self.ys[-1])
        scale = self.work(max(x, xc), max(y, yc)) / self.work(xc, yc)
        i0, i1, wx = _bracket(self.xs, xc)
        j0, j1, wy = _bracket(self.ys, yc)
        corners = self._log[[i0, i0, i1, i1], [j0, j1, j0, j1]]
        if np.isfinite(corners).all():
            weights = np.array([(1 - wx) * (1 - wy), (1 - wx) * wy, wx * (1 - wy), wx * wy])
            return float(np.exp(weights @ corners)) * scale
        # A cell not measured: the measured shape below it doing the most work, scaled up to it.
        below = np.isfinite(self.seconds) & (self.xs[:, None] <= xc) & (self.ys[None, :] <= yc)
        if not below.any():
            below = np.isfinite(self.seconds)
        cells = np.argwhere(below)
        works = np.array([self.work(self.xs[a], self.ys[b]) for a, b in cells])
        a, b = cells[int(np.argmax(works))]
        return float(self.seconds[a, b] * self.work(xc, yc) / works.max()) * scale
