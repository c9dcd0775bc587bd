"""Numerical parity with Hugging Face transformers, the reference implementation (float32).

Every checkpoint is a seeded random one from `engine.model_zoo.make_checkpoint`, made once per
module. For each architecture variant the engine's `LLM.score` logits must match
`AutoModelForCausalLM` to a relative error of 1e-4 (max|a-b| / max|b|), and greedy generation must
produce exactly the tokens of `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine import LLM, EngineConfig, InvalidRequestError, SamplingParams  # noqa: E402
from engine.model_config import CheckpointError  # noqa: E402
from engine.model_zoo import SHAPES, make_checkpoint  # noqa: E402

RTOL = 1e-4
VOCAB = SHAPES["tiny"]["vocab_size"]
SCORE_LEN = 160  # long enough that llama3 / linear rope scaling (original 64 positions) matters, and
# past engine.rules.ROW_BY_ROW_MEAN_PREFILL: scored through the prefill path, while the
# greedy prompts (GREEDY_PROMPT_LEN) are prefilled row by row
GREEDY_PROMPT_LEN = 100
GREEDY_STEPS = 32

# Config fields layered over the "tiny" named shape (hidden 64, 4 heads, 2 kv heads, 2 layers,
# vocab 512), or a named shape. Shapes that differ from "tiny" only in rope settings share its
# weights for a given seed, which `test_rope_scaling_changes_logits` relies on.
VARIANTS: dict[str, dict[str, Any] | str] = {
    "gqa": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8,
            "num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "head-dim": {"head_dim": 32},  # q/k/v width 128 != hidden 64
    "rope-llama3": {"max_position_embeddings": 1024, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}},
    "rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "rope-linear-legacy-key": {"rope_scaling": {"type": "linear", "factor": 4.0}},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "tie_word_embeddings": True, "use_sliding_window": False, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0},
    "llama-tied": {"tie_word_embeddings": True},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": None},
    "mixtral-tiny": "mixtral-tiny",
}
SEED = 0
# Checkpoint seeds picked so that transformers' greedy path has no near tie (smallest top-2 logit
# gap >= 1e-3 of the largest logit, against float32 differences of ~1e-6).
VARIANT_SEEDS = {"mistral": 1, "head-dim": 2}
# Weights 5x the usual 0.02 std: attention scores then depend strongly on position, so a rope
# mistake shows up far above the 1e-4 bound (a 0.1% error in the linear-rope frequencies moves
# the logits by ~5e-3 here, by only ~2e-5 at std 0.02).
INIT_STD = 0.1


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    # The engine sets torch's global thread count; put it back for the test modules that follow.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _engine(model_dir: Path, dtype: str = "float32", **kwargs: Any) -> LLM:
    # One thread: with tiny shapes it is the fastest setting, and it keeps timings steady on a
    # shared 2-core machine (two threads stall whenever another process holds a core).
    kwargs.setdefault("num_threads", 1)
    return LLM(EngineConfig(model=str(model_dir), dtype=dtype, **kwargs))


def _hf(model_dir: Path, dtype: torch.dtype = torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # run every requested step
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps,
                         eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == steps, f"transformers stopped after {len(tokens)} of {steps} steps"
    return tokens


def _assert_same_greedy(ours: list[int], ref: list[int], model, prompt: list[int]) -> None:
    if ours == ref:
        return
    i = next(j for j, (a, b) in enumerate(zip(ours, ref)) if a != b) if len(ours) == len(ref) \
        else min(len(ours), len(ref))
    logits = _hf_logits(model, prompt + ref[:i])[-1]
    top2 = logits.topk(2).values
    pytest.fail(f"greedy tokens differ at step {i}: engine {ours[i:i + 4]}..., transformers "
                f"{ref[i:i + 4]}...; transformers' top-2 logit gap there is "
                f"{(top2[0] - top2[1]).item():.3e} (a near tie would be a flaky prompt, not a bug)")


class _Zoo:
    """Checkpoints made on first use, one directory each, shared by the whole module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs: dict[tuple, Path] = {}

    def get(self, shape: dict[str, Any] | str, name: str, seed: int = SEED, dtype: str = "float32",
            **kwargs: Any) -> Path:
        kwargs.setdefault("init_std", INIT_STD)
        key = (name, seed, dtype, tuple(sorted(kwargs.items())))
        if key not in self.dirs:
            out = self.root / f"{name}-s{seed}-{dtype}-{len(self.dirs)}"
            if isinstance(shape, dict):
                shape_file = self.root / f"{name}.json"
                shape_file.write_text(json.dumps(shape))
                shape = str(shape_file)
            self.dirs[key] = make_checkpoint(shape, out, seed=seed, dtype=dtype, **kwargs)
        return self.dirs[key]

    def variant(self, name: str) -> Path:
        return self.get(VARIANTS[name], name, seed=VARIANT_SEEDS.get(name, SEED))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> _Zoo:
    return _Zoo(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def pairs(zoo):
    """(engine, transformers model) per variant, loaded once."""
    cache: dict[str, tuple[LLM, Any]] = {}

    def get(name: str) -> tuple[LLM, Any]:
        if name not in cache:
            model_dir = zoo.variant(name)
            cache[name] = (_engine(model_dir), _hf(model_dir))
        return cache[name]

    return get


# -- logits and greedy tokens, per architecture variant ------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_score_matches_transformers(pairs, name):
    llm, hf = pairs(name)
    ids = _ids(SCORE_LEN, seed=1)
    ours = llm.score(ids)
    ref = _hf_logits(hf, ids)
    assert ours.dtype == torch.float32
    assert ours.shape == (SCORE_LEN, hf.config.vocab_size)
    assert _rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_transformers(pairs, name):
    llm, hf = pairs(name)
    prompt = _ids(GREEDY_PROMPT_LEN, seed=2)
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=GREEDY_STEPS,
                                                  ignore_eos=True))
    assert out.finish_reason == "length"
    assert len(out.token_ids) == GREEDY_STEPS
    _assert_same_greedy(out.token_ids, _hf_greedy(hf, prompt, GREEDY_STEPS), hf, prompt)


