"""Launch commands for vLLM and SGLang equivalent to one of our `EngineConfig`s.

A plan is measured and predicted on pilot's own engine, but a user may deploy it on another
engine. These functions translate the knobs the plan chose into each engine's current command
line, and `export_notes` says in words where a knob has no exact counterpart, so nobody takes
the translated command for the measured configuration without reading the differences.

Flags pin every setting the plan's predictions depend on (batch caps, token budget, chunked
prefill, prefix caching, parallelism, speculative decoding, KV capacity) even where it equals
today's default of the other engine, because those defaults have changed between releases.
Settings that only matter for our CPU engine are left out and explained in the notes.
"""

from __future__ import annotations

import json
import shlex

from engine.config import EngineConfig
from planner.silicon.schedule import sglang_mixes_chunks

# vLLM's --block-size choices (vllm/config/cache.py `BlockSize`); its GPU attention backends
# further want a multiple of 16.
VLLM_BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
# torchao's int4 weight-only groups, the sizes SGLang's `--torchao-config int4wo-G` takes.
TORCHAO_INT4_GROUP_SIZES = (32, 64, 128, 256)
# The value at which each engine's memory-fraction flag is left at its default.
_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def _flag(argv: list[str], name: str, value: object) -> None:
    argv += [name, str(value)]


def _speculative_json(config: EngineConfig) -> str:
    # "method" is explicit so vLLM does not guess EAGLE/MTP from the draft's name or config.
    spec = {"method": "draft_model", "model": config.speculative_model,
            "num_speculative_tokens": config.num_speculative_tokens}
    return json.dumps(spec, separators=(",", ":"))


def vllm_args(config: EngineConfig, port: int = 8000) -> list[str]:
    """argv for `vllm serve MODEL ...` that reproduces `config` as closely as vLLM allows.

    Batch caps, chunked prefill and prefix caching are always written out (both polarities
    exist as flags) so a later change of vLLM's defaults cannot silently change the plan.
    """
    argv = ["vllm", "serve", config.model]
    _flag(argv, "--port", port)
    if config.tokenizer is not None:
        _flag(argv, "--tokenizer", config.tokenizer)
    if config.dtype != "auto":
        _flag(argv, "--dtype", config.dtype)
    _flag(argv, "--seed", config.seed)
    if config.max_model_len is not None:
        _flag(argv, "--max-model-len", config.max_model_len)
    _flag(argv, "--tensor-parallel-size", config.tensor_parallel_size)
    if config.data_parallel_size > 1:
        _flag(argv, "--data-parallel-size", config.data_parallel_size)
    _flag(argv, "--max-num-seqs", config.max_num_seqs)
    _flag(argv, "--max-num-batched-tokens", config.max_num_batched_tokens)
    argv.append("--enable-chunked-prefill" if config.enable_chunked_prefill
                else "--no-enable-chunked-prefill")
    argv.append("--enable-prefix-caching" if config.enable_prefix_caching
                else "--no-enable-prefix-caching")
    if config.block_size in VLLM_BLOCK_SIZES:  # otherwise vLLM's parser refuses it: see notes
        _flag(argv, "--block-size", config.block_size)
    if config.scheduling_policy != "fcfs":
        _flag(argv, "--scheduling-policy", config.scheduling_policy)
    # The same precedence as our engine: an exact block count, else a byte budget, else a
    # fraction of GPU memory.
    if config.num_kv_blocks is not None:
        _flag(argv, "--num-gpu-blocks-override", config.num_kv_blocks)
    elif config.kv_cache_memory_bytes is not None:
        _flag(argv, "--kv-cache-memory-bytes", config.kv_cache_memory_bytes)
    elif config.gpu_memory_utilization != _DEFAULT_GPU_MEMORY_UTILIZATION:
        _flag(argv, "--gpu-memory-utilization", config.gpu_memory_utilization)
    if config.quantization == "fp8":  # dynamic per-tensor fp8 of a bf16 checkpoint, in flight
        _flag(argv, "--quantization", "fp8")
    if config.kv_cache_dtype == "fp8":
        _flag(argv, "--kv-cache-dtype", "fp8")
    # Weight-only int8/int4 has no in-flight vLLM flag that matches; see export_notes.
    if config.speculative_model is not None:
        _flag(argv, "--speculative-config", _speculative_json(config))
    return argv


