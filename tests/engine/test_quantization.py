"""Weight-only quantization: the schemes, the CPU kernel, loading and `pilot models quantize`."""

from __future__ import annotations

import json

import pytest
import torch
from support.references import quantized_linear_reference
from typer.testing import CliRunner

from engine import LLM, EngineConfig
from engine.kernels import cpu as cpu_kernels
from engine.layers.linear import Linear
from engine.model_config import CheckpointError
from engine.model_zoo import make_checkpoint
from engine.quantization import QuantizedWeight, quantize
from engine.quantize_checkpoint import quantize_checkpoint
from planner.cli import app

CPU = torch.device("cpu")
kernel_only = pytest.mark.skipif(
    not cpu_kernels.quant_linear_supported(torch.float32, CPU, quantize(torch.ones(32, 64), "int8", 64)),
    reason="no C compiler, or neither AVX-512 nor AVX2 with FMA: kernel not built")


def _engine(model_dir, **kwargs) -> LLM:
    kwargs.setdefault("num_threads", 1)
    kwargs.setdefault("dtype", "float32")
    return LLM(EngineConfig(model=str(model_dir), **kwargs))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("q") / "tiny", seed=3, dtype="float32")


# -- the schemes -------------------------------------------------------------------------------

def test_int8_rounds_each_row_to_half_a_step():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    w[5] = 0.0  # an all-zero row must not divide by zero
    q = quantize(w, "int8")
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (48, 1) and q.mins is None
    assert q.qweight.abs().max() <= 127
    err = (q.dequantize() - w).abs()
    assert (err <= q.scales / 2 + 1e-7).all()
    assert torch.equal(q.dequantize()[5], torch.zeros(96))


def test_int4_rounds_each_group_to_half_a_step():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) + 3.0  # off-centre rows
    q = quantize(w, "int4", group_size=32)
    assert q.scales.shape == q.mins.shape == (32, 4)
    assert q.qweight.min() >= 0 and q.qweight.max() <= 15
    err = (q.dequantize() - w).abs().view(32, 4, 32)
    assert (err <= q.scales.unsqueeze(-1) / 2 + 1e-6).all()


@pytest.mark.parametrize("method, group", [("int4", 40), ("int4", 7), ("int5", 32)])
def test_bad_schemes_name_the_value(method, group):
    with pytest.raises(ValueError, match=str(group) if method == "int4" else method):
        quantize(torch.randn(16, 96), method, group)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_checkpoint_form_round_trips(method):
    q = quantize(torch.randn(40, 64), method, 32)
    parts = q.to_checkpoint("x")
    if method == "int4":
        assert parts["x.qweight"].dtype == torch.uint8 and parts["x.qweight"].shape == (40, 32)
    back = QuantizedWeight.from_checkpoint(parts["x.qweight"], parts["x.scales"], parts.get("x.mins"),
                                           q.bits, q.group_size)
    assert torch.equal(back.qweight, q.qweight) and torch.equal(back.dequantize(), q.dequantize())


# -- the CPU kernel against the dequantized weight ---------------------------------------------

@kernel_only
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("method, group", [("int8", 0), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows, out_features, in_features", [(1, 1280, 768), (1, 40, 128), (5, 100, 256),
                                                             (100, 64, 768), (13, 33, 64)])
