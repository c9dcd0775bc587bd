"""The Dockerfile builds the image the manifests run (no docker here: its text is checked): what
it copies exists and is not ignored, and its entrypoint, user and port are the manifests'."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from planner.deploy.engines import PILOT_CACHE, PILOT_ENTRYPOINT, PILOT_UID, PLAN_DIR, PLAN_FILE, PORT

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", DOCKERFILE, re.MULTILINE)]


def test_every_copied_source_exists_and_reaches_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    sources = []
    for line in _instructions("COPY"):
        if line.startswith("--from="):
            continue
        sources += shlex.split(line)[:-1]
    assert {"pyproject.toml", "setup.py", "engine", "planner", "profiles", "search_spaces"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source not in ignored, source


def test_the_entrypoint_and_command_are_what_the_manifests_expect():
    (entrypoint,) = _instructions("ENTRYPOINT")
    assert tuple(json.loads(entrypoint)) == PILOT_ENTRYPOINT
    (command,) = _instructions("CMD")
    assert json.loads(command) == ["--config", f"{PLAN_DIR}/{PLAN_FILE}"]
    assert _instructions("EXPOSE") == [str(PORT)]


def test_it_runs_as_the_non_root_user_the_manifests_name():
    assert _instructions("USER") == [str(PILOT_UID)]
    assert f"--uid {PILOT_UID}" in DOCKERFILE and f"PILOT_CACHE={PILOT_CACHE}" in DOCKERFILE


def test_torch_is_the_cpu_wheel_unless_a_cuda_index_is_given():
    args = dict(line.split("=", 1) for line in _instructions("ARG") if "=" in line)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in DOCKERFILE
