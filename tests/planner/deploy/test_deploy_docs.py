"""docs/deploy.md shows the manifests `pilot deploy` writes for its two-node example: they are the
ones the code writes today (the tests' 70B-class plan, built in code)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from planner.deploy import DeployOptions, write_deployment

DOC = Path(__file__).resolve().parents[3] / "docs" / "deploy.md"


def _shown(file_name: str) -> dict:
    """The YAML block docs/deploy.md shows after naming `file_name`, in its two-node example."""
    text = DOC.read_text().split("## Example: a replica across two nodes", 1)[1]
    match = re.search(re.escape(file_name) + r".*?```yaml\n(.*?)```", text, re.S)
    assert match, f"docs/deploy.md shows no {file_name} in its two-node example"
    return yaml.safe_load(match.group(1))


def test_the_two_node_example_in_the_docs_is_what_pilot_deploy_writes(multi_node_plan, tmp_path):
    write_deployment(multi_node_plan, tmp_path, DeployOptions(model_pvc="llama-weights"))
    written = yaml.safe_load((tmp_path / "base" / "leaderworkerset.yaml").read_text())
    assert _shown("base/leaderworkerset.yaml") == written
