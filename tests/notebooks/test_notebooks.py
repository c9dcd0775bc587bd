"""The notebooks run: executed top to bottom against a store and plan the tiny quickstart just
wrote, every cell succeeds and every figure renders."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.cli import app

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("store")
    result = CliRunner().invoke(app, ["quickstart", "--workdir", str(workdir), "--model", "tiny", "--max-runs", "4"])
    assert result.exit_code == 0, result.output
    return workdir


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_notebook_runs_on_a_fresh_store(path, quickstart, monkeypatch):
    monkeypatch.setenv("PILOT_DB", f"sqlite:///{quickstart / 'pilot.db'}")
    monkeypatch.setenv("PILOT_PLAN", str(quickstart / "plan.yaml"))
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # steps, accuracy, plan front


def test_there_is_a_notebook_and_it_was_committed_executed():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code"), path.name
