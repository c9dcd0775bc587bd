"""planner.search.launch_args: vLLM and SGLang launch commands for an EngineConfig, and the caveats."""

from __future__ import annotations

import json
import shlex

import pytest

from engine.config import EngineConfig
from planner.search.launch_args import as_shell, export_notes, sglang_args, vllm_args

MODEL = "/models/x"  # EngineConfig never checks that the directory exists


def _value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} should appear once in {argv}"
    return argv[argv.index(flag) + 1]


def _notes_text(config: EngineConfig) -> str:
    return "\n".join(export_notes(config))


# ---- exact argv for representative configs ----

def test_defaults() -> None:
    config = EngineConfig(model=MODEL)
    assert vllm_args(config) == [
        "vllm", "serve", MODEL, "--port", "8000", "--seed", "0",
        "--tensor-parallel-size", "1", "--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
        "--enable-chunked-prefill", "--enable-prefix-caching", "--block-size", "16"]
    assert sglang_args(config) == [
        "python", "-m", "sglang.launch_server", "--model-path", MODEL, "--port", "30000",
        "--random-seed", "0", "--tp-size", "1", "--max-running-requests", "64",
        "--chunked-prefill-size", "2048", "--max-prefill-tokens", "2048", "--enable-mixed-chunk",
        "--page-size", "16", "--schedule-policy", "fcfs"]


def test_tensor_and_data_parallel_with_int8() -> None:
    config = EngineConfig(model=MODEL, tensor_parallel_size=2, data_parallel_size=2,
                          quantization="int8", dtype="bfloat16", max_model_len=4096,
                          max_num_seqs=128, max_num_batched_tokens=8192)
    assert vllm_args(config, port=9000) == [
        "vllm", "serve", MODEL, "--port", "9000", "--dtype", "bfloat16", "--seed", "0",
        "--max-model-len", "4096", "--tensor-parallel-size", "2", "--data-parallel-size", "2",
        "--max-num-seqs", "128", "--max-num-batched-tokens", "8192",
        "--enable-chunked-prefill", "--enable-prefix-caching", "--block-size", "16"]
    assert sglang_args(config, port=31000) == [
        "python", "-m", "sglang.launch_server", "--model-path", MODEL, "--port", "31000",
        "--dtype", "bfloat16", "--random-seed", "0", "--context-length", "4096",
        "--tp-size", "2", "--dp-size", "2", "--max-running-requests", "128",
        "--chunked-prefill-size", "8192", "--max-prefill-tokens", "8192", "--enable-mixed-chunk",
        "--page-size", "16", "--schedule-policy", "fcfs", "--torchao-config", "int8wo"]
    # vLLM gets no in-flight quantization flag: the notes point at a pre-quantized checkpoint.
    assert "--quantization" not in vllm_args(config)
    text = _notes_text(config)
    assert "quantization=int8" in text and "W8A16" in text and "--torchao-config" in text


