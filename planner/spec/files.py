"""Reading the YAML/JSON files users write (spaces, workloads, hardware specs)."""

from __future__ import annotations

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
