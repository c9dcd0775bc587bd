"""The plan file: what `pilot recommend` decided and why, and what `pilot serve` launches.

A plan carries the `EngineConfig` to launch under `engine:` (so `EngineConfig.from_file` reads a
plan as well as a bare config), the replicas and hardware it needs, the workload and SLOs it was
planned for, what the cost model predicts with intervals, and what it costs. `pilot schema`
prints its JSON Schema.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.config import EngineConfig
from planner.spec.slo import SLOError, parse_slos
from planner.spec.workload import Workload

if TYPE_CHECKING:
    from planner.costmodel.fit import CostModel
    from planner.search.candidate import Candidate
    from planner.search.recommend import SearchResult
    from planner.search.search import Search

PLAN_VERSION = 1
OBJECTIVES = ("cost", "throughput", "latency")


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictedMetric(_Strict):
    value: float
    low: float | None = Field(None, description="80% interval, lower end")
    high: float | None = Field(None, description="80% interval, upper end")


class PlanHardware(_Strict):
    name: str = Field(description="a spec in profiles/hardware (or `pilot hardware`)")
    kind: Literal["gpu", "cpu"]
    devices_per_replica: int = Field(gt=0, description="GPUs (tensor x data parallel) or hosts")
    total_devices: int = Field(gt=0)
    price_per_device_hour_usd: float = Field(ge=0)
    calibrated: bool = Field(description="measured by `pilot profile`, not only specified")


class PlanLoad(_Strict):
    kind: Literal["rate", "concurrency"]
    value: float = Field(gt=0, description="requests/s, or clients in flight, over all replicas")
    per_replica: float = Field(gt=0)


class PlanCost(_Strict):
    per_hour_usd: float = Field(ge=0)
    per_million_output_tokens_usd: float = Field(ge=0)
    output_tokens_per_s: float = Field(ge=0, description="over all replicas")


class PlanCheck(_Strict):
    """One SLO: the target, what is predicted, and whether the plan holds it."""

    slo: str
    limit_s: float
    predicted_s: float
    upper_s: float = Field(description="what the metric stays under with probability `level`: "
                                       "what the plan is held to")
    level: float = Field(0.9, gt=0, lt=1, description="the probability this SLO is held to: the "
                                                      "plan's confidence ** (1 / number of SLOs)")
    met: bool


class Plan(_Strict):
    pilot_plan: Literal[1] = PLAN_VERSION
    created_at: dt.datetime
    engine: EngineConfig
    replicas: int = Field(gt=0, description="independent copies of `engine`, requests split evenly")
    hardware: PlanHardware
    workload: Workload
    load: PlanLoad
    slos: list[str] = Field(min_length=1)
    objective: Literal["cost", "throughput", "latency"] = "cost"
    confidence: float = Field(0.8, gt=0, lt=1, description="the chance of meeting every SLO it was "
                                                          "planned for")
    feasible: bool = Field(description="every SLO, the rate and the memory fit are predicted to hold")
    chance: float | None = Field(None, ge=0, le=1, description="the estimated chance it meets every "
                                                              "SLO when launched (the cost model's "
                                                              "held-out errors)")
    binding: str | None = Field(None, description="the constraint closest to (or past) its limit")
    checks: list[PlanCheck]
    predicted: dict[str, PredictedMetric] = Field(description="per replica, in seconds and tokens/s")
    cost: PlanCost
    acceptance_rate: float | None = Field(None, description="measured draft acceptance used")
    quality: dict[str, Any] | None = Field(None, description="with --max-quality-loss: the measured "
                                           "perplexity cost of the plan's weight quantization")
    basis: str = Field("", description="what the predictions are for and rest on: the engine that "
                                       "serves the plan, the hardware, and what was measured")
    predictions_for: Literal["client", "engine"] = Field(
        "engine", description="client: what a client of the launched server reads over HTTP (the "
                              "server's delays measured in served runs); engine: the engine's own "
                              "timings, without what serving adds")
    serve_with: Literal["pilot", "vllm", "sglang"] = Field(
        "pilot", description="the engine the predictions are for: `pilot serve`, or the command "
                             "under launch (GPU plans are priced from that engine's kernels)")
    cost_model: dict[str, Any] = Field(default_factory=dict, description="id and data version")
    study: str | None = Field(None, description="the Optuna study in the store (optuna-dashboard)")
    launch: dict[str, str] = Field(default_factory=dict,
                                   description="equivalent launch commands for other engines")
    notes: list[str] = Field(default_factory=list)

    @field_validator("slos")
    @classmethod
    def _parsable(cls, slos: list[str]) -> list[str]:
        try:
            parse_slos(",".join(slos))
        except SLOError as err:
            raise ValueError(str(err)) from None
        return slos

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, width=100)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as err:
            raise PlanError(f"{path}: not valid YAML/JSON ({err})") from None
        if not isinstance(data, dict):
            raise PlanError(f"{path}: expected a mapping of plan fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            # A missing field's "input" is the whole enclosing mapping: not worth echoing.
            problems = "; ".join(
                (f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                 + ("" if e["type"] == "missing" else f" (got {e.get('input')!r})"))[:300]
                for e in err.errors()[:3])
            raise PlanError(f"{path}: {problems}") from None


def schema(kind: str = "plan") -> dict[str, Any]:
    """JSON Schema of a plan, an engine config or a workload file."""
    models = {"plan": Plan, "engine": EngineConfig, "workload": Workload}
    if kind not in models:
        raise PlanError(f"schema: unknown kind {kind!r}; choose from {', '.join(models)}")
    return models[kind].model_json_schema()


def make_plan(result: SearchResult, search: Search, cost_model: CostModel,
              candidate: Candidate | None = None) -> Plan:
    """The plan file of a search's choice, or of another `candidate` it scored."""
    from planner.search.launch_args import as_shell, export_notes, sglang_args, vllm_args
    from planner.search.search import slo_bound

    best: Candidate = candidate if candidate is not None else result.best
    req = search.requirement
    prediction = best.prediction
    checks, predicted = [], {}
    if prediction is not None:
        for slo in req.slos:
            value = prediction.metrics[slo.key]
            upper = slo_bound(prediction, slo.key, cost_model, req.slo_level)
            checks.append(PlanCheck(slo=str(slo), limit_s=slo.limit_s, predicted_s=value,
                                    upper_s=upper, level=req.slo_level, met=upper <= slo.limit_s))
        keys = list(dict.fromkeys([*prediction.intervals, *(s.key for s in req.slos),
                                   "e2e_p50", "tpot_p50", "request_rate"]))
        for key in keys:
            low, high = prediction.intervals.get(key, (None, None))
            predicted[key] = PredictedMetric(value=prediction.metrics[key], low=low, high=high)
    notes = [*result.notes, *(prediction.notes if prediction else [])]
    if not result.feasible:
        notes.insert(0, f"no configuration tried meets every target; this is the one most likely to, and "
                        f"{best.binding} binds")
    launch = {"vllm": as_shell(vllm_args(best.config)), "sglang": as_shell(sglang_args(best.config))}
    notes += [f"launch: {n}" for n in export_notes(best.config)]
    return Plan(
        created_at=dt.datetime.now(dt.timezone.utc), engine=best.config, replicas=best.replicas,
        hardware=PlanHardware(name=best.hardware.name, kind=best.hardware.kind,
                              devices_per_replica=best.devices_per_replica,
                              total_devices=best.total_devices,
                              price_per_device_hour_usd=best.hardware.price_per_hour_usd,
                              calibrated=bool(prediction and prediction.calibrated)),
        workload=search.workload,
        load=PlanLoad(kind=req.load_kind, value=req.load_value, per_replica=best.per_replica_load or req.load_value),
        slos=[str(s) for s in req.slos], objective=req.objective, confidence=req.confidence,
        feasible=best.feasible, chance=best.slo_chance if prediction is not None else None,
        binding=best.binding, checks=checks, predicted=predicted,
        cost=PlanCost(per_hour_usd=best.cost_per_hour,
                      per_million_output_tokens_usd=(best.cost_per_million
                                                     if best.cost_per_million != float("inf") else 0.0),
                      output_tokens_per_s=best.output_tokens_per_s),
        acceptance_rate=search.acceptance_rate if best.config.num_speculative_tokens else None,
        quality=_quality(search, best.config),
        basis=prediction.basis if prediction is not None else "",
        predictions_for=prediction.predictions_for if prediction is not None else "engine",
        serve_with=search.backend if best.hardware.kind == "gpu" else "pilot",
        cost_model={"id": cost_model.id, "data_version": cost_model.data_version},
        study=result.study_name, launch=launch, notes=notes)


def _quality(search: Search, config: EngineConfig) -> dict[str, Any] | None:
    if search.quality is None:
        return None
    measured = search.quality.of(config) if config.quantization else None
    if measured is None:
        return {"scheme": "none", "perplexity_loss": 0.0, "max_loss": search.quality.max_loss}
    return {"scheme": measured.scheme, "perplexity_loss": round(measured.loss, 5),
            "perplexity": round(measured.perplexity, 4),
            "reference_perplexity": round(measured.reference_perplexity, 4),
            "max_loss": search.quality.max_loss,
            "measured_on": f"{measured.tokens} tokens of held-out ShareGPT replies, float32 activations"}
