"""What the search weighs: the requirement a deployment must meet, and a candidate deployment
with its predicted metrics, constraint values and cost, ranked by the chosen objective."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine import EngineConfig
from planner.costmodel.predict import Prediction
from planner.spec import hardware as hw
from planner.spec.errors import FieldError
from planner.spec.slo import SLO

OBJECTIVES = {"cost": "minimize", "throughput": "maximize", "latency": "minimize"}


class RecommendError(FieldError):
    """Inputs the search cannot work with; the message names the field."""


@dataclass(frozen=True)
class Requirement:
    """What the deployment must do: serve this load within these SLOs."""

    slos: list[SLO]
    load_kind: str  # "rate" | "concurrency"
    load_value: float
    objective: str = "cost"
    # The chance the plan meets every SLO when launched; each of n SLOs is held to the level
    # confidence ** (1 / n), as if their errors were independent.
    confidence: float = 0.8

    def __post_init__(self) -> None:
        if self.load_kind not in ("rate", "concurrency"):
            raise RecommendError(f"kind must be 'rate' or 'concurrency', got {self.load_kind!r}")
        if not (math.isfinite(self.load_value) and self.load_value > 0):
            raise RecommendError(f"must be > 0, got {self.load_value!r}", field=self.load_kind)
        if self.objective not in OBJECTIVES:
            raise RecommendError(f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}", field="objective")
        if not self.slos:
            raise RecommendError("at least one SLO is needed, e.g. ttft_p95<=500ms", field="slo")
        if not (math.isfinite(self.confidence) and 0.0 < self.confidence < 1.0):
            raise RecommendError(f"must be between 0 and 1 (exclusive), got {self.confidence!r}", field="confidence")

    @property
    def slo_level(self) -> float:
        """The probability each SLO is held to."""
        return self.confidence ** (1 / len(self.slos))


@dataclass(frozen=True)
class QualityLimit:
    """How much perplexity a weight quantization may cost (0.02 = 2% over the unquantized
    model), and the measured costs (`planner/measure/quality.py`) it is judged by."""

    max_loss: float
    measured: list[Any]  # planner.measure.quality.Quality

    def of(self, config: EngineConfig) -> Any | None:
        """The measured quality of `config`'s quantization; None where unmeasured."""
        group = config.quantization_group_size if config.quantization == "int4" else 0
        return next((q for q in self.measured if (q.quantization, q.group_size) == (config.quantization, group)),
                    None)

    def allows(self, config: EngineConfig) -> bool:
        if config.quantization is None:
            return True
        measured = self.of(config)
        return measured is not None and measured.loss <= self.max_loss


