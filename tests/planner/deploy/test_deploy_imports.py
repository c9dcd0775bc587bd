"""planner.deploy reads a finished plan: it imports the plan and launch arguments (planner.search),
hardware specs and errors (planner.spec) and the engine's config, nothing else of the planner."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "planner" / "deploy"
ALLOWED = ("planner._lazy", "planner.deploy", "planner.spec", "planner.search", "engine.config")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("planner", "engine")}


def test_deploy_imports_only_the_plan_specs_and_engine_config():
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 7
    wrong = {f"{p.name} -> {name}" for p in modules for name in _imports(p)
             if not any(name == a or name.startswith(a + ".") for a in ALLOWED)}
    assert not wrong, wrong