def test_kernel_matches_dequantized_reference(dtype, tol, method, group, rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows + out_features)
    q = quantize(torch.randn(out_features, in_features, generator=gen), method, group or 128)
    if not cpu_kernels.quant_linear_supported(dtype, CPU, q):
        pytest.skip(f"{dtype} not supported here")
    bias = torch.randn(out_features, generator=gen).to(dtype)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    packed = cpu_kernels.pack_quantized(q)
    out = cpu_kernels.quant_linear(x, packed, bias, out_features)
    ref = quantized_linear_reference(x, q, packed.dot) + bias.float()
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_linear_layer_quantized_in_place(method):
    layer = Linear(768, 256)
    layer.weight.data = torch.randn(256, 768)
    float_bytes = layer.weight_bytes()
    q = quantize(layer.weight.data, method, 32)
    x = torch.randn(3, 768)
    layer.set_quantized(q)
    assert layer.layout in (method, f"{method}-dequant")
    dot = isinstance(layer.quantized, cpu_kernels.PackedQuantized) and layer.quantized.dot
    with torch.inference_mode():
        assert torch.allclose(layer(x), quantized_linear_reference(x, q, dot), atol=1e-4)
    # fp32 -> one byte a weight plus a scale a row; half a byte plus two floats per 32 weights.
    assert layer.weight_bytes() / float_bytes <= {"int8": 0.26, "int4": 0.19}[method]


# -- the engine: load-time quantization, pre-quantized directories -----------------------------

@pytest.mark.parametrize("method", ["int8", "int4"])
def test_prequantized_directory_loads_the_same_model(tiny, tmp_path, method):
    out = quantize_checkpoint(tiny, tmp_path / method, method, group_size=32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "pilot", "bits": int(method[-1]), "group_size": 32}
    ids = list(range(5, 60))
    at_load = _engine(tiny, quantization=method, quantization_group_size=32).score(ids)
    prequantized = _engine(out).score(ids)
    assert torch.equal(at_load, prequantized)
    # Quantization changes the model, and by a bounded amount on these random weights.
    float_logits = _engine(tiny).score(ids)
    assert not torch.equal(prequantized, float_logits)
    assert (prequantized - float_logits).abs().max() < 0.5 * float_logits.abs().max()


def test_every_linear_but_the_router_is_quantized(tmp_path):
    moe = make_checkpoint("mixtral-tiny", tmp_path / "moe", seed=0, dtype="float32")
    model = _engine(moe, quantization="int8").engine.runner.model
    layouts = {name: m.layout for name, m in model.named_modules() if isinstance(m, Linear)}
    routers = [n for n in layouts if n.endswith("mlp.gate")]
    assert routers and all(layouts[n] in ("panels", "onednn", "plain") for n in routers)
    assert all(layout.startswith("int8") for n, layout in layouts.items() if n not in routers)


@kernel_only
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_kernel_and_pytorch_fallback_agree(tiny, request, method):
    ids = list(range(7, 70))
    kernel = _engine(tiny, quantization=method, quantization_group_size=32)
    assert kernel.engine.runner.model.lm_head.layout == method
    ours = kernel.score(ids)
    # The dot-product kernel rounds activations to int8 (groups of 32) as well: ~1% of a logit.
    tolerance = 3e-2 if cpu_kernels.dot_products_supported(64, 32) else 1e-4
    request.getfixturevalue("pytorch_paths")  # kernels off from here on
    fallback = _engine(tiny, quantization=method, quantization_group_size=32)
    assert fallback.engine.runner.model.lm_head.layout == f"{method}-dequant"
    reference = fallback.score(ids)
    assert ((ours - reference).abs().max() / reference.abs().max()).item() < tolerance


def test_quantized_checkpoint_errors_name_the_problem(tiny, tmp_path):
    out = quantize_checkpoint(tiny, tmp_path / "q8", "int8")
    with pytest.raises(CheckpointError, match="quantized as int8.*int4"):
        _engine(out, quantization="int4")
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", "int4")
    with pytest.raises(ValueError, match="source directory"):
        quantize_checkpoint(tiny, tiny, "int8")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'gptq'"):
        _engine(out)


def test_cli_quantize(tiny, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["models", "quantize", "--model", str(tiny), "--out", str(tmp_path / "q4"),
                                 "--method", "int4", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q4" / "model.safetensors").is_file()
    bad = runner.invoke(app, ["models", "quantize", "--model", str(tiny), "--out", str(tmp_path / "x"),
                              "--method", "int4", "--group-size", "48"])
    assert bad.exit_code == 2 and "quantization_group_size=48" in bad.output
