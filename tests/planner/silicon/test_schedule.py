"""A plan for SGLang is predicted under the schedule its exported command starts: prefill-first
steps unless the command turns mixed chunks on."""

from __future__ import annotations

import pytest

from engine import EngineConfig
from planner.search.launch_args import sglang_args
from planner.silicon.schedule import prefill_first, scheduler_config


@pytest.mark.parametrize("chunked", [True, False])
def test_sglang_prefills_first_exactly_when_its_command_leaves_mixed_chunks_off(chunked):
    config = EngineConfig(model="m", device="cuda", enable_chunked_prefill=chunked, max_num_batched_tokens=8192)
    scheduler = scheduler_config("sglang", config, 4096)
    assert scheduler.prefill_first is ("--enable-mixed-chunk" not in sglang_args(config))
    assert scheduler.prefill_first is (not chunked)
    assert scheduler.max_num_batched_tokens == 8192 and scheduler.enable_chunked_prefill is chunked


def test_vllm_and_tensorrt_llm_mix_and_sglang_defaults_prefill_first():
    config = EngineConfig(model="m", device="cuda", enable_chunked_prefill=False)
    assert not scheduler_config("vllm", config, 4096).prefill_first
    assert not prefill_first("trtllm") and prefill_first("sglang")
