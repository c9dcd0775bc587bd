"""What a deployment will do: an engine configuration on some hardware under a workload, run
through the simulator with the fitted cost model, with intervals and a word on how calibrated.

On hardware the store has measurements of, the full model applies. On hardware known only by its
spec sheet (profiles/hardware/*.yaml), the roofline part applies with the efficiency factors and
overheads learned on measured hardware, and the prediction says it is uncalibrated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import EngineConfig
from engine.data_parallel import replica_configs
from engine.model_config import ModelConfig
from engine.model_runner import num_kv_blocks
from engine.scheduler import SchedulerConfig
from planner import hardware as hw
from planner.cost_model import CostModel
from planner.fit_data import METRICS, device_for, spec_rates
from planner.roofline import Deployment, ModelShape
from planner.simulator import SimRequest, SimulationResult, Simulator
from planner.slo import SLO
from planner.store import fingerprint
from planner.workload import ClosedLoopArrival, PoissonArrival, Workload

@dataclass
class Prediction:
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # METRICS only
    calibrated: bool  # the hardware was measured, not only specified
    seen_model: bool  # the store has runs of this model
    num_kv_blocks: int
    goodput: float | None = None
    notes: list[str] = field(default_factory=list)


def workload_requests(workload: Workload, vocab_size: int, load_kind: str | None = None,
                      load_value: float | None = None) -> tuple[list[SimRequest], int | None]:
    """The workload's requests as `planner.load.run_load` sends them, and the concurrency for a
    closed loop (None for an open one). `load_kind` overrides the workload's own arrivals."""
    specs = workload.sample()
    rng = np.random.default_rng(workload.seed)
    prompts = [tuple(workload.prompt_token_ids(s, vocab_size, rng)) for s in specs]
    if load_kind is None:
        if isinstance(workload.arrival, ClosedLoopArrival):
            load_kind, load_value = "concurrency", workload.arrival.concurrency
        else:
            times = [float(s.arrival_time or 0.0) for s in specs]
            return [SimRequest(p, s.output_tokens, t) for p, s, t in zip(prompts, specs, times)], None
    if load_value is None or load_value <= 0:
        raise ValueError(f"{load_kind}: must be > 0, got {load_value!r}")
    if load_kind == "concurrency":
        return [SimRequest(p, s.output_tokens) for p, s in zip(prompts, specs)], int(load_value)
    if load_kind != "rate":
        raise ValueError(f"load_kind must be 'concurrency' or 'rate', got {load_kind!r}")
    offsets = PoissonArrival(rate=load_value).arrival_times(len(specs), rng)
    return [SimRequest(p, s.output_tokens, float(t)) for p, s, t in zip(prompts, specs, offsets)], None


def _kv_blocks(config: EngineConfig, deployment: Deployment, rates: dict[str, Any],
               memory_gb: float | None, max_len: int) -> int:
    target, draft = deployment.target, deployment.draft
    values = target.kv_values_per_token // deployment.tensor_parallel_size
    values += draft.kv_values_per_token if draft is not None else 0
    bytes_per_block = values * config.block_size * deployment.activation_bytes
    if rates["kind"] == "gpu":
        total = int((memory_gb or 0) * 1e9)
        free = total - int(deployment.weight_bytes + deployment.draft_weight_bytes)
        return num_kv_blocks(config, bytes_per_block, max_len, "cuda", free, total)
    memory = int((memory_gb or 8) * 1e9)
    if config.data_parallel_size > 1:
        # Each replica sizes its own cache, as the engine starts it.
        config = replica_configs(config, host_memory=memory)[0]
    return num_kv_blocks(config, bytes_per_block, max_len, "cpu", memory)


def predict(model: CostModel, config: EngineConfig, hardware: str | hw.HardwareSpec,
            workload: Workload, load_kind: str | None = None, load_value: float | None = None,
            acceptance_rate: float | None = None, slos: list[SLO] | None = None,
            memory_gb: float | None = None, seed: int = 0) -> Prediction:
    """Simulate `config` serving `workload` on `hardware` (a spec name or spec)."""
    spec_name = hardware if isinstance(hardware, str) else hardware.name
    calibrated = spec_name in model.hardware
    if calibrated:
        rates = model.hardware[spec_name]
    else:
        spec = hardware if isinstance(hardware, hw.HardwareSpec) else hw.get_spec(hardware)
        rates, memory_gb = spec_rates(spec), memory_gb or spec.memory_gb
    cfg = ModelConfig.from_dir(config.model)
    draft = (ModelShape.from_dir(config.speculative_model) if config.speculative_model else None)
    deployment = Deployment.from_engine_config(config.model_dump(), ModelShape.from_config(cfg), draft)
    device = device_for(rates, deployment)
    notes = [] if calibrated else [f"{spec_name} has no measurements: roofline with efficiencies "
                                   "learned on measured hardware (uncalibrated)"]
    max_len = config.max_model_len or cfg.max_position_embeddings
    blocks = _kv_blocks(config, deployment, rates, memory_gb, max_len)
    max_len = min(max_len, blocks * config.block_size)
    k = config.num_speculative_tokens or 0
    if k and acceptance_rate is None:
        raise ValueError("acceptance_rate: required with a speculative_model (measure the pair with "
                         "`pilot profile --draft`)")
    simulator = Simulator(model.step_model.step_time(deployment, device, calibrated),
                          SchedulerConfig.for_engine(config, max_len), blocks, config.block_size,
                          config.enable_prefix_caching, config.data_parallel_size, k,
                          acceptance_rate if k else None, seed)
    requests, concurrency = workload_requests(workload, cfg.vocab_size, load_kind, load_value)
    result: SimulationResult = simulator.run(requests, concurrency)
    metrics = result.metrics()
    seen = fingerprint(cfg.raw) in model.models
    intervals = {m: model.interval(m, metrics[m], seen_model=seen) for m in METRICS}
    if not seen:
        notes.append("model not in the store: intervals from leave-one-model-out errors")
    return Prediction(metrics, intervals, calibrated, seen, blocks,
                      result.goodput(slos) if slos else None, notes)
