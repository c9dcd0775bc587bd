"""Judging GPU predictions against serving runs measured on real GPUs: aiconfigurator-core's
`systems/silicon_sample.csv` (backend and version, model, GPU, precision, input and output
length, concurrency, tensor parallelism, measured TTFT and TPOT). These rows are validation only:
nothing pilot predicts with is fitted on them.

Each row the model family and knobs can express (dense Llama-family models, aggregated serving,
no pipeline or attention data parallelism) is replayed through the engine's own scheduler set as
the backend runs by default, with step times from the backend's measured kernels on that GPU.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.model_config import ModelConfig
from engine.observer import StepComposition
from engine.scheduler import SchedulerConfig
from planner.costmodel.roofline import Deployment, ModelShape
from planner.costmodel.simulator import SimRequest, Simulator, StepTime, unique_prompts
from planner.silicon import schedule
from planner.silicon.memory import memory_plan
from planner.silicon.overhead import Baseline, Overheads
from planner.silicon.step_time import KernelStepTime
from planner.silicon.tables import SYSTEMS, KernelDataError, KernelTables, data_root
from planner.spec import hardware as hw

# The checkpoint a served model's shapes come from, in aiconfigurator-core's model_configs/.
CONFIGS = {"meta-llama/Llama-3.1-8B-Instruct": "meta-llama--Meta-Llama-3.1-8B",
           "nvidia/Llama-3.1-8B-Instruct-FP8": "meta-llama--Meta-Llama-3.1-8B",
           "meta-llama/Llama-3.1-70B": "meta-llama--Meta-Llama-3.1-70B",
           "meta-llama/Llama-3.1-70B-Instruct": "meta-llama--Meta-Llama-3.1-70B",
           "Qwen/Qwen3-32B": "Qwen--Qwen3-32B", "Qwen/Qwen3-8B": "Qwen--Qwen3-8B"}
SPEC_OF_SYSTEM = {system: spec for spec, system in SYSTEMS.items()}
GEMM_QUANT = {"": None, "bf16": None, "fp8": "fp8", "fp8_block": "fp8_block"}
# What each backend runs with by default on an 80 GB-class GPU, for the knobs the scheduler has:
# vLLM V1's API server (max_num_seqs 1024, max_num_batched_tokens 8192), SGLang's and
# TensorRT-LLM's chunked prefill of 8192 tokens.
BACKEND_DEFAULTS = {"vllm": (1024, 8192), "sglang": (1024, 8192), "trtllm": (2048, 8192)}
# Requests a closed loop at concurrency c sends, in multiples of c: the first c ramp the clients
# up (out of phase, as a long benchmark's steady state has them) and are not counted, as
# benchmarks' warm-up requests are not.
WAVES = 4
# The sample's harness (aiconfigurator's eval) starts every client at once and sends 10c requests.
# Under a prefill-first schedule the clients that start together stay together (every decode
# waits for the group's prefills), so that burst is replayed as it was, every request counted.
# Under a mixed schedule real clients drift apart, which a deterministic replay of a burst
# never does: the out-of-phase steady state is replayed instead.
BURST_WAVES = 10


@dataclass(frozen=True)
class SiliconRow:
    id: str
    backend: str
    backend_version: str
    model: str
    system: str
    quantization: str | None
    kv_cache_dtype: str  # "fp8" where the checkpoint says so (NVIDIA's ModelOpt FP8 checkpoints)
    input_tokens: int
    output_tokens: int
    concurrency: int
    tensor_parallel_size: int
    ttft_s: float
    tpot_s: float

    @property
    def gpu(self) -> str:
        return SPEC_OF_SYSTEM[self.system]


@dataclass
class RowPrediction:
    row: SiliconRow
    ttft_s: float
    tpot_s: float
    extrapolated: bool
    preemptions: int
    decode_batch: float  # mean sequences per decode step, as a decoding request sees it
    steps_to_first_token: float
    notes: list[str] = field(default_factory=list)

    def baseline(self) -> Baseline:
        """This prediction as the overhead fit reads it (made with no overheads)."""
        return Baseline(self.row.backend, self.row.model, self.row.ttft_s, self.row.tpot_s, self.ttft_s,
                        self.tpot_s, self.decode_batch, self.steps_to_first_token)

    @property
    def ttft_ape(self) -> float:
        return abs(self.ttft_s / self.row.ttft_s - 1)

    @property
    def tpot_ape(self) -> float:
        return abs(self.tpot_s / self.row.tpot_s - 1)


def sample_path() -> Path:
    return data_root() / "silicon_sample.csv"


def model_config(name: str) -> ModelConfig:
    """A served model's architecture from the config.json aiconfigurator-core ships for it."""
    if name not in CONFIGS:
        raise KernelDataError(f"no config for {name!r}; known: {', '.join(sorted(CONFIGS))}", field="model")
    path = data_root().parent / "model_configs" / f"{CONFIGS[name]}_config.json"
    return ModelConfig.from_dict(json.loads(path.read_text()), str(path))


