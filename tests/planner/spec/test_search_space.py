"""Search spaces (planner/spec/search_space.py): loading and validating space files, integer ranges,
and the candidate configurations a space expands to, in coverage order."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.config import EngineConfig
from planner.spec.search_space import (
    SPACES_DIR,
    IntRange,
    LoadLevels,
    SearchSpace,
    SearchSpaceError,
    bf16_is_slower,
)

BASE = EngineConfig(model="m", max_model_len=512)  # configs() never loads the model unless given it


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _space(**knobs) -> SearchSpace:
    return SearchSpace(name="t", knobs=knobs)


def _key(config: EngineConfig) -> tuple:
    return tuple(sorted(config.model_dump().items(), key=lambda kv: kv[0]))


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_builtin_space_loads_by_name_and_by_path(name):
    by_name = SearchSpace.from_file(name)
    assert by_name.name == name
    path = SPACES_DIR / f"{name}.yaml"
    assert path.is_file()
    assert SearchSpace.from_file(path) == by_name
    assert SearchSpace.from_file(str(path)) == by_name


def test_builtin_spaces_contents():
    cpu, gpu = SearchSpace.from_file("cpu"), SearchSpace.from_file("gpu")
    assert cpu.load == LoadLevels(kind="concurrency", levels=[1, 4, 16])
    assert gpu.load == LoadLevels(kind="rate", levels=[1, 4, 16, 64])
    assert cpu.values("quantization") == [None, "int8", "int4"]
    assert cpu.values("max_num_seqs") == [1, 2, 4, 8, 16, 32, 64]
    assert gpu.values("max_num_seqs") == [16, 32, 64, 128, 256, 512, 1024]
    assert gpu.values("quantization") == [None, "fp8", "int8", "int4"]
    assert gpu.values("kv_cache_dtype") == ["auto", "fp8"]
    for space in (cpu, gpu):
        assert space.fixed == {"dtype": "bfloat16"}
        assert space.values("enable_prefix_caching") == [True, False]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_builtin_spaces_expand(name):
    space = SearchSpace.from_file(name)
    configs = space.configs(EngineConfig(model="m", max_model_len=4096), speculative_model="d")
    assert len({_key(c) for c in configs}) == len(configs) > 100
    assert all(c.dtype == "bfloat16" for c in configs)


def test_cpu_space_count_with_and_without_parallel_cap():
    # 3 quant x 7 seqs x 3 tokens x 2 chunked x 2 tp x 2 dp x 3 spec x 2 prefix caching = 3024
    # points; without chunking, 256 batched tokens < max_model_len=512 is dropped: 3*7*1*1*2*2*3*2.
    space = SearchSpace.from_file("cpu")
    assert len(space.configs(BASE, speculative_model="d")) == 3024 - 504
    capped = space.configs(BASE, speculative_model="d", max_parallel=1)
    assert len(capped) == (3024 - 504) // 4
    assert all(c.tensor_parallel_size == c.data_parallel_size == 1 for c in capped)


def test_configs_leave_out_what_the_model_cannot_load(tmp_path):
    """Given the model, a space drops the configurations its engine would refuse at launch (a
    profile spent a third of tiny's launches on int4 groups of 128 over 64 features)."""
    from engine import LLM
    from engine.model_config import ModelConfig
    from engine.model_zoo import make_checkpoint

    model_dir = make_checkpoint("tiny", tmp_path / "tiny", dtype="float32")  # hidden 64
    space = SearchSpace.from_file("cpu").without_drafts()
    base = EngineConfig(model=str(model_dir), max_model_len=512)
    every = space.configs(base)
    fitting = space.configs(base, model=ModelConfig.from_dir(model_dir))
    assert {c.quantization for c in every} == {None, "int8", "int4"}
    assert {c.quantization for c in fitting} == {None, "int8"}
    assert len(fitting) == len([c for c in every if c.quantization != "int4"])
    refused = next(c for c in every if c.quantization == "int4" and c.data_parallel_size == 1
                   and c.tensor_parallel_size == 1)
    with pytest.raises(ValueError, match="quantization_group_size=128"):
        LLM(refused)


def test_unknown_name_lists_builtins():
    with pytest.raises(FileNotFoundError) as info:
        SearchSpace.from_file("no-such-space")
    message = str(info.value)
    assert "no-such-space" in message
    assert "cpu" in message and "gpu" in message
    assert "README" not in message


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        SearchSpace.from_file(tmp_path / "missing.yaml")


def test_loads_a_custom_file(tmp_path):
    path = _write(tmp_path, """\
        name: mine
        knobs:
          quantization: [null, int8]
          max_num_seqs: {low: 2, high: 16}
        fixed:
          block_size: 32
        load:
          kind: rate
          levels: [16, 1, 4]
        """)
    space = SearchSpace.from_file(path)
    assert space.name == "mine"
    assert space.values("max_num_seqs") == [2, 4, 8, 16]
    assert space.load.kind == "rate"
    assert space.load.levels == [1, 4, 16]  # sorted
    assert space.fixed == {"block_size": 32}


def test_default_load_levels(tmp_path):
    space = SearchSpace.from_file(_write(tmp_path, "name: x\nknobs:\n  quantization: [null]\n"))
    assert space.load.kind == "concurrency"
    assert space.load.levels == [1, 4, 16]


# --- validation --------------------------------------------------------------------------------

INVALID = {
    "unknown knob": ("name: x\nknobs:\n  bogus: [1, 2]\n", ["knobs.bogus", "not a knob"]),
    "empty values": ("name: x\nknobs:\n  quantization: []\n",
                     ["knobs.quantization", "at least one value"]),
    "range high < low": ("name: x\nknobs:\n  max_num_seqs: {low: 8, high: 2}\n",
                         ["knobs.max_num_seqs"]),
    "range low < 1": ("name: x\nknobs:\n  max_num_seqs: {low: 0, high: 2}\n",
                      ["knobs.max_num_seqs"]),
    "zero load level": ("name: x\nknobs:\n  quantization: [null]\nload:\n  levels: [1, 0]\n",
                        ["load.levels", "levels[1]"]),
    "negative load level": ("name: x\nknobs:\n  quantization: [null]\n"
                            "load:\n  levels: [-2]\n", ["load.levels", "levels[0]"]),
    "empty load levels": ("name: x\nknobs:\n  quantization: [null]\nload:\n  levels: []\n",
                          ["load.levels"]),
    "unknown load kind": ("name: x\nknobs:\n  quantization: [null]\n"
                          "load:\n  kind: qps\n  levels: [1]\n", ["load.kind"]),
    "unknown top-level key": ("name: x\nknobs:\n  quantization: [null]\nbogus: 1\n",
                              ["bogus", "Extra inputs"]),
    "missing knobs": ("name: x\n", ["knobs"]),
    "missing name": ("knobs:\n  quantization: [null]\n", ["name"]),
    "non-mapping list": ("- a\n- b\n", ["expected a mapping", "list"]),
    "non-mapping scalar": ("42\n", ["expected a mapping", "int"]),
    "empty file": ("", ["expected a mapping"]),
    "invalid YAML": ("name: [unclosed\nknobs: {\n", ["not valid YAML or JSON"]),
}


@pytest.mark.parametrize("text, fragments", list(INVALID.values()), ids=list(INVALID))
def test_invalid_space_file(tmp_path, text, fragments):
    path = _write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.from_file(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_search_space_error_is_a_value_error():
    assert issubclass(SearchSpaceError, ValueError)


def test_range_error_message_gives_the_reason(tmp_path):
    path = _write(tmp_path, "name: x\nknobs:\n  max_num_seqs: {low: 8, high: 2}\n")
    with pytest.raises(SearchSpaceError, match="below low"):
        SearchSpace.from_file(path)


# --- IntRange ----------------------------------------------------------------------------------


@pytest.mark.parametrize("low, high, expected", [
    (3, 40, [3, 4, 8, 16, 32, 40]),
    (1, 64, [1, 2, 4, 8, 16, 32, 64]),
    (8, 256, [8, 16, 32, 64, 128, 256]),
    (5, 7, [5, 7]),
    (4, 4, [4]),
    (1, 1, [1]),
])
def test_int_range_log_values(low, high, expected):
    assert IntRange(low=low, high=high, log=True).values() == expected


def test_int_range_log_is_default():
    assert IntRange(low=1, high=8).values() == [1, 2, 4, 8]


@pytest.mark.parametrize("low, high", [(1, 64), (1, 8), (1, 3), (100, 10_000), (7, 7)])
def test_int_range_linear_values(low, high):
    values = IntRange(low=low, high=high, log=False).values()
    assert values == sorted(set(values))
    assert values[0] == low and values[-1] == high
    assert len(values) == min(8, high - low + 1)
    gaps = [b - a for a, b in zip(values, values[1:])]
    if gaps:
        assert max(gaps) - min(gaps) <= 1  # evenly spaced, up to rounding


def test_int_range_linear_example():
    assert IntRange(low=1, high=64, log=False).values() == [1, 10, 19, 28, 37, 46, 55, 64]
    assert IntRange(low=1, high=8, log=False).values() == list(range(1, 9))


@pytest.mark.parametrize("kwargs", [
    {"low": 5, "high": 4},
    {"low": 0, "high": 4},
    {"low": 1, "high": 4, "step": 2},
])
def test_int_range_rejects(kwargs):
    with pytest.raises(ValueError):
        IntRange(**kwargs)


# --- configs() ---------------------------------------------------------------------------------


def test_configs_distinct_and_first_nearest_defaults():
    space = _space(quantization=[None, "int8", "int4"],
                   max_num_seqs=IntRange(low=1, high=256),
                   enable_chunked_prefill=[True, False])
    configs = space.configs(BASE)
    assert len(configs) == 3 * 9 * 2
    assert len({_key(c) for c in configs}) == len(configs)
    first = configs[0]
    assert first.quantization is None
    assert first.max_num_seqs == 64  # the engine default, among the values
    assert first.enable_chunked_prefill is True
    assert all(c.model == "m" and c.max_model_len == 512 for c in configs)


def test_first_config_follows_the_base():
    space = _space(quantization=[None, "int8", "int4"], max_num_seqs=[1, 8, 64])
    base = EngineConfig(model="m", max_model_len=512, quantization="int8", max_num_seqs=8)
    first = space.configs(base)[0]
    assert (first.quantization, first.max_num_seqs) == ("int8", 8)


def test_first_config_when_default_is_not_a_value():
    # 64 is not among the values: the first config still comes from the space.
    space = _space(max_num_seqs=[2, 4, 128])
    configs = space.configs(BASE)
    assert sorted(c.max_num_seqs for c in configs) == [2, 4, 128]


def test_max_parallel_drops_large_configs():
    space = _space(tensor_parallel_size=[1, 2, 4], data_parallel_size=[1, 2])
    every = space.configs(BASE)
    assert len(every) == 6
    capped = space.configs(BASE, max_parallel=2)
    pairs = {(c.tensor_parallel_size, c.data_parallel_size) for c in capped}
    assert pairs == {(1, 1), (2, 1), (1, 2)}
    assert len(capped) == 3
    assert {(c.tensor_parallel_size, c.data_parallel_size)
            for c in space.configs(BASE, max_parallel=4)} == {(1, 1), (2, 1), (1, 2), (4, 1), (2, 2)}


def test_max_parallel_applies_to_fixed_fields():
    space = SearchSpace(name="t", knobs={"tensor_parallel_size": [1, 2]},
                        fixed={"data_parallel_size": 2})
    configs = space.configs(BASE, max_parallel=2)
    assert [(c.tensor_parallel_size, c.data_parallel_size) for c in configs] == [(1, 2)]


def test_unchunked_prefill_needs_room_for_a_whole_prompt():
    space = _space(enable_chunked_prefill=[True, False], max_num_batched_tokens=[256, 512, 2048])
    pairs = {(c.enable_chunked_prefill, c.max_num_batched_tokens) for c in space.configs(BASE)}
    assert pairs == {(True, 256), (True, 512), (True, 2048), (False, 512), (False, 2048)}


def test_unchunked_prefill_from_base_and_fixed():
    space = _space(max_num_batched_tokens=[256, 1024])
    base = EngineConfig(model="m", max_model_len=512, enable_chunked_prefill=False)
    assert [c.max_num_batched_tokens for c in space.configs(base)] == [1024]
    fixed = SearchSpace(name="t", knobs={"max_num_batched_tokens": [256, 1024]},
                        fixed={"enable_chunked_prefill": False})
    configs = fixed.configs(BASE)
    assert [(c.enable_chunked_prefill, c.max_num_batched_tokens) for c in configs] == [(False, 1024)]


def test_unchunked_prefill_with_base_batched_tokens():
    space = _space(enable_chunked_prefill=[True, False])
    base = EngineConfig(model="m", max_model_len=4096)  # default 2048 batched tokens < 4096
    assert [c.enable_chunked_prefill for c in space.configs(base)] == [True]


def test_unknown_context_length_keeps_unchunked_configs():
    space = _space(enable_chunked_prefill=[True, False], max_num_batched_tokens=[16])
    configs = space.configs(EngineConfig(model="m"))  # max_model_len None: nothing to fit
    assert sorted(c.enable_chunked_prefill for c in configs) == [False, True]


def test_fixed_fields_apply_to_every_config():
    space = SearchSpace(name="t", knobs={"max_num_seqs": [1, 4, 16]},
                        fixed={"dtype": "float16", "block_size": 32,
                               "enable_prefix_caching": False})
    configs = space.configs(BASE)
    assert len(configs) == 3
    for config in configs:
        assert config.dtype == "float16"
        assert config.block_size == 32
        assert config.enable_prefix_caching is False


def test_knob_overrides_fixed_field():
    space = SearchSpace(name="t", knobs={"max_num_seqs": [1, 4]}, fixed={"max_num_seqs": 99})
    assert sorted(c.max_num_seqs for c in space.configs(BASE)) == [1, 4]


def test_configs_do_not_modify_base():
    before = BASE.model_dump()
    SearchSpace(name="t", knobs={"max_num_seqs": [1, 4]}, fixed={"dtype": "float16"}).configs(BASE)
    assert BASE.model_dump() == before


def test_speculative_tokens_need_a_draft():
    space = _space(num_speculative_tokens=[0, 2, 4])
    with pytest.raises(SearchSpaceError, match="--draft"):
        space.configs(BASE)


def test_speculative_tokens_with_a_draft():
    space = _space(num_speculative_tokens=[0, 2, 4])
    configs = space.configs(BASE, speculative_model="d")
    assert len(configs) == 3
    by_k = {c.num_speculative_tokens: c for c in configs}
    assert set(by_k) == {None, 2, 4}
    assert by_k[None].speculative_model is None
    for k in (2, 4):
        assert by_k[k].speculative_model == "d"
        assert by_k[k].num_speculative_tokens == k
    assert configs[0].speculative_model is None  # the default: no draft


def test_zero_speculative_tokens_needs_no_draft():
    configs = _space(num_speculative_tokens=[0], max_num_seqs=[1, 2]).configs(BASE)
    assert len(configs) == 2
    assert all(c.speculative_model is None and c.num_speculative_tokens is None for c in configs)
    with_draft = _space(num_speculative_tokens=[0]).configs(BASE, speculative_model="d")
    assert [c.speculative_model for c in with_draft] == [None]


def test_coverage_prefix_spans_the_space():
    space = _space(quantization=[None, "int8", "int4"], max_num_seqs=IntRange(low=1, high=64))
    configs = space.configs(BASE)
    assert len(configs) == 3 * 7
    head = configs[:4]
    seqs = {c.max_num_seqs for c in head}
    assert 1 in seqs and 64 in seqs
    assert len({c.quantization for c in head}) >= 2
    assert (head[0].quantization, head[0].max_num_seqs) == (None, 64)
    assert (head[1].quantization, head[1].max_num_seqs) == ("int4", 1)  # the farthest corner


def test_coverage_order_is_deterministic():
    space = _space(quantization=[None, "int8", "int4"], max_num_seqs=IntRange(low=1, high=64))
    first = [_key(c) for c in space.configs(BASE)]
    second = [_key(c) for c in space.configs(BASE)]
    assert first == second
    again = _space(quantization=[None, "int8", "int4"], max_num_seqs=IntRange(low=1, high=64))
    assert [_key(c) for c in again.configs(BASE)] == first


def test_large_space_order_is_deterministic():
    space = SearchSpace.from_file("gpu")
    base = EngineConfig(model="m", max_model_len=4096)
    first = space.configs(base, speculative_model="d", max_parallel=8)
    second = space.configs(base, speculative_model="d", max_parallel=8)
    assert [_key(c) for c in first] == [_key(c) for c in second]


@pytest.mark.parametrize("space, kwargs", [
    (_space(tensor_parallel_size=[2, 4]), {"max_parallel": 1}),
    (_space(enable_chunked_prefill=[False], max_num_batched_tokens=[128, 256]), {}),
], ids=["parallel cap", "unchunked too small"])
def test_all_invalid_raises(space, kwargs):
    with pytest.raises(SearchSpaceError, match="no valid configuration"):
        space.configs(BASE, **kwargs)


@pytest.mark.parametrize("knobs, fixed", [
    ({"quantization": ["int3"]}, {}),
    ({"max_num_seqs": [0, 4]}, {}),
    ({"max_num_seqs": [1]}, {"dtype": "float8"}),
    ({"max_num_seqs": [1]}, {"no_such_field": 1}),
])
def test_invalid_values_raise(knobs, fixed):
    space = SearchSpace(name="t", knobs=knobs, fixed=fixed)
    with pytest.raises(SearchSpaceError):
        space.configs(BASE)


def test_the_builtin_cpu_space_runs_float32_where_bf16_is_slower():
    cpu = SearchSpace.from_file("cpu")
    assert cpu.fixed["dtype"] == "bfloat16"
    assert cpu.in_float32_where_bf16_is_slower(bf16_is_slower(1.2, 0.6)) is cpu  # bf16 arithmetic: kept
    assert cpu.in_float32_where_bf16_is_slower(bf16_is_slower(None, 0.6)) is cpu  # unknown rate: kept
    emulated = cpu.in_float32_where_bf16_is_slower(bf16_is_slower(0.001, 0.09))
    assert emulated.fixed["dtype"] == "float32" and emulated.knobs == cpu.knobs
    fp32 = cpu.model_copy(update={"fixed": {**cpu.fixed, "dtype": "float32"}})
    assert fp32.in_float32_where_bf16_is_slower(bf16_is_slower(0.001, 0.09)) is fp32
