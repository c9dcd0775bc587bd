"""One search's pieces: the predictors (the fitted cost model's for hardware pilot's engine
runs on, measured kernels' for GPUs), each hardware type's space, the requirement, and scoring a
point of a space: its prediction at the required load, its replicas (as many as the load needs),
and each constraint it breaks. An SLO is held not to the prediction's middle (a plan that only
meets its targets on average misses them about half the time it is launched) but to what the
metric stays under with the requirement's confidence, by the held-out errors behind the
prediction.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import numpy as np

from engine import EngineConfig
from engine.model_config import ModelConfig
from planner.costmodel.fit import CostModel
from planner.costmodel.fit_data import METRICS
from planner.costmodel.predict import Prediction, Predictor, length_notes
from planner.measure.profiler import base_config
from planner.search.candidate import Candidate, QualityLimit, RecommendError, Requirement, closest, improved
from planner.silicon.calibration import GpuCalibration
from planner.silicon.predict import KernelPredictor
from planner.silicon.tables import INSTALL, installed
from planner.spec import hardware as hw
from planner.spec.search_space import SearchSpace, SearchSpaceError, bf16_is_slower, quantizable, shardable
from planner.spec.workload import ClosedLoopArrival, PoissonArrival, Workload

SEARCH_REQUESTS = 100  # per trial; the finalists are simulated again with the whole workload
# On a GPU a step takes milliseconds, so the same requests span ten times the steps of a CPU's:
# trials replay fewer, and the finalists' confirmation replays the whole workload as everywhere.
GPU_SEARCH_REQUESTS = 50
# A replica keeps up with a rate up to this share of its capacity (requests/s with its batch
# full); past it the queue grows without bound and the SLOs only look met in a short run.
MAX_UTILISATION = 0.95
# Which interval stands in for an SLO's own when the cost model has none for that statistic.
_INTERVAL_FOR = {"ttft": "ttft_p95", "itl": "itl_p95", "tpot": "itl_p95", "e2e": "itl_p95"}


def slo_bound(prediction: Prediction, key: str, model: CostModel, level: float) -> float:
    """What `key` (e.g. "ttft_p95") stays under with probability `level`, by the held-out errors
    of the cost model (or the prediction's own, from measured kernels); a statistic the cost model
    was not judged on borrows the nearest one's."""
    if prediction.errors is not None:
        return prediction.errors.bound(key, prediction.metrics[key], level)
    return model.bound(_judged_as(key), prediction.metrics[key], level, prediction.seen_model,
                       prediction.layout)


def slo_chance(prediction: Prediction, key: str, model: CostModel, limit_s: float) -> float:
    """The chance `key` stays under `limit_s` (the inverse of `slo_bound`)."""
    if prediction.errors is not None:
        return prediction.errors.chance_under(key, prediction.metrics[key], limit_s)
    return model.chance_under(_judged_as(key), prediction.metrics[key], limit_s,
                              prediction.seen_model, prediction.layout)


def _judged_as(key: str) -> str:
    """The metric whose held-out errors stand for `key`'s: itself, or the nearest judged one."""
    return key if key in METRICS else _INTERVAL_FOR[key.split("_")[0]]


class Search:
    """The pieces of one search: the predictor, the spaces per hardware type, the requirement."""

    def __init__(self, cost_model: CostModel, model_dir: str, workload: Workload,
                 requirement: Requirement, hardware: list[str] | None = None,
                 space: SearchSpace | None = None, max_devices: int = 8,
                 draft_dir: str | None = None, acceptance_rate: float | None = None,
                 seed: int = 0, host_slowdowns: dict[str, float] | None = None, backend: str = "vllm",
                 calibration: GpuCalibration | None = None, backend_version: str | None = None,
                 quality: QualityLimit | None = None) -> None:
        self.cost_model, self.requirement, self.seed = cost_model, requirement, seed
        self.backend = backend
        self.quality = quality
        self.max_devices = max_devices
        if max_devices < 1:
            raise RecommendError(f"must be >= 1, got {max_devices}", field="max_devices")
        names = hardware or sorted(cost_model.hardware)
        if not names:
            raise RecommendError("the cost model has no measured hardware; name one", field="hardware")
        try:
            self.specs = {name: hw.get_spec(name) for name in names}
        except hw.HardwareSpecError as err:
            raise RecommendError(str(err), field="hardware") from None
        self.notes: list[str] = length_notes(cost_model, workload)
        if quality is not None:
            kept = [f"{q.scheme} ({q.loss:+.1%})" for q in quality.measured if q.loss <= quality.max_loss]
            left = [f"{q.scheme} ({q.loss:+.1%})" for q in quality.measured if q.loss > quality.max_loss]
            self.notes.append(f"quality: weight quantizations within {quality.max_loss:.1%} perplexity: "
                              f"{', '.join(kept) or 'none'}" + (f"; left out: {', '.join(left)}" if left else "")
                              + ("" if quality.measured else " (no perplexity measured for this model: "
                                 "`pilot profile` measures it)"))
        self.acceptance_rate = acceptance_rate
        self.draft_dir = draft_dir
        self.base = base_config(model_dir, workload)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.spaces = {name: self._space(spec, space) for name, spec in self.specs.items()}
        # The plan's workload carries the load it was planned for.
        arrival = (PoissonArrival(rate=requirement.load_value) if requirement.load_kind == "rate"
                   else ClosedLoopArrival(concurrency=math.ceil(requirement.load_value)))
        workload = workload.model_copy(update={"arrival": arrival})
        self.workload = workload
        search_workload = workload.model_copy(update={"num_requests": min(workload.num_requests,
                                                                           SEARCH_REQUESTS)})
        self.host_slowdowns = dict(host_slowdowns or {})
        for name, slowdown in self.host_slowdowns.items():
            self.notes.append(f"predicted for {name} running {slowdown:.2f}x its typical probe time "
                              f"(a host_speed reading taken when planning)")
        # A plan is launched with `pilot serve`: predicted as its clients see it.
        self.predictor = Predictor(cost_model, model_dir, search_workload, draft_dir, seed,
                                   self.host_slowdowns, served=True)
        self.full_predictor = Predictor(cost_model, model_dir, workload, draft_dir, seed,
                                        self.host_slowdowns, served=True)
        # GPUs are predicted from measured kernels, as the backend that will serve the plan runs.
        self.kernel_predictors: tuple[KernelPredictor, KernelPredictor] | None = None
        if any(spec.kind == "gpu" for spec in self.specs.values()):
            if not installed():
                raise RecommendError(f"GPU predictions rest on GPU kernel measurements: {INSTALL}",
                                     field="hardware")
            gpu_sample = workload.model_copy(update={"num_requests": min(workload.num_requests, GPU_SEARCH_REQUESTS)})
            self.kernel_predictors = (
                KernelPredictor(model_dir, gpu_sample, backend, calibration, seed, backend_version),
                KernelPredictor(model_dir, workload, backend, calibration, seed, backend_version))
            for name, spec in self.specs.items():  # an unmeasured backend version fails here, named
                if spec.kind == "gpu":
                    self.notes.append(f"{name}: {self.kernel_predictors[0].basis(spec)}")
        self.mean_output_tokens = float(np.mean([s.output_tokens for s in workload.sample()]))
        self._cache: dict[tuple[str, tuple[tuple[str, Any], ...], bool], Candidate] = {}
        self._capacity: dict[tuple[str, str, int], float] = {}
        kinds = {spec.kind for spec in self.specs.values()}
        self._prefix = len(kinds) > 1  # a mixed study names each kind's knobs apart
        # Optuna needs one value set per parameter name: a knob whose values differ between
        # hardware types (fp8 only where the GPU has it) is named per hardware type.
        self._per_hardware = {knob for knob in {k for sp in self.spaces.values() for k in sp.knobs}
                              if len({tuple(map(str, sp.values(knob))) for sp in self.spaces.values()
                                      if knob in sp.knobs}) > 1}

    def _space(self, spec: hw.HardwareSpec, given: SearchSpace | None) -> SearchSpace:
        space = given or SearchSpace.from_file(spec.kind)
        # The rates measured here where the cost model has them, else the spec's.
        rates = self.cost_model.hardware.get(spec.name, {}).get("peak_tflops", spec.peak_tflops)
        fastest = space.in_float32_where_bf16_is_slower(bf16_is_slower(rates.get("bf16"), rates.get("fp32")))
        if fastest is not space:
            self.notes.append(f"{spec.name} multiplies bf16 at {rates['bf16']:.3g} TFLOP/s, slower than "
                              f"fp32 at {rates['fp32']:.3g}: the built-in space is searched in float32")
            space = fastest
        knobs = dict(space.knobs)
        if "num_speculative_tokens" in knobs and any(space.values("num_speculative_tokens")):
            if self.draft_dir is None:
                knobs["num_speculative_tokens"] = [0]
            elif self.acceptance_rate is None:
                knobs["num_speculative_tokens"] = [0]
                self.notes.append("no measured acceptance rate for this draft: speculative decoding "
                                  "left out (measure the pair with `pilot profile --draft`)")
        if spec.kind == "gpu":
            knobs.update(self._gpu_knobs(spec, space))
        cfg = self.model_config
        if "tensor_parallel_size" in knobs:  # sizes the model cannot be split into never run
            sizes = [t for t in space.values("tensor_parallel_size") if shardable(cfg, t)]
            knobs["tensor_parallel_size"] = sizes or [1]
        return space.model_copy(update={"knobs": knobs})


    @staticmethod
    def _gpu_knobs(spec: hw.HardwareSpec, space: SearchSpace) -> dict[str, list[Any]]:
        """fp8 weights and KV cache only where the GPU has fp8 tensor cores."""
        knobs: dict[str, list[Any]] = {}
        if "fp8" not in spec.peak_tflops:
            for knob in ("quantization", "kv_cache_dtype"):
                if knob in space.knobs:
                    knobs[knob] = [v for v in space.values(knob) if v != "fp8"] or [space.values(knob)[0]]
        return knobs

    @property
    def space_size(self) -> int:
        return sum(math.prod(len(space.values(k)) for k in space.knobs) for space in self.spaces.values())

    def param(self, hardware: str, knob: str) -> str:
        if knob in self._per_hardware:
            return f"{hardware}.{knob}"
        return f"{self.specs[hardware].kind}.{knob}" if self._prefix else knob

    def config(self, hardware: str, point: dict[str, Any]) -> EngineConfig | None:
        """The engine config of `point`, or None where the space rules it out."""
        spec = self.specs[hardware]
        max_parallel = spec.max_devices_per_node if spec.kind == "gpu" else (os.cpu_count() or 1)
        try:
            config = self.spaces[hardware]._config(self.base, point, self.draft_dir, max_parallel)
        except SearchSpaceError:
            return None
        if config is None or not quantizable(self.model_config, config):
            return None
        if self.quality is not None and not self.quality.allows(config):
            return None  # costs more quality than allowed, or was never measured
        if spec.kind == "gpu":
            config = config.model_copy(update={"device": "cuda"})
        return config

    def evaluate(self, hardware: str, point: dict[str, Any], full: bool = False) -> Candidate:
        """Score one point: cached, since the sampler proposes the same point more than once."""
        key = self._key(hardware, point, full)
        if key not in self._cache:
            self._cache[key] = self._evaluate(hardware, point, full)
        return self._cache[key]

    @staticmethod
    def _key(hardware: str, point: dict[str, Any], full: bool) -> tuple[str, tuple[tuple[str, Any], ...], bool]:
        return hardware, tuple(sorted(point.items(), key=lambda kv: kv[0])), full

    def is_cached(self, hardware: str, point: dict[str, Any], full: bool = False) -> bool:
        return self._key(hardware, point, full) in self._cache

    def remember(self, hardware: str, point: dict[str, Any], full: bool, candidate: Candidate) -> None:
        """A candidate scored elsewhere (a worker process), as `evaluate` would have cached it."""
        self._cache.setdefault(self._key(hardware, point, full), candidate)

    def _evaluate(self, hardware: str, point: dict[str, Any], full: bool) -> Candidate:
        spec, config = self.specs[hardware], self.config(hardware, point)
        if config is None:
            return Candidate(spec, self.base, point, violations={"valid": 1.0})
        per_replica = (config.tensor_parallel_size * config.data_parallel_size
                       if spec.kind == "gpu" else 1)
        candidate = Candidate(spec, config, point, devices_per_replica=per_replica)
        predictor = self.predictor_for(spec, full)
        try:
            predictor.kv_blocks(config, spec)
        except ValueError:
            candidate.violations = {"valid": 0.0, "memory": 1.0}
            return candidate
        max_replicas = self.max_devices // per_replica
        if max_replicas < 1:
            candidate.violations = {"valid": 1.0}
            return candidate
        return self._replicate(candidate, predictor, max_replicas)

    def predictor_for(self, spec: hw.HardwareSpec, full: bool = False) -> Predictor | KernelPredictor:
        if spec.kind == "gpu" and self.kernel_predictors is not None:
            return self.kernel_predictors[1 if full else 0]
        return self.full_predictor if full else self.predictor

    def _score(self, candidate: Candidate, predictor: Predictor, replicas: int) -> Candidate:
        req = self.requirement
        load = (req.load_value / replicas if req.load_kind == "rate"
                else max(1, math.ceil(req.load_value / replicas)))
        k = candidate.config.num_speculative_tokens
        prediction = predictor.predict(candidate.config, candidate.hardware, req.load_kind, load,
                                       self.acceptance_rate if k else None)
        out = Candidate(candidate.hardware, candidate.config, candidate.params, replicas,
                        candidate.devices_per_replica, prediction, load)
        out.violations = {"valid": 0.0, "memory": 0.0}
        self._judge_slos(out)
        if req.load_kind == "rate":
            out.violations["rate"] = load / (MAX_UTILISATION * self.capacity(candidate, predictor)) - 1
            out.output_tokens_per_s = req.load_value * self.mean_output_tokens
        else:
            out.output_tokens_per_s = replicas * prediction.metrics["throughput_tok_s"]
        out.cost_per_hour = replicas * out.devices_per_replica * candidate.hardware.price_per_hour_usd
        return out

    def _judge_slos(self, out: Candidate) -> None:
        """Each SLO's violation (its bound at the requirement's level against the limit) and the
        chance that every one holds, from `out.prediction`."""
        req, prediction = self.requirement, out.prediction
        assert prediction is not None
        out.slo_chance = 1.0
        for slo in req.slos:
            out.violations[slo.key] = slo_bound(prediction, slo.key, self.cost_model,
                                                req.slo_level) / slo.limit_s - 1
            out.slo_chance *= slo_chance(prediction, slo.key, self.cost_model, slo.limit_s)

    def rejudged(self, candidate: Candidate, scale: dict[str, float]) -> Candidate:
        """`candidate` judged again with its predicted metrics multiplied by `scale` (metric ->
        factor; others as they were): what it would be were the model off by that much."""
        if candidate.prediction is None or not scale:
            return candidate
        p = candidate.prediction
        scaled = replace(p, metrics={k: v * scale.get(k, 1.0) for k, v in p.metrics.items()})
        out = replace(candidate, prediction=scaled, violations=dict(candidate.violations))
        self._judge_slos(out)
        return out

    def capacity(self, candidate: Candidate, predictor: Predictor) -> float:
        """Requests per second one replica completes with every batch slot busy (closed loop)."""
        key = (candidate.hardware.name, candidate.config.model_dump_json(), id(predictor))
        if key not in self._capacity:
            c = candidate.config
            busy = c.max_num_seqs * c.data_parallel_size
            k = c.num_speculative_tokens
            full = predictor.predict(c, candidate.hardware, "concurrency", busy,
                                     self.acceptance_rate if k else None)
            self._capacity[key] = max(full.metrics["request_rate"], 1e-12)
        return self._capacity[key]

    def _replicate(self, candidate: Candidate, predictor: Predictor, max_replicas: int) -> Candidate:
        """The fewest replicas that meet the requirement: double until it holds, then bisect."""
        scored = {1: self._score(candidate, predictor, 1)}
        if scored[1].feasible or max_replicas == 1:
            return scored[1]
        low, high = 1, None
        replicas = 1
        if self.requirement.load_kind == "rate":  # jump to what one replica's capacity implies
            capacity = MAX_UTILISATION * self.capacity(candidate, predictor)
            replicas = math.ceil(self.requirement.load_value / capacity)
        replicas = min(max_replicas, max(2, replicas))
        while True:
            scored[replicas] = self._score(candidate, predictor, replicas)
            if scored[replicas].feasible:
                high = replicas
                break
            low = replicas
            if replicas >= max_replicas or not improved(scored[replicas], scored[1]):
                break  # more replicas do not help: a latency floor, not a load problem
            replicas = min(max_replicas, replicas * 2)
        if high is None:
            return closest(list(scored.values()), self.requirement.slos)
        while high - low > 1:
            mid = (low + high) // 2
            scored[mid] = self._score(candidate, predictor, mid)
            low, high = (low, mid) if scored[mid].feasible else (mid, high)
        return scored[high]
