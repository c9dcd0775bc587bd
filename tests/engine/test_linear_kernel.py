"""The CPU linear kernel (panel-packed weights) against F.linear, and which layout Linear picks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.device import native_bf16
from engine.kernels import cpu as cpu_kernels
from engine.layers.linear import Linear

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not cpu_kernels.linear_supported(torch.float32, CPU, 16),
                                reason="no C compiler or neither AVX-512 nor AVX2: kernel not built")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 1280, 768),   # decode, whole panels
    (3, 40, 64),      # out_features not a multiple of 16: masked last panel
    (13, 100, 96),    # rows past one 12-row register tile, odd panel count
    (200, 48, 2050),  # several cache blocks of rows
    (7, 8, 32),       # fewer outputs than one panel (a MoE router)
    # With AMX (bf16, 3 rows or more, K a multiple of 32), the tile unit's path (the two above
    # with 3 and 7 rows as well):
    (40, 1000, 384),  # two 16-row tiles and a short one, a masked last block
    (5, 3072, 512),   # a decode batch: one short tile met by many blocks
    (300, 64, 2048),  # several cache blocks of rows
    (8, 32, 32),      # one short tile, one block, one K step
])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(dtype, tol, rows, out_features, in_features, bias):
    if not cpu_kernels.linear_supported(dtype, CPU, in_features):
        pytest.skip(f"{dtype} not supported by this CPU")
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    out = cpu_kernels.linear(x, cpu_kernels.pack_linear_weight(weight), b, out_features)
    ref = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_a_short_tile_of_strided_bf16_rows():
    """The rows past the last whole 16-row tile are copied out of a row-strided x."""
    if not cpu_kernels.linear_supported(torch.bfloat16, CPU, 512):
        pytest.skip("bfloat16 not supported by this CPU")
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 512, generator=gen).to(torch.bfloat16)
    packed = cpu_kernels.pack_linear_weight(weight)
    for rows in (4, 21):
        wide = torch.randn(rows, 600, generator=gen).to(torch.bfloat16)
        view = wide[:, 40:552]
        ref = view.float() @ weight.float().T
        out = cpu_kernels.linear(view, packed, None, 96).float()
        assert (out - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


def test_strided_and_batched_inputs():
    """A row-strided view and leading batch dims give the same result as a contiguous copy."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=gen)
    packed = cpu_kernels.pack_linear_weight(weight)
    wide = torch.randn(5, 200, generator=gen)
    view = wide[:, 10:106]  # row stride 200, unit column stride
    assert torch.allclose(cpu_kernels.linear(view, packed, None, 64), view @ weight.T, atol=1e-5)
    batched = torch.randn(2, 3, 96, generator=gen)
    out = cpu_kernels.linear(batched, packed, None, 64)
    assert out.shape == (2, 3, 64)
    assert torch.allclose(out, batched @ weight.T, atol=1e-5)
    col_major = torch.randn(96, 4, generator=gen).T  # not unit stride along K: copied first
    assert torch.allclose(cpu_kernels.linear(col_major, packed, None, 64), col_major @ weight.T, atol=1e-5)


@pytest.mark.parametrize("dtype, in_features, layout", [
    (torch.float32, 96, "panels"),
    (torch.bfloat16, 96, "panels"),
    (torch.bfloat16, 95, "onednn"),  # bf16 panels pair up K: odd K falls back to oneDNN
    (torch.float16, 96, "plain"),
])
def test_linear_picks_layout_and_keeps_results(dtype, in_features, layout):
    if layout == "panels" and not cpu_kernels.linear_supported(dtype, CPU, in_features):
        pytest.skip(f"{dtype} panels not supported by this CPU")
    if layout == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    if layout == "onednn" and not native_bf16():
        layout = "plain"  # oneDNN's bf16 is emulated without AVX-512 or AVX-NE-CONVERT: not packed
    gen = torch.Generator().manual_seed(1)
    layer = Linear(in_features, 40, bias=True)
    layer.weight.data = torch.randn(40, in_features, generator=gen).to(dtype)
    layer.bias.data = torch.randn(40, generator=gen).to(dtype)
    x = torch.randn(6, in_features, generator=gen).to(dtype)
    with torch.inference_mode():
        before = layer(x).float()
        layer.pack()
        after = layer(x).float()
    assert layer.layout == layout
    assert (after - before).abs().max().item() <= 2e-2 * before.abs().max().item()
