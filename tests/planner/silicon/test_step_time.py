"""A GPU step's time from measured kernels, checked against the physics it must respect: no
faster than the datasheet lets a step read its weights, faster with more GPUs, fp8 and smaller
weights, slower with longer contexts and bigger prompts."""

from __future__ import annotations

import pytest

from engine.observer import StepComposition
from planner.costmodel.roofline import Deployment, ModelShape
from planner.silicon.memory import GIB, memory_plan
from planner.silicon.step_time import KernelStepTime, StepOverhead
from planner.silicon.tables import KernelTables

# The kernel measurements: installed by the test extra (Python 3.11-3.13, as the package allows).
pytest.importorskip("aiconfigurator_core")

LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128, 128256)
LLAMA_70B = ModelShape(8192, 28672, 80, 64, 8, 128, 128256)
H100_BANDWIDTH = 3350.0


def _decode(batch: int, context: int) -> StepComposition:
    return StepComposition(batch, 0, batch, 0, batch, batch * context, decode_context_tokens=batch * context)


def _step(deployment: Deployment, overhead: StepOverhead = StepOverhead()) -> KernelStepTime:
    return KernelStepTime(KernelTables.load("h100_sxm", "vllm"), deployment, H100_BANDWIDTH, overhead)


def test_batch_one_decode_is_bound_by_reading_the_weights():
    deployment = Deployment(LLAMA_8B)
    seconds = _step(deployment)(_decode(1, 256))
    floor = deployment.weight_bytes / (H100_BANDWIDTH * 1e9)
    # Published vLLM figures for an 8B model on one H100 are 6-8 ms a token; the kernels alone
    # reach 70-95% of the datasheet bandwidth.
    assert floor < seconds < floor / 0.7


def test_more_gpus_fp8_and_int4_weights_each_make_decode_faster():
    base = _step(Deployment(LLAMA_8B))(_decode(8, 1024))
    assert _step(Deployment(LLAMA_8B, tensor_parallel_size=2))(_decode(8, 1024)) < base
    assert _step(Deployment(LLAMA_8B, quantization="fp8"))(_decode(8, 1024)) < base
    assert _step(Deployment(LLAMA_8B, quantization="int4"))(_decode(8, 1024)) < base


def test_an_fp8_kv_cache_reads_long_contexts_faster():
    long_context = _decode(256, 8000)
    assert (_step(Deployment(LLAMA_8B, kv_cache_dtype="fp8"))(long_context)
            < _step(Deployment(LLAMA_8B))(long_context))


def test_time_grows_with_context_batch_and_prompt():
    step = _step(Deployment(LLAMA_8B))
    assert step(_decode(32, 500)) < step(_decode(32, 4000)) < step(_decode(128, 4000))
    short = StepComposition(1, 1, 0, 512, 0, 512)
    long = StepComposition(1, 1, 0, 4096, 0, 4096)
    assert step(short) < step(long)
    # A chunk after a long cached prefix attends more pairs than the same chunk alone.
    assert step(StepComposition(1, 1, 0, 512, 0, 4096)) > step(short)


def test_a_prefill_is_compute_bound_near_the_datasheet_rate():
    step = _step(Deployment(LLAMA_8B))
    tokens = 8192
    seconds = step(StepComposition(4, 4, 0, tokens, 0, tokens))
    flops = 2 * LLAMA_8B.active_params * tokens
    assert flops / 989e12 < seconds < flops / (0.4 * 989e12)


def test_overheads_add_per_step_and_per_sequence():
    plain = _step(Deployment(LLAMA_8B))(_decode(10, 100))
    loaded = _step(Deployment(LLAMA_8B), StepOverhead(1e-3, 1e-5))(_decode(10, 100))
    assert loaded - plain == pytest.approx(1e-3 + 10 * 1e-5)


def test_steps_past_the_measured_shapes_are_flagged():
    step = _step(Deployment(LLAMA_8B))
    step(_decode(4, 100))
    assert not step.extrapolated
    step(StepComposition(1, 1, 0, 200_000, 0, 200_000))
    assert step.extrapolated


def test_vllm_memory_budget_leaves_the_kv_cache_what_weights_and_activations_do_not_take():
    plan = memory_plan(Deployment(LLAMA_8B), 80, "vllm", 8192, 256)
    assert plan.weight_bytes == pytest.approx(LLAMA_8B.weight_params * 2)
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert plan.kv_cache_bytes == int(0.9 * 80 * GIB) - plan.weight_bytes - plan.activation_bytes - plan.other_bytes
    # Llama 3.1 70B in bf16 (141 GB of weights) fits no 80 GB GPU; across four it does.
    assert memory_plan(Deployment(LLAMA_70B), 80).kv_cache_bytes == 0
    assert memory_plan(Deployment(LLAMA_70B, tensor_parallel_size=4), 80).kv_tokens > 100_000
    fp8_cache = memory_plan(Deployment(LLAMA_8B, kv_cache_dtype="fp8"), 80)
    assert fp8_cache.kv_bytes_per_token * 2 == plan.kv_bytes_per_token
