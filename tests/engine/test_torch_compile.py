"""`torch_compile=True`: decode steps run through torch.compile (Inductor, C++ on the CPU) and
give the tokens the eager engine gives."""

from __future__ import annotations

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.layers.linear import Linear

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
pytestmark = pytest.mark.inductor


def test_compiled_decode_steps_match_the_eager_engine(model_dir):
    # Several batch sizes (1 is its own graph) and uneven contexts (padded, masked decode groups).
    batches = [[list(range(300, 300 + n)) for n in (5, 40, 17)], [[7, 8, 9]]]
    with LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=2)) as eager:
        expected = [[o.token_ids for o in eager.generate(b, GREEDY)] for b in batches]
    from torch._dynamo.utils import counters  # here, not at collection: see conftest.py

    counters.clear()
    with LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=2, torch_compile=True)) as llm:
        runner = llm.engine.runner
        assert runner.compiled is not None and runner.decode_backend is None
        assert all(m.layout == "plain" for m in runner.model.modules() if isinstance(m, Linear))
        got = [[o.token_ids for o in llm.generate(b, GREEDY)] for b in batches]
    assert got == expected
    assert counters["stats"]["unique_graphs"] >= 2  # compiled, for batch 1 and for batch 3


def test_compiled_int8_decode_uses_the_dequantizing_path(model_dir):
    with LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=2, quantization="int8")) as eager:
        expected = [o.token_ids for o in eager.generate(["def f(x):"], GREEDY)]
    with LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=2, quantization="int8",
                          torch_compile=True)) as llm:
        layouts = {m.layout for m in llm.engine.runner.model.modules() if isinstance(m, Linear)}
        assert layouts == {"int8-dequant"}
        got = [o.token_ids for o in llm.generate(["def f(x):"], GREEDY)]
    assert got == expected
