"""A campaign several machines share through a real PostgreSQL server, as a team shares one
database: two `pilot profile` processes as two machines (each in a UTS namespace with a host name
of its own) on one campaign, one killed with kill -9, its experiment taken over once its claim
went stale;
then `pilot fit` and `pilot recommend` reading from it, the Optuna study in the same database,
searched by several worker processes and joined by another `pilot recommend`."""

from __future__ import annotations

import os
import shlex
import shutil
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


def _as_host(name: str, command: list[str]) -> list[str]:
    """`command` run as if on a machine called `name`: a UTS namespace of its own (root only),
    where the host name is that machine's; else as it is, on this host."""
    probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        return command
    return ["unshare", "--uts", "sh", "-c", f"hostname {name} && exec {shlex.join(command)}"]


# Claims renewed every half second and stale after three: the take-over of a dead machine's
# experiment within a test, with the same code as the 30 s / 5 min defaults.
CLAIMS = {"PILOT_HEARTBEAT_S": "0.5", "PILOT_STALE_CLAIM_S": "3"}


@pytest.fixture(scope="module")
def shared(postgres_server, model_dir, tmp_path_factory):
    """Two profilers, as two machines (machine-a, machine-b), started at once on an empty
    database; machine-a killed mid-campaign, machine-b finishing all it can; once machine-a's
    claim has gone stale, machine-b's command run again. (url, runs before the kill, the
    killed experiment, the rerun's output)."""
    url = postgres_server.new_database()
    space = tmp_path_factory.mktemp("space") / "space.yaml"
    space.write_text(SPACE)
    command = _profile_command(model_dir, space, url)
    env = {**os.environ, **CLAIMS}
    victim, survivor = (subprocess.Popen(_as_host(host, command), cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                        for host in ("machine-a", "machine-b"))
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
    os.kill(victim.pid, signal.SIGKILL)  # no handler, no cleanup: as a machine lost
    victim.wait()
    before = _runs(store)
    with store.session() as session:
        orphan = session.scalar(select(Experiment.id).where(Experiment.status == "running"))
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-2000:]
    with store.session() as session:
        left = session.scalar(select(func.count()).select_from(Experiment).where(Experiment.status != "done"))
    if left:  # machine-b ran out of work before machine-a's claim went stale: wait until it has
        time.sleep(3.5)
    rerun = subprocess.run(_as_host("machine-b", command), cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    return url, before, orphan, rerun.stderr


def test_two_machines_one_lost_run_each_experiment_once_and_lose_nothing(shared):
    url, before, orphan, rerun = shared
    store = Store(url)
    after = _runs(store)
    assert after[:len(before)] == before  # the finished runs, untouched by the kill
    assert len(after) == EXPERIMENTS and len({experiment for _, experiment in after}) == EXPERIMENTS
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Campaign)) == 1
        statuses = dict(session.execute(select(Experiment.status, func.count()).group_by(Experiment.status)).all())
        owners = {owner.split(":")[0] for owner in session.scalars(select(Experiment.owner)) if owner}
    assert statuses == {"done": EXPERIMENTS}
    if orphan is not None:  # the lost machine's experiment: run by the other once its claim went stale
        assert orphan in {experiment for _, experiment in after[len(before):]}
    assert "from earlier invocations" in " ".join(rerun.split())
    assert not owners  # a finished experiment keeps no owner


def test_fit_and_recommend_read_from_postgres_and_the_study_lives_there(shared, model_dir, tmp_path):
    url = shared[0]
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
