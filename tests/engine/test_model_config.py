"""`ModelConfig`: what a Hugging Face config.json says, read from real files. The planner prices
any plannable architecture from its shapes alone; the engine refuses the ones it cannot build.
Every missing or unusable field is a `CheckpointError` naming the field and the file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, EngineConfig
from engine.loader import load_model
from engine.model_config import (
    ENGINE_MODEL_TYPES,
    PLANNABLE_MODEL_TYPES,
    SIZE_FIELDS,
    CheckpointError,
    ModelConfig,
)
from engine.model_zoo import make_checkpoint

# Qwen/Qwen3-32B's config.json (the fields it has; the values as published).
QWEN3_32B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 25600, "max_position_embeddings": 40960, "max_window_layers": 64,
    "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
LLAMA: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128,
}


def _config_dir(path: Path, cfg: dict[str, Any]) -> Path:
    """A model directory holding config.json and nothing else."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _fails(model_dir: Path, pattern: str) -> None:
    config_json = re.escape(str(model_dir / "config.json"))
    with pytest.raises(CheckpointError, match=rf"^{config_json}: .*{pattern}"):
        ModelConfig.from_dir(model_dir)


# -- Qwen3: planned from its shapes, refused by the engine -----------------------------------------

def test_qwen3_reads_with_a_query_width_beyond_hidden_size(tmp_path):
    cfg = ModelConfig.from_dir(_config_dir(tmp_path / "qwen3-32b", QWEN3_32B))
    assert cfg.model_type == "qwen3" and not cfg.runnable
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (5120, 64, 25600)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 8, 128)
    assert cfg.num_attention_heads * cfg.head_dim == 8192 != cfg.hidden_size
    assert cfg.max_position_embeddings == 40960  # no sliding window: use_sliding_window is off
    assert not cfg.attention_bias and not cfg.is_moe and cfg.rope_type == "default"
    assert cfg.rope_theta == 1e6 and cfg.eos_token_ids == (151645,)
    assert set(ENGINE_MODEL_TYPES) < set(PLANNABLE_MODEL_TYPES) and "qwen3" not in ENGINE_MODEL_TYPES


def test_qwen3_keeps_its_context_when_the_sliding_window_is_switched_off():
    # Qwen ships a sliding_window that only use_sliding_window turns on, as Qwen2 does.
    off = ModelConfig.from_dict({**QWEN3_32B, "sliding_window": 4096})
    on = ModelConfig.from_dict({**QWEN3_32B, "sliding_window": 4096, "use_sliding_window": True,
                                "max_window_layers": 0})
    assert (off.max_position_embeddings, on.max_position_embeddings) == (40960, 4096)


def test_the_engine_refuses_qwen3_naming_its_model_type(tmp_path):
    model_dir = _config_dir(tmp_path / "qwen3", QWEN3_32B)
    named = rf"{re.escape(str(model_dir / 'config.json'))}: model_type 'qwen3' can be planned.*" \
            r"the engine cannot run it yet; the engine runs: llama, mistral, qwen2, mixtral"
    with pytest.raises(CheckpointError, match=named):
        ModelConfig.for_engine(model_dir)
    # The loader itself refuses, before it looks for weights.
    with pytest.raises(CheckpointError, match=named):
        load_model(model_dir, ModelConfig.from_dir(model_dir), torch.float32, torch.device("cpu"), 64)
    # And so does an engine asked to serve it, before it reads a tokenizer.
    with pytest.raises(CheckpointError, match=named):
        LLM(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"))


def test_make_checkpoint_refuses_an_architecture_the_engine_cannot_build(tmp_path):
    shape = tmp_path / "qwen3.json"
    shape.write_text(json.dumps({"model_type": "qwen3", "head_dim": 32}))
    with pytest.raises(CheckpointError, match="model_type 'qwen3' can be planned"):
        make_checkpoint(shape, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_engine_architecture_reads_for_the_engine(tmp_path):
    cfg = ModelConfig.for_engine(_config_dir(tmp_path / "llama", LLAMA))
    assert cfg.runnable and cfg.head_dim == 16 and cfg.num_key_value_heads == 2


# -- the directory and the file --------------------------------------------------------------------

def test_a_directory_without_config_json_says_so(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"missing file: {re.escape(str(tmp_path / 'config.json'))}"):
        ModelConfig.from_dir(tmp_path)


def test_a_missing_directory_says_so(tmp_path):
    with pytest.raises(CheckpointError, match=f"model directory not found: {re.escape(str(tmp_path / 'no'))}"):
        ModelConfig.from_dir(tmp_path / "no")


@pytest.mark.parametrize("text, says", [
    ('{"model_type": "llama",', "not valid JSON"),
    ("", "not valid JSON"),
    ('["llama"]', "expected a JSON object, got list"),
])
def test_a_config_json_that_is_not_a_json_object_says_so(tmp_path, text, says):
    (tmp_path / "config.json").write_text(text)
    _fails(tmp_path, says)


# -- fields ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", SIZE_FIELDS)
def test_each_missing_size_field_is_named_with_the_file(tmp_path, key):
    cfg = dict(QWEN3_32B)
    del cfg[key]
    _fails(_config_dir(tmp_path, cfg), rf"missing field {key} \(a positive integer\)$")


@pytest.mark.parametrize("key", SIZE_FIELDS)
def test_each_unusable_size_field_is_named_with_the_file(tmp_path, key):
    for value in (0, -8, "4096", 4096.0, True, None):
        _fails(_config_dir(tmp_path, {**LLAMA, key: value}),
               rf"{key} must be a positive integer, got {re.escape(repr(value))}$")


def test_a_missing_model_type_is_named(tmp_path):
    cfg = dict(QWEN3_32B)
    del cfg["model_type"]
    _fails(_config_dir(tmp_path, cfg), "unsupported model_type None; supported: llama, .*qwen3")


@pytest.mark.parametrize("fields, pattern", [
    ({"num_key_value_heads": "8"}, "num_key_value_heads must be a positive integer, got '8'"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"head_dim": -16}, "head_dim must be a positive integer, got -16"),
    ({"head_dim": "16"}, "head_dim must be a positive integer, got '16'"),
    ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4, and there is no head_dim"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number, got '1e-5'"),
    ({"rope_theta": "5e5"}, "rope_theta must be a positive number"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be a JSON object or null, got 'llama3'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs numeric low_freq_factor"),
    ({"rope_parameters": [1]}, "rope_parameters must be a JSON object"),
    ({"num_local_experts": "8", "num_experts_per_tok": 2}, "num_local_experts must be an integer >= 0"),
    ({"num_local_experts": 8, "num_experts_per_tok": 9}, "num_experts_per_tok=9 must be in 1..num_local_experts=8"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be a token id or a list of them, got '</s>'"),
    ({"eos_token_id": [1, None]}, "eos_token_id must be a token id or a list of them"),
    ({"bos_token_id": "<s>"}, "bos_token_id must be an integer >= 0, got '<s>'"),
])
def test_an_unusable_field_is_named_with_the_file(tmp_path, fields, pattern):
    _fails(_config_dir(tmp_path, {**LLAMA, **fields}), pattern)


def test_optional_fields_default_where_absent_or_null(tmp_path):
    cfg = ModelConfig.from_dir(_config_dir(tmp_path, {**LLAMA, "num_key_value_heads": None, "head_dim": None,
                                                      "bos_token_id": None, "eos_token_id": [1, 2]}))
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.bos_token_id, cfg.eos_token_ids) == (4, 16, None, (1, 2))
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0 and cfg.num_local_experts == 0