def _kv_cache_dtype(row: dict[str, str]) -> str:
    """NVIDIA's FP8 checkpoints (ModelOpt, `nvidia/*-FP8`) quantize the KV cache too
    (kv_cache_quant_algo: FP8 in their hf_quant_config.json), and the engines serve it so; any
    other checkpoint keeps a bf16 cache unless told otherwise, which the sample does not record."""
    return "fp8" if row["model_path"].startswith("nvidia/") and row["gemm_quant_mode"].startswith("fp8") else "auto"


def expressible_rows(path: Path | None = None, systems: tuple[str, ...] = ("h100_sxm", "h200_sxm")) -> list[SiliconRow]:
    """The sample's rows pilot's model family and knobs can express, on the given GPUs."""
    rows = []
    with open(path or sample_path(), newline="") as f:
        for r in csv.DictReader(f):
            if (r["mode"] != "agg" or r["model_path"] not in CONFIGS or r["system"] not in systems
                    or r["pp_size"] not in ("", "1") or r["attention_dp_size"] not in ("", "1")
                    or r["gemm_quant_mode"] not in GEMM_QUANT or not r["tp_size"]
                    or not r["silicon_ttft_ms"] or not r["silicon_tpot_ms"]):
                continue
            rows.append(SiliconRow(
                r["id"], r["backend"], r["backend_version"] or "unknown", r["model_path"], r["system"],
                GEMM_QUANT[r["gemm_quant_mode"]], _kv_cache_dtype(r), int(r["isl"]), int(r["osl"]),
                int(r["batch_size"]), int(r["tp_size"]), float(r["silicon_ttft_ms"]) / 1e3,
                float(r["silicon_tpot_ms"]) / 1e3))
    return rows


def request_duration(step_time: StepTime, concurrency: int, input_tokens: int, output_tokens: int) -> float:
    """About how long one request takes once `concurrency` clients run out of phase: its prompt
    alone, then its output at the step time of a full decode batch at mid-length contexts."""
    prefill = step_time(StepComposition(1, 1, 0, input_tokens, 0, input_tokens), 0)
    c, mid = concurrency, input_tokens + output_tokens // 2
    decode = step_time(StepComposition(c, 0, c, 0, c, c * mid, decode_context_tokens=c * mid), 0)
    return prefill + output_tokens * decode


def predict_row(row: SiliconRow, overheads: Overheads = Overheads(), waves: int = WAVES,
                seed: int = 0) -> RowPrediction:
    """Replay the row's closed loop through the engine's scheduler with kernel step times and
    the backend's framework `overheads`: out of phase over `waves`·c requests under a mixed
    schedule, from the harness's burst over 10c under a prefill-first one."""
    shape = ModelShape.from_config(model_config(row.model))
    deployment = Deployment(shape, quantization=row.quantization, tensor_parallel_size=row.tensor_parallel_size,
                            kv_cache_dtype=row.kv_cache_dtype)
    spec = hw.get_spec(row.gpu)
    tables = KernelTables.load(row.system, row.backend)
    step_time = KernelStepTime(tables, deployment, spec.memory_bandwidth_gbs, overheads.step)
    max_seqs, max_tokens = BACKEND_DEFAULTS[row.backend]
    max_len = row.input_tokens + row.output_tokens + 16
    memory = memory_plan(deployment, spec.memory_gb, row.backend, max_tokens, max_seqs)
    blocks = memory.kv_tokens // 16
    notes = []
    if blocks * 16 < max_len:
        raise KernelDataError(f"{row.id}: the KV cache holds {memory.kv_tokens} tokens, less than one "
                              f"request of {max_len}", field="memory")
    prefill_first = schedule.prefill_first(row.backend)  # each backend's default schedule
    scheduler = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens, max_model_len=max_len,
                                prefill_first=prefill_first)
    simulator = Simulator(step_time, scheduler, blocks, 16, enable_prefix_caching=False, seed=seed)
    count = max((BURST_WAVES if prefill_first else waves) * row.concurrency, 8)
    requests = [SimRequest(p, row.output_tokens) for p in unique_prompts([row.input_tokens] * count)]
    if prefill_first:
        result = simulator.run(requests, row.concurrency, record=True)
        counted = result.latencies
    else:
        stagger = request_duration(step_time, row.concurrency, row.input_tokens, row.output_tokens)
        result = simulator.run(requests, row.concurrency, record=True, stagger_s=stagger)
        counted = result.latencies[row.concurrency:] if count > row.concurrency else result.latencies
    ttft = float(np.mean([r.ttft_s for r in counted]))
    tpot = float(np.mean([r.tpot_s for r in counted if r.output_tokens > 1]))
    decoding = np.array([c.num_decode_seqs for c in result.compositions if c.num_decode_seqs], dtype=float)
    decode_batch = float(np.sum(decoding ** 2) / np.sum(decoding)) if len(decoding) else 1.0
    steps_to_first = ttft * result.num_steps / result.duration_s if result.duration_s > 0 else 1.0
    if step_time.extrapolated:
        notes.append("some steps fall outside the measured kernel shapes (scaled at measured efficiency)")
    return RowPrediction(row, ttft + overheads.per_request_s, tpot, step_time.extrapolated,
                         result.num_preemptions, decode_batch, steps_to_first, notes)
