"""`pilot profile`: real engine runs into a real SQLite store, resumable after kill -9."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sqlalchemy import select

from planner.cli.fit import print_report
from planner.measure.export import export, run_records
from planner.measure.profiler import plan_again, plan_campaign, profile
from planner.spec.search_space import SearchSpace
from planner.spec.slo import parse_slos
from planner.spec.workload import Workload
from planner.store.database import EngineConfigRow, Experiment, Hardware, RequestRow, StepRow, Store

REPO = Path(__file__).resolve().parents[3]
SPACE = """
name: mini
knobs:
  quantization: [null, int8]
  max_num_seqs: [1, 8]
fixed:
  dtype: float32
  num_threads: 1
load:
  kind: concurrency
  levels: [1, 4]
"""


def _space_file(tmp_path: Path, text: str = SPACE) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def space(tmp_path) -> Path:
    return _space_file(tmp_path)


def _workload(num_requests: int = 6, osl: str = "4:12") -> Workload:
    return Workload.from_flags("8:48", osl, concurrency=1, num_requests=num_requests)


def _db(path: Path) -> str:
    return f"sqlite:///{path}"


def test_a_campaign_stores_runs_requests_and_steps(model_dir, space, tmp_path):
    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload()
    campaign = plan_campaign(store, model_dir, SearchSpace.from_file(space), workload)
    result = profile(store, campaign, workload, budget_s=600, slos=parse_slos("ttft_p95<=10s,itl_p95<=1s"))
    assert result.planned == 8 and len(result.run_ids) == 8 and result.remaining == 0
    assert not result.failed
    runs = store.runs()
    assert {(r.load_kind, r.load_value) for r in runs} == {("concurrency", 1.0), ("concurrency", 4.0)}
    with store.session() as session:
        for run in runs:
            requests = session.scalars(select(RequestRow).where(RequestRow.run_id == run.id)).all()
            steps = session.scalars(select(StepRow).where(StepRow.run_id == run.id)).all()
            assert len(requests) == run.num_requests == 6
            assert sum(r.output_tokens for r in requests) == run.output_tokens
            # Every output token came out of some step: decode tokens plus one per prefill finish.
            assert sum(s.num_decode_tokens for s in steps) + 6 >= run.output_tokens
            assert all(0 < r.ttft_s <= r.e2e_s for r in requests)
            assert run.goodput == pytest.approx(6 / run.duration_s)  # lenient SLOs: all met
            assert run.latency["ttft_p50"] <= run.latency["ttft_p95"] <= run.latency["ttft_p99"]
            assert run.engine_version and run.peak_memory_bytes and run.peak_memory_bytes > 0
        hardware = session.scalars(select(Hardware)).one()
        assert hardware.kind == "cpu" and hardware.measurement["read_bandwidth_gbs"] > 0
    # A closed loop of 4 keeps up to 4 requests in flight; of 1, one at a time.
    with store.session() as session:
        for run in runs:
            steps = session.scalars(select(StepRow).where(StepRow.run_id == run.id)).all()
            assert max(s.num_running + s.num_waiting for s in steps) <= run.load_value


def test_the_machine_is_measured_on_every_thread_whatever_an_engine_left_set(tmp_path):
    # An engine sets the process's thread count and leaves it set; the host's rates are the
    # machine's, so they are read on every usable thread all the same.
    from planner.spec import hardware as hw
    from planner.store.records import hardware_row

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = hardware_row(Store(_db(tmp_path / "pilot.db")))
        assert row.measurement["threads"] == hw.detect().cpu.usable_threads
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_same_command_resumes_and_a_budget_stops_early(model_dir, space, tmp_path):
    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload()
    search = SearchSpace.from_file(space)
    first = profile(store, plan_campaign(store, model_dir, search, workload), workload, budget_s=1e-9)
    assert len(first.run_ids) == 1 and first.remaining == 7  # one run, then the budget is spent
    again = plan_campaign(store, model_dir, search, workload)
    assert again.id == first.campaign_id
    second = profile(store, again, workload, budget_s=600)
    assert second.done_before == 1 and len(second.run_ids) == 7 and second.remaining == 0
    assert first.run_ids[0] not in second.run_ids


def test_max_runs_stops_after_a_count_whatever_the_budget(model_dir, space, tmp_path):
    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload()
    campaign = plan_campaign(store, model_dir, SearchSpace.from_file(space), workload)
    first = profile(store, campaign, workload, budget_s=3600, max_runs=3)
    assert len(first.run_ids) == 3 and first.remaining == 5
    rest = profile(store, campaign, workload, budget_s=3600, max_runs=100)
    assert len(rest.run_ids) == 5 and rest.remaining == 0
    with pytest.raises(ValueError, match="max_runs: must be >= 1, got 0"):
        profile(store, campaign, workload, budget_s=3600, max_runs=0)


def test_a_draft_named_by_another_path_resumes_its_campaign(model_dir, space, tmp_path, monkeypatch):
    from planner.store.database import Campaign, Model, WorkloadRow, fingerprint

    store = Store(_db(tmp_path / "pilot.db"))
    workload, search = _workload(), SearchSpace.from_file(space)
    monkeypatch.chdir(Path(model_dir).parent)
    relative = Path(model_dir).name
    first = plan_campaign(store, model_dir, search, workload, draft=relative)
    assert plan_campaign(store, model_dir, search, workload, draft=str(Path(model_dir).resolve())).id == first.id
    # A campaign planned before drafts were keyed by their absolute path is still resumed.
    with store.session() as session:
        campaign = session.get(Campaign, first.id)
        identity = {"hardware": session.get(Hardware, campaign.hardware_id).fingerprint,
                    "model": session.get(Model, campaign.model_id).fingerprint,
                    "workload": session.get(WorkloadRow, campaign.workload_id).fingerprint,
                    "space": search.model_dump(mode="json"), "draft": relative}
        campaign.fingerprint = fingerprint(identity)
        session.commit()
    assert plan_campaign(store, model_dir, search, workload, draft=relative).id == first.id


def test_repeats_measure_each_configuration_and_level_back_to_back(model_dir, space, tmp_path, capsys):
    from planner.costmodel.fit import fit, measurement_groups
    from planner.costmodel.fit_data import load_runs

    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload(num_requests=3, osl="4:8")
    search = SearchSpace.from_file(space).model_copy(update={"knobs": {"quantization": [None],
                                                                        "max_num_seqs": [1, 8]}})
    single = plan_campaign(store, model_dir, search, workload)
    campaign = plan_campaign(store, model_dir, search, workload, repeats=3)
    assert campaign.id != single.id  # another plan, not a resume of the single-run one
    assert plan_campaign(store, model_dir, search, workload, repeats=3).id == campaign.id
    result = profile(store, campaign, workload, budget_s=600)
    assert result.planned == 2 * 2 * 3 and len(result.run_ids) == 12 and not result.failed
    runs = store.runs()
    for i in range(0, 12, 3):  # positions run in order: each triple is one config and level
        triple = runs[i:i + 3]
        assert len({(r.engine_config_id, r.load_value) for r in triple}) == 1
    groups = measurement_groups(load_runs(store))
    assert sorted(np.bincount(groups).tolist()) == [3, 3, 3, 3]
    report = fit(store, folds=2).report
    # Predictions are judged per measurement, against the median of its three runs.
    assert report["measurements"] == 4 and report["data"]["runs"] == 12
    assert all(m["runs"] <= 4 for m in report["by_run"]["metrics"].values())
    assert report["noise_floor"]["runs"] == 12 and report["noise_floor"]["overall"]["p90_ape"] > 0
    assert set(report["by_run"]["single_runs"]) == {"median_ape", "p90_ape", "coverage"}
    medians = report["median_noise_floor"]
    assert medians["measurements"] == 4 and 0 < medians["overall"]["median_ape"] <= medians["overall"]["p90_ape"]
    assert report["sitting_noise_floor"] is None  # one sitting so far
    print_report(report)
    assert "A perfect model would still err about" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        plan_campaign(store, model_dir, search, workload, repeats=0)

    # A second sitting of half the measurements, 2 runs each: they join the same measurements.
    again = plan_again(store, campaign, 0.5, repeats=2)
    assert plan_again(store, campaign, 0.5, repeats=2).id == again.id != campaign.id
    second = profile(store, again, workload, budget_s=600)
    assert second.planned == 2 * 2 and len(second.run_ids) == 4 and not second.failed
    runs = load_runs(store)
    groups = measurement_groups(runs)
    assert sorted(np.bincount(groups).tolist()) == [3, 3, 5, 5]
    assert {r.sitting for r in runs} == {campaign.id, again.id}
    report = fit(store, folds=2).report
    assert report["measurements"] == 4
    assert report["sitting_noise_floor"]["pairs"] == 2
    sittings = report["sitting_noise_floor"]["overall"]
    assert 0 < sittings["median_ape"] <= sittings["p90_ape"]
    print_report(report)
    assert "Measured in later sittings (2 measurements, 2 pairs of sittings)" in " ".join(
        capsys.readouterr().err.split())
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        plan_again(store, campaign, 0)

    # A third sitting of the same share: the same measurements, in a campaign of its own.
    third = plan_again(store, campaign, 0.5, repeats=2, sitting=3)
    assert third.id not in (campaign.id, again.id)
    assert len(profile(store, third, workload, budget_s=600).run_ids) == 4
    runs = load_runs(store)
    assert sorted(np.bincount(measurement_groups(runs)).tolist()) == [3, 3, 7, 7]
    floor = fit(store, folds=2).report["sitting_noise_floor"]
    # Three sittings of two runs or more: three pairs in each measurement, judged by their median.
    assert floor["pairs"] == 6 and floor["judged_by"]["sittings"] == 3
    with pytest.raises(ValueError, match="sitting must be >= 2"):
        plan_again(store, campaign, 0.5, sitting=1)


def test_a_later_sitting_takes_measurements_with_all_their_repeats(model_dir, space, tmp_path):
    """A measurement the budget cut short (fewer runs than repeats) has nothing to pair a full
    later sitting with; where whole ones exist, later sittings take only those."""
    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload(num_requests=2)
    campaign = plan_campaign(store, model_dir, SearchSpace.from_file(space), workload, repeats=2)
    with store.session() as session, session.begin():
        first, second, *_ = session.scalars(select(Experiment).where(Experiment.campaign_id == campaign.id)
                                            .order_by(Experiment.position)).all()[::2]
        whole = (first.engine_config_id, first.load_value)
        for e in session.scalars(select(Experiment).where(Experiment.campaign_id == campaign.id)):
            if (e.engine_config_id, e.load_value) == whole or e.position == second.position:
                e.status = "done"  # the first measurement whole, the second one run of two
    again = plan_again(store, campaign, 1.0, repeats=2)
    with store.session() as session:
        taken = {(e.engine_config_id, e.load_value)
                 for e in session.scalars(select(Experiment).where(Experiment.campaign_id == again.id))}
    assert taken == {whole}


def test_a_configuration_that_fails_at_launch_is_recorded_as_failed(model_dir, tmp_path):
    # A KV budget of 24 KiB holds 96 tokens of the tiny model in bfloat16 but 48 in float32,
    # fewer than the workload's max_model_len of 64: the float32 engines refuse to start.
    path = _space_file(tmp_path, SPACE.replace("  quantization: [null, int8]\n", "  dtype: [bfloat16, float32]\n")
                       .replace("  dtype: float32\n", "  kv_cache_memory_bytes: 24576\n"))
    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload(num_requests=2)
    result = profile(store, plan_campaign(store, model_dir, SearchSpace.from_file(path), workload),
                     workload, budget_s=600)
    assert len(result.run_ids) == 4 and len(result.failed) == 4
    assert all("max_model_len=64" in error for _, error in result.failed)
    with store.session() as session:
        statuses = sorted(e.status for e in session.scalars(select(Experiment)))
    assert statuses == ["done"] * 4 + ["failed"] * 4


def test_a_configuration_the_model_cannot_be_loaded_as_is_never_planned(model_dir, tmp_path):
    # int4 groups of 48 do not divide the tiny model's 64 hidden features.
    path = _space_file(tmp_path, SPACE.replace("[null, int8]", "[int8, int4]")
                       .replace("  num_threads: 1\n", "  num_threads: 1\n  quantization_group_size: 48\n"))
    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload(num_requests=2)
    campaign = plan_campaign(store, model_dir, SearchSpace.from_file(path), workload)
    with store.session() as session:
        planned = [session.get(EngineConfigRow, e.engine_config_id).quantization
                   for e in session.scalars(select(Experiment).where(Experiment.campaign_id == campaign.id))]
    assert planned == ["int8"] * 4  # two batch caps at two load levels


def _profile_command(model_dir: str, space: Path, db: str, budget: str = "10m") -> list[str]:
    return [sys.executable, "-m", "planner", "profile", "--model", model_dir, "--space", str(space),
            "--isl", "8:48", "--osl", "24:48", "--num-requests", "6", "--budget", budget, "--db", db]


def _done(db_path: Path) -> list[tuple[int, int]]:
    if not db_path.exists():
        return []
    with sqlite3.connect(db_path, timeout=30) as conn:
        try:
            return conn.execute("SELECT id, experiment_id FROM runs ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # tables not made yet
            return []


def test_kill_9_mid_campaign_loses_no_finished_run_and_the_rerun_finishes_it(model_dir, space, tmp_path):
    db_path = tmp_path / "pilot.db"
    command = _profile_command(model_dir, space, _db(db_path))
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_done(db_path)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # no handler, no cleanup: as a crash
    proc.wait()
    before = _done(db_path)
    assert len(before) >= 2
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        statuses = dict(conn.execute("SELECT status, count(*) FROM experiments GROUP BY status").fetchall())
    assert statuses.get("done") == len(before) and statuses.get("done", 0) < 8

    rerun = subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _done(db_path)
    assert after[:len(before)] == before  # the finished runs, untouched
    assert len(after) == 8 and len({experiment for _, experiment in after}) == 8  # none redone
    assert f"{8 - len(before)} new runs ({len(before)} from earlier invocations)" in " ".join(rerun.stderr.split())


def test_two_profilers_share_one_campaign_without_corrupting_the_store(model_dir, space, tmp_path):
    db_path = tmp_path / "pilot.db"
    command = _profile_command(model_dir, space, _db(db_path))
    Store(_db(db_path))  # tables made once, before both start
    procs = [subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    runs = _done(db_path)
    assert len(runs) == 8 and len({experiment for _, experiment in runs}) == 8
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM campaigns").fetchone()[0] == 1


def test_export_csv_and_parquet(model_dir, space, tmp_path):
    store = Store(_db(tmp_path / "pilot.db"))
    workload = _workload(num_requests=3)
    profile(store, plan_campaign(store, model_dir, SearchSpace.from_file(space), workload), workload, 600)
    records = run_records(store)
    assert len(records) == 8 and {"ttft_p95", "itl_p50", "throughput_tok_s", "quantization"} <= set(records[0])
    assert export(store, tmp_path / "runs.csv", "csv") == 8
    with (tmp_path / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and float(rows[0]["throughput_tok_s"]) > 0
    assert export(store, tmp_path / "requests.parquet", "parquet", table="requests") == 24
    table = pq.read_table(tmp_path / "requests.parquet")
    assert table.num_rows == 24 and "ttft_s" in table.column_names
    with pytest.raises(ValueError, match="format: must be csv or parquet, got 'xlsx'"):
        export(store, tmp_path / "x", "xlsx")
    with pytest.raises(ValueError, match="table: must be one of runs, requests, steps"):
        export(store, tmp_path / "x.csv", "csv", table="bogus")


def test_cli_profile_lists_and_exports(model_dir, space, tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    runner = CliRunner()
    db = _db(tmp_path / "pilot.db")
    # In process: sittings, listing and export do not depend on the path (test_http_measure.py
    # profiles through the server), and sixteen server launches would cost a minute.
    args = ["profile", "--model", model_dir, "--space", str(space), "--isl", "8:32", "--osl", "4",
            "--num-requests", "2", "--budget", "5m", "--db", db, "--via", "engine"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert ("8 new runs (0 from earlier invocations), 0 failed, 0 of 8 experiments left"
            in " ".join(result.output.split()))
    # A later sitting of half of it: a campaign of its own, resumed like any other.
    result = runner.invoke(app, args + ["--again", "0.5"])
    assert result.exit_code == 0, result.output
    assert ("4 new runs (0 from earlier invocations), 0 failed, 0 of 4 experiments left"
            in " ".join(result.output.split()))
    result = runner.invoke(app, args + ["--again", "0.5"])
    assert "0 new runs (4 from earlier invocations)" in " ".join(result.output.split())
    # The third sitting of the same half.
    result = runner.invoke(app, args + ["--again", "0.5", "--sitting", "3"])
    assert "4 new runs (0 from earlier invocations)" in " ".join(result.output.split())
    listed = runner.invoke(app, ["runs", "list", "--db", db])
    assert listed.exit_code == 0 and "16 runs" in listed.output
    out = tmp_path / "steps.parquet"
    exported = runner.invoke(app, ["runs", "export", "--out", str(out), "--format", "parquet",
                                   "--table", "steps", "--db", db])
    assert exported.exit_code == 0 and out.is_file(), exported.output


def test_cli_profile_without_a_draft_leaves_speculation_out(model_dir, tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    space = _space_file(tmp_path, SPACE.replace("max_num_seqs: [1, 8]", "num_speculative_tokens: [0, 2]"))
    result = CliRunner().invoke(app, ["profile", "--model", model_dir, "--space", str(space), "--isl", "8",
                                      "--osl", "4", "--num-requests", "2", "--db", _db(tmp_path / "p.db"),
                                      "--via", "engine"])
    assert result.exit_code == 0, result.output
    assert "no --draft" in result.output and "4 new runs" in result.output


@pytest.mark.parametrize("flag, value, field", [
    ("--budget", "soon", "budget"), ("--slo", "ttft_p95<=5us", "unit"), ("--isl", "a:b", "isl"),
    ("--space", "nowhere", "search space not found"), ("--db", "nosuchdialect://x", "--db"),
    ("--repeats", "0", "--repeats: must be >= 1, got 0"),
    ("--again", "1.5", "--again: must be a share in (0, 1], got 1.5"),
    ("--sitting", "1", "--sitting: must be >= 2"), ("--sitting", "3", "--sitting: 3 needs --again"),
])
def test_cli_profile_bad_input_names_the_field(model_dir, tmp_path, flag, value, field):
    from typer.testing import CliRunner

    from planner.cli import app

    args = ["profile", "--model", model_dir, "--space", "cpu", "--db", _db(tmp_path / "p.db"), flag, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and field in result.output, result.output


def test_cli_hardware_lists_specs_and_this_machine(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    (tmp_path / "my-gpu.yaml").write_text(
        "name: my-gpu\nvendor: nvidia\nkind: gpu\nmemory_gb: 32\nmemory_bandwidth_gbs: 1000\n"
        "peak_tflops: {bf16: 100}\ninterconnect: {kind: pcie4, bandwidth_gbs: 64}\n"
        "max_devices_per_node: 8\nprice_per_hour_usd: 1.5\nprice_source: test\nsource: test\n")
    result = CliRunner().invoke(app, ["hardware", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "h100-sxm" in result.output and "my-gpu" in result.output and "this machine:" in result.output
    (tmp_path / "bad.yaml").write_text("name: bad\nmemory_gb: -1\n")
    bad = CliRunner().invoke(app, ["hardware", "--dir", str(tmp_path)])
    assert bad.exit_code == 2 and "memory_gb" in bad.output
