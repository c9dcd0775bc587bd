"""Paged attention: write this step's keys and values into the block cache, then attend.

Tokens of one step are laid out flat: all decode tokens first (one per sequence), then each
prefill chunk. Decodes are attended in one batched call that gathers each sequence's context from
its cache slots; a prefill chunk attends to its cached prefix plus itself, causally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.kernels import cpu as cpu_kernels
from engine.kernels import gpu as gpu_kernels


@dataclass
class PrefillSpan:
    start: int  # index of the chunk's first token in the flat batch
    length: int
    # Cache slots of the whole context (prefix + chunk) and the additive causal mask over it;
    # both None when the chunk is the whole context: keys and values come from this step.
    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class DecodeGroup:
    """Decode sequences attended together: rows start..start+B of the flat batch."""

    start: int
    context_slots: torch.Tensor  # [B, L]; padding repeats a written slot of the same sequence
    mask: torch.Tensor | None = None  # [B, 1, 1, L] additive: 0 or -inf; None if unpadded


@dataclass
class DecodeKernelArgs:
    block_tables: torch.Tensor  # [B, max_blocks] int64, contiguous
    context_lens: torch.Tensor  # [B] int64
    max_context: int
    block_size: int
    backend: str = "cpu"  # "cpu": the compiled C kernel; "triton": the Triton kernel (CUDA)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of every token in this step
    num_decode_tokens: int = 0
    # Decodes sorted by context length and split so that each group's gathered keys and values
    # stay in cache: one padded group for 64 long sequences ran 7x slower than two of 32.
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    # Set instead of decode_groups when the CPU kernel reads the block cache in place.
    decode_kernel: DecodeKernelArgs | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)
    # PyTorch's CPU attention runs bf16/fp16 4-10x slower than fp32, so on the CPU
    # attention computes in float32 (masks are made in this dtype too).
    compute_dtype: torch.dtype = torch.float32


def _gather(cache: torch.Tensor, slots: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    # index_select on the 2-D cache is ~35x faster on the CPU than indexing a 3-D view, and
    # converting while contiguous is far cheaper than converting the transposed view later.
    gathered = cache.index_select(0, slots.reshape(-1)).to(dtype)
    return gathered.view(*slots.shape, kv_heads, -1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, kv_written: bool = False) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [num_slots, KVH * D]. Returns [T, H, D].

    k and v go into the cache first, unless the caller already wrote them (`kv_written`).
    Masks are additive floats: PyTorch's CPU attention is ~8x slower with boolean masks.
    """
    kv_heads = k.shape[1]
    if not kv_written:
        k_cache.index_copy_(0, meta.slot_mapping, k.reshape(k.shape[0], -1))
        v_cache.index_copy_(0, meta.slot_mapping, v.reshape(v.shape[0], -1))
    gqa = q.shape[1] != kv_heads
    dtype = meta.compute_dtype
    nd = meta.num_decode_tokens
    decoded = _decode_attention(q[:nd], k_cache, v_cache, meta, scale) if nd else None
    if not meta.prefills:
        return decoded
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decoded
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        query = q[rows].to(dtype).transpose(0, 1).unsqueeze(0)  # [1, H, S, D]
        if span.context_slots is None:
            keys, values = k[rows].to(dtype), v[rows].to(dtype)
        else:
            keys = _gather(k_cache, span.context_slots, kv_heads, dtype)
            values = _gather(v_cache, span.context_slots, kv_heads, dtype)
        attn = F.scaled_dot_product_attention(
            query, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=gqa)
        out[rows] = attn[0].transpose(0, 1).to(q.dtype)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence, q: [B, H, D] -> [B, H, D], through the kernel or groups."""
    if meta.decode_kernel is not None:
        args = meta.decode_kernel
        kernel = gpu_kernels if args.backend == "triton" else cpu_kernels
        return kernel.paged_decode_attention(
            q, k_cache, v_cache, args.block_tables, args.context_lens, args.block_size, scale,
            args.max_context)
    kv_heads = k_cache.shape[1] // q.shape[-1]
    dtype = meta.compute_dtype
    out = None if len(meta.decode_groups) == 1 else torch.empty_like(q)
    for group in meta.decode_groups:
        rows = slice(group.start, group.start + group.context_slots.shape[0])
        keys = _gather(k_cache, group.context_slots, kv_heads, dtype).transpose(1, 2)  # [B, KVH, L, D]
        values = _gather(v_cache, group.context_slots, kv_heads, dtype).transpose(1, 2)
        attn = F.scaled_dot_product_attention(
            q[rows].unsqueeze(2).to(dtype), keys, values, attn_mask=group.mask, scale=scale,
            enable_gqa=q.shape[1] != kv_heads).squeeze(2).to(q.dtype)
        if out is None:
            return attn
        out[rows] = attn
    return out
