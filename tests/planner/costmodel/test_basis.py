"""Every prediction of pilot's own engine says what it rests on: hardware the cost model
measured ("profiled here") or a spec sheet with efficiencies learned elsewhere."""

from __future__ import annotations

import json

from support.synthetic_cost_model import synthetic_cost_model

from engine import EngineConfig
from planner.costmodel.predict import Predictor
from planner.spec.workload import Workload
from planner.store.database import Store

TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}


def _predictor(tmp_path, model):
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY))
    workload = Workload.from_flags("32:32", "8:8", concurrency=1, num_requests=4)
    return Predictor(model, str(path), workload), str(path)


def test_hardware_the_cost_model_never_measured_is_a_marked_spec_sheet_estimate(tmp_path):
    model = synthetic_cost_model(Store(f"sqlite:///{tmp_path / 'p.db'}"))
    predictor, path = _predictor(tmp_path, model)
    p = predictor.predict(EngineConfig(model=path, max_model_len=64), "cpu-host", "concurrency", 1)
    assert p.basis.startswith("pilot engine on cpu-host: spec-sheet estimate")
    assert "uncalibrated" in p.basis and not p.calibrated


def test_measured_hardware_is_profiled_here(tmp_path):
    model = synthetic_cost_model(Store(f"sqlite:///{tmp_path / 'p.db'}"))
    model.hardware["cpu-host"] = {"kind": "cpu", "memory_bandwidth_gbs": 20.0,
                                  "peak_tflops": {"bf16": 0.5, "fp32": 1.0}, "interconnect_gbs": None}
    predictor, path = _predictor(tmp_path, model)
    p = predictor.predict(EngineConfig(model=path, max_model_len=64), "cpu-host", "concurrency", 1)
    assert p.basis == "pilot engine on cpu-host, profiled here" and p.calibrated
