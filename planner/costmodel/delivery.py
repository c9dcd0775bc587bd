"""What the served path adds, fitted: the delays between the engine and its clients that runs
measured through `pilot serve` recorded (planner.measure.delivery), by how many requests the
server was streaming at once, and replayed by the simulator onto the engine's own timings.

`admit_s` delays a request's arrival at the engine; `first_s` delays the moment its client reads
its first token, and `gap_s` stretches (or, for tokens read together, shrinks) each later gap
(runs measured before `gap_s` was kept delay each later token by its own `token_s` draw).
The server's work grows with the requests it holds (its clients' connections, streaming or
waiting), so each kind's quantiles are kept per band of the run's mean requests in flight
(powers of two) and interpolated between bands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from planner.measure.delivery import KINDS, LEVELS

if TYPE_CHECKING:
    from planner.costmodel.fit_data import RunData


def width_band(width: float) -> int:
    return int(round(np.log2(max(1.0, width))))


@dataclass
class DeliveryModel:
    # kind -> band -> quantiles at LEVELS: the median over the runs in that band of their own
    # quantiles (one run with a stall in it does not set the tail)
    bands: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    num_runs: int = 0
    _memo: dict[float, dict[str, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def fit(self, runs: list[RunData]) -> DeliveryModel:
        """From the served runs among `runs` (those with a delivery record)."""
        served = [r for r in runs if r.delivery]
        self.num_runs = len(served)
        self.bands, self._memo = {}, {}
        for kind in KINDS:
            by_band: dict[int, list[list[float]]] = {}
            for run in served:
                values = run.delivery.get(kind)
                if values and len(values) == len(LEVELS):
                    by_band.setdefault(width_band(run.mean_in_flight), []).append(values)
            if by_band:
                self.bands[kind] = {b: np.median(v, axis=0).tolist() for b, v in sorted(by_band.items())}
        return self

    @property
    def is_fitted(self) -> bool:
        return "first_s" in self.bands

    def quantiles(self, kind: str, width: float) -> np.ndarray:
        """`kind`'s quantiles at `LEVELS` for a server holding `width` requests at once,
        interpolated in log2(width) between the measured bands (the nearest beyond them); zeros
        for a kind never measured."""
        bands = self.bands.get(kind)
        if not bands:
            return np.zeros(len(LEVELS))
        keys = sorted(bands)
        x = float(np.clip(np.log2(max(1.0, width)), keys[0], keys[-1]))
        j = max(0, min(int(np.searchsorted(keys, x, side="right")) - 1, len(keys) - 2))
        if len(keys) == 1:
            return np.asarray(bands[keys[0]])
        t = (x - keys[j]) / (keys[j + 1] - keys[j])
        return (1 - t) * np.asarray(bands[keys[j]]) + t * np.asarray(bands[keys[j + 1]])

    def sampler(self, width: float, rng: np.random.Generator) -> DelaySampler:
        key = round(width, 1)  # the simulator asks at every arrival: memoised by width
        if key not in self._memo:
            self._memo[key] = {kind: self.quantiles(kind, width) for kind in KINDS}
        return DelaySampler(self._memo[key], rng)

    def to_dict(self) -> dict[str, Any]:
        return {"bands": {k: {str(b): v for b, v in d.items()} for k, d in self.bands.items()},
                "num_runs": self.num_runs}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DeliveryModel:
        data = data or {}
        bands = {k: {int(b): list(v) for b, v in d.items()} for k, d in data.get("bands", {}).items()}
        return cls(bands, int(data.get("num_runs", 0)))


class DelaySampler:
    """Draws delays of each kind from fixed quantiles."""

    def __init__(self, quantiles: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        self.quantiles, self.rng = quantiles, rng
        self.by_gaps = bool(np.any(quantiles.get("gap_s", 0.0)))

    def __call__(self, kind: str, size: int | None = None) -> Any:
        u = self.rng.random(size)
        return np.interp(u, LEVELS, self.quantiles[kind])

    def client_times(self, token_times: list[float]) -> list[float]:
        """When a client reads tokens the engine produced at `token_times`: the first after its
        delay, each later one after the engine's gap stretched by a measured `gap_s` (never
        before the one it follows)."""
        if not token_times:
            return []
        times = np.asarray(token_times, dtype=float)
        if not self.by_gaps:
            delays = np.r_[self("first_s"), self("token_s", len(times) - 1)]
            return np.maximum.accumulate(times + delays).tolist()
        gaps = np.maximum(0.0, np.diff(times) + self("gap_s", len(times) - 1))
        return (times[0] + max(0.0, float(self("first_s"))) + np.r_[0.0, np.cumsum(gaps)]).tolist()
