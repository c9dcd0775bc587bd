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

from engine import EngineConfig, replica_configs
from engine.model_config import ModelConfig
from engine.rules import num_kv_blocks
from engine.scheduler import SchedulerConfig
from planner.costmodel.fit import CostModel, layout_of, served_layout
from planner.costmodel.fit_data import METRICS, device_for, spec_rates
from planner.costmodel.roofline import Deployment, ModelShape
from planner.costmodel.simulator import SimRequest, SimulationResult, Simulator
from planner.spec import hardware as hw
from planner.spec.slo import SLO
from planner.spec.workload import ClosedLoopArrival, PoissonArrival, Workload
from planner.store.database import fingerprint


@dataclass
class Prediction:
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # METRICS only
    calibrated: bool  # the hardware was measured, not only specified
    seen_model: bool  # the store has runs of this model
    num_kv_blocks: int
    goodput: float | None = None
    notes: list[str] = field(default_factory=list)
    layout: str = "single"  # cost_model.layout_of the configuration: whose errors bound it
    basis: str = ""  # what the prediction is for and rests on, in words
    # Held-out errors of its own (`bound(key, value, level)`, `chance_under(key, value, limit)`),
    # where they are not the cost model's (GPU predictions from measured kernels).
    errors: Any = None
    # "client": what a client of `pilot serve` reads over HTTP; "engine": the engine's own timings.
    predictions_for: str = "engine"


