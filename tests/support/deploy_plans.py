"""Plans built in code for the deploy tests (tests/planner/deploy): the quickstart's CPU plan, the README's GPU plan
(Llama-3.1-8B on one H100 for vLLM), and a 70B-class plan whose replica spans two H100 nodes."""

from __future__ import annotations

import datetime as dt
from typing import Any

from engine.config import EngineConfig
from planner.search.plan import Plan, PlanCost, PlanHardware, PlanLoad, PredictedMetric
from planner.spec.workload import Workload

VLLM_BASIS = "vLLM 0.24.0 on h100-sxm, calibrated from measured kernels (aiconfigurator-core 0.12.0)"


def make_plan(engine: dict[str, Any], hardware: str = "cpu-host", kind: str = "cpu", devices: int = 1,
              replicas: int = 1, serve_with: str = "pilot", load: tuple[str, float] = ("rate", 4.0),
              e2e_p50: float | None = 1.5, basis: str = "") -> Plan:
    load_kind, per_replica = load
    predicted = {"ttft_p95": PredictedMetric(value=0.2, low=0.1, high=0.3)}
    if e2e_p50 is not None:
        predicted["e2e_p50"] = PredictedMetric(value=e2e_p50)
    arrival = ({"kind": "poisson", "rate": per_replica * replicas} if load_kind == "rate"
               else {"kind": "closed_loop", "concurrency": int(per_replica * replicas)})
    return Plan(
        created_at=dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc), engine=EngineConfig(**engine),
        replicas=replicas,
        hardware=PlanHardware(name=hardware, kind=kind, devices_per_replica=devices,
                              total_devices=devices * replicas, price_per_device_hour_usd=1.0, calibrated=True),
        workload=Workload(input_tokens={"kind": "uniform", "low": 512, "high": 2048},
                          output_tokens={"kind": "uniform", "low": 128, "high": 512}, arrival=arrival),
        load=PlanLoad(kind=load_kind, value=per_replica * replicas, per_replica=per_replica),
        slos=["ttft_p95<=500ms", "itl_p95<=50ms"], feasible=True, checks=[], predicted=predicted,
        cost=PlanCost(per_hour_usd=1.0, per_million_output_tokens_usd=1.0, output_tokens_per_s=100.0),
        serve_with=serve_with, basis=basis,
        launch={"vllm": "vllm serve x", "sglang": "python -m sglang.launch_server --model-path x"})
