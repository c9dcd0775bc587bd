"""`pilot bench sim`: how fast the simulator replays a workload with a fitted cost model."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine import EngineConfig
from planner.costmodel.fit import CostModel
from planner.costmodel.predict import predict
from planner.spec.workload import Workload

TARGET_S = 1.0  # the bar: 1,000 requests well under a second


@dataclass
class SimTiming:
    scenario: str
    requests: int
    wall_s: float
    simulated_s: float
    throughput_tok_s: float


def run_sim_benchmark(model: CostModel, model_dir: str, hardware: str, num_requests: int = 1000,
                      repeats: int = 3) -> list[SimTiming]:
    """Best of `repeats` wall times for a closed loop, an open loop near saturation, and a
    capped batch with chunked prefill, each over `num_requests` requests."""
    workload = Workload.from_flags("32:256", "16:64", concurrency=16, num_requests=num_requests)
    base = EngineConfig(model=model_dir, dtype="bfloat16")
    scenarios = [
        ("closed loop, 16 in flight", base, "concurrency", 16.0),
        ("closed loop, 64 in flight", base, "concurrency", 64.0),
        ("Poisson 8 req/s, max_num_seqs 8, chunks of 256", base.model_copy(
            update={"max_num_seqs": 8, "max_num_batched_tokens": 256}), "rate", 8.0),
    ]
    out = []
    for name, config, kind, value in scenarios:
        best, prediction = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            prediction = predict(model, config, hardware, workload, kind, value)
            best = min(best, time.perf_counter() - start)
        assert prediction is not None
        tokens = prediction.metrics["throughput_tok_s"]
        out.append(SimTiming(name, num_requests, best,
                             num_requests / max(prediction.metrics["request_rate"], 1e-9), tokens))
    return out
