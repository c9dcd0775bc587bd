"""Bad input gets a clear error that names the offending field, and the engine keeps serving.

The central test starts valid requests, steps the engine, throws every kind of bad request at
it while they run, and checks that the valid requests finish with exactly the tokens they get
when no bad request was ever made.
"""

from __future__ import annotations

import json
import math

import pydantic
import pytest

from engine import LLM, EngineConfig, InvalidRequestError, RequestOutput, SamplingParams

VOCAB = 512
MAX_LEN = 64


def make_llm(model_dir: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", MAX_LEN)
    kwargs.setdefault("num_threads", 1)  # the tiny model gains nothing from more; the machine is shared
    return LLM(EngineConfig(model=model_dir, dtype="float32", device="cpu", **kwargs))


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return make_llm(model_dir)


def bad_params(**fields) -> SamplingParams:
    """Valid params mutated afterwards, as a client can do, so the engine must re-check them."""
    params = SamplingParams(max_tokens=4)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


# The valid requests: greedy, seeded sampling, unseeded sampling (the engine's own generator),
# a string prompt, and stop tokens.
VALID = [
    ("A", list(range(10, 40)), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
    ("B", "Valid requests keep going", SamplingParams(temperature=0.8, seed=5, max_tokens=10,
                                                      ignore_eos=True)),
    ("C", [7, 8, 9, 10, 11], SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True)),
    ("D", list(range(100, 150)), SamplingParams(temperature=0.0, max_tokens=8)),
]

# (request_id, prompt, params, priority, expected field)
BAD = [
    ("bad-empty-str", "", None, 0, "prompt"),
    ("bad-empty-list", [], None, 0, "prompt_token_ids"),
    ("bad-long-str", "x" * MAX_LEN, None, 0, "prompt"),  # BOS + 64 bytes = 65 tokens
    ("bad-long-list", [5] * (MAX_LEN + 1), None, 0, "prompt_token_ids"),
    ("bad-negative-id", [1, 2, -1, 4], None, 0, "prompt_token_ids[2]"),
    ("bad-large-id", [1, 2, VOCAB, 4], None, 0, "prompt_token_ids[2]"),
    ("bad-huge-id", [1, 2, 3, 10**12], None, 0, "prompt_token_ids[3]"),
    ("bad-float-id", [1, 2.0, 3], None, 0, "prompt_token_ids[1]"),
    ("bad-bool-id", [True, 2, 3], None, 0, "prompt_token_ids[0]"),
    ("bad-max-tokens-0", [1, 2, 3], bad_params(max_tokens=0), 0, "max_tokens"),
    ("bad-max-tokens-neg", [1, 2, 3], bad_params(max_tokens=-5), 0, "max_tokens"),
    ("bad-temperature", [1, 2, 3], bad_params(temperature=-0.5), 0, "temperature"),
    ("bad-top-p-0", [1, 2, 3], bad_params(top_p=0.0), 0, "top_p"),
    ("bad-top-p-big", [1, 2, 3], bad_params(top_p=1.5), 0, "top_p"),
    ("bad-top-k", [1, 2, 3], bad_params(top_k=0), 0, "top_k"),
    ("bad-priority", [1, 2, 3], None, "high", "priority"),
    ("A", [1, 2, 3], None, 0, "request_id"),  # duplicate of a running request
    ("B", [1, 2, 3], None, 0, "request_id"),
]


def drain(engine, outputs: dict[str, RequestOutput]) -> None:
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    pytest.fail("the engine did not finish")


def run_valid(llm: LLM, bad: list | None = None, steps_before_bad: int = 3) -> dict[str, RequestOutput]:
    engine = llm.engine
    for rid, prompt, params in VALID:
        engine.add_request(rid, prompt, params)
    outputs: dict[str, RequestOutput] = {}
    for _ in range(steps_before_bad):
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    if bad:
        for rid, prompt, params, priority, field in bad:
            before = (set(engine.requests), engine.scheduler.num_unfinished,
                      engine.block_manager.num_free_blocks)
            with pytest.raises(InvalidRequestError) as info:
                engine.add_request(rid, prompt, params, priority=priority)
            err = info.value
            assert err.field == field, (rid, str(err))
            assert str(err).startswith(field + ":"), str(err)
            assert isinstance(err, ValueError)
            # Nothing of the bad request stayed behind.
            assert (set(engine.requests), engine.scheduler.num_unfinished,
                    engine.block_manager.num_free_blocks) == before, rid
    drain(engine, outputs)
    return outputs


def test_engine_keeps_serving_through_bad_requests(model_dir):
    reference = run_valid(make_llm(model_dir))
    assert set(reference) == {"A", "B", "C", "D"}

    llm = make_llm(model_dir)
    engine = llm.engine
    outputs = run_valid(llm, bad=BAD)
    assert set(outputs) == set(reference)
    for rid, ref in reference.items():
        assert outputs[rid].token_ids == ref.token_ids, rid
        assert outputs[rid].text == ref.text
        assert outputs[rid].finish_reason == ref.finish_reason
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.requests
    # A finished request's id may be used again, and new work is served normally.
    engine.add_request("A", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    more: dict[str, RequestOutput] = {}
    drain(engine, more)
    assert len(more["A"].token_ids) == 2


def test_bad_messages_say_what_is_wrong(llm):
    engine = llm.engine
    cases = [
        (([1, 2, VOCAB],), "outside the vocabulary"),
        (([3] * (MAX_LEN + 1),), f"max_model_len={MAX_LEN}"),
        (("",), "empty"),
    ]
    for args, text in cases:
        with pytest.raises(InvalidRequestError, match=text):
            engine.add_request(None, *args)
    with pytest.raises(InvalidRequestError, match=r"0\.\.511"):
        engine.add_request(None, [VOCAB + 5])
    with pytest.raises(InvalidRequestError, match="-0.5"):
        engine.add_request(None, [1, 2], bad_params(temperature=-0.5))
    assert not engine.has_unfinished_requests()


def test_prompt_of_exactly_max_model_len_is_accepted(llm):
    out = llm.generate([[9] * MAX_LEN], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 1  # the context is full after one more token


# -- SamplingParams on their own ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_p=1.0001), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
])
def test_sampling_params_refuse_out_of_range_values(kwargs, field):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(field)
    assert str(list(kwargs.values())[0]) in str(info.value)


def test_sampling_params_edge_values_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=1)
    SamplingParams(top_p=1e-9, top_k=1, max_tokens=None)


