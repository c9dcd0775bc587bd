"""Roofline physics of one engine step: the bytes it must move and the FLOPs it must do, and the
time each would take at the hardware's throughput.

These are the step-time model's first features. They carry a configuration to other hardware
(the same step on an H100 moves the same bytes at another bandwidth) and to other models of the
same family (a wider model moves proportionally more), which a regressor on raw step counts
could not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engine.model_config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
# A gloo/shared-memory all-reduce between processes on one CPU host, measured (engine README).
CPU_ALLREDUCE_LATENCY_S = 60e-6
GPU_ALLREDUCE_LATENCY_S = 10e-6


@dataclass(frozen=True)
class ModelShape:
    """What the physics needs of a decoder-only transformer."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int = 0
    experts_per_token: int = 0

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelShape:
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                   cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size,
                   cfg.num_local_experts, cfg.num_experts_per_tok)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape:
        return cls.from_config(ModelConfig.from_dir(model_dir))

    def _attention_params(self) -> int:
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    def _mlp_params(self, experts: int) -> int:
        return 3 * self.hidden_size * self.intermediate_size * max(1, experts)

    @property
    def weight_params(self) -> int:
        """Every linear weight a forward pass reads: all experts, and the LM head."""
        per_layer = self._attention_params() + self._mlp_params(self.num_experts)
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    @property
    def active_params(self) -> int:
        """Linear weights one token multiplies by (its routed experts only), LM head aside."""
        return self.num_layers * (self._attention_params() + self._mlp_params(self.experts_per_token))

    @property
    def kv_values_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def weight_bytes_per_param(dtype: str, quantization: str | None, group_size: int) -> float:
    """Bytes a stored weight costs, scales and mins included."""
    if quantization in ("int8", "fp8", "fp8_block"):
        return 1.0  # one fp32 scale per output row: negligible per weight
    if quantization == "int4":
        return 0.5 + 8.0 / group_size  # fp32 scale and min per group
    return float(DTYPE_BYTES.get(dtype, 2))


@dataclass(frozen=True)
class Deployment:
    """The parts of an engine configuration that change what a step costs."""

    target: ModelShape
    dtype: str = "bfloat16"
    quantization: str | None = None
    group_size: int = 128
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    draft: ModelShape | None = None
    num_speculative_tokens: int = 0
    kv_cache_dtype: str = "auto"  # "fp8": one byte a KV value (GPU serving engines)

    @classmethod
    def from_engine_config(cls, config: Mapping[str, Any], target: ModelShape,
                           draft: ModelShape | None = None) -> Deployment:
        """`config`: an `EngineConfig` dumped to a dict (as the store keeps it)."""
        k = config.get("num_speculative_tokens") or 0
        return cls(target, config.get("dtype", "bfloat16"), config.get("quantization"),
                   int(config.get("quantization_group_size", 128)),
                   int(config.get("tensor_parallel_size", 1)), int(config.get("data_parallel_size", 1)),
                   draft if k else None, int(k), str(config.get("kv_cache_dtype") or "auto"))

    @property
    def activation_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def kv_bytes(self) -> int:
        """Bytes a cached key or value takes."""
        return 1 if self.kv_cache_dtype.startswith("fp8") else self.activation_bytes

    @property
    def weight_bytes(self) -> float:
        """Weights one rank reads per target forward pass."""
        per_param = weight_bytes_per_param(self.dtype, self.quantization, self.group_size)
        return self.target.weight_params * per_param / self.tensor_parallel_size

    @property
    def draft_weight_bytes(self) -> float:
        # The draft runs unquantized and unsharded on rank 0.
        return 0.0 if self.draft is None else self.draft.weight_params * self.activation_bytes


