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


def quantized_linear_reference(x, q, dot: bool):
    """x @ dequant(W)^T in fp32 as the CPU kernel computes it: for the integer dot-product kernel
    (`dot`), x is first rounded to int8 in groups of 32 (scale max|x| / 127) for the q * scale
    part, while int4's min part meets the exact x."""
    x = x.float()
    if not dot:
        return x @ q.dequantize().T
    groups = x.view(*x.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    rounded = (torch.round(groups * inverse) * (amax / 127.0)).view_as(x)
    n, k = q.shape
    scaled = q.qweight.float().view(n, -1, q.group_size) * q.scales.unsqueeze(-1)
    out = rounded @ scaled.view(n, k).T
    if q.mins is not None:
        out = out + x @ q.mins.repeat_interleave(q.group_size, dim=1).T
    return out
