"""Measuring through `pilot serve` (`--via http`): the profiler and `recommend --verify` drive
a real server process over the OpenAI API and store what a client saw, with the engine's steps."""

from __future__ import annotations

import numpy as np
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from engine import EngineConfig
from planner.cli import app
from planner.measure.http import OverHTTP
from planner.measure.profiler import plan_campaign, profile
from planner.spec.search_space import SearchSpace
from planner.spec.workload import Workload
from planner.store.database import RequestRow, Run, StepRow, Store

SPACE = """
name: http-test
knobs:
  max_num_seqs: [4]
fixed:
  dtype: float32
  num_threads: 1
load:
  kind: concurrency
  levels: [1, 3]
"""


def test_profile_via_http_stores_what_the_client_saw_and_the_engine_steps(model_dir, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    workload = Workload.from_flags("8:32", "4:12", concurrency=1, num_requests=6)
    store = Store(f"sqlite:///{tmp_path / 'pilot.db'}")
    campaign = plan_campaign(store, model_dir, SearchSpace.from_file(space_file), workload)
    result = profile(store, campaign, workload, budget_s=600, via="http")
    assert result.remaining == 0 and not result.failed and len(result.run_ids) == 2
    planned = sum(spec.output_tokens for spec in workload.sample())
    with store.session() as session:
        for run_id in result.run_ids:
            run = session.get(Run, run_id)
            assert run.num_requests == 6 and run.output_tokens == planned
            assert run.latency["ttft_p50"] > 0 and run.throughput_tok_s > 0
            requests = session.scalar(select(func.count()).where(RequestRow.run_id == run_id))
            decode = session.scalar(select(func.sum(StepRow.num_decode_tokens)).where(StepRow.run_id == run_id))
            # Every output token but each request's first came from a decode step of this run.
            assert requests == 6 and decode == planned - 6
            # What serving added, request by request: each kind's quantiles, from every request.
            assert run.path == "http" and run.delivery["first_s_count"] == 6
            assert run.delivery["admit_s_count"] == 6 and run.delivery["token_s_count"] > 0
            quantiles = {k: np.array(run.delivery[k]) for k in ("admit_s", "first_s", "token_s", "gap_s")}
            assert all(len(q) == 100 and np.all(np.diff(q) >= 0) for q in quantiles.values())
            # The server takes a request after it was sent and streams a token after it was made.
            assert quantiles["admit_s"][50] > 0 and quantiles["first_s"][50] > 0 and quantiles["token_s"][50] > 0


def test_a_failing_configuration_over_http_is_a_finding_not_a_crash(model_dir, tmp_path):
    bad = EngineConfig(model=model_dir, dtype="float32", num_threads=1, max_model_len=4096)
    try:
        OverHTTP(bad, Workload.from_flags("8", "4", concurrency=1, num_requests=2))
    except RuntimeError as err:
        assert "max_model_len" in str(err)
    else:
        raise AssertionError("a model with 512 positions served 4096")


def test_recommend_verify_via_http(profiled_copy, fitted, tmp_path):
    store, (model_dir, _) = profiled_copy
    result = CliRunner().invoke(app, [
        "recommend", "--model", model_dir, "--slo", "ttft_p95<=2s,itl_p95<=500ms", "--concurrency",
        "2", "--isl", "8:64", "--osl", "4:16", "--num-requests", "12", "--trials", "12", "--out",
        str(tmp_path / "plan.yaml"), "--verify", "--via", "http", "--db", store.url])
    assert result.exit_code == 0, result.output
    assert "through pilot serve" in result.output and "Every SLO held" in result.output
    # The store holds in-process runs only: the plan says it predicts the engine, not its clients.
    assert "predicts the engine in process: the server's delays add to what was measured" in " ".join(
        result.output.split())
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["predictions_for"] == "engine"
    assert any("no run was measured through `pilot serve`" in note for note in plan["notes"])
    result = CliRunner().invoke(app, ["recommend", "--model", model_dir, "--slo", "ttft_p95<=2s",
                                      "--concurrency", "2", "--via", "carrier-pigeon", "--db", store.url])
    assert result.exit_code == 2 and "--via" in result.output