def test_speculative_decoding_with_a_draft() -> None:
    config = EngineConfig(model=MODEL, speculative_model="/models/draft", num_speculative_tokens=4)
    argv = vllm_args(config)
    assert argv == [
        "vllm", "serve", MODEL, "--port", "8000", "--seed", "0",
        "--tensor-parallel-size", "1", "--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
        "--enable-chunked-prefill", "--enable-prefix-caching", "--block-size", "16",
        "--speculative-config",
        '{"method":"draft_model","model":"/models/draft","num_speculative_tokens":4}']
    assert json.loads(_value(argv, "--speculative-config")) == {
        "method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 4}
    assert sglang_args(config) == [
        "python", "-m", "sglang.launch_server", "--model-path", MODEL, "--port", "30000",
        "--random-seed", "0", "--tp-size", "1", "--max-running-requests", "64",
        "--chunked-prefill-size", "2048", "--max-prefill-tokens", "2048",
        "--page-size", "16", "--schedule-policy", "fcfs",
        "--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", "/models/draft",
        "--speculative-num-steps", "4", "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", "5"]
    text = _notes_text(config)
    assert "speculative_model=/models/draft" in text and "--enable-mixed-chunk" in text


def test_speculative_json_survives_odd_paths_and_the_shell() -> None:
    draft = "/models/my draft's \"v2\""
    config = EngineConfig(model=MODEL, speculative_model=draft, num_speculative_tokens=2)
    argv = vllm_args(config)
    spec = json.loads(_value(argv, "--speculative-config"))
    assert spec["model"] == draft and spec["num_speculative_tokens"] == 2
    assert shlex.split(as_shell(argv)) == argv


def test_chunked_prefill_off() -> None:
    config = EngineConfig(model=MODEL, enable_chunked_prefill=False, max_num_batched_tokens=4096)
    assert vllm_args(config) == [
        "vllm", "serve", MODEL, "--port", "8000", "--seed", "0",
        "--tensor-parallel-size", "1", "--max-num-seqs", "64", "--max-num-batched-tokens", "4096",
        "--no-enable-chunked-prefill", "--enable-prefix-caching", "--block-size", "16"]
    assert sglang_args(config) == [
        "python", "-m", "sglang.launch_server", "--model-path", MODEL, "--port", "30000",
        "--random-seed", "0", "--tp-size", "1", "--max-running-requests", "64",
        "--chunked-prefill-size", "-1", "--max-prefill-tokens", "4096",
        "--page-size", "16", "--schedule-policy", "fcfs"]
    # Without max_model_len vLLM may refuse a budget below the model's context length.
    assert "enable_chunked_prefill=False" in _notes_text(config)
    fits = config.model_copy(update={"max_model_len": 4096})
    assert "enable_chunked_prefill=False" not in _notes_text(fits)


def test_prefix_caching_off() -> None:
    config = EngineConfig(model=MODEL, enable_prefix_caching=False)
    vllm = vllm_args(config)
    assert "--no-enable-prefix-caching" in vllm and "--enable-prefix-caching" not in vllm
    assert vllm == [
        "vllm", "serve", MODEL, "--port", "8000", "--seed", "0",
        "--tensor-parallel-size", "1", "--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
        "--enable-chunked-prefill", "--no-enable-prefix-caching", "--block-size", "16"]
    assert sglang_args(config) == [
        "python", "-m", "sglang.launch_server", "--model-path", MODEL, "--port", "30000",
        "--random-seed", "0", "--tp-size", "1", "--max-running-requests", "64",
        "--chunked-prefill-size", "2048", "--max-prefill-tokens", "2048", "--enable-mixed-chunk",
        "--disable-radix-cache", "--page-size", "16", "--schedule-policy", "fcfs"]
    assert "--disable-radix-cache" not in sglang_args(EngineConfig(model=MODEL))


# ---- individual knobs ----

def test_int4_group_size_reaches_torchao() -> None:
    config = EngineConfig(model=MODEL, quantization="int4", quantization_group_size=64)
    assert _value(sglang_args(config), "--torchao-config") == "int4wo-64"
    assert "W4A16" in _notes_text(config)
    odd = EngineConfig(model=MODEL, quantization="int4", quantization_group_size=48)
    assert "quantization_group_size=48" in _notes_text(odd)
    assert "quantization_group_size" not in _notes_text(config)


def test_tokenizer_and_priority() -> None:
    config = EngineConfig(model=MODEL, tokenizer="/models/tok", scheduling_policy="priority", seed=7)
    vllm, sglang = vllm_args(config), sglang_args(config)
    assert _value(vllm, "--tokenizer") == "/models/tok"
    assert _value(vllm, "--scheduling-policy") == "priority"
    assert _value(vllm, "--seed") == "7"
    assert _value(sglang, "--tokenizer-path") == "/models/tok"
    assert _value(sglang, "--random-seed") == "7"
    assert "--enable-priority-scheduling" in sglang
    assert "--schedule-low-priority-values-first" in sglang
    assert "scheduling_policy=priority" in _notes_text(config)
    assert "--scheduling-policy" not in vllm_args(EngineConfig(model=MODEL))


def test_kv_cache_sizing_follows_our_precedence() -> None:
    blocks = EngineConfig(model=MODEL, num_kv_blocks=1000, block_size=32,
                          kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.8)
    vllm, sglang = vllm_args(blocks), sglang_args(blocks)
    assert _value(vllm, "--num-gpu-blocks-override") == "1000"
    assert "--kv-cache-memory-bytes" not in vllm and "--gpu-memory-utilization" not in vllm
    assert _value(sglang, "--max-total-tokens") == "32000"
    assert "--mem-fraction-static" not in sglang

    budget = EngineConfig(model=MODEL, kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.8)
    assert _value(vllm_args(budget), "--kv-cache-memory-bytes") == str(1 << 30)
    assert "--gpu-memory-utilization" not in vllm_args(budget)
    assert "--mem-fraction-static" not in sglang_args(budget)
    assert "kv_cache_memory_bytes=1073741824" in _notes_text(budget)

    fraction = EngineConfig(model=MODEL, gpu_memory_utilization=0.8)
    assert _value(vllm_args(fraction), "--gpu-memory-utilization") == "0.8"
    assert _value(sglang_args(fraction), "--mem-fraction-static") == "0.8"
    assert "gpu_memory_utilization=0.8" in _notes_text(fraction)

    default = EngineConfig(model=MODEL)
    for flag in ("--gpu-memory-utilization", "--kv-cache-memory-bytes", "--num-gpu-blocks-override"):
        assert flag not in vllm_args(default)
    assert "--mem-fraction-static" not in sglang_args(default)


def test_block_sizes_vllm_does_not_take() -> None:
    odd = EngineConfig(model=MODEL, block_size=24)
    assert "--block-size" not in vllm_args(odd)
    assert _value(sglang_args(odd), "--page-size") == "24"
    assert "block_size=24" in _notes_text(odd)

    small = EngineConfig(model=MODEL, block_size=8)
    assert _value(vllm_args(small), "--block-size") == "8"
    assert "block_size=8" in _notes_text(small)

    assert _value(vllm_args(EngineConfig(model=MODEL, block_size=32)), "--block-size") == "32"
    assert "block_size" not in _notes_text(EngineConfig(model=MODEL, block_size=32))
    assert "--page-size" not in sglang_args(EngineConfig(model=MODEL, block_size=1))


# ---- notes ----

def test_cpu_only_knobs_are_noted_and_never_emitted() -> None:
    config = EngineConfig(model=MODEL, device="cpu", num_threads=4, torch_compile=True)
    text = _notes_text(config)
    for knob in ("device=cpu", "num_threads=4", "torch_compile=True"):
        assert knob in text
    assert vllm_args(config) == vllm_args(EngineConfig(model=MODEL))
    assert sglang_args(config) == sglang_args(EngineConfig(model=MODEL))


def test_default_notes_stay_quiet_about_knobs_left_alone() -> None:
    text = _notes_text(EngineConfig(model=MODEL))
    for knob in ("quantization", "device=", "num_threads", "torch_compile", "block_size",
                 "speculative", "scheduling_policy", "kv_cache_memory_bytes",
                 "gpu_memory_utilization", "enable_chunked_prefill"):
        assert knob not in text
    # The one difference that always holds: SGLang's prefill-only token cap.
    assert "max_num_batched_tokens=2048" in text


def test_budget_below_sequence_cap_is_noted() -> None:
    config = EngineConfig(model=MODEL, max_num_seqs=256, max_num_batched_tokens=128)
    assert "max_num_seqs=256" in _notes_text(config)


def test_speculative_with_tensor_parallel_notes_the_draft_sharding() -> None:
    config = EngineConfig(model=MODEL, speculative_model="/models/draft",
                          num_speculative_tokens=3, tensor_parallel_size=2)
    assert "draft_tensor_parallel_size" in _notes_text(config)
    single = config.model_copy(update={"tensor_parallel_size": 1})
    assert "draft_tensor_parallel_size" not in _notes_text(single)


# ---- shell ----

@pytest.mark.parametrize("config", [
    EngineConfig(model="/models/with space/it's"),
    EngineConfig(model=MODEL, tokenizer="/tok $HOME", speculative_model="/d;rm -rf /",
                 num_speculative_tokens=2, quantization="int4"),
])
def test_as_shell_round_trips(config: EngineConfig) -> None:
    for argv in (vllm_args(config), sglang_args(config)):
        line = as_shell(argv)
        assert "\n" not in line
        assert shlex.split(line) == argv
    assert all(isinstance(arg, str) for arg in vllm_args(config) + sglang_args(config))
