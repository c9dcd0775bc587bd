"""A model directory or engine config that cannot be used fails with an error naming the problem.

Checkpoint problems raise `engine.model_config.CheckpointError` (a `ValueError`) whose message
names the file or tensor; unknown config keys are pydantic validation errors; a knob the model
cannot take (a tensor-parallel size that does not divide its heads) is a `ValueError` naming both.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pydantic
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, EngineConfig
from engine.model_config import CheckpointError
from engine.model_zoo import make_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load(model_dir: Path | str, **kwargs: Any) -> LLM:
    return LLM(EngineConfig(model=str(model_dir), dtype="float32", num_threads=1, **kwargs))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_checkpoint("tiny", tmp_path_factory.mktemp("pristine") / "tiny", seed=0,
                           dtype="float32")


@pytest.fixture(scope="module")
def pristine_sharded(tmp_path_factory) -> Path:
    return make_checkpoint("tiny", tmp_path_factory.mktemp("pristine") / "sharded", seed=0,
                           dtype="float32", max_shard_bytes=64 * 1024)


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A private, loadable copy of the tiny checkpoint for a test to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture
def sharded(pristine_sharded, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_sharded, tmp_path / "sharded"))


def _edit_config(model_dir: Path, edit: Callable[[dict], Any]) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _edit_tensors(model_dir: Path, edit: Callable[[dict], Any]) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_pristine_copy_loads(ckpt):
    """The baseline every other test breaks in one way."""
    assert _load(ckpt).score([1, 2, 3]).shape == (3, 512)


# -- the directory and its files ------------------------------------------------------------------

def test_missing_model_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match=f"model directory not found: {re.escape(str(missing))}"):
        _load(missing)


def test_model_path_is_a_file(ckpt):
    with pytest.raises(CheckpointError, match="model directory not found: .*config.json"):
        _load(ckpt / "config.json")


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"missing file: {re.escape(str(ckpt / 'config.json'))}"):
        _load(ckpt)


def test_config_json_not_json(ckpt):
    (ckpt / "config.json").write_text("{'model_type': 'llama'")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        _load(ckpt)


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file: .*model\.safetensors") as info:
        _load(ckpt)
    assert "model.safetensors.index.json" in str(info.value)


def test_pytorch_bin_only_is_refused_without_unpickling(ckpt):
    (ckpt / "model.safetensors").unlink()
    # Not a pickle at all: loading must refuse before ever reading it.
    (ckpt / "pytorch_model.bin").write_bytes(b"this is not a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*only safetensors") as info:
        _load(ckpt)
    assert "missing file" in str(info.value)


def test_index_lists_a_missing_shard(sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError,
                       match=rf"missing file: .*{re.escape(shards[1].name)} \(listed in .*"
                             r"model\.safetensors\.index\.json\)"):
        _load(sharded)


def test_index_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        _load(sharded)


def test_index_without_weight_map(sharded):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        _load(sharded)


def test_index_missing_a_tensor(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["weight_map"]["model.layers.0.self_attn.o_proj.weight"]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.0\.self_attn\.o_proj\.weight"):
        _load(sharded)


# -- config.json contents -------------------------------------------------------------------------

def test_unsupported_model_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'gpt2'; supported: llama"):
        _load(ckpt)


def test_missing_model_type(ckpt):
    _edit_config(ckpt, lambda c: c.pop("model_type"))
    with pytest.raises(CheckpointError, match="unsupported model_type None"):
        _load(ckpt)


def test_unsupported_rope_scaling_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))
    with pytest.raises(CheckpointError,
                       match=r"config\.json: unsupported rope_scaling type 'yarn'; supported: default"):
        _load(ckpt)


def test_unsupported_rope_type_in_transformers5_rope_parameters(ckpt):
    _edit_config(ckpt, lambda c: c.update(rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    with pytest.raises(CheckpointError, match="unsupported rope_scaling type 'dynamic'"):
        _load(ckpt)


def test_non_positive_size_field(ckpt):
    _edit_config(ckpt, lambda c: c.update(hidden_size=0))
    with pytest.raises(CheckpointError, match="hidden_size must be a positive integer, got 0"):
        _load(ckpt)


def test_missing_size_field(ckpt):
    _edit_config(ckpt, lambda c: c.pop("num_hidden_layers"))
    with pytest.raises(CheckpointError, match=r"config\.json: missing field num_hidden_layers \(a positive integer\)"):
        _load(ckpt)


def test_heads_not_a_multiple_of_kv_heads(ckpt):
    _edit_config(ckpt, lambda c: c.update(num_key_value_heads=3))
    with pytest.raises(CheckpointError,
                       match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        _load(ckpt)


def test_moe_top_k_larger_than_expert_count(tmp_path):
    model_dir = make_checkpoint("mixtral-tiny", tmp_path / "moe", dtype="float32")
    _edit_config(model_dir, lambda c: c.update(num_experts_per_tok=9))
    with pytest.raises(CheckpointError, match="num_experts_per_tok=9 must be in 1..num_local_experts=8"):
        _load(model_dir)


def test_config_disagrees_with_tensors(ckpt):
    # Every tensor is checked against the shapes config.json implies.
    _edit_config(ckpt, lambda c: c.update(hidden_size=96))
    with pytest.raises(CheckpointError,
                       match=r"tensor model\.embed_tokens\.weight has shape \(512, 64\), "
                             r"expected \(512, 96\) from config\.json"):
        _load(ckpt)


# -- tensors --------------------------------------------------------------------------------------

def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight$"):
        _load(ckpt)


def test_missing_untied_lm_head(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor lm_head\.weight"):
        _load(ckpt)


def test_many_missing_tensors_are_summarised(ckpt):
    def drop_layer_1(tensors: dict) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.1.")]:
            del tensors[name]

    _edit_tensors(ckpt, drop_layer_1)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\..*\(and 6 more\)"):
        _load(ckpt)


def test_misshaped_tensor(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"  # 2 kv heads x 16 = 32 rows

    def reshape(tensors: dict) -> None:
        assert tuple(tensors[name].shape) == (32, 64)
        tensors[name] = torch.zeros(64, 64)

    _edit_tensors(ckpt, reshape)
    with pytest.raises(CheckpointError,
                       match=rf"tensor {re.escape(name)} has shape \(64, 64\), expected \(32, 64\)"):
        _load(ckpt)


def test_integer_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has dtype torch\.int32, expected a float"):
        _load(ckpt)


# -- broken files and values that escape as other exception types ----------------------------------

def _garbage_safetensors(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 16)


def _truncated_safetensors(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("corrupt", [
    pytest.param(_garbage_safetensors, id="garbage"),
    pytest.param(_truncated_safetensors, id="truncated"),
])
def test_corrupt_safetensors_names_the_file(ckpt, corrupt):
    corrupt(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _load(ckpt)


def test_index_points_to_wrong_shard(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[-1])
    index["weight_map"][name] = shards[0]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*{re.escape(shards[0])}"):
        _load(sharded)


def _set(**fields: Any) -> Callable[[dict], None]:
    return lambda c: c.update(fields)


@pytest.mark.parametrize("edit, names", [
    pytest.param(_set(rope_scaling={"rope_type": "linear"}), "factor", id="linear-rope-without-factor"),
    pytest.param(_set(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor",
                 id="llama3-rope-without-its-fields"),
    pytest.param(_set(rope_theta=None), "rope_theta", id="rope-theta-null"),
    pytest.param(_set(max_position_embeddings=0), "max_position_embeddings",
                 id="max-position-embeddings-zero"),
])
def test_malformed_config_values_name_the_field(ckpt, edit, names):
    _edit_config(ckpt, edit)
    with pytest.raises(CheckpointError, match=rf"config\.json.*{names}"):
        _load(ckpt)


def test_config_json_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        _load(ckpt)


def test_index_json_not_an_object(sharded):
    (sharded / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        _load(sharded)


# -- EngineConfig ---------------------------------------------------------------------------------

def test_unknown_engine_config_key(pristine):
    with pytest.raises(pydantic.ValidationError, match="max_num_sequences") as info:
        EngineConfig(model=str(pristine), max_num_sequences=8)
    assert "extra" in str(info.value).lower()


def test_unknown_key_through_llm_kwargs(pristine):
    with pytest.raises(pydantic.ValidationError, match="bogus_knob"):
        LLM(model=str(pristine), bogus_knob=1)


def test_invalid_engine_config_value(pristine):
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        EngineConfig(model=str(pristine), dtype="float64")


def test_speculative_fields_must_come_together(pristine):
    with pytest.raises(pydantic.ValidationError, match="num_speculative_tokens"):
        EngineConfig(model=str(pristine), speculative_model=str(pristine))


@pytest.mark.parametrize("size, field", [(3, "num_attention_heads (4)"),
                                         (4, "num_key_value_heads (2)")])
def test_tensor_parallel_size_must_divide_the_heads(pristine, size, field):
    with pytest.raises(ValueError, match=re.escape(f"tensor_parallel_size={size} must divide the "
                                                   f"model's {field}")):
        _load(pristine, tensor_parallel_size=size)


def test_max_model_len_beyond_the_model(pristine):
    with pytest.raises(ValueError, match="max_model_len=1000 exceeds the model's max_position_embeddings=512"):
        _load(pristine, max_model_len=1000)


# -- make_checkpoint ------------------------------------------------------------------------------

def test_make_checkpoint_unknown_shape(tmp_path):
    with pytest.raises(CheckpointError, match="unknown shape 'llama-7z'; known: tiny, llama-110m"):
        make_checkpoint("llama-7z", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_make_checkpoint_missing_shape_file(tmp_path):
    with pytest.raises(CheckpointError, match="shape file not found: .*nope.json"):
        make_checkpoint(tmp_path / "nope.json", tmp_path / "out")


def test_make_checkpoint_invalid_shape_file(tmp_path):
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        make_checkpoint(shape, tmp_path / "out")


def test_make_checkpoint_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        make_checkpoint("tiny", tmp_path / "out", dtype="int8")
