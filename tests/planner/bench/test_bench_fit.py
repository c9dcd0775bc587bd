"""`pilot bench fit`: the cost model's reference benchmark, on two of its models for seconds."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.model_config import ModelConfig
from planner.bench.fit import REFERENCE_MODELS, FitBenchmark, make_models, run_fit_benchmark
from planner.cli import app
from planner.costmodel.roofline import ModelShape

runner = CliRunner()


def _runs_in(workdir: Path) -> int:
    with sqlite3.connect(workdir / "reference.db") as db:
        return db.execute("SELECT count(*) FROM runs").fetchone()[0]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FitBenchmark]:
    workdir = tmp_path_factory.mktemp("bench-fit")
    return workdir, run_fit_benchmark(workdir, budget_s=3600, names=("tiny", "h128"), folds=2, max_runs=8)


def test_profiles_each_model_fits_and_continues(profiled: tuple[Path, FitBenchmark]) -> None:
    tmp_path, first = profiled
    assert set(first.runs) == {"tiny", "h128"} and all(n > 0 for n in first.runs.values())
    assert first.report["data"]["models"] == sorted(["tiny", "h128"])
    summary = first.summary()
    assert set(summary) >= {"by_run", "by_model"}
    for section in ("by_run", "by_model"):
        assert 0 < summary[section]["median_ape"] <= summary[section]["p90_ape"]
        assert 0 <= summary[section]["coverage"] <= 1
    stored = _runs_in(tmp_path)
    assert stored == sum(first.runs.values())
    # Budget 0 fits what the store holds: the same runs, no new ones, no models remade.
    made = (tmp_path / "models" / "tiny" / "config.json").stat().st_mtime_ns
    again = run_fit_benchmark(tmp_path, budget_s=0, names=("tiny", "h128"), folds=2)
    assert again.runs == {} and _runs_in(tmp_path) == stored
    assert again.report["data"]["runs"] == first.report["data"]["runs"]
    assert (tmp_path / "models" / "tiny" / "config.json").stat().st_mtime_ns == made


def test_reference_models_are_distinct_shapes_ordered_by_size() -> None:
    sizes = [s["hidden_size"] * s["num_hidden_layers"] for s in REFERENCE_MODELS.values()]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for name, shape in REFERENCE_MODELS.items():
        assert shape["hidden_size"] % shape["num_attention_heads"] == 0, name
        assert shape["num_attention_heads"] % shape["num_key_value_heads"] == 0, name


def test_reference_models_leave_no_wide_gap_in_weight_bytes_from_h256_on() -> None:
    """A last-level cache's edge (a few MiB to tens) must fall between models close in size, or
    the model left out beside it is priced at the wrong side of the edge."""
    sizes = [2.0 * ModelShape.from_config(ModelConfig.from_dict(shape)).weight_params
             for shape in REFERENCE_MODELS.values()]
    assert sizes == sorted(sizes)
    upper = sizes[list(REFERENCE_MODELS).index("h256"):]
    assert max(b / a for a, b in zip(upper, upper[1:])) <= 2.2


def test_unknown_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gpt-17"):
        make_models(tmp_path, ["gpt-17"])
    result = runner.invoke(app, ["bench", "fit", "--workdir", str(tmp_path), "--models", "tiny,gpt-17"])
    assert result.exit_code != 0 and "--models" in result.output and "gpt-17" in result.output
    result = runner.invoke(app, ["bench", "fit", "--workdir", str(tmp_path), "--budget", "soon"])
    assert result.exit_code != 0 and "budget" in result.output and "soon" in result.output


def test_cli_prints_the_table_and_writes_json(profiled: tuple[Path, FitBenchmark], tmp_path: Path) -> None:
    workdir, first = profiled
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["bench", "fit", "--workdir", str(workdir), "--models", "tiny,h128",
                                 "--budget", "0", "--folds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Cost-model reference" in result.output and "held-out model" in result.output
    written = json.loads(out.read_text())
    assert written["runs"] == {} and written["report"]["data"]["runs"] == first.report["data"]["runs"]
    assert written["summary"]["by_run"]["median_ape"] == pytest.approx(
        first.summary()["by_run"]["median_ape"])


def test_again_measures_a_share_in_a_second_sitting(profiled: tuple[Path, FitBenchmark], tmp_path: Path) -> None:
    workdir, first = profiled
    shutil.copytree(workdir / "models", tmp_path / "models")
    # SQLite's backup, not a file copy: the store is in WAL mode.
    with sqlite3.connect(workdir / "reference.db") as source, sqlite3.connect(tmp_path / "reference.db") as target:
        source.backup(target)
    result = runner.invoke(app, ["bench", "fit", "--workdir", str(tmp_path), "--models", "tiny,h128",
                                 "--budget", "0", "--folds", "2", "--again", "0.25"])
    assert result.exit_code == 0, result.output
    added = _runs_in(tmp_path) - _runs_in(workdir)
    assert added > 0 and added % 3 == 0  # each measurement again, three runs back to back
    assert "noise floor (one sitting)" in result.output
    assert "Measured in later sittings" in " ".join(result.output.split())
    assert "Judged by the median of 3 sittings it would be about" in " ".join(result.output.split())
    result = runner.invoke(app, ["bench", "fit", "--workdir", str(tmp_path), "--again", "1.5"])
    assert result.exit_code != 0 and "--again" in result.output and "1.5" in result.output

    # Two more sittings of that share: each measurement's truth becomes the median of three.
    before = _runs_in(tmp_path)
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["bench", "fit", "--workdir", str(tmp_path), "--models", "tiny,h128",
                                 "--budget", "0", "--folds", "2", "--again", "0.25", "--sittings", "3",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _runs_in(tmp_path) - before == added  # the third sitting; the second was there
    summary = json.loads(out.read_text())["summary"]
    # Three sittings, but a first one the budget cut short may hold a single run, unpaired.
    assert summary["judged_noise_floor"]["sittings"] in (2, 3)
    # The median of two or three sittings strays less than one does. (The median error, not the
    # p90: from a few dozen pairs the p90 of a median of two came out above one sitting's in CI.)
    assert summary["judged_noise_floor"]["median_ape"] < summary["sitting_noise_floor"]["median_ape"]
    assert "noise floor (all sittings)" in result.output
    assert "judged by the median of their" in " ".join(result.output.split())
    for flag, value in (("--sittings", "0"), ("--repeats", "0")):
        result = runner.invoke(app, ["bench", "fit", "--workdir", str(tmp_path), flag, value])
        assert result.exit_code != 0 and flag in result.output and value in result.output
