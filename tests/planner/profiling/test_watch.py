"""Profiling to an accuracy: the watch's cross-validated estimate (the same figure `pilot fit`
reports), the stop rule ending a real profile, and the adaptive order choosing what to measure."""

from __future__ import annotations

import pytest
from support.mini_space import WORKLOAD, mini_space
from typer.testing import CliRunner

from planner.cli import app
from planner.costmodel import fit as cm
from planner.measure.profiler import plan_campaign, profile
from planner.profiling.adaptive import AdaptiveOrder
from planner.profiling.estimate import MIN_MEASUREMENTS, campaign_run_ids, cross_validated
from planner.profiling.until import parse_until
from planner.profiling.watch import Checkpoint, outlook, watch_profile
from planner.store.database import Store


def _campaign(tmp_path, model_dir):
    _, space = mini_space(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'pilot.db'}")
    return store, plan_campaign(store, model_dir, space, WORKLOAD)


def test_a_loose_target_stops_the_profile_at_its_second_check(model_dir, tmp_path):
    store, campaign = _campaign(tmp_path, model_dir)
    seen: list[Checkpoint] = []
    watch = watch_profile(store, campaign.id, model_dir, WORKLOAD, "engine", parse_until("median_ape<=1000%"),
                          on_estimate=seen.append)
    result = profile(store, campaign, WORKLOAD, 600, via="engine", max_runs=12, after_run=watch)
    # First estimate at MIN_MEASUREMENTS runs, the next a quarter more runs on: met at both.
    assert [c.runs for c in watch.history] == [MIN_MEASUREMENTS, 8] and seen == watch.history
    assert result.stopped_by_rule and watch.stopped_by_target and len(result.run_ids) == 8
    assert watch.target == "met"
    assert result.remaining == 12 - 8
    # The estimate is the held-out error `pilot fit` reports for the same runs.
    report = cm.fit(store, folds=5).report["by_run"]["overall"]
    assert watch.latest.median_ape == pytest.approx(report["median_ape"])
    assert watch.latest.p90_ape == pytest.approx(report["p90_ape"])


def test_an_unmet_target_runs_to_the_count_and_the_adaptive_order_takes_its_best(model_dir, tmp_path):
    store, campaign = _campaign(tmp_path, model_dir)
    watch = watch_profile(store, campaign.id, model_dir, WORKLOAD, "engine", parse_until("median_ape<=0.001%"),
                          order="adaptive")
    assert isinstance(watch.order, AdaptiveOrder)
    watch.order.first_pass = 1  # the mini space has few configurations: the committee from the first estimate on
    turns: list[tuple[str, list[int]]] = []
    committee: list[list[tuple[float, float, float]]] = []  # the scored candidates when a committee turn chooses
    configs: list[int] = []  # the configuration of each run

    def rank(candidates):
        order = watch.order
        loaded = order.loaded  # what the committee prices runs against
        ranked = order.rank(candidates)
        choosing = order.turn == "committee" and (not turns or turns[-1][0] != "committee")
        turns.append((order.turn, [e.id for e in ranked]))
        configs.append(ranked[0].engine_config_id)
        if choosing:
            committee.append([(order.value(order.scores[e.id], loaded), order.scores[e.id].spread,
                               order.scores[e.id].seconds) for e in ranked if e.id in order.scores])
        return ranked

    result = profile(store, campaign, WORKLOAD, 600, via="engine", max_runs=11, rank=rank, after_run=watch)
    assert not result.stopped_by_rule and not watch.stopped_by_target and len(result.run_ids) == 11
    # The first pass is the campaign's order. Then a coverage turn measures the next configuration
    # in that order at both its load levels, and the committee takes as many runs; then coverage again.
    assert [turn for turn, _ in turns] == (["builtin"] * MIN_MEASUREMENTS + ["coverage"] * 2 + ["committee"] * 2
                                           + ["coverage"])
    # Checks at 6, 8 and 10 runs; the profile ended between checks, so a last estimate covers every run.
    assert [c.runs for c in watch.history] == [6, 8, 10]
    watch.finish(100.0)
    assert [c.runs for c in watch.history] == [6, 8, 10, 11] and watch.target == "not met"
    watch.finish(100.0)
    assert len(watch.history) == 4  # nothing new to estimate on
    assert all(ids == sorted(ids) for turn, ids in turns if turn != "committee")
    for scored in committee:  # the committee's best first, priced on the configuration then loaded
        values = [value for value, _, _ in scored]
        assert len(scored) >= 2 and values[0] == max(values)
        assert all(spread > 0 and seconds > 0 for _, spread, seconds in scored)
    # A committee turn measures its configuration's load levels together, as coverage does.
    committee_runs = [i for i, (turn, _) in enumerate(turns) if turn == "committee"]
    assert len({configs[i] for i in committee_runs}) == 1 and len(committee) == 1
    # What a run cost beyond its own length, measured: loading another configuration costs more.
    assert watch.order.switch_s > watch.order.same_config_s > 0


