"""GPU memory as the serving engines budget it: the weights a rank holds, the activation peak of
their profiling run, the memory outside PyTorch's allocator, and what is left for the KV cache
within the engine's memory fraction. A plan whose KV cache would not hold one full-length
sequence is never proposed: it would fail at start-up, as generated configs of peer tools do."""

from __future__ import annotations

from dataclasses import dataclass

from planner.costmodel.roofline import Deployment

GIB = 1 << 30
# Memory a rank spends outside the weights, activations and KV cache: the CUDA context, CUDA
# graphs and NCCL buffers. aiconfigurator's system files reserve 3.5 GiB (other_mem) and up to
# ~0.4 GB more for NCCL with tensor parallelism; vLLM's own start-up logs report 1-3 GiB.
NON_TORCH_BYTES = {1: int(2.0 * GIB), 2: int(2.4 * GIB), 4: int(2.4 * GIB), 8: int(2.4 * GIB)}
# The share of a GPU's memory each engine takes by default: vLLM's gpu_memory_utilization,
# SGLang's mem_fraction_static (weights and KV cache), TensorRT-LLM's free_gpu_memory_fraction
# (of what is free after the weights).
DEFAULT_FRACTION = {"vllm": 0.9, "sglang": 0.88, "trtllm": 0.9}


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    weight_bytes: int
    activation_bytes: int
    other_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache_bytes // self.kv_bytes_per_token


def activation_peak(deployment: Deployment, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """The largest transient a rank allocates in the engine's profiling run: one layer's
    activations for a full token budget (the MLP's gate and up outputs dominate) and the
    float32 logits of every sequence's sampling."""
    shape, tp = deployment.target, deployment.tensor_parallel_size
    per_token = 4 * shape.hidden_size + 3 * shape.intermediate_size // tp
    logits = max_num_seqs * shape.vocab_size // tp * 4
    return int(max_num_batched_tokens * per_token * deployment.activation_bytes + logits)


def memory_plan(deployment: Deployment, memory_gib: float, backend: str = "vllm",
                max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                fraction: float | None = None) -> MemoryPlan:
    """Per rank. `memory_gib`: the GPU's memory (datasheets' "80GB" HBM is 80 GiB)."""
    total = int(memory_gib * GIB)
    fraction = DEFAULT_FRACTION.get(backend, 0.9) if fraction is None else fraction
    weights = int(deployment.weight_bytes + deployment.draft_weight_bytes)
    activation = activation_peak(deployment, max_num_batched_tokens, max_num_seqs)
    other = NON_TORCH_BYTES.get(deployment.tensor_parallel_size, NON_TORCH_BYTES[8])
    if backend == "trtllm":
        kv = int(fraction * (total - weights - activation - other))
    elif backend == "sglang":
        kv = int(fraction * total) - weights
    else:
        kv = int(fraction * total) - weights - activation - other
    shape = deployment.target
    per_token = (2 * shape.num_layers * max(1, shape.num_kv_heads // deployment.tensor_parallel_size)
                 * shape.head_dim * deployment.kv_bytes)
    return MemoryPlan(total, weights, activation, other, max(kv, 0), per_token)
