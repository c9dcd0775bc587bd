"""`Linear`: a bias-optional linear layer whose weight is repacked for the CPU's fast GEMM.

On the CPU, oneDNN's pre-packed weight layout reads the weights at ~73% of the machine's memory
bandwidth at batch 1, against ~40% for `F.linear` on the plain row-major weight (measured on a
2-core AMD EPYC, fp32 and bf16 alike), and it is faster at prefill sizes too. Decode is a pass over
the weights, so this is where the batch-1 tokens/s come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PACKABLE = (torch.float32, torch.bfloat16)


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in _PACKABLE
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed = False

    def pack(self) -> None:
        """Switch the weight to the backend's fast layout; call once, after loading."""
        if self.packed or not can_pack(self.weight):
            return
        # Batch hint 1: the layout tuned for decode; measured no slower at prefill sizes.
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 1)
        # The packed tensor is not a plain strided tensor, so it cannot stay a Parameter.
        del self.weight
        self.register_buffer("weight", packed, persistent=False)
        self.packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, packed={self.packed}"