def test_nan_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=math.nan)


# -- the LLM API --------------------------------------------------------------------------------


def test_llm_api_reports_bad_prompts_and_keeps_serving(llm):
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    expected = llm.generate([1, 2, 3, 4], params)[0].token_ids
    with pytest.raises(InvalidRequestError) as info:
        llm.generate("", params)
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([[]], params)
    assert info.value.field == "prompt_token_ids"
    with pytest.raises(InvalidRequestError) as info:
        next(llm.stream([1, 2, VOCAB], params))
    assert info.value.field == "prompt_token_ids[2]"
    with pytest.raises(ValueError, match="params"):
        llm.generate([[1, 2], [3, 4]], [params])
    for ids, field in (([], "prompt_token_ids"), ([1, -3], "prompt_token_ids[1]"),
                       ([1] * (MAX_LEN + 1), "prompt_token_ids")):
        with pytest.raises(InvalidRequestError) as info:
            llm.score(ids)
        assert info.value.field == field
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([1, 2, 3, 4], params)[0].token_ids == expected
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_generate_with_one_bad_prompt_leaves_nothing_behind(model_dir):
    llm = make_llm(model_dir)
    with pytest.raises(InvalidRequestError):
        llm.generate([[1, 2, 3], [4, 5, 6], [7, VOCAB]], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.requests


def test_automatic_request_ids_do_not_collide_with_caller_ids(model_dir):
    llm = make_llm(model_dir)
    llm.engine.add_request("0", [1, 2, 3], SamplingParams(max_tokens=2))
    out = llm.generate([4, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert len(out.token_ids) == 2


# -- EngineConfig -------------------------------------------------------------------------------


def test_unknown_engine_config_key_is_named(model_dir):
    with pytest.raises(pydantic.ValidationError) as info:
        EngineConfig(model=model_dir, max_num_seq=8)  # typo of max_num_seqs
    assert "max_num_seq" in str(info.value)
    assert "xtra" in str(info.value)  # pydantic: "Extra inputs are not permitted"


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"),
    (dict(block_size=0), "block_size"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(scheduling_policy="lifo"), "scheduling_policy"),
    (dict(dtype="float8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
])
def test_bad_engine_config_values_are_named(model_dir, kwargs, field):
    with pytest.raises(pydantic.ValidationError) as info:
        EngineConfig(model=model_dir, **kwargs)
    assert field in str(info.value)


def test_engine_config_assignment_is_validated(model_dir):
    cfg = EngineConfig(model=model_dir)
    with pytest.raises(pydantic.ValidationError, match="max_num_seqs"):
        cfg.max_num_seqs = -4


def test_engine_config_from_file_with_unknown_key(tmp_path, model_dir):
    yaml_path = tmp_path / "engine.yaml"
    yaml_path.write_text(f"model: {model_dir}\ndtype: float32\nmax_num_seqz: 4\n")
    with pytest.raises(pydantic.ValidationError, match="max_num_seqz"):
        EngineConfig.from_file(yaml_path)

    json_path = tmp_path / "engine.json"
    json_path.write_text(json.dumps({"model": model_dir, "enable_prefix_cache": True}))
    with pytest.raises(pydantic.ValidationError, match="enable_prefix_cache"):
        EngineConfig.from_file(json_path)

    plan_path = tmp_path / "plan.yaml"  # a plan keeps engine settings under `engine:`
    plan_path.write_text(f"engine:\n  model: {model_dir}\n  chunked_prefill: false\nreplicas: 2\n")
    with pytest.raises(pydantic.ValidationError, match="chunked_prefill"):
        EngineConfig.from_file(plan_path)

    good_path = tmp_path / "good.yaml"
    good_path.write_text(f"engine:\n  model: {model_dir}\n  max_num_seqs: 4\nreplicas: 2\n")
    assert EngineConfig.from_file(good_path).max_num_seqs == 4

    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        EngineConfig.from_file(tmp_path / "nope.yaml")
    list_path = tmp_path / "list.yaml"
    list_path.write_text("- model\n- dtype\n")
    with pytest.raises(ValueError, match="mapping"):
        EngineConfig.from_file(list_path)


def test_engine_refuses_inconsistent_configs_by_name(model_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        make_llm(model_dir, max_model_len=10_000)  # the tiny model has 512 positions
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_llm(model_dir, enable_chunked_prefill=False, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="max_model_len"):
        make_llm(model_dir, num_kv_blocks=2, block_size=16)  # 32 cache slots < 64
    with pytest.raises(ValueError, match="quantization_group_size=48"):
        make_llm(model_dir, quantization="int4", quantization_group_size=48)  # 64 % 48 != 0
    with pytest.raises(pydantic.ValidationError, match="num_speculative_tokens"):
        EngineConfig(model=model_dir, speculative_model=model_dir)
