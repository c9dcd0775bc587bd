"""`pilot bench recommend`: the pure pieces (cost, overspend, the SLO rule, the grid, the
summary), and the quick preset end to end (opt-in: -m benchmark)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from sqlalchemy import select

from engine import EngineConfig
from planner.bench.recommend import (
    PRESETS,
    WORKLOADS,
    BenchResult,
    ScenarioResult,
    run_recommend_benchmark,
    scenario_workload,
    summarize,
)
from planner.bench.truth import (
    GridPoint,
    _round_up,
    bench_space,
    cost_per_million,
    derive_slos,
    grid_configs,
    judge_grid,
    measure_grid,
    meets,
    overspend,
)
from planner.measure.profiler import base_config
from planner.spec.hardware import get_spec
from planner.spec.slo import parse_slos
from planner.store.database import Run, Store


def test_cost_per_million_is_price_over_tokens_produced_in_an_hour():
    price = get_spec("cpu-host").price_per_hour_usd
    # 1,000 tokens/s is 3.6 M tokens an hour.
    assert cost_per_million(price, 1000.0) == pytest.approx(price / 3.6)
    assert cost_per_million(3.6, 1e6 / 3600) == pytest.approx(3.6)
    assert cost_per_million(1.0, 2000.0) == pytest.approx(cost_per_million(1.0, 1000.0) / 2)
    assert cost_per_million(1.0, 0.0) == math.inf
    assert cost_per_million(1.0, math.nan) == math.inf


def test_overspend_is_relative_to_the_best_and_may_be_negative():
    assert overspend(1.2, 1.0) == pytest.approx(0.2)
    assert overspend(0.9, 1.0) == pytest.approx(-0.1)  # beat the grid: reported as is
    assert overspend(2.0, 2.0) == 0.0
    assert overspend(math.inf, 1.0) == math.inf  # the plan did not run
    assert math.isnan(overspend(1.0, math.inf))  # no truly feasible configuration


def test_limits_are_rounded_up_to_three_significant_digits():
    assert _round_up(0.012345) == pytest.approx(0.0124)
    assert _round_up(0.0124) == pytest.approx(0.0124)
    assert _round_up(2.0) == pytest.approx(2.0)
    assert _round_up(0.000999) == pytest.approx(0.000999)
    assert _round_up(123456.0) == pytest.approx(124000.0)


def _grid(pairs):
    return [{"ttft_p95": t, "itl_p95": i} for t, i in pairs]


def test_derived_slos_bind_sit_between_measurements_and_leave_someone_feasible():
    # Anti-correlated like real configurations: long queues with short gaps, and the reverse.
    grid = _grid([(0.01 * k, 0.01 * (11 - k)) for k in range(1, 11)])
    slos = derive_slos(grid)
    assert [s.key for s in slos] == ["ttft_p95", "itl_p95"]
    feasible = [g for g in grid if meets(g, slos)]
    assert 0 < len(feasible) < len(grid)
    for slo in slos:
        values = sorted(g[slo.key] for g in grid)
        # Within the grid's 25th-75th percentile band (the gap above the 75th at most), never
        # on a measurement, where noise alone would decide which side a configuration falls.
        assert values[1] < slo.limit_s < values[7]
        assert min(abs(slo.limit_s / v - 1) for v in values) > 0.05
    # Evenly spaced values leave no limit 8% clear of every measurement; of the combinations
    # that leave a quarter (3 of 10) feasible, the widest margin puts TTFT in the gap 0.06-0.07
    # and ITL in 0.07-0.08 (geometric middles, rounded up).
    assert [s.limit_s for s in slos] == [pytest.approx(0.0649), pytest.approx(0.0749)]
    assert feasible == grid[3:6]
    # Latencies that rise together: the gap above the 25th percentile leaves a quarter feasible.
    together = _grid([(0.01 * k, 0.001 * k) for k in range(1, 11)])
    slos = derive_slos(together)
    assert [s.limit_s for s in slos] == [pytest.approx(0.0347), pytest.approx(0.00347)]
    assert [g for g in together if meets(g, slos)] == together[:3]
    mixed = _grid([(0.01 * t, 0.01 * i) for t, i in
                   ((1, 5), (2, 6), (3, 1), (4, 2), (5, 3), (6, 4), (7, 7), (8, 8), (9, 9), (10, 10))])
    slos = derive_slos(mixed)
    assert [s.limit_s for s in slos] == [pytest.approx(0.0448), pytest.approx(0.0548)]
    assert [g for g in mixed if meets(g, slos)] == [mixed[0], mixed[2], mixed[3]]


def test_derived_slos_keep_clear_of_measurements_where_the_grid_allows():
    # A measured grid (tiny model, chat workload, 12 configurations, seconds). The old rule
    # (the gap above the 30th-60th percentile that first left a quarter feasible) put both limits
    # within 3-4% of a measurement: whether those configurations met them was a coin toss.
    ttft = [0.001257, 0.047736, 0.083712, 0.083181, 0.076289, 0.042594, 0.002686, 0.002362,
            0.010421, 0.009179, 0.039804, 0.003605]
    itl = [0.000828, 0.000559, 0.000330, 0.000398, 0.000675, 0.000201, 0.001587, 0.000759,
           0.001347, 0.001135, 0.000170, 0.001026]
    grid = _grid(list(zip(ttft, itl)))
    slos = derive_slos(grid)
    for slo in slos:
        values = np.array([g[slo.key] for g in grid])
        assert np.min(np.abs(np.log(values / slo.limit_s))) >= 0.08
    assert 1 <= sum(meets(g, slos) for g in grid) < len(grid)


def test_derived_slos_widen_for_the_nearest_configuration_when_none_would_be_feasible():
    grid = _grid([(0.01, 0.10), (0.02, 0.09), (0.09, 0.02), (0.10, 0.01)])
    # A band of the lowest rank only: both limits sit just above the smallest measurement,
    # sqrt(0.01 * 0.02), and nobody meets both; the nearest, (0.02, 0.09), has each limit it
    # misses moved into the gap above its measurement.
    slos = derive_slos(grid, quantiles=(0.0, 0.0))
    limits = {s.key: s.limit_s for s in slos}
    assert limits["ttft_p95"] == pytest.approx(0.0425)
    assert limits["itl_p95"] == pytest.approx(0.0949)
    assert [g for g in grid if meets(g, slos)] == [grid[1]]


def test_derived_slos_skip_unmeasured_configurations_and_refuse_an_empty_grid():
    grid = _grid([(0.01, 0.05), (0.02, 0.04), (0.03, 0.03), (0.04, 0.02)]) + [{}]
    assert any(meets(g, derive_slos(grid)) for g in grid[:-1])
    with pytest.raises(ValueError, match="no grid configuration"):
        derive_slos([{}, {"ttft_p95": math.nan, "itl_p95": 0.1}])


def test_the_truly_feasible_set_is_what_was_measured_to_meet_every_slo():
    slos = derive_slos(_grid([(0.01, 0.04), (0.02, 0.03), (0.03, 0.02), (0.04, 0.01)]))
    limits = {s.key: s.limit_s for s in slos}
    ok = {"ttft_p95": limits["ttft_p95"] * 0.9, "itl_p95": limits["itl_p95"] * 0.9}
    grid = [GridPoint("cheap but slow", {**ok, "itl_p95": limits["itl_p95"] * 1.01}, 0.5),
            GridPoint("dear", dict(ok), 2.0), GridPoint("cheapest that holds", dict(ok), 1.0),
            GridPoint("refused", {}, 0.1, error="ValueError: no"),
            GridPoint("at the limit", dict(limits), 1.5)]
    best = judge_grid(grid, slos)
    assert best is grid[2]
    assert [g.feasible for g in grid] == [False, True, True, False, True]
    assert judge_grid(grid[:1], slos) is None and not grid[0].feasible


def test_the_grid_is_the_spaces_coverage_order_and_holds_the_engine_default(model_dir):
    space = bench_space(parallel=False)
    base = base_config(model_dir, scenario_workload(WORKLOADS[0], 8))
    configs, at = grid_configs(space, base, 5)
    assert len(configs) == 5 and len({c.model_dump_json() for c in configs}) == 5
    default = configs[at]
    engine = EngineConfig(model=model_dir)
    assert (default.max_num_seqs, default.quantization, default.enable_chunked_prefill,
            default.enable_prefix_caching, default.num_speculative_tokens) == (
        engine.max_num_seqs, None, True, True, None)
    assert default.dtype == "bfloat16" and default.quantization_group_size == 32
    assert all(c.tensor_parallel_size == c.data_parallel_size == 1 for c in configs)
    assert configs == space.configs(base, max_parallel=2)[:5]
    one, at = grid_configs(space, base, 1)
    assert at == 0 and len(one) == 1 and one[0] == default


def test_the_grid_is_measured_in_rounds_and_judged_on_medians(model_dir, tmp_path):
    workload = scenario_workload(WORKLOADS[0], 6)
    base = base_config(model_dir, workload)
    configs, _ = grid_configs(bench_space(parallel=False), base, 2)
    store = Store(f"sqlite:///{tmp_path / 'truth.db'}")
    measured = measure_grid(store, model_dir, workload, 2, configs, repeats=3)
    assert [err for _, err in measured] == [None, None]
    with store.session() as session:
        runs = list(session.scalars(select(Run).order_by(Run.id)))
        assert len(runs) == 6
        # In rounds: each configuration once, then again, so a host spell spreads over both.
        order = [r.engine_config_id for r in runs]
        assert order[:2] == order[2:4] == order[4:] and order[0] != order[1]
        for i, (metrics, _) in enumerate(measured):
            mine = runs[i::2]
            assert {r.engine_config_id for r in mine} == {mine[0].engine_config_id}
            assert metrics["itl_p95"] == statistics.median(r.latency["itl_p95"] for r in mine)
            assert metrics["throughput_tok_s"] == statistics.median(r.throughput_tok_s for r in mine)
    # Measured again, the campaign is found done: nothing runs twice.
    assert measure_grid(store, model_dir, workload, 2, configs, repeats=3) == measured
    assert len(store.runs()) == 6
    with pytest.raises(ValueError, match="repeats: must be >= 1, got 0"):
        measure_grid(store, model_dir, workload, 2, configs, repeats=0)


def test_calibration_repeats_each_measurement_and_fits_on_their_medians(model_dir, tmp_path):
    from dataclasses import replace

    from planner.bench.recommend import calibrate
    from planner.costmodel.fit import measurement_groups
    from planner.costmodel.fit_data import load_runs

    preset = replace(PRESETS["quick"], budget_s=3600, calibration_runs=8, calibration_requests=6, folds=2,
                     calibration_repeats=2, via="engine")
    store = Store(f"sqlite:///{tmp_path / 'calibration.db'}")
    fitted, info = calibrate(store, {"tiny": model_dir}, preset)
    sizes = np.bincount(measurement_groups(load_runs(store)))
    # Back to back in pairs; the budget may stop between the two runs of the last one.
    assert info["runs"]["tiny"] == sizes.sum() >= 4 and set(sizes) <= {1, 2} and (sizes == 2).sum() >= 2
    assert info["runs"]["tiny"] == 8  # a count, not what fits in a time on this host
    assert fitted.report["measurements"] == len(sizes) and "noise_floor" in fitted.report


def _scenario(met: bool, over: float, default_ratio: float = 2.0,
              drift: dict[str, float] | None = None, rank: int = 1, first_over: float | None = None,
              explored: int = 0, paired: float = math.nan, best_held: bool | None = None) -> ScenarioResult:
    return ScenarioResult(
        model="tiny", workload="chat", concurrency=8, slos=["ttft_p95<=100ms", "itl_p95<=5ms"], slo_margin=0.1,
        grid=[GridPoint("bf16 seqs64 tok2048", {"ttft_p95": 0.01}, 1.0, True, True)], grid_feasible=1,
        best_config="bf16 seqs64 tok2048", best_cost=1.0, default_cost=default_ratio,
        default_feasible=True, default_ratio=default_ratio, recommended="int8 seqs8 tok512",
        replicas=1, predicted_feasible=True, binding="itl_p95", predicted={"itl_p95": 0.004},
        measured={"itl_p95": 0.0045}, predicted_cost=1.0, measured_cost=1.0 + over, met=met,
        overspend=over, overspend_clipped=max(0.0, over), search_s=1.0, predicted_chance=0.6 if met else 0.2,
        host_drift=drift if drift is not None else {"ttft_p95": 0.9, "itl_p95": 1.1},
        first_recommended="int4 seqs1 tok256" if rank > 1 else "int8 seqs8 tok512",
        first_met=met and (rank == 1 or explored > 0), first_overspend=over if first_over is None else first_over,
        tries=rank, rank=rank, explored=explored, paired_overspend=paired, best_held_again=best_held)


def test_summary_counts_successes_and_takes_overspend_over_the_plans_that_met():
    scenarios = [_scenario(True, 0.10), _scenario(True, -0.20), _scenario(True, 0.30),
                 _scenario(False, -0.50, default_ratio=4.0, drift={"ttft_p95": 1.4, "itl_p95": 1.3}),
                 _scenario(True, 0.0, drift={})]  # no feasible grid configuration to measure again
    result = summarize("quick", {}, scenarios[:4], {}, 1.0, "/tmp/x")
    # The host's drift: each scenario's slowest SLO metric, the median over those measured.
    assert summarize("quick", {}, scenarios, {}, 1.0, "/tmp/x").median_host_drift == pytest.approx(1.1)
    assert result.success_rate == pytest.approx(0.75)
    assert result.expected_success == pytest.approx((0.6 * 3 + 0.2) / 4)
    assert result.median_overspend == pytest.approx(0.10)  # clipped: 0.10, 0, 0.30
    assert result.mean_overspend == pytest.approx(0.40 / 3)
    assert result.median_overspend_raw == pytest.approx(0.10)
    assert result.mean_overspend_raw == pytest.approx(0.20 / 3)
    assert result.median_default_ratio == pytest.approx(2.0)
    data = json.loads(json.dumps(result.to_json()))
    assert data["scenarios"][0]["overspend"] == pytest.approx(0.10)
    # The search's own plans alone: the one that met only by a fallback does not count.
    fell_back = summarize("quick", {}, [_scenario(True, 0.10), _scenario(True, 0.02, rank=2, first_over=-0.3)],
                          {}, 1.0, "/tmp/x")
    assert fell_back.success_rate == 1.0 and fell_back.first_success_rate == 0.5
    assert fell_back.first_median_overspend == pytest.approx(0.10)
    assert fell_back.median_overspend == pytest.approx(0.06)
    # Paired with the grid's best measured again alongside: over the plans that met, clipped.
    paired = summarize("quick", {}, [_scenario(True, 0.3, paired=0.04), _scenario(True, 0.2, paired=-0.1),
                                     _scenario(True, 0.1), _scenario(False, 0.0, paired=0.5)], {}, 1.0, "/tmp/x")
    assert paired.paired_median_overspend == pytest.approx(0.02) and paired.paired_mean_overspend == pytest.approx(0.02)
    assert math.isnan(result.paired_median_overspend)
    # The grid's best, measured again: how often the ground truth itself held, over those measured.
    again = summarize("quick", {}, [_scenario(True, 0.1, best_held=True), _scenario(True, 0.1, best_held=False),
                                    _scenario(False, 0.1, best_held=False), _scenario(True, 0.1)], {}, 1.0, "/tmp/x")
    assert again.best_success_rate == pytest.approx(1 / 3) and math.isnan(result.best_success_rate)
    nobody = summarize("quick", {}, [_scenario(False, 0.1)], {}, 1.0, "/tmp/x")
    assert nobody.success_rate == 0.0 and math.isnan(nobody.median_overspend)
    assert nobody.to_json()["median_overspend"] is None  # JSON has no NaN


def test_the_report_shows_every_scenario_against_the_targets():
    from rich.console import Console

    from planner.bench.report import print_results

    result = summarize("quick", {"grid_size": 1}, [_scenario(True, 0.10, best_held=True), _scenario(False, -0.5),
                                                   _scenario(True, 0.0, rank=3, best_held=False)],
                       {"runs": {"tiny": 9}, "workload": "x"}, 1.0, "/tmp/x")
    console = Console(record=True, width=250)
    print_results(result, console)
    text = console.export_text()
    assert text.count("chat @8") == 3 and "clear by 11%" in text  # a margin of 0.1 (log)
    assert "+10.0%" in text and "-50.0%" in text
    assert text.count("(host 1.10x)") == 3 and "was 1.10x as slow as in the" in " ".join(text.split())
    assert "67% of 3 scenarios" in text and "LLM-Pilot 80%" in text and "target >= 95%" in text
    assert "(plan #3, by measurement: #1 int4 seqs1 tok256 missed)" in " ".join(text.split())
    assert "first plans alone met in 33%" in " ".join(text.split())
    assert "met every SLO again in 50% of the 2 scenarios" in " ".join(text.split())
    assert "launched 2 more plans in all, 0 of them cheaper ones explored" in " ".join(text.split())
    # A cheaper plan found by exploring, after the search's own plan held.
    explored = summarize("quick", {"grid_size": 1}, [_scenario(True, 0.0, rank=2, first_over=0.4, explored=1)],
                         {"runs": {"tiny": 9}, "workload": "x"}, 1.0, "/tmp/x")
    console = Console(record=True, width=250)
    print_results(explored, console)
    text = " ".join(console.export_text().split())
    assert "(plan #2, cheaper than #1 int4 seqs1 tok256; held twice)" in text
    assert "Paired (the plan and the grid's best measured again in alternation" in text
    assert "1 more plans in all, 1 of them cheaper ones explored" in text
    assert explored.first_success_rate == 1.0 and explored.first_median_overspend == pytest.approx(0.4)


def test_bad_sizes_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        run_recommend_benchmark("huge", tmp_path)
    with pytest.raises(ValueError, match="grid-size"):
        run_recommend_benchmark("quick", tmp_path, grid_size=0)
    with pytest.raises(ValueError, match="models"):
        run_recommend_benchmark("quick", tmp_path, models=["giant"])
    with pytest.raises(ValueError, match="confidence"):
        run_recommend_benchmark("quick", tmp_path, confidence=1.0)
    with pytest.raises(ValueError, match="fallbacks: must be >= 0, got -1"):
        run_recommend_benchmark("quick", tmp_path, fallbacks=-1)
    with pytest.raises(ValueError, match="explore: must be >= 0, got -1"):
        run_recommend_benchmark("quick", tmp_path, explore=-1)
    with pytest.raises(ValueError, match="via"):
        run_recommend_benchmark("quick", tmp_path, via="pigeon")
    (tmp_path / "truth.db").write_text("")
    with pytest.raises(ValueError, match="earlier run"):
        run_recommend_benchmark("quick", tmp_path)



def test_cli_bad_input_names_the_flag(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    for args, words in ((["--preset", "huge"], "preset"), (["--budget", "soon"], "budget"),
                        (["--grid", "0"], "grid"), (["--models", "tiny,giant"], "giant"),
                        (["--confidence", "2"], "confidence")):
        result = CliRunner().invoke(app, ["bench", "recommend", "--workdir", str(tmp_path), *args])
        assert result.exit_code == 2 and words in result.output, result.output
    assert not (tmp_path / "calibration.db").exists()


@pytest.mark.benchmark
def test_quick_preset_end_to_end(tmp_path):
    out = tmp_path / "result.json"
    seen = []
    result = run_recommend_benchmark("quick", tmp_path / "work", json_out=out,
                                     on_progress=lambda text, done, total: seen.append((done, total)))
    assert isinstance(result, BenchResult)
    preset = PRESETS["quick"]
    assert len(result.scenarios) == len(preset.models) * len(WORKLOADS) >= 6
    assert {(s.model, s.workload) for s in result.scenarios} == {
        (m, w.name) for m in preset.models for w in WORKLOADS}
    assert 0.0 <= result.success_rate <= 1.0
    assert seen[-1][0] == seen[-1][1]
    for s in result.scenarios:
        assert len(s.grid) == preset.grid_size
        assert sum(g.default for g in s.grid) == 1
        assert len(s.slos) == 2 and s.binding in ("ttft_p95", "itl_p95")
        slos = parse_slos(",".join(s.slos))
        assert [g.feasible for g in s.grid] == [g.error is None and meets(g.measured, slos) for g in s.grid]
        assert s.grid_feasible == sum(g.feasible for g in s.grid) >= 1
        assert s.best_cost == min(g.cost_per_million for g in s.grid if g.feasible)
        assert math.isfinite(s.best_cost) and s.best_cost > 0
        assert math.isfinite(s.default_ratio) and s.default_ratio > 0
        assert math.isfinite(s.measured_cost) and math.isfinite(s.overspend)
        assert s.overspend_clipped == max(0.0, s.overspend)
        assert math.isfinite(s.predicted[s.binding]) and math.isfinite(s.measured[s.binding])
        assert s.met == meets(s.measured, slos)
        assert s.overspend == pytest.approx(s.measured_cost / s.best_cost - 1)
        assert math.isfinite(s.paired_overspend)  # the plan and the best, measured again side by side
        assert s.best_held_again == all(s.host_drift[k] * g.measured[k] <= slo.limit_s
                                        for slo in slos for k in [slo.key]
                                        for g in s.grid if g.config == s.best_config)
        # Planned at the host's speed when planning, read against the calibration runs'.
        assert 0.2 < s.host_slowdown < 5 and s.host_slowdown != 1.0
    assert math.isfinite(result.median_default_ratio)
    data = json.loads(out.read_text())
    assert len(data["scenarios"]) == len(result.scenarios)
    assert (tmp_path / "work" / "truth.db").is_file()
