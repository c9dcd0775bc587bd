"""`pilot recommend --refine N`: the plan's own configuration is launched at its load and the
cost model fitted again before the plan is promised, on the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from planner.cli import app
from planner.costmodel import fit as cost_model
from planner.search.plan import Plan
from planner.search.refine import measured_runs, refine, runs_here
from planner.search.request import RecommendRequest
from planner.search.verify import VerifyError
from planner.spec.search_space import SearchSpace

SLO = "ttft_p95<=5s,itl_p95<=500ms"


def _space_file(tmp_path: Path) -> str:
    # One process: a plan of data or tensor parallelism would start worker processes per launch.
    space = SearchSpace.from_file("cpu")
    space = space.model_copy(update={"knobs": {**space.knobs, "tensor_parallel_size": [1],
                                               "data_parallel_size": [1]}})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
    return str(path)


def _request(model_dir: str, tmp_path: Path) -> RecommendRequest:
    # Three clients: no profiled run was at that load, so no first plan has been measured.
    return RecommendRequest(model=Path(model_dir), slo=SLO, concurrency=3, isl="8:32", osl="16:24",
                            num_requests=12, trials=12, max_devices=1, space=_space_file(tmp_path))


def test_the_plan_is_launched_at_its_load_and_the_model_fitted_again(profiled_copy, fitted, tmp_path):
    store, (model_dir, _) = profiled_copy
    request = _request(model_dir, tmp_path)
    first = cost_model.load(store)
    runs_before = len(store.runs())
    refined = refine(store, request, first, rounds=1, via="engine", repeats=2)
    launched = refined.rounds[0]
    assert launched.measured is not None and len(launched.measured.run_ids) == 2
    # Its runs are the plan's configuration on the plan's workload at its load, and in the store.
    assert measured_runs(store, launched.plan) == launched.measured.run_ids
    assert len(store.runs()) == runs_before + 2
    assert all(r.load_value == 3 and r.load_kind == "concurrency" for r in store.runs()[-2:])
    # The model was fitted again on them, saved, and the last search used it.
    assert refined.cost_model.id is not None and refined.cost_model.id != first.id
    assert cost_model.load(store).id == refined.cost_model.id
    assert refined.cost_model.report["data"]["runs"] > first.report["data"]["runs"]
    assert refined.cost_model.report["by_run"]["folds"] == first.report["by_run"]["folds"]
    assert refined.search.cost_model is refined.cost_model
    # One launch allowed: the last plan is either the one measured, or a new one said to be not.
    last = refined.rounds[-1]
    if last.measured is None:
        assert measured_runs(store, last.plan) and "was measured at its load before" in refined.stopped
    else:
        assert len(refined.rounds) == 1 and "1 refining launches were made" in refined.stopped


def test_no_rounds_launch_nothing_and_a_measured_plan_is_not_launched_again(profiled_copy, fitted, tmp_path):
    store, (model_dir, _) = profiled_copy
    request = _request(model_dir, tmp_path)
    runs_before = len(store.runs())
    none = refine(store, request, fitted, rounds=0, via="engine")
    assert none.rounds == [] and none.stopped == "refining was not asked for"
    assert len(store.runs()) == runs_before
    with pytest.raises(VerifyError, match="refine: must be >= 0, got -1"):
        refine(store, request, fitted, rounds=-1)
    # Until the plan found is one measured at its load, or the launches run out.
    refined = refine(store, request, fitted, rounds=3, via="engine", repeats=1)
    last = refined.rounds[-1]
    if last.measured is None:
        assert measured_runs(store, last.plan) and "measured at its load before" in refined.stopped
        again = refine(store, request, refined.cost_model, rounds=3, via="engine", repeats=1)
        assert [r.measured for r in again.rounds] == [None]  # the same search finds the same plan
    else:
        assert len(refined.rounds) == 3


def test_a_plan_for_other_hardware_cannot_be_launched_here(profiled, fitted, tmp_path):
    _, (model_dir, _) = profiled
    from planner.search.plan import make_plan
    from planner.search.recommend import run_search

    search = _request(model_dir, tmp_path).search(profiled[0], fitted)
    plan = make_plan(run_search(search, 4), search, fitted)
    assert runs_here(profiled[0], plan) is None
    elsewhere = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"name": "h100-sxm"})})
    assert "the plan is for h100-sxm" in runs_here(profiled[0], elsewhere)


def test_the_cli_refines_and_says_so_in_the_plan(profiled_copy, fitted, tmp_path):
    store, (model_dir, _) = profiled_copy
    out = tmp_path / "plan.yaml"
    args = ["recommend", "--model", model_dir, "--slo", SLO, "--concurrency", "3", "--isl", "8:32",
            "--osl", "16:24", "--num-requests", "12", "--trials", "12", "--max-devices", "1",
            "--space", _space_file(tmp_path), "--out", str(out), "--db", store.url]
    cli = CliRunner().invoke(app, [*args, "--refine", "1", "--via", "engine", "--repeats", "1"])
    assert cli.exit_code == 0, cli.output
    said = " ".join(cli.output.split())
    assert "refine 1/1: launching" in said and "refine 1/1: measured ttft_p95" in said, said
    assert "ms predicted), itl_p95" in said and "fitting again" in said
    plan = Plan.from_file(out)
    assert plan.notes[0].startswith("refined: the plan")
    bad = CliRunner().invoke(app, [*args, "--refine", "-1"])
    assert bad.exit_code == 2 and "--refine: must be >= 0, got -1" in bad.output
