"""`pilot recommend`: the Optuna search over the simulator, the plan file, and --verify, on a
cost model fitted to real runs of the engine (tests/profiled.py)."""

from __future__ import annotations

import json
import math
import statistics

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from engine import EngineConfig
from engine.model_zoo import SHAPES
from planner.cli import app
from planner.costmodel.fit_data import measured_acceptance
from planner.search.candidate import RecommendError, Requirement
from planner.search.plan import Plan, PlanError, make_plan, schema
from planner.search.recommend import run_search
from planner.search.search import Search
from planner.search.verify import VerifyError, verify
from planner.spec.hardware import load_specs
from planner.spec.slo import parse_slos
from planner.spec.workload import Workload
from planner.store.database import Run

LOOSE = "ttft_p95<=2s,itl_p95<=500ms"


def _workload(n: int = 24) -> Workload:
    return Workload.from_flags("8:64", "4:16", concurrency=1, num_requests=n)


def _search(fitted, model_dir: str, slos: str = LOOSE, kind: str = "concurrency", value: float = 4,
            **kwargs) -> Search:
    return Search(fitted, model_dir, _workload(kwargs.pop("n", 24)), Requirement(parse_slos(slos), kind, value),
                  **kwargs)


def test_search_meets_the_slos_through_optunas_named_constraints(profiled, fitted):
    store, (model_dir, _) = profiled
    search = _search(fitted, model_dir)
    result = run_search(search, trials=30, storage=store.url, study_name="t-feasible")
    assert result.feasible and result.best.feasible
    best = result.best
    for slo in parse_slos(LOOSE):
        assert best.prediction.metrics[slo.key] <= slo.limit_s
        assert best.violations[slo.key] <= 0
    # The study is in the store, trial by trial, with one named constraint per limit.
    study = optuna.load_study(study_name="t-feasible", storage=store.url)
    assert len(study.trials) == 30
    assert set(study.best_trial.constraints) >= {"ttft_p95", "itl_p95", "memory", "valid"}
    assert all(v <= 0 for v in study.best_trial.constraints.values())
    # The engine's defaults were scored first, as the baseline.
    assert result.default is not None and result.default.prediction is not None
    assert study.trials[0].params["max_num_seqs"] == EngineConfig(model=model_dir).max_num_seqs
    # The finalists are ranked by cost; the plan is the cheapest of them that holds.
    feasible = [c for c in result.finalists if c.feasible]
    assert best.cost_per_million == min(c.cost_per_million for c in feasible)
    assert result.space_size == math.prod(len(search.spaces["cpu-host"].values(k))
                                          for k in search.spaces["cpu-host"].knobs)
    assert result.pareto and all(c.feasible for c in result.pareto)


def test_a_workload_longer_than_the_profiled_lengths_is_flagged_as_extrapolated(profiled, fitted):
    from planner.costmodel import fit as cost_model

    store, (model_dir, _) = profiled
    # The profile's prompts are drawn from 8:64 and its outputs from 4:16.
    assert 8 <= fitted.lengths["prompt_tokens"] <= 64
    assert fitted.lengths["prompt_tokens"] < fitted.lengths["sequence_tokens"] <= 80
    assert cost_model.load(store, fitted.id).lengths == fitted.lengths
    assert not [n for n in _search(fitted, model_dir).notes if "extrapolate" in n]
    long_prompts = Workload.from_flags("150:200", "4:8", concurrency=1, num_requests=24)
    search = Search(fitted, model_dir, long_prompts, Requirement(parse_slos(LOOSE), "concurrency", 4))
    notes = [n for n in search.notes if "extrapolate" in n]
    longest = max(s.input_tokens for s in long_prompts.sample())
    assert any(f"prompt tokens up to {longest}" in n and f"({fitted.lengths['prompt_tokens']})" in n
               for n in notes), search.notes
    assert any(n.startswith("the workload has sequence tokens") for n in notes)


def test_a_higher_confidence_holds_each_slo_to_a_higher_bound(profiled, fitted):
    _, (model_dir, _) = profiled
    slos = parse_slos(LOOSE)
    scored = {}
    for confidence in (0.5, 0.8, 0.99):
        search = Search(fitted, model_dir, _workload(), Requirement(slos, "concurrency", 4,
                                                                    confidence=confidence))
        point = {k: search.spaces["cpu-host"].values(k)[0] for k in search.spaces["cpu-host"].knobs}
        scored[confidence] = search.evaluate("cpu-host", point)
        # Each of the two SLOs is held to the level whose square is the confidence.
        assert search.requirement.slo_level == pytest.approx(confidence ** 0.5)
    for slo in slos:
        violations = [scored[c].violations[slo.key] for c in (0.5, 0.8, 0.99)]
        assert violations[0] < violations[1] < violations[2]
        # The same prediction: only the bound it is held to moves.
        assert len({scored[c].prediction.metrics[slo.key] for c in scored}) == 1