@dataclass
class Candidate:
    """One deployment: a configuration on some hardware, replicated, and what it would do."""

    hardware: hw.HardwareSpec
    config: EngineConfig
    params: dict[str, Any]
    replicas: int = 1
    devices_per_replica: int = 1
    prediction: Prediction | None = None  # per replica
    per_replica_load: float = 0.0
    violations: dict[str, float] = field(default_factory=dict)  # <= 0 holds
    cost_per_hour: float = math.inf
    output_tokens_per_s: float = 0.0
    trial: int | None = None
    # The estimated chance every SLO holds when launched (the cost model's held-out errors,
    # SLOs taken as independent); what picks the closest plan when none is predicted feasible.
    slo_chance: float = 0.0

    @property
    def feasible(self) -> bool:
        return bool(self.violations) and all(v <= 0 for v in self.violations.values())

    @property
    def valid(self) -> bool:
        return self.violations.get("valid", 0.0) <= 0 and self.violations.get("memory", 0.0) <= 0

    @property
    def cost_per_million(self) -> float:
        if self.output_tokens_per_s <= 0:
            return math.inf
        return self.cost_per_hour / (self.output_tokens_per_s * 3600) * 1e6

    @property
    def total_devices(self) -> int:
        return self.replicas * self.devices_per_replica

    @property
    def binding(self) -> str | None:
        """The constraint nearest its limit (or furthest past it): validity and memory only
        when broken, since they hold at 0 rather than with room to spare."""
        shown = {k: v for k, v in self.violations.items() if v > 0 or k not in ("valid", "memory")}
        return max(shown, key=shown.__getitem__) if shown else None

    def slo_ratio(self, slo: SLO) -> float:
        return self.violations.get(slo.key, math.inf) + 1.0

    def score(self, objective: str, slos: list[SLO]) -> float:
        if objective == "cost":
            return self.cost_per_million
        if objective == "throughput":  # output tokens per second per device
            return self.output_tokens_per_s / max(1, self.total_devices)
        return max(self.slo_ratio(s) for s in slos)

    def describe(self, short: bool = False) -> str:
        c = self.config
        if short:
            where = (f"{self.hardware.name}x{self.total_devices}" if self.hardware.kind == "gpu"
                     else self.hardware.name + (f"x{self.replicas}" if self.replicas > 1 else ""))
            spec = f" k{c.num_speculative_tokens}" if c.num_speculative_tokens else ""
            return (f"{where} {c.quantization or 'bf16'} tp{c.tensor_parallel_size} "
                    f"dp{c.data_parallel_size} seqs{c.max_num_seqs} tok{c.max_num_batched_tokens}"
                    f"{'' if c.enable_chunked_prefill else ' nochunk'}"
                    f"{'' if c.enable_prefix_caching else ' nocache'}{spec}")
        parts = [f"{self.hardware.name} x{self.total_devices}" if self.hardware.kind == "gpu"
                 else self.hardware.name, f"replicas={self.replicas}",
                 f"quant={c.quantization or 'none'}", f"tp={c.tensor_parallel_size}",
                 f"dp={c.data_parallel_size}", f"max_num_seqs={c.max_num_seqs}",
                 f"batched_tokens={c.max_num_batched_tokens}",
                 f"chunked={'on' if c.enable_chunked_prefill else 'off'}",
                 f"prefix_cache={'on' if c.enable_prefix_caching else 'off'}"]
        if c.num_speculative_tokens:
            parts.append(f"draft k={c.num_speculative_tokens}")
        return " ".join(parts)



def improved(more: Candidate, one: Candidate) -> bool:
    return total_violation(more) < total_violation(one) * 0.98


def total_violation(candidate: Candidate) -> float:
    return sum(max(0.0, v) for v in candidate.violations.values())


def closeness(candidate: Candidate, slos: list[SLO]) -> tuple[float, float, float]:
    """A sort key, nearest feasible first: running and serving the load (violations other than
    the SLOs), then the chance of meeting every SLO, then the least total violation."""
    keys = {s.key for s in slos}
    return (sum(max(0.0, v) for k, v in candidate.violations.items() if k not in keys),
            -candidate.slo_chance, total_violation(candidate))


def closest(candidates: list[Candidate], slos: list[SLO]) -> Candidate:
    """When none is predicted feasible: the one that runs and serves the load, most likely to
    meet every SLO; then the least total violation."""
    return min(candidates, key=lambda c: closeness(c, slos))


def pareto_front(candidates: list[Candidate], slos: list[SLO]) -> list[Candidate]:
    """Feasible candidates not beaten on both cost per million tokens and the first SLO's
    predicted value (the latency axis of the cost-latency plot)."""
    feasible = [c for c in candidates if c.feasible]
    key = slos[0].key
    points = sorted(feasible, key=lambda c: (c.cost_per_million, c.prediction.metrics[key]))  # type: ignore[union-attr]
    front, best_latency = [], math.inf
    for c in points:
        latency = c.prediction.metrics[key]  # type: ignore[union-attr]
        if latency < best_latency:
            front.append(c)
            best_latency = latency
    return front


def rank(candidates: list[Candidate], requirement: Requirement) -> list[Candidate]:
    sign = -1.0 if OBJECTIVES[requirement.objective] == "maximize" else 1.0
    # Ties (a rate every single-host configuration carries costs the same on each) go to the
    # one with the most headroom under its SLOs, then to the cheaper.
    return sorted(candidates, key=lambda c: (sign * c.score(requirement.objective, requirement.slos),
                                             c.score("latency", requirement.slos), c.cost_per_million))
