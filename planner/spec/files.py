"""Reading the YAML/JSON files users write (spaces, workloads, hardware specs), and finding the
built-in ones."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml


def read_mapping(path: Path, error: type[ValueError], what: str = "fields") -> dict[str, Any]:
    """The file's top-level mapping (JSON by suffix, else YAML); `error` naming the file when
    it cannot be read, parsed, or is not a mapping."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise error(f"{path}: not valid YAML or JSON, or unreadable ({err})") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def builtin_data(name: str) -> Path:
    """The folder of built-in data `name` (`search_spaces`, `profiles`). The repository keeps it
    at the top level; a wheel ships it as the package `planner.data.<name>` (pyproject.toml's
    package-dir). Found through the import system, so an installed copy reads its own files; in
    a source checkout or an editable install that package is not importable, and it is the
    checkout's folder."""
    try:
        spec = importlib.util.find_spec(f"planner.data.{name}")
    except ImportError:  # no planner.data beside this planner: a checkout
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location).is_dir():
            return Path(location)
    return Path(__file__).resolve().parents[2] / name
