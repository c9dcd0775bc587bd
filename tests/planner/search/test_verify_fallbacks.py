"""`pilot recommend --verify --fallbacks N --explore M`: while the plan launched misses an SLO,
the next candidates the model ranks are launched and measured in turn; once one holds, cheaper
ones are, and kept only if they hold twice. On the real engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
from typer.testing import CliRunner

from planner.cli import app
from planner.search.candidate import Requirement
from planner.search.plan import Plan
from planner.search.recommend import run_search
from planner.search.search import Search
from planner.search.verify import (
    MIN_CHANCE,
    MIN_SAVING,
    NARROW,
    Attempt,
    Comparison,
    VerifyError,
    VerifyResult,
    cheaper_in_turn,
    deployment_key,
    held_narrowly,
    measured_bias,
    next_in_turn,
    room_needed,
    shortfall,
    twins,
    verify_in_turn,
    worst_ratio,
)
from planner.spec.search_space import SearchSpace
from planner.spec.slo import parse_slos
from planner.spec.workload import Workload

# At 8 clients, one sequence at a time queues every prompt behind 7 whole requests of 32-48
# tokens (60 ms or more here); a batch starts each within a few steps (under 10 ms, with the
# first burst, on a busy CI machine).
QUEUE_BOUND = "ttft_p95<=30ms,itl_p95<=500ms"
GENEROUS = "ttft_p95<=5s,itl_p95<=500ms"  # one sequence at a time holds it too, at a higher cost


def _search(fitted, model_dir: str, slos: str, objective: str = "cost") -> Search:
    workload = Workload.from_flags("8:32", "32:48", concurrency=1, num_requests=24)
    # One process, one host: no replicas to spread the clients over, and no second process
    # contending for two cores, whose TTFT tail swings the most.
    space = SearchSpace.from_file("cpu")
    space = space.model_copy(update={"knobs": {**space.knobs, "tensor_parallel_size": [1],
                                               "data_parallel_size": [1]}})
    return Search(fitted, model_dir, workload, Requirement(parse_slos(slos), "concurrency", 8, objective),
                  space=space, max_devices=1)


def _one_at_a_time(search: Search, result):
    params = {**result.best.params, "max_num_seqs": 1, "data_parallel_size": 1,
              "tensor_parallel_size": 1, "num_speculative_tokens": 0}
    return search.evaluate(result.best.hardware.name, params, full=True)


def test_the_next_candidate_is_the_models_pick_without_those_tried(profiled, fitted):
    _, (model_dir, _) = profiled
    search = _search(fitted, model_dir, QUEUE_BOUND)
    result = run_search(search, trials=24)
    keys = ["ttft_p95", "itl_p95"]
    versions = [c for c in [*result.finalists, *result.candidates] if c.valid and c.prediction is not None]
    tried = [result.best]
    while (pick := next_in_turn(result, search, tried)) is not None:
        gone = {deployment_key(t) for t in tried}
        gone |= {deployment_key(c) for c in versions
                 if any(twins(c, t, keys) for t in versions + tried if deployment_key(t) in gone)}
        pool: dict = {}  # a finalist's whole-workload prediction over the search's sample
        for c in versions:
            if deployment_key(c) not in gone:
                pool.setdefault(deployment_key(c), c)
        others = list(pool.values())
        assert deployment_key(pick) in pool
        if any(c.feasible for c in others):  # the cheapest predicted to hold
            assert pick.feasible and pick.cost_per_million <= min(c.cost_per_million for c in others if c.feasible)
        else:  # then the one most likely to hold
            assert pick.slo_chance >= max(c.slo_chance for c in others) - 1e-12
        tried.append(pick)
    keys_tried = [deployment_key(c) for c in tried]
    assert len(set(keys_tried)) == len(keys_tried) > 1
    # Every deployment that runs was picked, or is one the simulator cannot tell from one picked.
    assert all(deployment_key(c) in keys_tried or any(twins(c, t, keys) for t in tried + versions
                                                      if deployment_key(t) in keys_tried) for c in versions)


def test_a_miss_makes_the_next_pick_leave_room_for_it(profiled, fitted):
    _, (model_dir, _) = profiled
    search = _search(fitted, model_dir, QUEUE_BOUND)
    result = run_search(search, trials=24)
    plain = next_in_turn(result, search, [result.best])
    assert plain is not None
    # As if the plans launched had measured TTFT p95 at 1.5x their predictions.
    corrected = next_in_turn(result, search, [result.best], {"ttft_p95": 1.5})
    assert corrected is not None
    # Whether any candidate besides the plan (and its twins) is predicted to hold depends on
    # the session's profile: the pick is feasible whenever the plain pick still is with the
    # miss priced in, and then at no lower cost than the plain pick.
    assert corrected.feasible or not search.rejudged(plain, {"ttft_p95": 1.5}).feasible
    if corrected.feasible:
        assert corrected.violations["ttft_p95"] <= 0
        assert not plain.feasible or corrected.cost_per_million >= plain.cost_per_million
    # The plain pick, judged with the miss priced in, has less room than it had.
    rejudged = search.rejudged(plain, {"ttft_p95": 1.5})
    assert rejudged.violations["ttft_p95"] > plain.violations["ttft_p95"]
    assert rejudged.slo_chance <= plain.slo_chance
    assert rejudged.violations["itl_p95"] == pytest.approx(plain.violations["itl_p95"])
    assert search.rejudged(plain, {}) is plain


def test_a_twin_of_a_plan_tried_is_not_launched(profiled, fitted):
    _, (model_dir, _) = profiled
    search = _search(fitted, model_dir, QUEUE_BOUND)
    result = run_search(search, trials=24)
    best, keys = result.best, ["ttft_p95", "itl_p95"]
    # These prompts share no prefix: with prefix caching flipped the simulator runs the same steps.
    twin = search.evaluate(best.hardware.name, {**best.params, "enable_prefix_caching":
                                                not best.config.enable_prefix_caching}, full=True)
    assert twins(twin, best, keys) and twin.feasible
    with_twin = replace(result, candidates=[twin, *result.candidates])
    pick = next_in_turn(with_twin, search, [best])
    assert pick is not None and deployment_key(pick) != deployment_key(twin) and not twins(pick, best, keys)
    # A cheaper candidate that is a twin of one tried is not explored either.
    assert all(not twins(c, best, keys) for c in cheaper_in_turn(with_twin, best, [best]))
    # Another hardware, or other replicas, or a metric apart by more than the tolerance: not twins.
    assert not twins(replace(twin, replicas=best.replicas + 1), best, keys)
    slower = replace(twin, prediction=replace(twin.prediction, metrics={
        **twin.prediction.metrics, "itl_p95": twin.prediction.metrics["itl_p95"] * 1.05}))
    assert not twins(slower, best, keys) and twins(slower, best, ["ttft_p95"])  # ITL not compared


def test_the_measured_bias_is_the_geometric_mean_of_the_misses_and_never_under_one():
    def measured(ttft: float, itl: float, predicted: float = 0.1) -> VerifyResult:
        return VerifyResult(1, 1, {}, [Comparison("ttft_p95", predicted, None, None, ttft),
                                       Comparison("itl_p95", predicted, None, None, itl),
                                       Comparison("throughput_tok_s", 100.0, None, None, 50.0)], {})

    first = Attempt(None, None, measured(0.12, 0.05), 1)
    assert measured_bias([first], ["ttft_p95", "itl_p95"]) == {"ttft_p95": pytest.approx(1.2), "itl_p95": 1.0}
    # A second launch counts as a measurement too.
    second = Attempt(None, None, measured(0.1, 0.05), 2, confirmation=measured(0.15, 0.05))
    bias = measured_bias([first, second], ["ttft_p95"])
    assert bias == {"ttft_p95": pytest.approx((1.2 * 1.0 * 1.5) ** (1 / 3))}
    assert measured_bias([], ["ttft_p95"]) == {}


def test_a_plan_that_misses_gives_way_to_the_next_that_holds(profiled_copy, fitted):
    store, (model_dir, _) = profiled_copy
    search = _search(fitted, model_dir, QUEUE_BOUND)
    result = run_search(search, trials=24)
    assert result.feasible and result.best.config.max_num_seqs > 1
    # As if the model had ranked one-at-a-time first: it must miss, and the next must hold.
    forced = replace(result, best=_one_at_a_time(search, result), feasible=False)
    runs_before = len(store.runs())
    chosen, attempts = verify_in_turn(store, search, forced, fitted, fallbacks=2, repeats=1)
    assert [a.rank for a in attempts] == list(range(1, len(attempts) + 1)) and chosen is attempts[-1]
    assert len(attempts) >= 2 and attempts[0].plan.engine.max_num_seqs == 1
    assert not attempts[0].result.all_met and not attempts[0].result.slos[QUEUE_BOUND.split(",")[0]][2]
    assert chosen.result.all_met and chosen.plan.engine.max_num_seqs > 1
    assert chosen.plan.notes[0].startswith("chosen by measurement on this machine: #1 ")
    assert "ttft_p95" in chosen.plan.notes[0]
    assert f"(the model's #{chosen.rank}) held every SLO" in chosen.plan.notes[0]
    # Every measurement is in the store, for the next fit (a narrow hold is launched twice).
    assert len(store.runs()) == runs_before + sum(1 + (a.confirmation is not None) for a in attempts)
    with pytest.raises(VerifyError, match="fallbacks: must be >= 0, got -1"):
        verify_in_turn(store, search, forced, fitted, fallbacks=-1)


def test_when_none_holds_the_closest_measured_is_kept_and_the_cli_exits_1(profiled_copy, fitted, tmp_path):
    store, (model_dir, _) = profiled_copy
    impossible = "ttft_p95<=0.001ms,itl_p95<=0.001ms"
    search = _search(fitted, model_dir, impossible)
    result = run_search(search, trials=12)
    chosen, attempts = verify_in_turn(store, search, result, fitted, fallbacks=1, repeats=1)
    assert len(attempts) == 2 and not any(a.result.all_met for a in attempts)
    assert chosen is min(attempts, key=lambda a: worst_ratio(a.result))
    assert worst_ratio(chosen.result) > 1
    # Whichever came closest, the plan's notes name the others' misses and its own.
    assert chosen.plan.notes[0].startswith("chosen by measurement on this machine: #")
    assert f"(the model's #{chosen.rank}) came closest: it missed " in chosen.plan.notes[0]

    out = tmp_path / "plan.yaml"
    cli = CliRunner().invoke(app, [
        "recommend", "--model", model_dir, "--slo", impossible, "--concurrency", "8", "--isl", "8:32",
        "--osl", "32:48", "--num-requests", "24", "--trials", "12", "--max-devices", "1", "--out", str(out), "--verify",
        "--repeats", "1", "--fallbacks", "1", "--db", store.url])
    assert cli.exit_code == 1, cli.output
    said = " ".join(cli.output.split())
    assert "plan #" in said and ("missed ttft_p95" in said or "missed itl_p95" in said), said
    assert "Some SLO was missed" in said
    assert Plan.from_file(out).engine.model == model_dir
    bad = CliRunner().invoke(app, ["recommend", "--model", model_dir, "--slo", impossible,
                                   "--concurrency", "2", "--verify", "--fallbacks", "-1",
                                   "--db", store.url, "--out", str(out)])
    assert bad.exit_code == 2 and "--fallbacks: must be >= 0, got -1" in bad.output
    bad = CliRunner().invoke(app, ["recommend", "--model", model_dir, "--slo", impossible,
                                   "--concurrency", "2", "--verify", "--explore", "-2",
                                   "--db", store.url, "--out", str(out)])
    assert bad.exit_code == 2 and "--explore: must be >= 0, got -2" in bad.output


def test_cheaper_candidates_come_by_the_saving_they_are_expected_to_bring(profiled, fitted):
    _, (model_dir, _) = profiled
    search = _search(fitted, model_dir, QUEUE_BOUND)
    result = run_search(search, trials=24)
    expensive = _one_at_a_time(search, result)
    pool = cheaper_in_turn(result, expensive, [expensive])
    assert pool
    assert all(c.valid and c.cost_per_million < expensive.cost_per_million * (1 - MIN_SAVING) for c in pool)
    # Long shots are not launched, however much they would save.
    assert all(c.slo_chance >= MIN_CHANCE for c in pool)
    # The fit may leave no cheaper candidate in doubt, so make one: the best saving, doubted.
    doubted = replace(pool[0], slo_chance=MIN_CHANCE / 2)
    with_doubt = replace(result, candidates=[doubted, *(c for c in result.candidates if c is not pool[0])])
    assert doubted not in cheaper_in_turn(with_doubt, expensive, [expensive])
    assert replace(doubted, slo_chance=MIN_CHANCE) in cheaper_in_turn(
        replace(with_doubt, candidates=[replace(doubted, slo_chance=MIN_CHANCE), *with_doubt.candidates[1:]]),
        expensive, [expensive])
    saving = [c.slo_chance * (1 - c.cost_per_million / expensive.cost_per_million) for c in pool]
    assert saving == sorted(saving, reverse=True)
    keys = [(c.config.model_dump_json(), c.replicas) for c in pool]
    assert len(set(keys)) == len(keys)
    # Once one is tried, the next round looks below it and passes over what was tried.
    after = cheaper_in_turn(result, pool[0], [expensive, pool[0]])
    assert pool[0] not in after
    assert all(c.cost_per_million < pool[0].cost_per_million for c in after)
    assert cheaper_in_turn(result, min(pool, key=lambda c: c.cost_per_million), []) == []


def test_a_cheaper_plan_that_holds_twice_replaces_the_plan(profiled_copy, fitted):
    store, (model_dir, _) = profiled_copy
    search = _search(fitted, model_dir, GENEROUS)
    result = run_search(search, trials=24)
    # As if the model had been unsure of everything cheaper than one sequence at a time.
    forced = replace(result, best=_one_at_a_time(search, result))
    runs_before = len(store.runs())
    chosen, attempts = verify_in_turn(store, search, forced, fitted, fallbacks=1, repeats=1, explore=1)
    first, cheaper = attempts
    assert first.result.all_met and first.plan.engine.max_num_seqs == 1 and not first.cheaper
    assert cheaper.cheaper and cheaper.rank == 2 and cheaper.confirmation is not None
    assert cheaper.candidate.cost_per_million < first.candidate.cost_per_million
    assert cheaper.held and chosen is cheaper
    assert "cheaper than plan #1 (cpu-host" in chosen.plan.notes[0] and "which held" in chosen.plan.notes[0]
    assert "held every SLO on two launches" in chosen.plan.notes[0]
    # Three launches, all in the store: the plan, the cheaper one, and its second measurement.
    assert len(store.runs()) == runs_before + 3
    # Objective latency: nothing cheaper is explored.
    latency = _search(fitted, model_dir, GENEROUS, objective="latency")
    chosen, attempts = verify_in_turn(store, latency, forced, fitted, fallbacks=0, repeats=1, explore=1)
    assert len(attempts) == 1 and chosen.rank == 1
    with pytest.raises(VerifyError, match="explore: must be >= 0, got -1"):
        verify_in_turn(store, search, forced, fitted, explore=-1)


def test_a_cheaper_plan_counts_as_held_only_when_both_launches_held():
    def measured(met: bool) -> VerifyResult:
        return VerifyResult(1, 1, {"ttft_p95": 0.2}, [], {"ttft_p95<=0.25s": (0.25, 0.2 if met else 0.3, met)})

    assert Attempt(None, None, measured(True), 1).held  # the model's own plans: one launch
    assert not Attempt(None, None, measured(False), 1).held
    assert not Attempt(None, None, measured(True), 2, cheaper=True).held  # not yet measured again
    second_missed = Attempt(None, None, measured(True), 2, cheaper=True, confirmation=measured(False))
    assert not second_missed.held and second_missed.deciding is second_missed.confirmation
    assert Attempt(None, None, measured(True), 2, cheaper=True, confirmation=measured(True)).held


def test_a_narrow_hold_counts_only_when_a_second_launch_holds_too():
    def measured(ratio: float) -> VerifyResult:
        return VerifyResult(1, 1, {"itl_p95": 0.1 * ratio}, [], {"itl_p95<=0.1s": (0.1, 0.1 * ratio, ratio <= 1)})

    assert held_narrowly(measured(1 - NARROW / 2)) and not held_narrowly(measured(1 - 2 * NARROW))
    assert not held_narrowly(measured(1.01))  # a miss is not a hold of any kind
    assert Attempt(None, None, measured(0.97), 1).held  # not yet measured again: one launch decides
    missed_again = Attempt(None, None, measured(0.97), 1, confirmation=measured(1.05))
    assert not missed_again.held and missed_again.deciding is missed_again.confirmation
    # Two holds a hair under the limit are not a hold: the next launch would miss about as often.
    hair = Attempt(None, None, measured(0.97), 1, confirmation=measured(0.99))
    assert not hair.held and hair.too_little_room and "held twice by too little" in shortfall(hair)
    assert Attempt(None, None, measured(0.95), 1, confirmation=measured(0.85)).held
    # The bar over two launches lies between one launch's (1 - NARROW) and the limit.
    assert room_needed(1) == pytest.approx(1 - NARROW) and 1 - NARROW < room_needed(2) < room_needed(3) < 1
    assert Attempt(None, None, measured(0.95), 1, confirmation=measured(0.85)).worst == pytest.approx(
        (0.95 * 0.85) ** 0.5)


def test_a_plan_that_holds_narrowly_is_launched_again(profiled_copy, fitted):
    store, (model_dir, _) = profiled_copy
    search = _search(fitted, model_dir, GENEROUS)
    result = run_search(search, trials=12)
    runs_before = len(store.runs())
    # Every hold counts as narrow and none has room (narrow=1): the plan is launched a second
    # time, holds every SLO on both, and still has not held; it is kept as the closest.
    chosen, attempts = verify_in_turn(store, search, result, fitted, fallbacks=0, repeats=1, narrow=1.0)
    assert attempts == [chosen] and chosen.rank == 1
    assert chosen.confirmation is not None and chosen.deciding is chosen.confirmation
    assert chosen.confirmation.all_met and chosen.too_little_room and not chosen.held
    assert chosen.plan.notes[0].startswith("no plan held with room; this one came closest: it held twice")
    assert len(store.runs()) == runs_before + 2
    # By default a plan that holds a 5 s limit with room to spare is launched once.
    chosen, attempts = verify_in_turn(store, search, result, fitted, fallbacks=1, repeats=1)
    assert attempts == [chosen] and chosen.confirmation is None and chosen.held