def test_an_impossible_target_names_the_binding_slo_and_the_closest_configuration(profiled, fitted):
    _, (model_dir, _) = profiled
    search = _search(fitted, model_dir, slos="ttft_p95<=0.001ms,itl_p95<=10s")
    result = run_search(search, trials=12)
    assert not result.feasible
    assert result.best.binding == "ttft_p95"
    assert result.best.prediction is not None  # a real configuration, not an empty answer
    plan = make_plan(result, search, fitted)
    assert not plan.feasible and plan.binding == "ttft_p95"
    assert "ttft_p95 binds" in plan.notes[0]
    assert [c.met for c in plan.checks] == [False, True]
    assert plan.chance == result.best.slo_chance


def test_with_nothing_feasible_the_plan_is_the_one_most_likely_to_meet_the_slos(profiled, fitted):
    _, (model_dir, _) = profiled
    # Within reach of some configurations at a low chance, none at the plan's 80%: the limit
    # the fastest TTFT any search predicted so far meets 30% of the time (by the fitted
    # held-out errors, whichever way this session's profile leaned). The sampler follows the
    # SLOs, so a search under a tighter limit can find a faster configuration than the one before.
    result = run_search(_search(fitted, model_dir), trials=16)
    seen: list = []
    for _ in range(4):
        seen += [c for c in result.candidates if c.prediction is not None]
        ttft = min(c.prediction.metrics["ttft_p95"] for c in seen)
        limit = fitted.bound("ttft_p95", ttft, 0.3)
        search = _search(fitted, model_dir, slos=f"ttft_p95<={limit * 1000:.4f}ms,itl_p95<=10s")
        result = run_search(search, trials=16)
        if not result.feasible:
            break
    assert not result.feasible
    pool = result.finalists or [c for c in result.candidates if c.prediction is not None]
    runnable = [c for c in pool if c.valid]
    assert result.best.slo_chance == max(c.slo_chance for c in runnable)
    # ITL is all but certain, so the chance is TTFT's, below the level each SLO is held to.
    assert 0.0 < result.best.slo_chance < search.requirement.slo_level
    assert len({round(c.slo_chance, 3) for c in runnable}) > 1  # the choice was a real one


def test_replicas_are_the_fewest_the_rate_needs(profiled, fitted):
    _, (model_dir, _) = profiled
    # Past one replica's capacity the queue grows: the rate constraint breaks, whatever the SLOs.
    search = _search(fitted, model_dir, slos="ttft_p95<=1000s", kind="rate", value=1000.0, max_devices=1)
    one = search.evaluate("cpu-host", {k: search.spaces["cpu-host"].values(k)[0]
                                       for k in search.spaces["cpu-host"].knobs})
    capacity = search.capacity(one, search.predictor)
    assert not one.feasible and one.violations["rate"] > 0 and one.violations["ttft_p95"] < 0
    heavy = _search(fitted, model_dir, slos="ttft_p95<=5s", kind="rate", value=capacity * 4,
                    max_devices=64)
    point = {k: heavy.spaces["cpu-host"].values(k)[0] for k in heavy.spaces["cpu-host"].knobs}
    chosen = heavy.evaluate("cpu-host", point)
    assert chosen.feasible and chosen.replicas > 1
    assert chosen.per_replica_load == pytest.approx(capacity * 4 / chosen.replicas)
    fewer = heavy._score(chosen, heavy.predictor, chosen.replicas - 1)
    assert not fewer.feasible
    assert chosen.cost_per_hour == pytest.approx(chosen.replicas * chosen.hardware.price_per_hour_usd)


