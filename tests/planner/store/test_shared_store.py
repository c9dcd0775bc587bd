"""A campaign several processes share through a real PostgreSQL server, as a team shares one
database: two `pilot profile` processes on one campaign, one killed with kill -9 and resumed;
then `pilot fit` and `pilot recommend` reading from it, the Optuna study in the same database,
searched by several worker processes and joined by another `pilot recommend`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from sqlalchemy import func, select
from support.mini_space import SPACE
from typer.testing import CliRunner

from planner.cli import app
from planner.search.plan import Plan
from planner.store.database import Campaign, CostModelRow, Experiment, Run, Store

REPO = Path(__file__).resolve().parents[3]
LOOSE = "ttft_p95<=2s,itl_p95<=500ms"
EXPERIMENTS = 12  # two quantizations x three batch caps x two load levels


def _profile_command(model_dir: str, space: Path, db: str) -> list[str]:
    return [sys.executable, "-m", "planner", "profile", "--model", model_dir, "--space", str(space),
            "--isl", "8:48", "--osl", "16:32", "--num-requests", "6", "--budget", "10m", "--db", db]


def _runs(store: Store) -> list[tuple[int, int]]:
    with store.session() as session:
        return [tuple(r) for r in session.execute(select(Run.id, Run.experiment_id).order_by(Run.id))]


@pytest.fixture(scope="module")
def shared(postgres_server, model_dir, tmp_path_factory):
    """Two profilers started at once on an empty database; one killed mid-campaign, the other
    finishing; then the killed command run again. (url, runs before the kill, the rerun's output)."""
    url = postgres_server.new_database()
    space = tmp_path_factory.mktemp("space") / "space.yaml"
    space.write_text(SPACE)
    command = _profile_command(model_dir, space, url)
    procs = [subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    victim, survivor = procs
    store, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        try:
            store = store or Store(url)
            if len(_runs(store)) >= 3:
                break
        except Exception:  # tables not made yet
            pass
        time.sleep(0.1)
    assert victim.poll() is None, victim.stderr.read()[-2000:]
    os.kill(victim.pid, signal.SIGKILL)  # no handler, no cleanup: as a crash
    victim.wait()
    before = _runs(store)
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-2000:]
    rerun = subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    return url, before, rerun.stderr


def test_two_profilers_one_killed_run_each_experiment_once_and_lose_nothing(shared):
    url, before, rerun = shared
    store = Store(url)
    after = _runs(store)
    assert after[:len(before)] == before  # the finished runs, untouched by the kill
    assert len(after) == EXPERIMENTS and len({experiment for _, experiment in after}) == EXPERIMENTS
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Campaign)) == 1
        statuses = dict(session.execute(select(Experiment.status, func.count()).group_by(Experiment.status)).all())
    assert statuses == {"done": EXPERIMENTS}
    assert f"0 new runs ({EXPERIMENTS} from earlier invocations)" in " ".join(rerun.split())


def test_fit_and_recommend_read_from_postgres_and_the_study_lives_there(shared, model_dir, tmp_path):
    url, _, _ = shared
    listed = CliRunner().invoke(app, ["runs", "list", "--db", url])
    assert listed.exit_code == 0 and "12 runs" in " ".join(listed.output.split()), listed.output
    exported = CliRunner().invoke(app, ["runs", "export", "--db", url, "--out", str(tmp_path / "runs.csv")])
    assert exported.exit_code == 0, exported.output
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 1 + EXPERIMENTS
    fitted = CliRunner().invoke(app, ["fit", "--db", url, "--folds", "3"])
    assert fitted.exit_code == 0, fitted.output
    with Store(url).session() as session:
        assert session.scalar(select(func.count()).select_from(CostModelRow)) == 1
    out = tmp_path / "plan.yaml"
    base = ["recommend", "--model", model_dir, "--slo", LOOSE, "--concurrency", "2", "--isl", "8:64",
            "--osl", "4:16", "--num-requests", "12", "--db", url]
    # Three worker processes asking and telling on the study in PostgreSQL.
    searched = CliRunner().invoke(app, [*base, "--trials", "12", "--workers", "3", "--study", "team",
                                        "--out", str(out)])
    assert searched.exit_code == 0, searched.output
    study = optuna.load_study(study_name="team", storage=Store(url).url)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 12
    plan = Plan.from_file(out)
    assert plan.study == "team" and plan.feasible
    # Another process joins the study: its plan ranks all 20 trials, its own 8 and the 12 before.
    joined = CliRunner().invoke(app, [*base, "--trials", "8", "--study", "team", "--out", str(tmp_path / "p2.yaml")])
    assert joined.exit_code == 0, joined.output
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 20
    joined_plan = Plan.from_file(tmp_path / "p2.yaml")
    assert joined_plan.cost.per_hour_usd <= plan.cost.per_hour_usd + 1e-12
    # A study made for other SLOs is refused, naming the field.
    other = CliRunner().invoke(app, [*base[:4], "ttft_p95<=1s", *base[5:], "--trials", "2", "--study", "team",
                                     "--out", str(tmp_path / "p3.yaml")])
    assert other.exit_code == 2 and "study: " in other.output and "made for another" in other.output, other.output
