"""A GPU engine step's time from measured kernels: the linears of every layer at the step's token
count (one tensor-parallel shard each), attention for the step's prefill chunks and decode rows
at their context lengths, two all-reduces a layer under tensor parallelism, the elementwise work
at the GPU's bandwidth, and the serving framework's own time per step.

The simulator calls this once per step with the engine scheduler's `StepComposition`; what does
not depend on the step (curves for this model's shapes) is built once per deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.observer import StepComposition
from planner.costmodel.roofline import Deployment
from planner.silicon.grid import Curve
from planner.silicon.tables import KernelDataError, KernelTables

# Share of the datasheet bandwidth elementwise kernels reach (norms, rotary, activation),
# as aiconfigurator's system files assume (mem_bw_empirical_scaling_factor: 0.8).
ELEMENTWISE_BANDWIDTH_SHARE = 0.8
# Bytes per token per layer that elementwise kernels move, in units of hidden-size values: two
# RMSNorms with their residual adds (read x and residual, write both), rotary on q and k.
ELEMENTWISE_HIDDEN_PASSES = 10
WEIGHT_ONLY_BYTES = {"int8": 0.5, "int4": 0.25}  # of bf16's weight bytes


@dataclass(frozen=True)
class StepOverhead:
    """The framework's time per step outside the kernels (scheduling, input preparation,
    sampling, detokenization): a constant and a part per sequence in the batch."""

    per_step_s: float = 0.0
    per_seq_s: float = 0.0

    def __call__(self, num_seqs: int) -> float:
        return self.per_step_s + self.per_seq_s * num_seqs


def gemm_dtype(quantization: str | None) -> str:
    return quantization if quantization in ("fp8", "fp8_block") else "bfloat16"


class KernelStepTime:
    """`StepTime` (see planner/costmodel/simulator.py) of one deployment on one GPU type."""

    def __init__(self, tables: KernelTables, deployment: Deployment, memory_bandwidth_gbs: float,
                 overhead: StepOverhead = StepOverhead(), draft: KernelStepTime | None = None) -> None:
        shape, tp = deployment.target, deployment.tensor_parallel_size
        if shape.num_experts:
            raise KernelDataError("mixture-of-experts models are not priced from kernels yet", field="model")
        self.shape, self.tp, self.overhead, self.tables = shape, tp, overhead, tables
        heads, kv_heads, hd = shape.num_heads // tp, max(1, shape.num_kv_heads // tp), shape.head_dim
        dtype = gemm_dtype(deployment.quantization)
        linears = [((heads + 2 * kv_heads) * hd, shape.hidden_size),  # q, k, v
                   (shape.hidden_size, heads * hd),  # o
                   (2 * shape.intermediate_size // tp, shape.hidden_size),  # gate and up
                   (shape.hidden_size, shape.intermediate_size // tp)]  # down
        curves = [tables.gemm_curve(dtype, n, k) for n, k in linears]
        self.layer_linears = _sum(curves)
        if deployment.quantization in WEIGHT_ONLY_BYTES:
            self.layer_linears = _weight_only(self.layer_linears, WEIGHT_ONLY_BYTES[deployment.quantization])
        self.lm_head = tables.gemm_curve("bfloat16", shape.vocab_size // tp, shape.hidden_size)
        kv_dtype = "fp8" if deployment.kv_cache_dtype.startswith("fp8") else "bfloat16"
        self.prefill = tables.attention("context", heads, kv_heads, hd, kv_dtype)
        self.decode = tables.attention("generation", heads, kv_heads, hd, kv_dtype)
        self.allreduce = tables.allreduce_curve(tp) if tp > 1 else None
        values = ELEMENTWISE_HIDDEN_PASSES * shape.hidden_size + 3 * shape.intermediate_size // tp
        self.elementwise_s_per_token = (shape.num_layers * values * deployment.activation_bytes
                                        / (ELEMENTWISE_BANDWIDTH_SHARE * memory_bandwidth_gbs * 1e9))
        self.extrapolated = False  # set once a step falls outside the measured shapes
        self._dense_cache: dict[tuple[int, int], float] = {}
        # Speculative decoding: the draft model (priced by the same kernels, no overhead of its
        # own) runs k decode passes for the step's decoding sequences.
        self.draft, self.k = draft, deployment.num_speculative_tokens

    def _dense(self, tokens: int, seqs: int) -> float:
        """What depends on the token and sequence counts alone: linears, LM head, all-reduces,
        elementwise work (cached: a simulation sees few distinct counts)."""
        key = (tokens, seqs)
        if key not in self._dense_cache:
            seconds = self.shape.num_layers * self.layer_linears(tokens) + self.lm_head(seqs)
            if self.allreduce is not None:
                seconds += (2 * self.shape.num_layers + 1) * self.allreduce(tokens * self.shape.hidden_size)
            self._dense_cache[key] = seconds + tokens * self.elementwise_s_per_token
        return self._dense_cache[key]

    def __call__(self, step: StepComposition, peers: int = 0) -> float:
        layers = self.shape.num_layers
        tokens = step.num_prefill_tokens + step.num_decode_tokens
        seconds = self._dense(tokens, step.num_seqs)
        if step.num_decode_seqs:
            decode_context = step.decode_context_tokens or (
                step.context_tokens * step.num_decode_tokens / max(tokens, 1))
            # The mean context on a 1% grid: the time moves by far less within a cell, and the
            # surface's cache then serves most of a simulation's thousands of steps.
            batch = step.num_decode_seqs
            mean = float(np.exp(round(np.log(max(decode_context / batch, 1.0)) * 100) / 100))
            attention, outside = self.decode.lookup(batch, mean)
            seconds += layers * attention
            self.extrapolated |= outside
        if step.num_prefill_seqs:
            seconds += layers * self._prefill_attention(step)
        self.extrapolated |= tokens > self.layer_linears.largest
        if self.draft is not None and step.num_draft_tokens and step.num_decode_seqs:
            n, context = step.num_decode_seqs, step.decode_context_tokens
            proposal = StepComposition(n, 0, n, 0, n, context, decode_context_tokens=context)
            seconds += self.k * self.draft(proposal)
        return seconds + self.overhead(step.num_seqs)

    def _prefill_attention(self, step: StepComposition) -> float:
        """Prefill chunks as the measured kernel's equal-length prompts doing as many query-key
        pairs: a chunk of n new tokens after p cached ones attends n * p + n^2 / 2 pairs."""
        n = step.num_prefill_seqs
        new = step.num_prefill_tokens / n
        context = max(step.context_tokens - step.decode_context_tokens, step.num_prefill_tokens) / n
        pairs = new * (context - new) + new * new / 2
        length = float(np.sqrt(2 * pairs))
        seconds, outside = self.prefill.lookup(n, length)
        self.extrapolated |= outside
        return seconds


def _sum(curves: list[Curve]) -> Curve:
    xs = curves[0].xs
    return Curve(xs.astype(float), np.sum([c.many(xs) for c in curves], axis=0))


def _weight_only(bf16: Curve, weight_share: float) -> Curve:
    """Weight-only int8/int4 GEMMs (no kernel measurements): the time bf16 spends reading its
    weights (its flat part, at m = 1) shrinks with the weight bytes; the rest is compute, which
    a dequantizing kernel does no faster."""
    floor = bf16.seconds[0]
    return Curve(bf16.xs, np.maximum(floor * weight_share, bf16.seconds - floor * (1 - weight_share)))