def test_weights_that_do_not_fit_break_the_memory_constraint(profiled, fitted, tmp_path):
    _, (model_dir, _) = profiled
    big = tmp_path / "big"  # a config.json is all a prediction reads: a 70B-class shape
    big.mkdir()
    (big / "config.json").write_text(json.dumps({**SHAPES["llama-110m"], "hidden_size": 8192,
                                                 "intermediate_size": 28672, "num_hidden_layers": 80,
                                                 "num_attention_heads": 64, "num_key_value_heads": 8,
                                                 "max_position_embeddings": 4096}))
    gpus = [name for name, spec in load_specs().items() if spec.kind == "gpu"]
    search = Search(fitted, str(big), _workload(), Requirement(parse_slos(LOOSE), "concurrency", 1),
                    hardware=gpus)
    assert search.space_size >= 10_000  # every GPU type of the gpu space, every tensor size valid
    point = {k: search.spaces["l4"].values(k)[0] for k in search.spaces["l4"].knobs}
    point.update(quantization=None, tensor_parallel_size=1, data_parallel_size=1)
    on_l4 = search.evaluate("l4", point)
    assert on_l4.violations["memory"] > 0 and not on_l4.valid
    point.update(tensor_parallel_size=8)
    on_h100s = search.evaluate("h100-sxm", point)
    assert on_h100s.violations["memory"] <= 0
    # An H100 is priced from its measured kernels (calibrated); an L4 borrows an L40S's, scaled.
    assert on_h100s.devices_per_replica == 8 and on_h100s.prediction.calibrated
    assert "calibrated from measured kernels" in on_h100s.prediction.basis


def test_speculative_knobs_need_a_measured_acceptance_rate(profiled, fitted, tmp_path):
    store, (model_dir, wider) = profiled
    assert measured_acceptance(store, model_dir, wider) is None
    search = _search(fitted, model_dir, draft_dir=wider, acceptance_rate=None,
                     space=None)
    assert search.spaces["cpu-host"].values("num_speculative_tokens") == [0]
    assert any("acceptance" in note for note in search.notes)


def test_bad_requirements_name_the_field(profiled, fitted):
    _, (model_dir, _) = profiled
    with pytest.raises(RecommendError, match="rate: must be > 0"):
        Requirement(parse_slos(LOOSE), "rate", -1)
    with pytest.raises(RecommendError, match="objective: "):
        Requirement(parse_slos(LOOSE), "rate", 1, objective="cheapest")
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(RecommendError, match="confidence: "):
            Requirement(parse_slos(LOOSE), "rate", 1, confidence=bad)
    with pytest.raises(RecommendError, match="hardware: "):
        _search(fitted, model_dir, hardware=["no-such-gpu"])
    with pytest.raises(RecommendError, match="max_devices: "):
        _search(fitted, model_dir, max_devices=0)