def sglang_args(config: EngineConfig, port: int = 30000) -> list[str]:
    """argv for `python -m sglang.launch_server --model-path MODEL ...` closest to `config`.

    SGLang has no single per-step token budget: our `max_num_batched_tokens` becomes both the
    chunk size and the prefill-batch cap, and mixed prefill/decode batches are switched on to
    match our scheduler, which runs decodes and prefill chunks in the same step.
    """
    argv = ["python", "-m", "sglang.launch_server", "--model-path", config.model]
    _flag(argv, "--port", port)
    if config.tokenizer is not None:
        _flag(argv, "--tokenizer-path", config.tokenizer)
    if config.dtype != "auto":
        _flag(argv, "--dtype", config.dtype)
    _flag(argv, "--random-seed", config.seed)  # SGLang draws a random seed otherwise
    if config.max_model_len is not None:
        _flag(argv, "--context-length", config.max_model_len)
    _flag(argv, "--tp-size", config.tensor_parallel_size)
    if config.data_parallel_size > 1:
        _flag(argv, "--dp-size", config.data_parallel_size)
    _flag(argv, "--max-running-requests", config.max_num_seqs)
    if config.enable_chunked_prefill:
        _flag(argv, "--chunked-prefill-size", config.max_num_batched_tokens)
    else:
        _flag(argv, "--chunked-prefill-size", -1)  # -1 turns chunking off
    _flag(argv, "--max-prefill-tokens", config.max_num_batched_tokens)
    if sglang_mixes_chunks(config):
        argv.append("--enable-mixed-chunk")
    if not config.enable_prefix_caching:
        argv.append("--disable-radix-cache")
    if config.block_size != 1:  # SGLang's page is one token by default
        _flag(argv, "--page-size", config.block_size)
    # Pinned: older SGLang releases defaulted to longest-prefix-match ordering.
    _flag(argv, "--schedule-policy", "fcfs")
    if config.scheduling_policy == "priority":
        # Ours, like vLLM, serves the lowest priority value first.
        argv += ["--enable-priority-scheduling", "--schedule-low-priority-values-first"]
    if config.num_kv_blocks is not None:
        _flag(argv, "--max-total-tokens", config.num_kv_blocks * config.block_size)
    elif (config.kv_cache_memory_bytes is None
          and config.gpu_memory_utilization != _DEFAULT_GPU_MEMORY_UTILIZATION):
        _flag(argv, "--mem-fraction-static", config.gpu_memory_utilization)
    if config.quantization == "fp8":
        _flag(argv, "--quantization", "fp8")
    if config.kv_cache_dtype == "fp8":
        _flag(argv, "--kv-cache-dtype", "fp8_e4m3")
    if config.quantization == "int8":
        _flag(argv, "--torchao-config", "int8wo")
    elif config.quantization == "int4":
        _flag(argv, "--torchao-config", f"int4wo-{config.quantization_group_size}")
    if config.speculative_model is not None:
        k = config.num_speculative_tokens or 0  # set whenever the draft is (validated)
        argv += ["--speculative-algorithm", "STANDALONE",
                 "--speculative-draft-model-path", config.speculative_model]
        # A single chain of k drafts: top-1 per step, k drafts plus the bonus token verified.
        _flag(argv, "--speculative-num-steps", k)
        _flag(argv, "--speculative-eagle-topk", 1)
        _flag(argv, "--speculative-num-draft-tokens", k + 1)
    return argv


def as_shell(argv: list[str]) -> str:
    """One line a person can paste into a shell; quoting keeps paths and JSON intact."""
    return shlex.join(argv)