def workload_requests(workload: Workload, vocab_size: int, load_kind: str | None = None,
                      load_value: float | None = None) -> tuple[list[SimRequest], int | None]:
    """The workload's requests as `planner.measure.in_process.run_load` sends them, and the concurrency for a
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


# How far past the longest measured length a workload may reach before its predictions are
# called extrapolated: a profile's sample rarely draws the very top of its length range.
LENGTH_SLACK = 1.1


def length_notes(model: CostModel, workload: Workload) -> list[str]:
    """What the workload asks well beyond the lengths the cost model was measured on
    (`CostModel.lengths`): the predictions for those requests extrapolate."""
    if not model.lengths:
        return []
    specs = workload.sample()
    asked = {"prompt_tokens": max(s.input_tokens for s in specs),
             "sequence_tokens": max(s.input_tokens + s.output_tokens for s in specs)}
    flags = {"prompt_tokens": "--isl", "sequence_tokens": "--isl and --osl"}
    notes = []
    for key, longest in asked.items():
        measured = model.lengths.get(key)
        if measured is not None and longest > LENGTH_SLACK * measured:
            what = key.replace("_", " ")
            notes.append(f"the workload has {what} up to {longest}, beyond the longest the cost model "
                         f"was measured on ({measured}): predictions extrapolate (profile with "
                         f"{flags[key]} reaching {longest}, then `pilot fit`)")
    return notes


class Predictor:
    """Predictions for one model under one workload, many configurations: what does not depend
    on the configuration (the model's shapes, the sampled requests) is read once, which is what
    lets a search score hundreds of configurations in seconds."""

    def __init__(self, model: CostModel, model_dir: str, workload: Workload,
                 draft_dir: str | None = None, seed: int = 0,
                 host_slowdowns: dict[str, float] | None = None, served: bool = False) -> None:
        self.model, self.workload, self.seed = model, workload, seed
        self.served = served  # predict what clients of `pilot serve` see, unless told otherwise
        # spec name -> how slow that (measured) host runs now against its typical moment
        # (`CostModel.host_slowdown`); hardware not named is predicted at a typical moment.
        self.host_slowdowns = dict(host_slowdowns or {})
        self.model_config = ModelConfig.from_dir(model_dir)
        self.shape = ModelShape.from_config(self.model_config)
        self.draft_shape = ModelShape.from_dir(draft_dir) if draft_dir else None
        self.seen_model = fingerprint(self.model_config.raw) in model.models
        self._requests: dict[tuple[str | None, float | None], tuple[list[SimRequest], int | None]] = {}

    def requests(self, load_kind: str | None, load_value: float | None) -> tuple[list[SimRequest], int | None]:
        key = (load_kind, load_value)
        if key not in self._requests:
            self._requests[key] = workload_requests(self.workload, self.model_config.vocab_size,
                                                    load_kind, load_value)
        return self._requests[key]

    def deployment(self, config: EngineConfig) -> Deployment:
        draft = self.draft_shape if config.speculative_model else None
        if config.speculative_model and draft is None:
            draft = ModelShape.from_dir(config.speculative_model)
        return Deployment.from_engine_config(config.model_dump(), self.shape, draft)

    def rates(self, hardware: str | hw.HardwareSpec, memory_gb: float | None = None
              ) -> tuple[dict[str, Any], float | None, bool]:
        """The hardware's rates, memory and whether it was measured (calibrated)."""
        spec_name = hardware if isinstance(hardware, str) else hardware.name
        if spec_name in self.model.hardware:
            return self.model.hardware[spec_name], memory_gb, True
        spec = hardware if isinstance(hardware, hw.HardwareSpec) else hw.get_spec(hardware)
        return spec_rates(spec), memory_gb or spec.memory_gb, False

    def kv_blocks(self, config: EngineConfig, hardware: str | hw.HardwareSpec,
                  memory_gb: float | None = None) -> int:
        """KV blocks the engine would allocate; ValueError where weights and cache do not fit."""
        rates, memory_gb, _ = self.rates(hardware, memory_gb)
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        return _kv_blocks(config, self.deployment(config), rates, memory_gb, max_len)

    def predict(self, config: EngineConfig, hardware: str | hw.HardwareSpec,
                load_kind: str | None = None, load_value: float | None = None,
                acceptance_rate: float | None = None, slos: list[SLO] | None = None,
                memory_gb: float | None = None, served: bool | None = None) -> Prediction:
        """What `config` does on `hardware`: as its clients see it through `pilot serve`
        (`served`, default the predictor's; where the store has runs measured that way), else as
        the engine in process."""
        served = self.served if served is None else served
        spec_name = hardware if isinstance(hardware, str) else hardware.name
        rates, memory_gb, calibrated = self.rates(hardware, memory_gb)
        deployment = self.deployment(config)
        device = device_for(rates, deployment)
        notes = [] if calibrated else [f"{spec_name} has no measurements: roofline with efficiencies "
                                       "learned on measured hardware (uncalibrated)"]
        basis = (f"pilot engine on {spec_name}, profiled here" if calibrated else
                 f"pilot engine on {spec_name}: spec-sheet estimate, roofline with efficiencies learned on "
                 f"{', '.join(sorted(self.model.hardware)) or 'measured hardware'} (uncalibrated)")
        delivery = self.model.delivery if served and calibrated and self.model.delivery.is_fitted else None
        if delivery is not None:
            basis += (f"; as clients of `pilot serve` see it (the server's delays from "
                      f"{self.model.delivery.num_runs} served runs)")
        elif served:
            basis += "; the engine in process (no run measured through `pilot serve` to add its delays)"
            notes.append("no run was measured through `pilot serve`: the predictions leave out what "
                         "serving adds (profile with --via http, then `pilot fit`)")
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        blocks = _kv_blocks(config, deployment, rates, memory_gb, max_len)
        max_len = min(max_len, blocks * config.block_size)
        k = config.num_speculative_tokens or 0
        if k and acceptance_rate is None:
            raise ValueError("acceptance_rate: required with a speculative_model (measure the pair "
                             "with `pilot profile --draft`)")
        slowdown = self.host_slowdowns.get(spec_name, 1.0) if calibrated else 1.0
        step_time = self.model.step_model.step_time(deployment, device, calibrated,
                                                    host_slowdown=slowdown, served=delivery is not None)
        simulator = Simulator(step_time,
                              SchedulerConfig.for_engine(config, max_len), blocks, config.block_size,
                              config.enable_prefix_caching, config.data_parallel_size, k,
                              acceptance_rate if k else None, self.seed, delivery)
        requests, concurrency = self.requests(load_kind, load_value)
        result: SimulationResult = simulator.run(requests, concurrency)
        metrics = result.metrics()
        layout = served_layout(layout_of(config.model_dump()), delivery is not None)
        intervals = {m: self.model.interval(m, metrics[m], self.seen_model, layout) for m in METRICS}
        if not self.seen_model:
            notes.append("model not in the store: intervals from leave-one-model-out errors")
        return Prediction(metrics, intervals, calibrated, self.seen_model, blocks,
                          result.goodput(slos) if slos else None, notes, layout, basis,
                          predictions_for="client" if delivery is not None else "engine")


def predict(model: CostModel, config: EngineConfig, hardware: str | hw.HardwareSpec,
            workload: Workload, load_kind: str | None = None, load_value: float | None = None,
            acceptance_rate: float | None = None, slos: list[SLO] | None = None,
            memory_gb: float | None = None, seed: int = 0, served: bool = False) -> Prediction:
    """Simulate `config` serving `workload` on `hardware` (a spec name or spec)."""
    predictor = Predictor(model, config.model, workload, config.speculative_model, seed)
    return predictor.predict(config, hardware, load_kind, load_value, acceptance_rate, slos, memory_gb,
                             served)
