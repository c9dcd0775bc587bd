"""Rules the planner shares with the engine: how a step is attended, how many KV blocks an engine
allocates, how many drafts it proposes, and which shardings and quantization schemes a model
admits. The engine decides by these and the planner predicts by the same functions.

Torch-free on purpose (stdlib only, and engine modules that are torch-free themselves): the
planner imports it without loading the engine's model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.sequence import Sequence

# Continuations of a context up to this many tokens are attended like decodes, row by row.
ROW_BY_ROW_MAX_TOKENS = 8
# So are a step's prompts and prefill chunks, given a decode kernel, when they average at most
# this many tokens; with only decode-like rows left, the CPU runs the step's layers as the fused
# decode calls. Prefill otherwise attends each prompt in a call of its own and runs the layers op
# by op. Measured (bf16, 2 cores, AMD EPYC; op by op -> row by row): tiny, a 16-token prompt
# 0.54 -> 0.28 ms and a dozen 1.68 -> 0.99 ms; h256, a dozen 6.5 -> 4.6 ms; llama-110m, eight of
# 128 tokens 480 -> 436 ms. Longer prompts lose: row by row each token re-reads its context, and
# tiny's 256-token prompt took 1.31x as long.
ROW_BY_ROW_MEAN_PREFILL = 128

# Weight-only quantization methods and their bits.
METHODS = {"int8": 8, "int4": 4}


def prefills_row_by_row(num_prefill_seqs: int, num_prefill_tokens: int) -> bool:
    """Whether a step whose prefills (`StepComposition`'s count and tokens) are these attends
    them row by row, where the runner has a decode kernel: the planner prices steps by this
    (elementwise, on NumPy arrays of steps)."""
    return (num_prefill_seqs > 0) & (num_prefill_tokens <= ROW_BY_ROW_MEAN_PREFILL * num_prefill_seqs)


def continues_row_by_row(start: int, num_new_tokens: int) -> bool:
    """Whether one sequence's scheduled tokens (from position `start`) are attended row by row
    whatever the rest of the step: a decode, or a short continuation of a context."""
    return num_new_tokens == 1 or (start > 0 and num_new_tokens <= ROW_BY_ROW_MAX_TOKENS)


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, max_len: int, device_type: str,
                  free_bytes: int, total_bytes: int = 0) -> int:
    """The KV blocks an engine with `config` allocates, given its device's free memory (after
    the weights) and, on CUDA, its total; the planner sizes simulated caches with this too."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    budget = config.kv_cache_memory_bytes
    if budget is None:
        if device_type == "cuda":
            budget = int(total_bytes * config.gpu_memory_utilization) - (total_bytes - free_bytes)
        else:
            # Enough for every sequence at full length, but never more than a quarter of RAM.
            wanted = config.max_num_seqs * max_len // config.block_size * bytes_per_block
            budget = min(wanted, free_bytes // 4)
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ValueError(
            f"kv cache budget of {budget} bytes holds no block of {bytes_per_block} bytes; "
            "raise kv_cache_memory_bytes (or gpu_memory_utilization)")
    return int(blocks)


def draft_budget(seq: Sequence, k: int, max_model_len: int) -> int:
    """Drafts worth proposing: within the context limit and the tokens still wanted (the
    planner's simulator proposes by the same rule)."""
    room = min(k, max_model_len - seq.num_tokens)
    if seq.params.max_tokens is not None:
        room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
    return max(0, room)


def split_evenly(total: int, size: int, what: str) -> int:
    """Each rank's share of `total` features (or heads) split evenly over `size` ranks."""
    if total % size:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's {what} "
                         f"({total})")
    return total // size


def check_shardable(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """Raise (naming the field) unless `size` ranks can split the model evenly."""
    split_evenly(num_heads, size, "num_attention_heads")
    split_evenly(num_kv_heads, size, "num_key_value_heads")
    split_evenly(intermediate_size, size, "intermediate_size")


def check_scheme(method: str, group_size: int, in_features: int) -> tuple[int, int]:
    """(bits, effective group size) for quantizing a layer with `in_features` inputs."""
    if method not in METHODS:
        raise ValueError(f"quantization: unknown method {method!r}; choose from {', '.join(METHODS)}")
    bits = METHODS[method]
    if bits == 8:
        return bits, in_features  # per output channel: one group spans the row
    if group_size <= 0 or in_features % group_size or group_size % 2:
        raise ValueError(f"quantization_group_size={group_size} must be even and divide every "
                         f"layer's input features (a layer has {in_features})")
    return bits, group_size
