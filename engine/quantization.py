"""Weight-only quantization: int8 per output channel, int4 in groups along the input features.

`QuantizedWeight` is the layout-free form, the one a pre-quantized checkpoint stores
(`pilot models quantize`); `Linear.set_quantized` repacks it for the CPU kernel or keeps it for
the PyTorch fallback, which dequantizes on the fly.

- int8: symmetric, w ~= q * scale with q in [-127, 127] and one scale per output row.
- int4: asymmetric, w ~= q * scale + min with q in [0, 15], a scale and a min per row and group
  of `group_size` input features (GPTQ/AWQ-style min-max, without calibration data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.rules import check_scheme

DEFAULT_GROUP_SIZE = 128
CHECKPOINT_FORMAT = "pilot"  # quantization_config.quant_method of a pre-quantized directory


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # int8 [N, K]: int8 values, or int4 values 0..15
    scales: torch.Tensor  # float32 [N, K // group_size]
    mins: torch.Tensor | None  # float32 [N, K // group_size], int4 only
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        n, k = self.qweight.shape
        q = self.qweight.float().view(n, k // self.group_size, self.group_size)
        w = q * self.scales.unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.unsqueeze(-1)
        return w.view(n, k)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack along the outputs (fused q/k/v, gate/up): every scheme here is row-local."""
        first = parts[0]
        if any(p.bits != first.bits or p.group_size != first.group_size for p in parts):
            raise ValueError("cannot fuse weights quantized with different schemes")
        return QuantizedWeight(
            torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
            None if first.mins is None else torch.cat([p.mins for p in parts]),  # type: ignore[misc]
            first.bits, first.group_size)

    def narrow(self, dim: int, start: int, length: int) -> "QuantizedWeight":
        """Rows (dim 0) or input features (dim 1) start..start+length, as a tensor-parallel
        shard; input features must keep whole groups."""
        if dim == 0:
            return QuantizedWeight(self.qweight[start:start + length], self.scales[start:start + length],
                                   None if self.mins is None else self.mins[start:start + length],
                                   self.bits, self.group_size)
        qweight = self.qweight[:, start:start + length]
        if self.group_size == self.shape[1]:  # per output channel: the row's scale still holds
            return QuantizedWeight(qweight, self.scales, self.mins, self.bits, length)
        if start % self.group_size or length % self.group_size:
            raise ValueError(f"a shard of input features {start}..{start + length} splits a "
                             f"quantization group of {self.group_size}")
        groups = slice(start // self.group_size, (start + length) // self.group_size)
        return QuantizedWeight(qweight, self.scales[:, groups],
                               None if self.mins is None else self.mins[:, groups],
                               self.bits, self.group_size)

    # -- checkpoint form: int4 packs two values a byte along K, low nibble first --------------

    def to_checkpoint(self, prefix: str) -> dict[str, torch.Tensor]:
        q = self.qweight
        if self.bits == 4:
            q = (q[:, 0::2].to(torch.uint8) | (q[:, 1::2].to(torch.uint8) << 4)).contiguous()
        tensors = {f"{prefix}.qweight": q, f"{prefix}.scales": self.scales.contiguous()}
        if self.mins is not None:
            tensors[f"{prefix}.mins"] = self.mins.contiguous()
        return tensors

    @staticmethod
    def from_checkpoint(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                        bits: int, group_size: int) -> "QuantizedWeight":
        if bits == 4:
            packed = qweight.to(torch.uint8)
            q = torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1).to(torch.int8)
        else:
            q = qweight.to(torch.int8)
        return QuantizedWeight(q, scales.float(), None if mins is None else mins.float(), bits, group_size)

    def checkpoint_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        return quantized_shapes(prefix, *self.shape, self.bits, self.group_size)


@dataclass
class NibblePacked:
    """An int4 weight held two values a byte along K (its checkpoint form) and unpacked on use:
    the PyTorch fallback's form, so it holds half a byte a weight, as the kernels' layout does."""

    qweight: torch.Tensor  # uint8 [N, K // 2], low nibble first
    scales: torch.Tensor
    mins: torch.Tensor | None
    group_size: int
    bits: int = 4

    @staticmethod
    def pack(weight: QuantizedWeight) -> "NibblePacked":
        if weight.bits != 4:
            raise ValueError(f"only int4 weights pack two a byte, got int{weight.bits}")
        tensors = weight.to_checkpoint("w")
        return NibblePacked(tensors["w.qweight"], weight.scales, weight.mins, weight.group_size)

    def dequantize(self) -> torch.Tensor:
        return QuantizedWeight.from_checkpoint(self.qweight, self.scales, self.mins, 4,
                                               self.group_size).dequantize()


def quantized_shapes(prefix: str, n: int, k: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    groups = k // group_size
    shapes = {f"{prefix}.qweight": (n, k // 2 if bits == 4 else k), f"{prefix}.scales": (n, groups)}
    if bits == 4:
        shapes[f"{prefix}.mins"] = (n, groups)
    return shapes


def quantize(weight: torch.Tensor, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
    """Quantize a float [N, K] weight (in float32 arithmetic, whatever its dtype)."""
    n, k = weight.shape
    bits, group = check_scheme(method, group_size, k)
    w = weight.detach().float().view(n, k // group, group)
    if bits == 8:
        scales = w.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
        q = torch.round(w / scales.unsqueeze(-1)).clamp_(-127, 127)
        return QuantizedWeight(q.to(torch.int8).view(n, k), scales, None, bits, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.round((w - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp_(0, 15)
    return QuantizedWeight(q.to(torch.int8).view(n, k), scales, lo, bits, group)