@pytest.mark.parametrize("name", ["gqa", "qwen2", "rope-llama3", "mixtral-tiny"])
def test_pytorch_paths_match_transformers(zoo, pytorch_paths, name):
    """With the compiled CPU kernels off, the PyTorch paths (CUDA's) meet the same bounds."""
    model_dir = zoo.variant(name)
    llm, hf = _engine(model_dir), _hf(model_dir)
    runner = llm.engine.runner
    assert not runner.use_cpu_kernel
    assert all(m.layout != "panels" for m in runner.model.modules() if hasattr(m, "layout"))
    ids = _ids(SCORE_LEN, seed=1)
    assert _rel_err(llm.score(ids), _hf_logits(hf, ids)) <= RTOL
    prompt = _ids(GREEDY_PROMPT_LEN, seed=2)
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=GREEDY_STEPS,
                                                  ignore_eos=True))
    _assert_same_greedy(out.token_ids, _hf_greedy(hf, prompt, GREEDY_STEPS), hf, prompt)


def test_architecture_variants_are_what_they_claim(pairs):
    """Guard the parametrization: transformers built the architecture each variant names."""
    expected = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                "mixtral-tiny": "MixtralForCausalLM"}
    for name in VARIANTS:
        llm, hf = pairs(name)
        assert type(hf).__name__ == expected.get(name, "LlamaForCausalLM"), name
    cfg = pairs("mqa")[0].engine.model_config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 1)
    cfg = pairs("gqa")[0].engine.model_config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert pairs("qwen2")[0].engine.model_config.attention_bias
    assert pairs("qwen2")[0].engine.model_config.tie_word_embeddings
    assert pairs("llama-tied")[0].engine.model_config.tie_word_embeddings
    assert pairs("mixtral-tiny")[0].engine.model_config.is_moe
    assert pairs("rope-llama3")[1].config.rope_parameters["rope_type"] == "llama3"
    assert pairs("rope-linear-legacy-key")[1].config.rope_parameters["rope_type"] == "linear"


@pytest.mark.parametrize("name", ["rope-llama3", "rope-linear"])
def test_rope_scaling_changes_logits(zoo, pairs, name):
    """The scaled variants share "tiny"'s weights, so any difference comes from the scaling:
    the parity checks above would be vacuous if it made none on these prompts."""
    ids = _ids(SCORE_LEN, seed=1)
    plain = _engine(zoo.get("tiny", "tiny")).score(ids)
    scaled = pairs(name)[0].score(ids)
    assert _rel_err(scaled, plain) > 1e-3


# -- the scheduler's paths: batching, chunked prefill, prefix cache, paged blocks ----------------