def export_notes(config: EngineConfig) -> list[str]:
    """Where the commands from `vllm_args`/`sglang_args` differ from what was measured.

    Each note names our knob first, so a reader (and a test) can find the caveat for a knob.
    """
    notes: list[str] = []

    if config.quantization in ("int8", "int4"):
        scheme = ("int8 per output channel" if config.quantization == "int8"
                  else f"int4 in groups of {config.quantization_group_size} with a scale and a min")
        notes.append(
            f"quantization={config.quantization}: ours quantizes the weights ({scheme}) while "
            "loading, activations stay in the model dtype. vLLM has no in-flight flag for that "
            "scheme; the command serves the weights unquantized unless MODEL is replaced by a "
            f"pre-quantized W{8 if config.quantization == 'int8' else 4}A16 checkpoint "
            "(e.g. compressed-tensors from llm-compressor, or GPTQ/AWQ), whose scheme vLLM "
            "reads from its config.json. SGLang's command quantizes in flight with torchao "
            "(--torchao-config, experimental, needs torchao installed). A checkpoint written by "
            "`pilot models quantize` is in pilot's own layout, which neither engine reads.")
        if config.quantization == "int4":
            if config.quantization_group_size not in TORCHAO_INT4_GROUP_SIZES:
                notes.append(
                    f"quantization_group_size={config.quantization_group_size}: torchao's int4 "
                    f"weight-only takes groups of {', '.join(map(str, TORCHAO_INT4_GROUP_SIZES))}; "
                    "SGLang will refuse this size.")
            if config.dtype not in ("auto", "bfloat16"):
                notes.append(
                    f"dtype={config.dtype}: torchao's int4 weight-only kernels expect bfloat16 "
                    "activations.")

    if config.device == "cpu":
        notes.append(
            "device=cpu: both commands target NVIDIA GPUs. vLLM's CPU backend is "
            "a separate build and SGLang's needs --device cpu; measurements from our CPU engine "
            "do not carry over to either.")
    if config.num_threads is not None:
        notes.append(
            f"num_threads={config.num_threads}: CPU threads of our engine; no counterpart in "
            "the GPU commands.")
    if config.torch_compile:
        notes.append(
            "torch_compile=True: selects torch.compile over our own CPU kernels; no counterpart. "
            "vLLM compiles and captures CUDA graphs by default; SGLang's --enable-torch-compile "
            "is a separate tuning choice.")

    if config.block_size not in VLLM_BLOCK_SIZES:
        notes.append(
            f"block_size={config.block_size}: vLLM accepts --block-size "
            f"{'/'.join(map(str, VLLM_BLOCK_SIZES))} only, so the flag is left out and vLLM "
            "picks its own (16 on GPU); KV capacity and prefix-cache granularity will differ.")
    elif config.block_size % 16:
        notes.append(
            f"block_size={config.block_size}: vLLM's GPU attention backends want a multiple of "
            "16 and may refuse this --block-size.")

    notes.append(
        f"max_num_batched_tokens={config.max_num_batched_tokens}: ours caps all tokens of a "
        "step, decodes included, as vLLM does. SGLang caps prefill tokens only "
        "(--chunked-prefill-size per chunk, --max-prefill-tokens per batch, which it never "
        "lets fall below the context length), and decodes come on top.")
    if config.max_num_batched_tokens < config.max_num_seqs:
        notes.append(
            f"max_num_batched_tokens={config.max_num_batched_tokens} < max_num_seqs="
            f"{config.max_num_seqs}: vLLM refuses a token budget below the sequence cap.")
    if not config.enable_chunked_prefill:
        limit = ("the model's context length" if config.max_model_len is None
                 else f"max_model_len={config.max_model_len}")
        if config.max_model_len is None or config.max_model_len > config.max_num_batched_tokens:
            notes.append(
                f"enable_chunked_prefill=False: vLLM then refuses a max_num_batched_tokens "
                f"({config.max_num_batched_tokens}) smaller than {limit}; set --max-model-len "
                "no larger than the token budget or raise the budget.")
    elif config.speculative_model is not None:
        notes.append(
            "enable_chunked_prefill=True with speculative decoding: SGLang turns mixed "
            "prefill/decode batches off under speculative decoding, so --enable-mixed-chunk is "
            "left out and its prefill chunks run in steps of their own.")

    if config.kv_cache_memory_bytes is not None and config.num_kv_blocks is None:
        notes.append(
            f"kv_cache_memory_bytes={config.kv_cache_memory_bytes}: SGLang has no byte budget "
            "for the KV cache; size it with --max-total-tokens (this budget divided by the KV "
            "bytes per token of the model on one GPU) or --mem-fraction-static.")
    if (config.num_kv_blocks is None and config.kv_cache_memory_bytes is None
            and config.gpu_memory_utilization != _DEFAULT_GPU_MEMORY_UTILIZATION):
        notes.append(
            f"gpu_memory_utilization={config.gpu_memory_utilization}: vLLM's fraction, like "
            "ours, covers everything the process holds; SGLang's --mem-fraction-static covers "
            "weights and the KV pool only, so the same number leaves SGLang a larger KV cache.")
    if config.num_kv_blocks is not None:
        notes.append(
            f"num_kv_blocks={config.num_kv_blocks}: vLLM takes it as --num-gpu-blocks-override "
            "(meant for testing, and the GPU must still hold the blocks); SGLang as "
            "--max-total-tokens (blocks times block size).")

    if config.scheduling_policy == "priority":
        notes.append(
            "scheduling_policy=priority: SGLang also preempts running requests for a waiting one "
            "whose priority is better by at least --priority-scheduling-preemption-threshold; "
            "ours and vLLM's only reorder the queue and pick preemption victims by priority.")

    if config.speculative_model is not None:
        notes.append(
            f"speculative_model={config.speculative_model}: vLLM needs a release whose engine "
            "supports the 'draft_model' method; SGLang runs it as the STANDALONE algorithm with "
            "one chain of num_speculative_tokens drafts.")
        if config.tensor_parallel_size > 1:
            notes.append(
                "speculative_model with tensor_parallel_size>1: our draft runs unsharded on the "
                "first rank; both engines shard it like the target by default (vLLM accepts "
                "draft_tensor_parallel_size=1 in --speculative-config to match).")
    return notes
