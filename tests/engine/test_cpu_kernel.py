"""The compiled CPU paged decode-attention kernel against PyTorch's attention."""

from __future__ import annotations

import pytest
import torch
from support.references import paged_decode_attention_reference

from engine import LLM, EngineConfig, SamplingParams
from engine.kernels import cpu as cpu_kernels
from engine.model_zoo import make_checkpoint

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler: kernel not built")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (12, 4, 64, 16),   # GQA, AVX-512 path
    (8, 8, 128, 16),   # MHA, wider heads
    (8, 1, 64, 5),     # MQA, odd block size
    (16, 2, 32, 3),    # narrow heads, group of 8
    (10, 2, 80, 16),   # head_dim an odd number of 16-lane vectors: bf16 keys widened, not paired
    (6, 2, 24, 7),     # head_dim not a multiple of 16: a masked last chunk (a small draft's heads)
    (3, 1, 40, 16),    # ... of three chunks, the last half empty
    (4, 2, 8, 16),     # ... shorter than one chunk
])
def test_kernel_matches_pytorch(dtype, tol, heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    num_blocks, batch = 200, 9
    lens = torch.tensor([1, 2, block_size, block_size + 1, 17, 64, 150, 299, 300])
    width = (int(lens.max()) + block_size - 1) // block_size
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(batch)])
    k_cache = torch.randn(num_blocks * block_size, kv_heads * head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads * head_dim, generator=gen).to(dtype)
    q = (2 * torch.randn(batch, heads, head_dim, generator=gen)).to(dtype)
    scale = head_dim ** -0.5
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size, scale,
                                             int(lens.max()))
    assert out.dtype == dtype and out.shape == q.shape
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, block_size, scale)
    assert (out.float() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 24])
def test_kernel_never_reads_unwritten_slots(head_dim, dtype):
    """Slots outside each sequence's context hold NaN; the output must not see them (nor, with
    a short last chunk, the NaN just past a head's last feature)."""
    block_size, heads, kv_heads = 4, 4, 2
    k_cache = torch.full((64 * block_size, kv_heads * head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.tensor([[3, 9, 0], [5, 0, 0]])
    lens = torch.tensor([10, 3])
    for b, n in enumerate(lens.tolist()):
        for pos in range(n):
            slot = int(tables[b, pos // block_size]) * block_size + pos % block_size
            k_cache[slot] = torch.randn(kv_heads * head_dim)
            v_cache[slot] = torch.randn(kv_heads * head_dim)
    q = torch.randn(2, heads, head_dim)
    k_cache, v_cache, q = k_cache.to(dtype), v_cache.to(dtype), q.to(dtype)
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size, 0.2, 10)
    assert torch.isfinite(out).all()
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, block_size, 0.2)
    assert torch.allclose(out.float(), ref, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_unsupported_group_is_refused():
    q = torch.randn(1, 64, 8)  # 64 query heads on one kv head: group above the kernel's limit
    cache = torch.randn(16, 8)
    with pytest.raises(ValueError, match="unsupported heads=64"):
        cpu_kernels.paged_decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.long),
                                           torch.tensor([3]), 16, 0.3, 3)


def test_engine_outputs_equal_with_and_without_kernel(tmp_path):
    model = make_checkpoint("tiny", tmp_path / "tiny", seed=4, dtype="float32")
    prompts = [list(range(300, 300 + n)) for n in (5, 40, 90, 17)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for use_kernel in (True, False):
        llm = LLM(EngineConfig(model=str(model), dtype="float32", num_threads=1, block_size=8))
        runner = llm.engine.runner
        assert runner.decode_backend == "cpu"  # available on this machine (module skip otherwise)
        if not use_kernel:  # PyTorch's attention over gathered copies, layer by layer
            runner.decode_backend, runner.model.decode_layers = None, None
        outputs[use_kernel] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outputs[True] == outputs[False]


class _CountingLayers:
    """The runner's fused decode layers, counting the steps they run."""

    def __init__(self, layers) -> None:
        self.layers, self.calls = layers, 0

    def __call__(self, *args):
        self.calls += 1
        return self.layers(*args)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_short_prompts_run_as_fused_decode_rows_and_match_the_prefill_path(tmp_path, monkeypatch, dtype):
    """A step of short prompts is attended row by row and runs the fused decode layers; the
    same step through the prefill path (each prompt attended apart, layers op by op) must give
    the same logits and tokens."""
    from engine import rules

    model = make_checkpoint("tiny", tmp_path / "tiny", seed=5, dtype="float32")
    prompts = [list(range(100 + 7 * n, 100 + 8 * n)) for n in (3, 12, 20, 16, 9)]  # mean 12 tokens
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seen, default = {}, rules.ROW_BY_ROW_MEAN_PREFILL
    for mean in (default, 0):
        monkeypatch.setattr(rules, "ROW_BY_ROW_MEAN_PREFILL", mean)
        llm = LLM(EngineConfig(model=str(model), dtype=dtype, num_threads=1, block_size=8,
                               enable_prefix_caching=False))
        if llm.engine.runner.model.decode_layers is None:
            llm.close()
            pytest.skip("this CPU runs no fused decode layers (they need the AVX-512 kernels)")
        counter = _CountingLayers(llm.engine.runner.model.decode_layers)
        llm.engine.runner.model.decode_layers = counter
        first = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
        fused_prefill = counter.calls
        outputs = llm.generate(prompts, params)
        seen[mean] = ([o.token_ids for o in first], [o.token_ids for o in outputs],
                      llm.score(prompts[2]), fused_prefill)
    rows, pytorch = seen[default], seen[0]
    assert rows[3] == 1 and pytorch[3] == 0  # the prompts' one step: fused, then not
    assert rows[0] == pytorch[0] and rows[1] == pytorch[1]
    tol = 1e-5 if dtype == "float32" else 3e-2
    assert torch.allclose(rows[2], pytorch[2], atol=tol, rtol=tol)
