"""int8 weight-only matmul in Triton for CUDA: y = x @ (q * scale)^T (+ bias), dequantized
inside the matmul so the weights cross memory as int8.

Weights stay in the layout-free form of `QuantizedWeight` (q int8 [N, K], one scale per output
row): a tile of q is loaded, widened to the activations' dtype in registers and fed to
`tl.dot`; the per-row scale multiplies the fp32 accumulator once at the end. Tested on the CPU
under TRITON_INTERPRET=1 against PyTorch; compiled where CUDA is present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K,
                        stride_xm, stride_qn, stride_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        q = tl.load(q_ptr + cols[None, :] * stride_qn + k[:, None],
                    mask=(cols[None, :] < N) & (k[:, None] < K), other=0)
        # [BLOCK_K, BLOCK_N] tile of q^T, widened in registers; fp32 operands (tf32 on tensor
        # cores for half-precision models): the kernel is bound by reading q, not by the dot.
        acc += tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision=PRECISION)
    acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp32/bf16/fp16) @ (qweight int8 [N, K] * scales [N])^T (+ bias) -> [..., N]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # Small M (decode) is a GEMV: narrow row tiles, wide column tiles to stream q.
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _int8_matmul_kernel[grid](
        x2, qweight, scales.reshape(-1).float().contiguous(), bias if bias is not None else x2, y,
        m, n, k, x2.stride(0), qweight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return y.view(*lead, n)
