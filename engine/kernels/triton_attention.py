"""Paged decode attention in Triton for CUDA, split over the context (FlashDecoding-style).

One query token per sequence reads its keys and values in place from the block cache
([num_slots, kv_heads * head_dim], slot = block * block_size + offset). A batch of few,
long sequences would leave most of a GPU idle with one program per (sequence, kv head), so
the context is also split into segments: each program attends to one segment for all the
query heads that share a kv head (GQA rows packed into one tile), writes its partial output
with its running max and sum, and a second kernel merges the segments (log-sum-exp).
Tested on the CPU under TRITON_INTERPRET=1 against PyTorch; compiled where CUDA is present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SEGMENT = 256  # context tokens per program in the first pass
BLOCK_N = 32  # tokens per inner tile


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr,
                    scale, table_stride, kv_stride, num_segments,
                    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                    GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, SEGMENT: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    segment = tl.program_id(2)
    context = tl.load(lens_ptr + seq)
    start = segment * SEGMENT
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < D
    heads = kvh * GROUP + rows
    q = tl.load(q_ptr + (seq * HEADS + heads)[:, None] * D + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for offset in range(0, SEGMENT, BLOCK_N):
        pos = start + offset + tl.arange(0, BLOCK_N)
        live = pos < context
        block = tl.load(tables_ptr + seq * table_stride + pos // BLOCK_SIZE, mask=live, other=0)
        slots = block * BLOCK_SIZE + pos % BLOCK_SIZE
        addr = slots[:, None] * kv_stride + kvh * D + dims[None, :]
        k = tl.load(k_ptr + addr, mask=live[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + addr, mask=live[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_N]
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A segment past the context keeps m at -inf: guard the exponent against -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        correction = tl.exp(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    base = (seq * HEADS + heads) * num_segments + segment
    tl.store(out_ptr + base[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(m_ptr + base, m_i, mask=row_ok)
    tl.store(l_ptr + base, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(partial_ptr, m_ptr, l_ptr, out_ptr, num_segments,
                  D: tl.constexpr, D_PAD: tl.constexpr, SEG_PAD: tl.constexpr):
    row = tl.program_id(0)  # (sequence, head)
    segs = tl.arange(0, SEG_PAD)
    seg_ok = segs < num_segments
    dims = tl.arange(0, D_PAD)
    m = tl.load(m_ptr + row * num_segments + segs, mask=seg_ok, other=float("-inf"))
    denom = tl.load(l_ptr + row * num_segments + segs, mask=seg_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    weights = tl.where(seg_ok & (m > float("-inf")), tl.exp(m - m_max), 0.0)
    partial = tl.load(partial_ptr + (row * num_segments + segs)[:, None] * D + dims[None, :],
                      mask=seg_ok[:, None] & (dims < D)[None, :], other=0.0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.sum(denom * weights, axis=0)
    tl.store(out_ptr + row * D + dims, out, mask=dims < D)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, max_context: int) -> torch.Tensor:
    """Same contract as the CPU kernel: q [B, H, D]; caches [num_slots, KVH * D]; block_tables
    [B, max_blocks] and context_lens [B] int64. Returns [B, H, D] in q's dtype."""
    q = q.contiguous()
    batch, heads, d = q.shape
    kv_heads = k_cache.shape[1] // d
    group = heads // kv_heads
    segments = max(1, triton.cdiv(max_context, SEGMENT))
    partial = torch.empty(batch, heads, segments, d, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, heads, segments, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    _partial_kernel[(batch, kv_heads, segments)](
        q, k_cache, v_cache, block_tables, context_lens, partial, m, denom, scale,
        block_tables.stride(0), k_cache.stride(0), segments,
        HEADS=heads, KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=d, D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=block_size, SEGMENT=SEGMENT,
        BLOCK_N=BLOCK_N,
        # fp32 models keep full-precision products; half-precision ones may use tf32.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    out = torch.empty(batch, heads, d, dtype=torch.float32, device=q.device)
    _merge_kernel[(batch * heads,)](partial, m, denom, out, segments, D=d,
                                    D_PAD=max(16, triton.next_power_of_2(d)),
                                    SEG_PAD=max(2, triton.next_power_of_2(segments)))
    return out.to(q.dtype)