@dataclass(frozen=True)
class Device:
    """What one engine process gets of the hardware: bandwidth, FLOP/s and its collectives."""

    memory_bandwidth: float  # bytes/s
    flops: float  # FLOP/s at the configuration's dtype
    allreduce_latency_s: float
    interconnect_bandwidth: float  # bytes/s between ranks

    @classmethod
    def for_deployment(cls, deployment: Deployment, kind: str, memory_bandwidth_gbs: float,
                       peak_tflops: Mapping[str, float], interconnect_gbs: float | None = None) -> Device:
        """On a CPU host every process of a configuration (replicas x ranks) shares the one
        socket's bandwidth and cores; on GPUs each rank has a device of its own."""
        share = deployment.tensor_parallel_size * deployment.data_parallel_size if kind == "cpu" else 1
        key = "fp32" if deployment.dtype == "float32" else "bf16"
        tflops = peak_tflops.get(key) or peak_tflops["bf16"]
        if kind == "cpu":
            return cls(memory_bandwidth_gbs * 1e9 / share, tflops * 1e12 / share,
                       CPU_ALLREDUCE_LATENCY_S, memory_bandwidth_gbs * 1e9 / share)
        link = (interconnect_gbs or memory_bandwidth_gbs / 10) * 1e9
        return cls(memory_bandwidth_gbs * 1e9, tflops * 1e12, GPU_ALLREDUCE_LATENCY_S, link)


# Roofline terms of a step, in seconds; the physics model weighs them (efficiency factors).
TERMS = ("weights_s", "kv_read_s", "compute_s", "allreduce_s", "draft_s")


def step_terms(deployment: Deployment, device: Device, num_seqs: np.ndarray,
               num_prefill_seqs: np.ndarray, num_prefill_tokens: np.ndarray,
               num_decode_tokens: np.ndarray, context_tokens: np.ndarray,
               num_draft_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The roofline time of each term for arrays of steps (one element a step)."""
    tokens = num_prefill_tokens + num_decode_tokens
    shape, tp = deployment.target, deployment.tensor_parallel_size
    kv_bytes = context_tokens * shape.kv_values_per_token * deployment.activation_bytes / tp
    # Attention: every new token against its context. Decode tokens read one context each; a
    # prefill chunk of n tokens from one sequence forms about n^2/2 pairs.
    pairs = context_tokens + num_prefill_tokens ** 2 / (2.0 * np.maximum(num_prefill_seqs, 1))
    attention_flops = 4.0 * shape.num_layers * shape.num_heads * shape.head_dim * pairs / tp
    linear_flops = 2.0 * shape.active_params * tokens / tp
    head_flops = 2.0 * shape.vocab_size * shape.hidden_size * (num_seqs + num_draft_tokens) / tp
    allreduce = np.zeros_like(tokens, dtype=float)
    if tp > 1:
        payload = tokens * shape.hidden_size * deployment.activation_bytes
        allreduce = 2 * shape.num_layers * (device.allreduce_latency_s
                                           + payload * (tp - 1) / tp / device.interconnect_bandwidth)
    draft = np.zeros_like(tokens, dtype=float)
    if deployment.draft is not None and deployment.num_speculative_tokens:
        # The draft proposes k tokens for every decoding sequence, one forward pass each.
        decoding = np.maximum(num_seqs - num_prefill_seqs, 0)
        passes = deployment.num_speculative_tokens * (decoding > 0)
        draft_flops = 2.0 * deployment.draft.active_params * decoding * deployment.num_speculative_tokens
        draft = passes * deployment.draft_weight_bytes / device.memory_bandwidth + draft_flops / device.flops
    ones = np.ones_like(tokens, dtype=float)
    # A score (one query head against one context token) costs more than its FLOPs: its
    # softmax exponent, and the decode kernel's walk of the block table, do not grow with the
    # head dimension the FLOPs count. Not one of TERMS: it came later and is appended.
    scores = shape.num_layers * shape.num_heads * pairs / tp
    return {
        "attention_scores_s": scores / device.flops,
        "weights_s": ones * deployment.weight_bytes / device.memory_bandwidth,
        "kv_read_s": kv_bytes / device.memory_bandwidth,
        "compute_s": (linear_flops + attention_flops + head_flops) / device.flops,
        "allreduce_s": allreduce,
        "draft_s": draft,
    }
