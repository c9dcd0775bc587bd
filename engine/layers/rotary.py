"""Rotary position embeddings with the `default`, `linear` and `llama3` frequency schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (the half-split layout of HF Llama)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        half = head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * sin with the first half of sin negated.
        signed_sin = emb.sin()
        signed_sin[:, :half] *= -1
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("signed_sin", signed_sin.to(dtype), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for this step's positions, [T, 1, head_dim]; shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


@dataclass
class RotaryStep:
    """One step's positions against the model's tables, shared by every layer; the cos/sin rows
    are looked up on first use only (the fused CPU kernel reads the tables directly)."""

    rotary: RotaryEmbedding
    positions: torch.Tensor
    _rows: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            self._rows = self.rotary.lookup(self.positions)
        return self._rows


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; queries and keys may be rotated together in one call.

    The half-split rotation of HF Llama, x * cos + rotate_half(x) * sin, in three ops not five.
    """
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)