def test_the_adaptive_order_keeps_the_built_in_order_for_its_first_configurations(model_dir, tmp_path):
    store, campaign = _campaign(tmp_path, model_dir)
    watch = watch_profile(store, campaign.id, model_dir, WORKLOAD, "engine", order="adaptive")
    watch.order.first_pass = 4
    turns: list[tuple[str, int]] = []

    def rank(candidates):
        ranked = watch.order.rank(candidates)
        turns.append((watch.order.turn, ranked[0].engine_config_id))
        return ranked

    profile(store, campaign, WORKLOAD, 600, via="engine", max_runs=11, rank=rank, after_run=watch)
    first_pass = [config for turn, config in turns if turn == "builtin"]
    # Four configurations at all their load levels (two each), past the first estimate at 6 runs.
    assert len(set(first_pass)) == 4 and len(first_pass) == 8
    assert [turn for turn, _ in turns[8:]] == ["coverage"] * 2 + ["committee"]


def test_the_estimate_needs_enough_measurements(model_dir, tmp_path):
    store, campaign = _campaign(tmp_path, model_dir)
    profile(store, campaign, WORKLOAD, 600, via="engine", max_runs=MIN_MEASUREMENTS - 1)
    assert cross_validated(store, campaign_run_ids(store, campaign.id)) is None


def test_the_outlook_follows_a_falling_curve_and_declines_a_flat_one():
    from planner.profiling.estimate import Accuracy

    def history(errors):
        return [Checkpoint(n, n, Accuracy(n, n, e, 2 * e, 0.8), 0.1) for n, e in zip((8, 16, 32), errors)]

    runs, error = outlook(history([0.2, 0.1, 0.05]))  # error halves as the runs double
    assert runs == 64 and error == pytest.approx(0.025)
    assert outlook(history([0.1, 0.1, 0.12])) is None
    assert outlook(history([0.2, 0.1])[:2]) is None


def test_pilot_profile_until_says_why_it_stopped_and_what_more_would_buy(model_dir, tmp_path):
    space_file, _ = mini_space(tmp_path)
    runner = CliRunner()
    args = ["profile", "--model", model_dir, "--space", str(space_file), "--isl", "8:48", "--osl", "4:12",
            "--num-requests", "6", "--via", "engine", "--db", f"sqlite:///{tmp_path / 'p.db'}"]
    bad = runner.invoke(app, [*args, "--until", "median<=8%"])
    assert bad.exit_code == 2 and "until: 'median' is not one of median_ape, p90_ape" in " ".join(bad.output.split())
    bad = runner.invoke(app, [*args, "--order", "random"])
    said = " ".join(bad.output.split())
    assert bad.exit_code == 2 and "order: must be one of builtin, adaptive, got 'random'" in said
    result = runner.invoke(app, [*args, "--until", "median_ape<=1000%", "--max-runs", "12", "--order", "adaptive"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "8 new runs" in said and "stopped: the target was met at two checks in a row" in said
    assert "accuracy: held-out error" in said and "(8 measurements)" in said
