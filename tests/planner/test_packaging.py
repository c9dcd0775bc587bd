"""The wheel: what `pip install pilot` gets must run without the repository around it.

A copy of the repository is built into a wheel once per module (a few seconds, offline, with the
setuptools of this environment; the copy keeps the checkout free of build/ and of stale files a
previous build left there). The wheel must hold the C kernel sources, every built-in search space
and hardware spec (compared with the files in the repository, so a data file the package data
does not match fails here), the `pilot` entry point, and nothing of tests/ or notebooks/. Unpacked
as site-packages, the copy must find its data inside itself; a checkout finds its top-level
folders."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from engine.kernels import cpu
from planner.spec.files import builtin_data
from planner.spec.hardware import BUILTIN_DIR, load_specs
from planner.spec.search_space import SPACES_DIR, SearchSpace

REPO = Path(__file__).resolve().parents[2]
# Top-level entries of a checkout that are neither sources nor part of a build.
_NOT_SOURCES = {".git", ".venv", "build", "dist", ".pytest_cache", "models", "pilot-quickstart",
                ".whl", ".gl"}


def _ignore(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".db", ".pyc"))}
    if Path(folder).resolve() == REPO:
        skip |= _NOT_SOURCES & set(names)
    return skip


def _files(root: Path, pattern: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.glob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the copy of the repository it was built from, the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=_ignore)
    out = tmp / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(out), str(source)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list(out.glob("pilot-*.whl"))
    assert len(wheels) == 1, wheels
    return source, wheels[0]


@pytest.fixture(scope="module")
def names(built) -> set[str]:
    with zipfile.ZipFile(built[1]) as wheel:
        return set(wheel.namelist())


def _dist_info(wheel: Path) -> str:
    name, version = wheel.name.split("-")[:2]
    return f"{name}-{version}.dist-info"


def test_wheel_holds_the_kernel_sources(built, names):
    source, _ = built
    kernels = _files(source, "engine/kernels/*.c") | _files(source, "engine/kernels/*.h")
    assert "engine/kernels/simd_math.h" in kernels and len(kernels) >= 7
    assert kernels <= names, sorted(kernels - names)
    # What cpu.py compiles is what the wheel ships.
    assert {f"engine/kernels/{p.name}" for p in cpu.SOURCES + cpu.HEADERS} <= names


def test_wheel_holds_every_builtin_data_file(built, names):
    """Every file of search_spaces/ and profiles/ (the specs and their READMEs), as planner/data/."""
    source, _ = built
    for folder in ("search_spaces", "profiles"):
        files = _files(source / folder, "**/*")
        assert files, folder
        expected = {f"planner/data/{folder}/{f}" for f in files}
        assert expected <= names, f"{folder}/ files not packaged: {sorted(expected - names)}"
    assert {"planner/data/search_spaces/cpu.yaml", "planner/data/search_spaces/gpu.yaml",
            "planner/data/profiles/hardware/cpu-host.yaml"} <= names
    # Data only as package data, not as top-level folders of site-packages.
    assert not {n for n in names if n.startswith(("search_spaces/", "profiles/"))}


def test_wheel_holds_every_module_and_no_tests(built, names):
    source, _ = built
    modules = _files(source, "engine/**/*.py") | _files(source, "planner/**/*.py")
    assert modules <= names, sorted(modules - names)
    assert (source / "tests").is_dir() and (source / "notebooks").is_dir()  # in the copy built
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"engine", "planner", _dist_info(built[1])}, tops
    assert not [n for n in names if n.startswith(("tests/", "notebooks/", "docs/"))]


def test_wheel_declares_the_pilot_command(built):
    with zipfile.ZipFile(built[1]) as wheel:
        text = wheel.read(f"{_dist_info(built[1])}/entry_points.txt").decode()
    points = configparser.ConfigParser()
    points.read_string(text)
    assert points["console_scripts"]["pilot"] == "planner.cli:app"


_PROBE = """
import json
import planner
from engine.kernels import cpu
from planner.spec.hardware import BUILTIN_DIR, load_specs
from planner.spec.search_space import SPACES_DIR, SearchSpace
print(json.dumps({"planner": planner.__file__, "spaces": str(SPACES_DIR),
                  "hardware": str(BUILTIN_DIR), "kernels": [str(p) for p in cpu.SOURCES + cpu.HEADERS],
                  "cpu_space": SearchSpace.from_file("cpu").name, "specs": sorted(load_specs())}))
"""


def test_installed_wheel_reads_its_own_data(built, tmp_path):
    """Unpacked as site-packages and run from an empty folder: the data comes from the package."""
    source, wheel = built
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PILOT_CPU_KERNELS": "0"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=empty, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["planner"]).is_relative_to(site)
    assert Path(found["spaces"]) == site / "planner" / "data" / "search_spaces"
    assert Path(found["hardware"]) == site / "planner" / "data" / "profiles" / "hardware"
    assert all(Path(k).is_relative_to(site) and Path(k).is_file() for k in found["kernels"])
    assert found["cpu_space"] == "cpu"
    assert found["specs"] == sorted(p.stem for p in (source / "profiles" / "hardware").glob("*.yaml"))


def test_checkout_reads_its_top_level_folders():
    assert SPACES_DIR == builtin_data("search_spaces") == REPO / "search_spaces"
    assert BUILTIN_DIR == REPO / "profiles" / "hardware"
    assert SearchSpace.from_file("cpu").name == "cpu"
    assert set(load_specs()) == {p.stem for p in BUILTIN_DIR.glob("*.yaml")}
    assert cpu.KERNEL_DIR == REPO / "engine" / "kernels"
    assert all(p.is_file() for p in cpu.SOURCES + cpu.HEADERS)


# -- where the compiled kernels go ---------------------------------------------------------------

def test_kernel_cache_prefers_pilot_cache_then_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PILOT_CACHE", str(tmp_path / "pc"))
    assert cpu._cache_dir() == tmp_path / "pc" / "kernels"
    monkeypatch.delenv("PILOT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu._cache_dir() == tmp_path / "xdg" / "pilot" / "kernels"
    assert (tmp_path / "xdg" / "pilot" / "kernels").is_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu._cache_dir() == tmp_path / "home" / ".cache" / "pilot" / "kernels"


def test_kernel_cache_falls_back_to_a_private_temp_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("PILOT_CACHE", raising=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # cannot hold a folder: unwritable
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scratch = cpu._cache_dir()
    assert scratch == tmp_path / "tmp" / f"pilot-kernels-{os.getuid()}"
    assert scratch.stat().st_mode & 0o777 == 0o700
    scratch.chmod(0o777)  # someone else could plant a library there: not used
    with pytest.raises(OSError, match="PILOT_CACHE"):
        cpu._cache_dir()
