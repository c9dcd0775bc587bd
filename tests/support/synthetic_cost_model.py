"""A cost model fitted in a second on synthetic steps, saved in a store: for tests of what
`pilot recommend` reads of its inputs, where the predictions' accuracy is beside the point and
profiling a real model (support/profiled.py) would take minutes."""

from __future__ import annotations

import numpy as np

from planner.costmodel import fit as cost_model
from planner.costmodel.features import COMPOSITION, feature_matrix
from planner.costmodel.fit import CostModel
from planner.costmodel.fit_data import METRICS
from planner.costmodel.roofline import Deployment, Device, ModelShape
from planner.costmodel.step_model import StepTimeModel
from planner.store.database import Store


def synthetic_cost_model(store: Store, steps: int = 400) -> CostModel:
    """A step-time model fitted to steps of a small shape on a GPU whose time grows with the
    batch and the prompt tokens, with +-20% intervals; it has measured no hardware, so every
    prediction is an uncalibrated one for the spec named. Saved in `store`."""
    rng = np.random.default_rng(0)
    shape = ModelShape(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                       num_kv_heads=4, head_dim=64, vocab_size=8000)
    deployment = Deployment(shape, "bfloat16")
    device = Device.for_deployment(deployment, "gpu", 3350.0, {"bf16": 990.0, "fp32": 67.0})
    decode = rng.integers(1, 64, steps)
    prefill = rng.integers(0, 2, steps) * rng.integers(1, 2048, steps)
    columns = {name: np.zeros(steps, dtype=int) for name in COMPOSITION}
    columns.update(num_seqs=decode + (prefill > 0), num_prefill_seqs=(prefill > 0).astype(int),
                   num_decode_seqs=decode, num_prefill_tokens=prefill, num_decode_tokens=decode,
                   context_tokens=decode * rng.integers(16, 2048, steps) + prefill)
    seconds = 2e-3 + 5e-5 * columns["num_seqs"] + 2e-6 * prefill
    step_model = StepTimeModel().fit(feature_matrix(deployment, device, columns), seconds, calibrate=False)
    model = CostModel(step_model, {"run": {metric: (-0.2, 0.2) for metric in METRICS}}, hardware={},
                      models=[], data_version="synthetic", report={"data": {"runs": 0, "steps": steps}})
    cost_model.save(store, model)
    return model
