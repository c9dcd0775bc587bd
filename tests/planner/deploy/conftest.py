"""The deploy tests' plans (tests/support/deploy_plans.py) as fixtures."""

from __future__ import annotations

import pytest
from support.deploy_plans import VLLM_BASIS, make_plan

from planner.search.plan import Plan


@pytest.fixture
def cpu_plan() -> Plan:
    """As the quickstart plans SmolLM2-135M: int8, two data-parallel engine cores, 4 clients."""
    return make_plan({"model": "/root/.cache/pilot/models/smollm2-135m", "dtype": "bfloat16",
                      "max_model_len": 208, "max_num_seqs": 32, "quantization": "int8",
                      "quantization_group_size": 32, "data_parallel_size": 2,
                      "enable_prefix_caching": False, "enable_chunked_prefill": False},
                     load=("concurrency", 4.0), e2e_p50=0.66, basis="pilot engine on cpu-host, profiled here")


@pytest.fixture
def gpu_plan() -> Plan:
    """The README's GPU example as pilot recommend plans it: one H100, vLLM, 4 requests/s."""
    return make_plan({"model": "models/Llama-3.1-8B", "dtype": "bfloat16", "device": "cuda",
                      "max_model_len": 2528, "max_num_seqs": 32, "max_num_batched_tokens": 8192},
                     hardware="h100-sxm", kind="gpu", serve_with="vllm", e2e_p50=1.665, basis=VLLM_BASIS)


@pytest.fixture
def multi_node_plan() -> Plan:
    """A 70B-class model at tensor_parallel_size=16: two nodes of eight H100s per replica."""
    return make_plan({"model": "models/Llama-3.1-70B", "dtype": "bfloat16", "device": "cuda",
                      "tensor_parallel_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 8192},
                     hardware="h100-sxm", kind="gpu", devices=16, replicas=2, serve_with="vllm",
                     e2e_p50=4.0, basis=VLLM_BASIS)
