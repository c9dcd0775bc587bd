"""`Linear`: a bias-optional linear layer whose weight is repacked for a fast CPU matmul.

Decode is a pass over the weights, so this is where the batch-1 tokens/s come from. On the CPU
the weight is repacked once, after loading, into the first of these that the machine supports:
- panels for the engine's own kernel (AVX-512, bf16 needing AVX512-BF16; else AVX2 with FMA, which
  widens bf16 pairs in registers): batch 1 reads the weights
  at the machine's streaming bandwidth, 1.1-1.8x oneDNN's packed GEMM, and larger batches run
  level with oneDNN (measured on a 2-core AMD EPYC, fp32 and bf16); on a CPU with AMX, bf16
  batches of 3 rows or more run on its tile unit from the same panels, at or above oneDNN;
- oneDNN's pre-packed layout (bf16 only where oneDNN runs it: AVX-512 or AVX-NE-CONVERT): ~73%
  of the read bandwidth at batch 1, against ~40% for `F.linear` on the plain row-major weight.
Elsewhere (CUDA, float16, no compiler) it is `F.linear` on the plain weight.

A weight-only quantized layer (`set_quantized`) holds int8/int4 weights instead: packed for the
CPU kernel, or as they are for the PyTorch fallback, which dequantizes them on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.device import native_bf16
from engine.kernels import cpu as cpu_kernels
from engine.kernels import gpu as gpu_kernels
from engine.quantization import NibblePacked, QuantizedWeight

_ONEDNN_PACKABLE = (torch.float32, torch.bfloat16)


def _onednn_packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in _ONEDNN_PACKABLE
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and (weight.dtype != torch.bfloat16 or native_bf16()))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # "plain", "panels" (the engine's kernel), "onednn", or for quantized weights
        # "int8"/"int4" (the engine's CPU kernel), "int8-triton" (CUDA) and
        # "int8-dequant"/"int4-dequant" (PyTorch, dequantizing per call; int4 kept two a byte).
        self.layout = "plain"
        self.quantized: cpu_kernels.PackedQuantized | QuantizedWeight | NibblePacked | None = None
        # PyTorch ops only (no repacking, no compiled kernels): what torch.compile can trace.
        self.portable = False

    def pack(self) -> None:
        """Switch the weight to the fastest layout this machine runs; call once, after loading."""
        if self.layout != "plain" or self.portable:
            return
        weight = self.weight.data
        if cpu_kernels.linear_supported(weight.dtype, weight.device, self.in_features):
            packed, self.layout = cpu_kernels.pack_linear_weight(weight), "panels"
        elif _onednn_packable(weight):
            # Batch hint 1: the layout tuned for decode; measured no slower at prefill sizes.
            packed, self.layout = torch.ops.mkldnn._reorder_linear_weight(weight, 1), "onednn"
        else:
            return
        # A packed tensor is not the [out, in] weight any more, so it cannot stay a Parameter.
        del self.weight
        self.register_buffer("weight", packed, persistent=False)

    def set_quantized(self, weight: QuantizedWeight, backend: str | None = None) -> None:
        """Hold a weight-only quantized weight in place of the float one. `backend` ("cpu",
        "triton" or "dequant") defaults to the fastest this device runs."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight of shape {weight.shape} for a linear layer "
                             f"[{self.out_features}, {self.in_features}]")
        float_weight = self.weight
        device, method = float_weight.device, f"int{weight.bits}"
        if backend is None and self.portable:
            backend = "triton" if weight.bits == 8 and gpu_kernels.available(device.type) else "dequant"
        if backend is None:
            backend = ("cpu" if cpu_kernels.quant_linear_supported(float_weight.dtype, device, weight)
                       else "triton" if weight.bits == 8 and gpu_kernels.available(device.type)
                       else "dequant")
        if backend == "cpu":
            self.quantized, self.layout = cpu_kernels.pack_quantized(weight), method
        else:
            moved = QuantizedWeight(weight.qweight.to(device), weight.scales.to(device),
                                    None if weight.mins is None else weight.mins.to(device),
                                    weight.bits, weight.group_size)
            self.quantized = NibblePacked.pack(moved) if weight.bits == 4 else moved
            self.layout = f"{method}-{backend}"
        del self.weight
        self.register_buffer("weight", torch.empty(0, dtype=float_weight.dtype,
                                                   device=float_weight.device), persistent=False)

    def weight_bytes(self) -> int:
        """Bytes a forward pass reads for the weight (quantized parts included)."""
        if self.quantized is None:
            return self.out_features * self.in_features * self.weight.element_size()
        q = self.quantized
        return sum(t.numel() * t.element_size() for t in (q.qweight, q.scales, q.mins) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            q = self.quantized
            if isinstance(q, cpu_kernels.PackedQuantized):
                return cpu_kernels.quant_linear(x, q, self.bias, self.out_features)
            if self.layout == "int8-triton":
                return gpu_kernels.int8_linear(x, q.qweight, q.scales, self.bias)
            return F.linear(x, q.dequantize().to(x.dtype), self.bias)
        if self.layout == "panels":
            return cpu_kernels.linear(x, self.weight, self.bias, self.out_features)
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}")
