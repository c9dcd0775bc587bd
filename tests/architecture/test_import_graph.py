"""The import graph of engine/ and planner/, read from the source with `ast`: no cycles, the
engine never imports the planner, the planner reaches the engine through a few modules, the
planner's packages import one way, and the scheduler and simulator run without model code."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "planner")
# The engine modules the planner may import (engine/__init__.py says why each).
PLANNER_MAY_IMPORT = {"engine", "engine.config", "engine.model_config", "engine.scheduler",
                      "engine.block_manager", "engine.sequence", "engine.sampling_params",
                      "engine.observer", "engine.rules", "engine.device", "engine.model_zoo",
                      "engine.quantize_checkpoint", "engine.serving", "engine.gguf", "engine.hub"}
# planner's packages, lowest first: each imports only those before it (and itself).
LAYERS = ("planner._lazy", "planner.spec", "planner.store", "planner.loadgen", "planner.measure",
          "planner.costmodel", "planner.profiling", "planner.silicon", "planner.search", "planner.deploy",
          "planner.bench", "planner.cli", "planner.__main__")
MODEL_CODE = ("engine.models", "engine.layers", "engine.kernels", "engine.model_runner",
              "engine.loader", "engine.llm", "engine.llm_engine", "engine.parallel", "engine.spec_decode")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


@cache
def imports(name: str, with_type_checking: bool = False) -> frozenset[str]:
    """What module `name` imports (at any depth of its code), as module names: `from a import b`
    counts as a.b where that is a module, else as a; externals by their top-level name."""
    path = modules()[name]
    tree = ast.parse(path.read_text())
    skip = set() if with_type_checking else _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base)
    return frozenset(m if m.split(".")[0] in PACKAGES else m.split(".")[0] for m in found)


def _internal(name: str) -> set[str]:
    return {m for m in imports(name) if m.split(".")[0] in PACKAGES}


def test_the_graph_is_read():
    assert {"engine.scheduler", "planner.costmodel.simulator", "planner.cli"} <= modules().keys()
    assert "engine.scheduler" in _internal("planner.costmodel.simulator")


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in _internal(node):
            if nxt not in modules():
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in _internal(node):
                cycles.append(sorted(component))

    for name in sorted(modules()):
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_the_engine_never_imports_the_planner():
    offenders = {name: sorted(m for m in imports(name, with_type_checking=True) if m.startswith("planner"))
                 for name in modules() if name.startswith("engine")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_planner_uses_the_engine_through_its_documented_modules():
    reached = {name: sorted(m for m in _internal(name) if m.startswith("engine") and m not in PLANNER_MAY_IMPORT)
               for name in modules() if name.startswith("planner")}
    assert not {k: v for k, v in reached.items() if v}


def _layer(name: str) -> int:
    return max(i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")
               ) if name != "planner" else -1


def test_the_planners_packages_import_one_way():
    upward = []
    for name in modules():
        if not name.startswith("planner."):
            continue
        for target in _internal(name):
            if target.startswith("planner.") and _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def _closure(name: str) -> set[str]:
    """Every module importing `name` runs, its parent packages' __init__ included."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))}
        todo.extend(m for m in ({*imports(current), *parents} if current in modules() else set()))
    return seen


@pytest.mark.parametrize("name", ["engine.scheduler", "planner.costmodel.simulator"])
def test_the_scheduler_and_simulator_import_no_model_code(name):
    reached = _closure(name)
    model_code = sorted(m for m in reached if m.startswith(MODEL_CODE))
    assert not model_code, f"{name} imports model code: {model_code}"
    if name == "engine.scheduler":
        assert "torch" not in reached, "the scheduler must run without torch"


def test_importing_the_scheduler_loads_neither_torch_nor_the_planner():
    """The same, run: a fresh interpreter imports the scheduler and the engine's shared rules."""
    code = ("import sys, engine.scheduler, engine.block_manager, engine.rules; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('planner', 'engine.models'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
