"""The fused CPU element-wise kernels against the PyTorch lines they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu as cpu_kernels
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.models.llama import RMSNorm

pytestmark = pytest.mark.skipif(not cpu_kernels.fused_supported(torch.empty(0)),
                                reason="no C compiler: kernels not built")
# fp32: rounding-level agreement; bf16: within one unit in the last place of the output.
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.bfloat16]


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)
    assert err.max().item() <= TOL[dtype], err.max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 768), (5, 100), (300, 64)])
def test_rms_norm(dtype, rows, dim):
    gen = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-5).to(dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    x = torch.randn(rows, dim, generator=gen).to(dtype)
    _close(cpu_kernels.rms_norm(x, norm.weight, norm.eps), norm._norm(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_adds_the_residual_in_place(dtype):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-6).to(dtype)
    x = torch.randn(7, 96, generator=gen).to(dtype)
    residual = torch.randn(7, 96, generator=gen).to(dtype)
    expected_sum = x + residual  # rounded once to the dtype, as PyTorch does
    out = cpu_kernels.rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(residual, expected_sum)
    _close(out, norm._norm(expected_sum), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inter", [(1, 2048), (9, 40)])
def test_silu_mul(dtype, rows, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (3 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -30.0])  # far tails of the sigmoid
    gate, up = gate_up.chunk(2, dim=-1)
    out = cpu_kernels.silu_mul(gate_up)
    ref = F.silu(gate) * up
    assert (out.float() - ref.float()).abs().max().item() <= TOL[dtype] * ref.float().abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(12, 4, 64), (4, 1, 24), (2, 2, 128)])
def test_rope_and_cache(dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    tokens, num_slots = 6, 40
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None, dtype)
    positions = torch.tensor([0, 1, 2, 300, 511, 7])
    slots = torch.tensor([3, 17, 0, 39, 21, 8])
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    k_cache = torch.full((num_slots, kv_heads * head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    ref_qk = apply_rotary(qkv[:, :q_size + kv_size].view(tokens, heads + kv_heads, head_dim),
                          *rotary.lookup(positions)).reshape(tokens, -1)
    ref_v = qkv[:, q_size + kv_size:].clone()

    cpu_kernels.rope_and_cache(qkv, positions, rotary.cos, rotary.signed_sin, heads, kv_heads,
                               head_dim, k_cache, v_cache, slots)
    _close(qkv[:, :q_size + kv_size], ref_qk, dtype)
    assert torch.equal(qkv[:, q_size + kv_size:], ref_v)  # values pass through untouched
    assert torch.equal(k_cache[slots], qkv[:, q_size:q_size + kv_size])
    assert torch.equal(v_cache[slots], ref_v)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


# -- one compiled call per decoder layer on decode steps --------------------------------------

@pytest.mark.parametrize("shape, dtype, quantization", [
    ("tiny", "float32", None),
    ("tiny", "bfloat16", None),
    ("tiny", "float32", "int8"),
    ("tiny", "bfloat16", "int4"),
    ("qwen2", "float32", None),  # q/k/v bias
])
def test_decoder_layer_kernel_matches_python_forward(tmp_path, shape, dtype, quantization):
    import json

    from engine import LLM, EngineConfig, SamplingParams
    from engine.model_zoo import make_checkpoint

    if shape == "qwen2":
        spec = tmp_path / "qwen2.json"
        spec.write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                    "tie_word_embeddings": True, "use_sliding_window": False}))
        shape = str(spec)
    model_dir = make_checkpoint(shape, tmp_path / "m", seed=5, dtype="float32")
    prompts = [list(range(300, 300 + n)) for n in (3, 40, 17, 70)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = {}
    for fused in (True, False):
        llm = LLM(EngineConfig(model=str(model_dir), dtype=dtype, num_threads=1, block_size=8,
                               quantization=quantization, quantization_group_size=32))
        model = llm.engine.runner.model
        if model.decode_layers is None and quantization is None and not cpu_kernels.linear_supported(
                torch.float32, torch.device("cpu"), 64):
            pytest.skip("dense linears run on the engine's own kernel only with AVX-512")
        assert model.decode_layers is not None
        if not fused:
            model.decode_layers = None
        results[fused] = [o.token_ids for o in llm.generate(prompts, params)]
    assert results[True] == results[False]
