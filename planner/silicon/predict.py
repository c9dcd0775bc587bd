"""GPU predictions from measured kernels, for `pilot recommend`: a configuration served by vLLM
or SGLang on a GPU type is replayed through the engine's own scheduler (set as the plan sets
the target engine) with step times from that backend's kernels measured on that GPU, the KV
cache sized as the backend sizes it, and bounds from the held-out errors of `pilot bench gpu`.

A GPU with no kernel measurements borrows those of the closest measured GPU, scaled by the two
spec sheets (bandwidth where the step is bound by memory, FLOP/s where by compute), and says so.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from engine import EngineConfig
from engine.model_config import ModelConfig
from engine.observer import StepComposition
from planner.costmodel.fit_data import METRICS
from planner.costmodel.predict import Prediction, workload_requests
from planner.costmodel.roofline import Deployment, ModelShape
from planner.costmodel.simulator import SimRequest, Simulator
from planner.silicon.calibration import GpuCalibration
from planner.silicon.memory import memory_plan
from planner.silicon.schedule import scheduler_config
from planner.silicon.step_time import KernelStepTime
from planner.silicon.tables import SYSTEMS, KernelDataError, KernelTables, package_version
from planner.spec import hardware as hw
from planner.spec.slo import SLO, RequestLatency, goodput, summarize
from planner.spec.workload import Workload

BACKEND_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "trtllm": "TensorRT-LLM"}


@functools.lru_cache(maxsize=None)
def _builtin_spec(name: str) -> hw.HardwareSpec:
    return hw.get_spec(name)


def reference_gpu(spec: hw.HardwareSpec) -> str:
    """`spec` itself where measured, else the measured GPU closest in bandwidth and FLOP/s."""
    if spec.name in SYSTEMS:
        return spec.name

    def distance(name: str) -> float:
        other = _builtin_spec(name)
        return (abs(math.log(other.memory_bandwidth_gbs / spec.memory_bandwidth_gbs))
                + abs(math.log(other.peak_tflops["bf16"] / spec.peak_tflops["bf16"])))

    return min(SYSTEMS, key=distance)


@dataclass
class KernelErrors:
    """SLO bounds of a kernel-based prediction: the held-out errors of its backend's TTFT (for
    TTFT) and TPOT (for ITL, TPOT and end-to-end latency) in `pilot bench gpu`."""

    calibration: GpuCalibration
    backend: str

    @staticmethod
    def _metric(key: str) -> str:
        return "ttft" if key.startswith("ttft") else "tpot"

    def bound(self, key: str, value: float, confidence: float) -> float:
        return self.calibration.bound(self.backend, self._metric(key), value, confidence)

    def chance_under(self, key: str, value: float, limit: float) -> float:
        return self.calibration.chance_under(self.backend, self._metric(key), value, limit)


class BorrowedStepTime:
    """A measured GPU's step time carried to an unmeasured one: scaled by the bandwidth ratio
    for the part of the step bound by memory and the FLOP/s ratio for the part bound by compute
    (the shares by the step's roofline on the measured GPU)."""

    def __init__(self, measured: KernelStepTime, deployment: Deployment, reference: hw.HardwareSpec,
                 target: hw.HardwareSpec) -> None:
        self.measured, self.deployment = measured, deployment
        key = "fp8" if deployment.quantization == "fp8" else "bf16"
        self.reference, self.target = (
            (spec.memory_bandwidth_gbs * 1e9, spec.peak_tflops.get(key, spec.peak_tflops["bf16"]) * 1e12)
            for spec in (reference, target))

    @property
    def extrapolated(self) -> bool:
        return self.measured.extrapolated

    def __call__(self, step: StepComposition, peers: int = 0) -> float:
        d, tp = self.deployment, self.deployment.tensor_parallel_size
        tokens = step.num_prefill_tokens + step.num_decode_tokens
        moved = d.weight_bytes + step.context_tokens * d.target.kv_values_per_token * d.kv_bytes / tp
        work = 2.0 * d.target.active_params * tokens / tp
        memory_s, compute_s = moved / self.reference[0], work / self.reference[1]
        share = memory_s / (memory_s + compute_s)
        ratio = share * self.reference[0] / self.target[0] + (1 - share) * self.reference[1] / self.target[1]
        return self.measured(step, peers) * ratio


@functools.lru_cache(maxsize=8)
def _draft_shape(model_dir: str) -> ModelShape:
    """A draft's shapes, read once: every scored configuration with drafts asks again."""
    return ModelShape.from_dir(model_dir)


class KernelPredictor:
    """Predictions for one model under one workload on GPUs, many configurations."""

    def __init__(self, model_dir: str, workload: Workload, backend: str = "vllm",
                 calibration: GpuCalibration | None = None, seed: int = 0,
                 backend_version: str | None = None) -> None:
        if backend not in BACKEND_NAMES:
            raise KernelDataError(f"unknown backend {backend!r}; known: {', '.join(BACKEND_NAMES)}",
                                  field="backend")
        self.backend, self.workload, self.seed = backend, workload, seed
        self.backend_version = backend_version  # None: the newest measured on each GPU
        self.calibration = calibration or GpuCalibration.load()
        self.model_config = ModelConfig.from_dir(model_dir)
        self.shape = ModelShape.from_config(self.model_config)
        self.overheads = self.calibration.backends.get(backend)
        if self.overheads is None:
            raise KernelDataError(f"no fitted overheads for {backend}; calibrated: "
                                  f"{', '.join(sorted(self.calibration.backends))}", field="backend")
        self._requests: dict[tuple[str | None, float | None], tuple[list[SimRequest], int | None]] = {}

    def requests(self, load_kind: str | None, load_value: float | None) -> tuple[list[SimRequest], int | None]:
        key = (load_kind, load_value)
        if key not in self._requests:
            self._requests[key] = workload_requests(self.workload, self.model_config.vocab_size, load_kind, load_value)
        return self._requests[key]

    def deployment(self, config: EngineConfig) -> Deployment:
        draft = _draft_shape(config.speculative_model) if config.speculative_model else None
        return Deployment.from_engine_config(config.model_dump(), self.shape, draft)

    def basis(self, spec: hw.HardwareSpec) -> str:
        """What a prediction on `spec` rests on, in words."""
        reference = reference_gpu(spec)
        tables = self.tables(reference)
        name = f"{BACKEND_NAMES[self.backend]} {tables.versions['gemm']}"
        if reference == spec.name:
            return (f"{name} on {spec.name}, calibrated from measured kernels (aiconfigurator-core "
                    f"{package_version()}); framework overheads fitted on {self.overheads.rows} "
                    f"end-to-end rows ({', '.join(self.overheads.models)})")
        return (f"{name} on {spec.name}: spec-sheet estimate, {reference}'s measured kernels scaled by "
                f"the two datasheets (uncalibrated for {spec.name})")

    def tables(self, gpu: str) -> KernelTables:
        return KernelTables.load(SYSTEMS[gpu], self.backend, self.backend_version)

    def kv_blocks(self, config: EngineConfig, spec: hw.HardwareSpec, memory_gb: float | None = None) -> int:
        """KV blocks the backend would allocate; ValueError where the weights leave no room for
        one sequence of the plan's max_model_len."""
        plan = memory_plan(self.deployment(config), memory_gb or spec.memory_gb, self.backend,
                           config.max_num_batched_tokens, config.max_num_seqs, config.gpu_memory_utilization)
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        blocks = plan.kv_tokens // config.block_size
        if blocks * config.block_size < max_len:
            raise ValueError(f"{spec.name}: {plan.weight_bytes / 2**30:.1f} GiB of weights a GPU leave "
                             f"room for {plan.kv_tokens} KV tokens, less than max_model_len={max_len}")
        return blocks

    def step_time(self, config: EngineConfig, spec: hw.HardwareSpec) -> KernelStepTime | BorrowedStepTime:
        deployment = self.deployment(config)
        reference = _builtin_spec(reference_gpu(spec))
        tables = self.tables(reference.name)
        draft = None
        if deployment.draft is not None:  # sharded like the target, as vLLM and SGLang run it
            draft_deployment = Deployment(deployment.draft, deployment.dtype, None,
                                          tensor_parallel_size=deployment.tensor_parallel_size)
            draft = KernelStepTime(tables, draft_deployment, reference.memory_bandwidth_gbs)
        measured = KernelStepTime(tables, deployment, reference.memory_bandwidth_gbs, self.overheads.step, draft)
        return measured if reference.name == spec.name else BorrowedStepTime(measured, deployment, reference, spec)

    def predict(self, config: EngineConfig, hardware: str | hw.HardwareSpec, load_kind: str | None = None,
                load_value: float | None = None, acceptance_rate: float | None = None,
                slos: list[SLO] | None = None, memory_gb: float | None = None) -> Prediction:
        spec = hardware if isinstance(hardware, hw.HardwareSpec) else _builtin_spec(hardware)
        k = config.num_speculative_tokens or 0
        if k and acceptance_rate is None:
            raise KernelDataError("required with a speculative_model (measure the pair with `pilot profile "
                                  "--draft`)", field="acceptance_rate")
        blocks = self.kv_blocks(config, spec, memory_gb)
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        step_time = self.step_time(config, spec)
        simulator = Simulator(step_time, scheduler_config(self.backend, config, max_len), blocks, config.block_size,
                              config.enable_prefix_caching, config.data_parallel_size, k,
                              acceptance_rate if k else None, self.seed)
        requests, concurrency = self.requests(load_kind, load_value)
        result = simulator.run(requests, concurrency)
        # The front end's time before the first token (HTTP, tokenization) is not a step's.
        offset = self.overheads.per_request_s
        latencies = [RequestLatency(r.ttft_s + offset, r.itl_s, r.e2e_s + offset, r.output_tokens)
                     for r in result.latencies]
        metrics: dict[str, Any] = {**result.metrics(), **summarize(latencies)}
        errors = KernelErrors(self.calibration, self.backend)
        intervals = {m: _interval(errors, m, metrics[m]) for m in METRICS}
        notes = []
        if step_time.extrapolated:
            notes.append("some steps fall outside the measured kernel shapes: scaled at the measured "
                         "efficiency of the largest")
        prediction = Prediction(metrics, intervals, reference_gpu(spec) == spec.name, True, blocks,
                                goodput(latencies, slos, result.duration_s) if slos else None, notes,
                                "kernels", basis=self.basis(spec), errors=errors)
        return prediction


def _interval(errors: KernelErrors, metric: str, value: float) -> tuple[float, float]:
    if metric == "throughput_tok_s":  # throughput moves inversely to the time per token
        low, high = errors.bound("tpot", 1.0, 0.9), errors.bound("tpot", 1.0, 0.1)
        return value / low, value / high
    return errors.bound(metric, value, 0.1), errors.bound(metric, value, 0.9)

