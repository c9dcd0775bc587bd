"""The Triton kernels on the CPU, under TRITON_INTERPRET=1, against PyTorch references.

On CUDA the same kernels are compiled; this machine has none, so the interpreter runs them
op by op on CPU tensors (the interpreter is chosen when the kernel module is imported).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from support.references import paged_decode_attention_reference  # noqa: E402

from engine.kernels import triton_attention  # noqa: E402

if not getattr(triton_attention._partial_kernel, "__class__", None).__name__.startswith("Interpreted"):
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET was set",
                allow_module_level=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (8, 2, 64, 16),   # GQA
    (4, 4, 32, 16),   # MHA
    (8, 1, 24, 5),    # MQA, head_dim not a power of two, odd block size
])
def test_paged_decode_attention_matches_pytorch(dtype, tol, heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(heads + head_dim)
    lens = torch.tensor([1, 7, 300, 600])  # 300 and 600 span two and three segments of 256
    num_blocks = 200
    width = (int(lens.max()) + block_size - 1) // block_size
    tables = torch.stack([torch.randperm(num_blocks * 4, generator=gen)[:width] for _ in lens])
    slots = num_blocks * 4 * block_size
    k_cache = torch.randn(slots, kv_heads * head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, kv_heads * head_dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size,
                                                  scale, int(lens.max()))
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, block_size, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


from engine.kernels import triton_quant  # noqa: E402
from engine.quantization import quantize  # noqa: E402


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows, out_features, in_features", [(1, 256, 128), (5, 100, 96), (70, 64, 200)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matmul_matches_dequantized_reference(dtype, tol, rows, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(rows + out_features)
    q = quantize(torch.randn(out_features, in_features, generator=gen), "int8")
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    out = triton_quant.int8_linear(x, q.qweight, q.scales, b)
    ref = x.float() @ q.dequantize().T + (b.float() if bias else 0)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


# -- wired into the engine: forced onto the CPU here, where the interpreter runs them ----------

def test_engine_decodes_through_the_triton_attention(model_dir):
    from engine import LLM, EngineConfig, SamplingParams

    prompts = [list(range(300, 300 + n)) for n in (5, 40, 17)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("cpu", "triton"):
        llm = LLM(EngineConfig(model=model_dir, dtype="float32", num_threads=1))
        runner = llm.engine.runner
        runner.decode_backend = backend
        runner.model.decode_layers = None  # the per-layer C path would bypass the dispatch
        calls = []
        original = triton_attention.paged_decode_attention

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        triton_attention.paged_decode_attention = counted
        try:
            outputs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        finally:
            triton_attention.paged_decode_attention = original
        assert bool(calls) == (backend == "triton")
    assert outputs["triton"] == outputs["cpu"]


def test_linear_runs_int8_through_the_triton_matmul():
    from engine.layers.linear import Linear

    layer = Linear(96, 40, bias=True)
    layer.weight.data = torch.randn(40, 96)
    layer.bias.data = torch.randn(40)
    q = quantize(layer.weight.data, "int8")
    layer.set_quantized(q, backend="triton")
    assert layer.layout == "int8-triton"
    x = torch.randn(3, 96)
    with torch.inference_mode():
        assert torch.allclose(layer(x), x @ q.dequantize().T + layer.bias, atol=1e-4)
