"""What GPU predictions rest on beyond the kernel tables: each backend's framework overheads
fitted on the silicon sample's end-to-end rows, and the errors its predictions made on rows of
models the overheads were not fitted on, which set how far a prediction is trusted (the SLO
bounds of `pilot recommend`). `pilot bench gpu --save` writes it; profiles/gpu_calibration.json
is the committed copy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from planner.silicon.overhead import Overheads
from planner.spec.files import builtin_data

BUILTIN = builtin_data("profiles") / "gpu_calibration.json"
# The levels at which held-out log(measured / predicted) errors are kept.
LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))


@dataclass
class GpuCalibration:
    backends: dict[str, Overheads]
    # backend -> "ttft" | "tpot" -> log(measured / predicted) at LEVELS, on held-out models
    errors: dict[str, dict[str, list[float]]]
    # backend -> "ttft" | "tpot" -> {"median_ape", "p90_ape", "rows"}
    accuracy: dict[str, dict[str, dict[str, float]]]
    source: str
    notes: list[str] = field(default_factory=list)

    def bound(self, backend: str, metric: str, value: float, confidence: float) -> float:
        """What `metric` ("ttft" or "tpot") stays under with probability `confidence`."""
        levels = self._levels(backend, metric)
        return value * float(np.exp(np.interp(confidence, LEVELS, levels)))

    def chance_under(self, backend: str, metric: str, value: float, limit: float) -> float:
        if not (value > 0 and limit > 0):
            return 1.0 if value <= limit else 0.0
        levels = np.maximum.accumulate(self._levels(backend, metric))
        return float(np.interp(np.log(limit / value), levels, LEVELS, left=0.0, right=1.0))

    def _levels(self, backend: str, metric: str) -> list[float]:
        errors = self.errors.get(backend) or self.errors.get("all", {})
        return errors[metric]

    def save(self, path: Path) -> None:
        data = {"source": self.source, "notes": self.notes, "errors": self.errors, "accuracy": self.accuracy,
                "backends": {k: {**asdict(v), "models": list(v.models)} for k, v in self.backends.items()}}
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path = BUILTIN) -> GpuCalibration:
        data = json.loads(Path(path).read_text())
        backends = {k: Overheads(**{**v, "models": tuple(v["models"])}) for k, v in data["backends"].items()}
        return cls(backends, data["errors"], data["accuracy"], data["source"], list(data.get("notes", [])))


def held_out_errors(measured: np.ndarray, predicted: np.ndarray) -> tuple[list[float], dict[str, float]]:
    """Quantiles of log(measured / predicted) and the absolute percentage errors' summary."""
    ratio = np.log(measured / predicted)
    ape = np.abs(predicted / measured - 1)
    return (np.quantile(ratio, LEVELS).tolist(),
            {"median_ape": float(np.median(ape)), "p90_ape": float(np.quantile(ape, 0.9)), "rows": int(len(ape))})
