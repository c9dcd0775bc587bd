"""`pilot recommend`'s GPU predictor: a configuration on a GPU replayed through the engine's
scheduler with measured kernel step times, its KV cache sized as vLLM sizes it, and every
prediction saying what it rests on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine import EngineConfig
from planner.silicon.calibration import LEVELS, GpuCalibration
from planner.silicon.overhead import Overheads
from planner.silicon.predict import KernelPredictor, reference_gpu
from planner.spec import hardware as hw
from planner.spec.workload import Workload

# The kernel measurements: installed by the test extra (Python 3.11-3.13, as the package allows).
pytest.importorskip("aiconfigurator_core")

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
}
LLAMA_70B = {**LLAMA_31_8B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
             "intermediate_size": 28672}


def _calibration(spread: float = 0.1) -> GpuCalibration:
    """Overheads of 1 ms a step and 20 ms a request, errors of +-spread (log) at the extremes."""
    errors = {"ttft": [spread * (2 * q - 1) for q in LEVELS], "tpot": [spread * (2 * q - 1) for q in LEVELS]}
    return GpuCalibration({"vllm": Overheads(1e-3, 0.0, 20e-3, 10, ("a",))}, {"vllm": errors}, {}, "test")


def _model(tmp_path: Path, cfg: dict, name: str = "m") -> str:
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def _predictor(tmp_path: Path, cfg: dict = LLAMA_31_8B, **kwargs) -> KernelPredictor:
    workload = Workload.from_flags("128:128", "64:64", concurrency=1, num_requests=6)
    return KernelPredictor(_model(tmp_path, cfg), workload, calibration=_calibration(), **kwargs)


def _config(model: str, **knobs) -> EngineConfig:
    return EngineConfig(model=model, device="cuda", max_model_len=4096, **knobs)


def test_batch_one_itl_of_an_8b_model_on_an_h100_is_single_digit_milliseconds(tmp_path):
    predictor = _predictor(tmp_path)
    config = _config(str(tmp_path / "m"))
    p = predictor.predict(config, "h100-sxm", "concurrency", 1)
    # Published vLLM measurements of an 8B Llama on one H100: 6-8 ms a token at one client.
    assert 0.005 < p.metrics["itl_p50"] < 0.010
    assert p.metrics["ttft_p50"] > 0.020  # the front end's 20 ms come first
    assert "vLLM" in p.basis and "h100-sxm" in p.basis and "calibrated from measured kernels" in p.basis
    assert p.calibrated


def test_an_h200_decodes_faster_than_an_h100_and_tp2_faster_than_tp1(tmp_path):
    predictor = _predictor(tmp_path)
    model = str(tmp_path / "m")
    itl = {(gpu, tp): predictor.predict(_config(model, tensor_parallel_size=tp), gpu, "concurrency", 4)
           .metrics["itl_p50"] for gpu in ("h100-sxm", "h200") for tp in (1, 2)}
    assert itl[("h200", 1)] < itl[("h100-sxm", 1)]
    assert itl[("h100-sxm", 2)] < itl[("h100-sxm", 1)]


def test_a_gpu_without_measurements_borrows_the_closest_measured_and_says_so(tmp_path):
    assert reference_gpu(hw.get_spec("h100-sxm")) == "h100-sxm"
    assert reference_gpu(hw.get_spec("l4")) == "l40s"
    predictor = _predictor(tmp_path)
    model = str(tmp_path / "m")
    l4 = predictor.predict(_config(model, quantization="fp8"), "l4", "concurrency", 1)
    l40s = predictor.predict(_config(model, quantization="fp8"), "l40s", "concurrency", 1)
    assert "spec-sheet estimate" in l4.basis and "l40s" in l4.basis and not l4.calibrated
    # An L4 has about a third of an L40S's bandwidth: batch-1 decode is about that much slower.
    assert 2.0 < l4.metrics["itl_p50"] / l40s.metrics["itl_p50"] < 3.5


def test_a_plan_whose_weights_leave_no_room_for_one_sequence_is_refused(tmp_path):
    predictor = _predictor(tmp_path, LLAMA_70B)
    model = str(tmp_path / "m")
    with pytest.raises(ValueError, match="max_model_len"):
        predictor.kv_blocks(_config(model), hw.get_spec("h100-sxm"))
    assert predictor.kv_blocks(_config(model, tensor_parallel_size=4), hw.get_spec("h100-sxm")) > 1000
    assert predictor.kv_blocks(_config(model, quantization="fp8"), hw.get_spec("h200")) > 1000


def test_intervals_and_slo_bounds_come_from_the_calibration(tmp_path):
    p = _predictor(tmp_path).predict(_config(str(tmp_path / "m")), "h100-sxm", "concurrency", 2)
    low, high = p.intervals["itl_p95"]
    assert low < p.metrics["itl_p95"] < high
    assert p.errors.bound("itl_p95", 1.0, 0.95) == pytest.approx(math.exp(0.09))
    assert p.errors.chance_under("ttft_p95", 1.0, 10.0) == 1.0


def test_an_unknown_backend_and_an_unmeasured_version_are_named(tmp_path):
    with pytest.raises(ValueError, match="vllm, sglang"):
        _predictor(tmp_path, backend="tgi")
    predictor = _predictor(tmp_path, backend_version="0.0.1")
    with pytest.raises(ValueError, match="measured: "):
        predictor.basis(hw.get_spec("h100-sxm"))
