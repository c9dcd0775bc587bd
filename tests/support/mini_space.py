"""A search space of twelve experiments (two quantizations x three batch caps x two load levels)
and a workload that runs each in about a second on the tiny model: what the profiling tests
order, estimate and stop over."""

from __future__ import annotations

from pathlib import Path

from planner.spec.search_space import SearchSpace
from planner.spec.workload import Workload

SPACE = """
name: mini
knobs:
  quantization: [null, int8]
  max_num_seqs: [1, 4, 8]
fixed:
  dtype: float32
  num_threads: 1
load:
  kind: concurrency
  levels: [1, 4]
"""
WORKLOAD = Workload.from_flags("8:48", "4:12", concurrency=1, num_requests=6)


def mini_space(tmp_path: Path) -> tuple[Path, SearchSpace]:
    """The space written to `tmp_path`/space.yaml (for the CLI), and read back."""
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path, SearchSpace.from_file(path)
