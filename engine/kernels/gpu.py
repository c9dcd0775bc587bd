"""The engine's Triton kernels, used where CUDA and Triton are present (PILOT_TRITON_KERNELS=0
turns them off): paged decode attention and the int8 weight-only matmul. Imported lazily, so
CPU-only installs never need Triton."""

from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def available(device_type: str) -> bool:
    if device_type != "cuda" or os.environ.get("PILOT_TRITON_KERNELS", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, max_context: int) -> torch.Tensor:
    from engine.kernels.triton_attention import paged_decode_attention as kernel

    return kernel(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, max_context)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    from engine.kernels.triton_quant import int8_linear as kernel

    return kernel(x, qweight, scales, bias)
