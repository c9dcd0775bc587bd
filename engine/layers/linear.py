"""`Linear`: a bias-optional linear layer whose weight is repacked for a fast CPU matmul.

Decode is a pass over the weights, so this is where the batch-1 tokens/s come from. On the CPU
the weight is repacked once, after loading, into the first of these that the machine supports:
- panels for the engine's own kernel (AVX-512; bf16 needs AVX512-BF16): batch 1 reads the weights
  at the machine's streaming bandwidth, 1.1-1.8x oneDNN's packed GEMM, and larger batches run
  level with oneDNN (measured on a 2-core AMD EPYC, fp32 and bf16);
- oneDNN's pre-packed layout: ~73% of the read bandwidth at batch 1, against ~40% for
  `F.linear` on the plain row-major weight.
Elsewhere (CUDA, float16, no compiler) it is `F.linear` on the plain weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu as cpu_kernels

_ONEDNN_PACKABLE = (torch.float32, torch.bfloat16)


def _onednn_packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in _ONEDNN_PACKABLE
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.layout = "plain"  # or "panels" (the engine's kernel) or "onednn"

    def pack(self) -> None:
        """Switch the weight to the fastest layout this machine runs; call once, after loading."""
        if self.layout != "plain":
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

    @property
    def packed(self) -> bool:
        return self.layout != "plain"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "panels":
            return cpu_kernels.linear(x, self.weight, self.bias, self.out_features)
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}")