def test_batched_chunked_prefix_cached_greedy_matches_transformers(zoo):
    """Several prompts at once through small blocks, small chunks and shared prefixes; each
    output must still be the transformers greedy continuation of that prompt alone."""
    model_dir = zoo.variant("gqa")
    hf = _hf(model_dir)
    llm = _engine(model_dir, block_size=4, max_num_batched_tokens=24, max_num_seqs=3)
    common = _ids(40, seed=3)
    prompts = [common + _ids(1, 4), common + _ids(7, 5), common + _ids(30, 6), _ids(5, 7),
               common[:9]]
    steps = 20
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        _assert_same_greedy(out.token_ids, _hf_greedy(hf, prompt, steps), hf, prompt)
    assert llm.engine.block_manager.num_prefix_hits > 0  # the prefix cache was exercised

    # Scoring after generation, with the cache warm, is unchanged and repeatable.
    first = llm.score(prompts[2])
    assert _rel_err(first, _hf_logits(hf, prompts[2])) <= RTOL
    assert torch.equal(first, llm.score(prompts[2]))


# -- checkpoint formats ---------------------------------------------------------------------------

def test_sharded_checkpoint_loads_identically(zoo):
    whole = zoo.get("tiny", "tiny", seed=5)
    sharded = zoo.get("tiny", "tiny", seed=5, max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    ids = _ids(64, seed=8)
    ours = _engine(sharded).score(ids)
    assert torch.equal(ours, _engine(whole).score(ids))
    assert _rel_err(ours, _hf_logits(_hf(sharded), ids)) <= RTOL


def test_bfloat16_checkpoint(zoo):
    model_dir = zoo.get("tiny", "tiny", seed=6, dtype="bfloat16")
    ids = _ids(64, seed=9)
    fp32 = _engine(model_dir, dtype="float32")
    ours32 = fp32.score(ids)
    # Upcast on load: exactly what transformers computes from the same bf16 weights in fp32.
    assert _rel_err(ours32, _hf_logits(_hf(model_dir, torch.float32), ids)) <= RTOL

    bf16 = _engine(model_dir, dtype="bfloat16")
    assert bf16.engine.runner.dtype == torch.bfloat16
    ours16 = bf16.score(ids)
    assert ours16.dtype == torch.float32  # logits come back in float32 whatever the compute dtype
    assert _rel_err(ours16, ours32) <= 5e-2

    # dtype="auto" follows the checkpoint's torch_dtype.
    assert _engine(model_dir, dtype="auto").engine.runner.dtype == torch.bfloat16


def test_transformers_save_pretrained_layout(zoo, tmp_path):
    """A directory written by transformers 5 itself (rope settings under `rope_parameters`,
    `dtype` instead of `torch_dtype`, tied head not stored) loads with the same logits."""
    hf = _hf(zoo.variant("rope-llama3"))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg.get("rope_parameters", {}).get("rope_type") == "llama3"
    ids = _ids(SCORE_LEN, seed=1)
    assert _rel_err(_engine(tmp_path).score(ids), _hf_logits(hf, ids)) <= RTOL

    tied = _hf(zoo.variant("qwen2"))
    tied.save_pretrained(tmp_path / "qwen2")
    assert _rel_err(_engine(tmp_path / "qwen2").score(ids), _hf_logits(tied, ids)) <= RTOL


# -- sliding-window attention ---------------------------------------------------------------------

SLIDING = {
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "sliding_window": 16},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
}


@pytest.mark.parametrize("name", list(SLIDING))
def test_sliding_window_is_honoured_or_refused(zoo, name):
    model_dir = zoo.get(SLIDING[name], f"sliding-{name}")
    hf = _hf(model_dir)
    ids = _ids(60, seed=10)  # longer than the 16-token window
    try:
        ours = _engine(model_dir).score(ids)
    except (CheckpointError, InvalidRequestError, NotImplementedError):
        return  # refused loudly: acceptable
    assert _rel_err(ours, _hf_logits(hf, ids)) <= RTOL


# -- a real-size shape ----------------------------------------------------------------------------

def test_llama_110m_parity(tmp_path_factory):
    """The named llama-110m shape (12 layers, vocab 32000): ~10 s to make, load and compare."""
    start = time.perf_counter()
    model_dir = make_checkpoint("llama-110m", tmp_path_factory.mktemp("llama-110m"), seed=0,
                                dtype="float32")
    # A small KV budget: the default sizes the cache for 64 full-length sequences (GBs to zero).
    llm = _engine(model_dir, kv_cache_memory_bytes=32 * 2**20)
    hf = _hf(model_dir)
    prompt = _ids(24, seed=11)
    assert _rel_err(llm.score(prompt), _hf_logits(hf, prompt)) <= RTOL
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    _assert_same_greedy(out.token_ids, _hf_greedy(hf, prompt, 8), hf, prompt)
    print(f"llama-110m parity: {time.perf_counter() - start:.1f} s")
