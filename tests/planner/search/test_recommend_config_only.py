"""`pilot recommend --model DIR` where DIR holds config.json and nothing else: planning a
deployment reads no weights, tokenizer or generation_config.json, so an 8B or 32B model plans on
a machine that has only its config. On a cost model fitted in a second (support/synthetic_cost_model.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.synthetic_cost_model import synthetic_cost_model
from typer.testing import CliRunner

from planner.cli import app
from planner.costmodel.fit import CostModel
from planner.costmodel.roofline import ModelShape
from planner.measure.profiler import base_config
from planner.search.candidate import RecommendError
from planner.search.request import RecommendRequest
from planner.spec.search_space import SearchSpace
from planner.store.database import Store

LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-05, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}
QWEN3_32B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 5120,
    "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 25600, "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1000000, "rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
    "max_window_layers": 64, "attention_bias": False, "torch_dtype": "bfloat16",
}
SLO = "ttft_p95<=10s,itl_p95<=1s"
H100 = "h100-sxm"


def _config_only(path: Path, cfg: dict[str, Any]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _request(model: Path, **kwargs: Any) -> RecommendRequest:
    return RecommendRequest(model=model, slo=SLO, concurrency=4, isl="128:512", osl="32:128",
                            num_requests=24, hardware=(H100,), trials=4, **kwargs)


@pytest.fixture
def fitted(tmp_path) -> tuple[Store, CostModel]:
    """A store holding a cost model and nothing else: no runs of any model."""
    store = Store(f"sqlite:///{tmp_path / 'pilot.db'}")
    return store, synthetic_cost_model(store)


def test_the_library_reads_a_config_only_llama_31_8b(tmp_path, fitted):
    model = _config_only(tmp_path / "llama-3.1-8b", LLAMA_31_8B)
    request = _request(model)  # checks the config on construction
    workload = request.load()
    longest = max(s.input_tokens + s.output_tokens for s in workload.sample())
    base = base_config(str(model), workload)
    assert base.model == str(model) and base.max_model_len == -(-longest // 16) * 16
    search = request.search(*fitted)
    cfg = search.model_config
    assert (cfg.rope_type, cfg.rope_scaling["factor"], cfg.rope_theta) == ("llama3", 8.0, 500000.0)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.eos_token_ids) == (128, 8, (128001, 128008, 128009))
    shape = search.predictor.shape
    assert shape == ModelShape(4096, 14336, 32, 32, 8, 128, 128256)
    # Every linear weight a forward pass reads, LM head included (8.03B with the embeddings).
    assert shape.weight_params == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 128256 * 4096
    # 32 query and 8 KV heads split 1, 2, 4 or 8 ways: every tensor-parallel size of the space.
    sizes = SearchSpace.from_file("gpu").values("tensor_parallel_size")
    assert search.spaces[H100].values("tensor_parallel_size") == sizes and 8 in sizes
    point = {k: search.spaces[H100].values(k)[0] for k in search.spaces[H100].knobs}
    candidate = search.evaluate(H100, {**point, "tensor_parallel_size": 1, "quantization": None})
    assert candidate.violations["memory"] <= 0 and candidate.prediction is not None  # 15 GB on 80
    assert [p.name for p in model.iterdir()] == ["config.json"]  # nothing read, nothing written


def test_cli_recommend_plans_a_config_only_directory(tmp_path, fitted):
    store, out = fitted[0], tmp_path / "plan.yaml"
    for name, cfg in (("llama-3.1-8b", LLAMA_31_8B), ("qwen3-32b", QWEN3_32B)):
        model = _config_only(tmp_path / name, cfg)
        result = CliRunner().invoke(app, [
            "recommend", "--model", str(model), "--slo", SLO, "--concurrency", "4", "--hardware", H100,
            "--isl", "128:512", "--osl", "32:128", "--num-requests", "24", "--trials", "4",
            "--db", store.url, "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
        plan = yaml.safe_load(out.read_text())
        assert plan["engine"]["model"] == str(model) and plan["hardware"]["name"] == H100
        assert [p.name for p in model.iterdir()] == ["config.json"]


def test_qwen3_32b_is_priced_by_its_query_width_not_hidden_size(tmp_path, fitted):
    model = _config_only(tmp_path / "qwen3-32b", QWEN3_32B)
    search = _request(model).search(*fitted)
    shape = search.predictor.shape
    assert shape.num_heads * shape.head_dim == 8192 != shape.hidden_size
    per_layer = 2 * 5120 * 8192 + 2 * 5120 * 8 * 128 + 3 * 5120 * 25600
    assert shape.weight_params == 64 * per_layer + 151936 * 5120  # 32.0B: 32.8B less the embeddings
    assert shape.kv_values_per_token == 2 * 64 * 8 * 128
    assert 8 in search.spaces[H100].values("tensor_parallel_size")


@pytest.mark.parametrize("edit, says", [
    (lambda d: (d / "config.json").unlink(), r"missing file: .*config\.json"),
    (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({k: v for k, v in LLAMA_31_8B.items()
                                                          if k != "intermediate_size"})),
     r"config\.json: missing field intermediate_size \(a positive integer\)"),
    (lambda d: (d / "config.json").write_text(json.dumps({**LLAMA_31_8B, "model_type": "gpt2"})),
     r"config\.json: unsupported model_type 'gpt2'"),
])
def test_an_unusable_config_is_named_before_the_search(tmp_path, edit, says):
    model = _config_only(tmp_path / "model", LLAMA_31_8B)
    edit(model)
    with pytest.raises(RecommendError, match=rf"^model: .*{says}") as info:
        _request(model)
    assert info.value.field == "model" and str(model / "config.json") in str(info.value)
    with pytest.raises(RecommendError, match=says) as info:
        _request(_config_only(tmp_path / "target", LLAMA_31_8B), draft=model)
    assert info.value.field == "draft"
    # The CLI names the flag; no store or cost model is needed to say so.
    result = CliRunner().invoke(app, ["recommend", "--model", str(model), "--slo", SLO, "--rate", "1",
                                      "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 2 and "--model:" in result.output and "config.json" in result.output


def test_verify_needs_a_model_the_engine_runs_with_its_weights(tmp_path):
    llama = _config_only(tmp_path / "llama", LLAMA_31_8B)
    qwen3 = _config_only(tmp_path / "qwen3", QWEN3_32B)
    _request(llama)  # plans
    with pytest.raises(RecommendError, match=r"^model: missing file: .*model\.safetensors.*"
                                             r"a plan alone needs only config\.json"):
        _request(llama).check_launchable()
    with pytest.raises(RecommendError, match="model_type 'qwen3' can be planned.*the engine cannot run it"):
        _request(qwen3).check_launchable()
    # Refused before the search: the store is never opened.
    result = CliRunner().invoke(app, ["recommend", "--model", str(qwen3), "--slo", SLO, "--rate", "1",
                                      "--verify", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 2 and "--model:" in result.output and "qwen3" in result.output
    assert not (tmp_path / "none.db").exists()