def test_the_plan_file_round_trips_and_is_what_serve_reads(profiled, fitted, tmp_path):
    _, (model_dir, _) = profiled
    search = _search(fitted, model_dir)
    plan = make_plan(run_search(search, trials=10), search, fitted)
    path = plan.write(tmp_path / "plan.yaml")
    again = Plan.from_file(path)
    assert again == plan
    assert EngineConfig.from_file(path) == plan.engine  # `pilot serve --config plan.yaml`
    assert again.workload.arrival.kind == "closed_loop" and again.workload.arrival.concurrency == 4
    assert again.launch["vllm"].startswith(f"vllm serve {model_dir}")
    assert "--max-running-requests" in again.launch["sglang"]
    data = yaml.safe_load(path.read_text())
    data["replicas"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match="replicas"):
        Plan.from_file(tmp_path / "bad.yaml")
    data["replicas"], data["slos"] = 1, ["ttft_p95<=fast"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match="slos"):
        Plan.from_file(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("replicas: 1\n")
    with pytest.raises(PlanError, match="engine: Field required") as missing:
        Plan.from_file(tmp_path / "bad.yaml")
    assert "got" not in str(missing.value)
    assert "engine" in schema("plan")["properties"]
    with pytest.raises(PlanError, match="unknown kind"):
        schema("nope")


def test_cli_recommend_writes_a_plan_and_verify_measures_it_into_the_store(profiled_copy, fitted, tmp_path):
    store, (model_dir, _) = profiled_copy
    runs_before = len(store.runs())
    out = tmp_path / "plan.yaml"
    result = CliRunner().invoke(app, [
        "recommend", "--model", model_dir, "--slo", LOOSE, "--concurrency", "2", "--isl", "8:64",
        "--osl", "4:16", "--num-requests", "12", "--trials", "12", "--out", str(out),
        "--plot", str(tmp_path / "front.png"), "--verify", "--db", store.url])
    assert result.exit_code == 0, result.output
    plan = Plan.from_file(out)
    assert plan.feasible and plan.hardware.calibrated
    assert (tmp_path / "front.png").stat().st_size > 0
    assert "Verified on this machine" in result.output and "Every SLO held" in result.output
    assert "medians shown" in result.output
    runs = store.runs()
    assert len(runs) == runs_before + 3  # --repeats defaults to 3
    with store.session() as session:
        for row in runs[-3:]:
            run = session.get(Run, row.id)
            assert run.load_kind == "concurrency" and run.load_value == 2
            assert run.engine_config.config["max_num_seqs"] == plan.engine.max_num_seqs

    # Called directly: the verdict is on each metric's median over the repeats.
    checked = verify(store, plan, repeats=2)
    assert len(set(checked.run_ids)) == 2 and checked.run_id == checked.run_ids[0]
    with store.session() as session:
        repeated = [session.get(Run, i) for i in checked.run_ids]
        for key in ("ttft_p95", "itl_p95"):
            assert checked.measured[key] == pytest.approx(statistics.median(r.latency[key] for r in repeated))
        assert checked.measured["throughput_tok_s"] == pytest.approx(
            statistics.median(r.throughput_tok_s for r in repeated))
    for slo, (limit, measured, met) in checked.slos.items():
        assert met == (measured <= limit) and measured == checked.measured[slo.split("<=")[0]]
    with pytest.raises(VerifyError, match="repeats: must be >= 1, got 0"):
        verify(store, plan, repeats=0)
    bad = CliRunner().invoke(app, ["recommend", "--model", model_dir, "--slo", LOOSE, "--concurrency", "2",
                                   "--verify", "--repeats", "0", "--db", store.url, "--out", str(out)])
    assert bad.exit_code == 2 and "--repeats" in bad.output, bad.output


def test_cli_recommend_json_and_bad_input(profiled_copy, fitted, tmp_path):
    store, (model_dir, _) = profiled_copy
    base = ["recommend", "--model", model_dir, "--db", store.url, "--out", str(tmp_path / "p.yaml")]
    ok = CliRunner().invoke(app, [*base, "--slo", LOOSE, "--rate", "0.5", "--trials", "8",
                                  "--num-requests", "12", "--json"])
    assert ok.exit_code == 0, ok.output
    plan = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert plan["load"] == {"kind": "rate", "value": 0.5, "per_replica": 0.5 / plan["replicas"]}
    assert plan["confidence"] == 0.8  # the default
    assert [c["level"] for c in plan["checks"]] == [pytest.approx(0.8 ** 0.5)] * 2
    assert not any("probe time" in note for note in plan["notes"])
    # Planned for this host as fast as it runs now, which the plan says.
    now = CliRunner().invoke(app, [*base, "--slo", LOOSE, "--rate", "0.5", "--trials", "8",
                                   "--num-requests", "12", "--json", "--host-speed", "now"])
    assert now.exit_code == 0, now.output
    notes = json.loads(now.stdout[now.stdout.index("{"):])["notes"]
    assert any("typical probe time" in note for note in notes), notes
    for args, field in ((["--slo", "ttft_p95<=fast", "--rate", "1"], "fast"),
                        (["--slo", LOOSE], "--rate or --concurrency"),
                        (["--slo", LOOSE, "--rate", "1", "--concurrency", "2"], "--rate or --concurrency"),
                        (["--slo", LOOSE, "--rate", "1", "--objective", "speed"], "--objective"),
                        (["--slo", LOOSE, "--rate", "1", "--confidence", "95"], "--confidence"),
                        (["--slo", LOOSE, "--rate", "1", "--hardware", "tpu9"], "tpu9"),
                        (["--slo", LOOSE, "--rate", "1", "--host-speed", "slow"], "--host-speed"),
                        (["--slo", LOOSE, "--rate", "1", "--draft", str(tmp_path / "none")], "--draft")):
        bad = CliRunner().invoke(app, [*base, *args])
        assert bad.exit_code == 2 and field in bad.output, bad.output
    empty = CliRunner().invoke(app, ["recommend", "--model", model_dir, "--slo", LOOSE, "--rate", "1",
                                     "--db", str(tmp_path / "empty.db")])  # a bare path is SQLite
    assert empty.exit_code == 2 and "pilot fit" in empty.output
    assert (tmp_path / "empty.db").is_file()
    shown = CliRunner().invoke(app, ["schema", "plan"])
    assert shown.exit_code == 0 and "replicas" in json.loads(shown.stdout)["properties"]
