"""PyTorch references shared by kernel tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    """One query per sequence against its context gathered from the block cache, in fp32."""
    kv_heads = k_cache.shape[1] // q.shape[-1]
    rows = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = (tables[b].unsqueeze(-1) * block_size + torch.arange(block_size)).flatten()[:n]
        k = k_cache[slots].float().view(n, kv_heads, -1).transpose(0, 1)
        v = v_cache[slots].float().view(n, kv_heads, -1).transpose(0, 1)
        rows.append(F.scaled_dot_product_attention(q[b].float().unsqueeze(1), k, v, scale=scale,
                                                   enable_gqa=True).squeeze(1))
    return torch.stack(rows)
