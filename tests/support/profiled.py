"""A small real profile shared by the cost-model and recommendation tests: two tiny models,
16 runs each, measured by the engine on this machine into a SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

from engine.model_zoo import SHAPES, make_checkpoint
from planner.measure.profiler import plan_campaign, profile
from planner.spec.search_space import SearchSpace
from planner.spec.workload import Workload
from planner.store.database import Store

SPACE = """
name: fit-test
knobs:
  quantization: [null, int8]
  max_num_seqs: [1, 8]
  max_num_batched_tokens: [64, 512]
fixed:
  dtype: float32
  num_threads: 1
load:
  kind: concurrency
  levels: [1, 4]
"""
WIDER = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3}


def small_workload() -> Workload:
    return Workload.from_flags("8:64", "4:16", concurrency=1, num_requests=8)


def profile_two_models(tmp: Path, model_dir: str) -> tuple[Store, list[str]]:
    wider_shape = tmp / "wider.json"
    wider_shape.write_text(json.dumps({**SHAPES["tiny"], **WIDER}))
    wider = str(make_checkpoint(wider_shape, tmp / "wider", seed=1, dtype="float32"))
    space_file = tmp / "space.yaml"
    space_file.write_text(SPACE)
    store = Store(f"sqlite:///{tmp / 'pilot.db'}")
    for model in (model_dir, wider):
        campaign = plan_campaign(store, model, SearchSpace.from_file(space_file), small_workload())
        result = profile(store, campaign, small_workload(), budget_s=600)
        assert result.remaining == 0 and not result.failed
    return store, [model_dir, wider]
