"""`pilot deploy` end to end through typer: it writes the layout and says what it wrote."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()


def test_deploy_writes_the_layout_and_prints_each_path(gpu_plan, tmp_path):
    plan_file = gpu_plan.write(tmp_path / "plan.yaml")
    out = tmp_path / "deploy"
    result = runner.invoke(app, ["deploy", "--plan", str(plan_file), "--out", str(out), "--namespace", "llm",
                                 "--name", "llama", "--hf-model", "meta-llama/Llama-3.1-8B-Instruct",
                                 "--registry", "ghcr.io/acme", "--max-replicas", "4",
                                 "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3"])
    assert result.exit_code == 0, result.output
    written = [line for line in result.stdout.splitlines() if line.startswith(str(out))]
    assert {p.split("/deploy/", 1)[1] for p in written} == {
        "base/deployment.yaml", "base/service.yaml", "base/scaledobject.yaml", "base/plan.yaml",
        "base/kustomization.yaml", "overlays/llm/kustomization.yaml"}
    text = " ".join(result.output.split())
    assert "Deployment llama: 1 replica(s), each a pod of 1 GPU, served by vllm" in text
    assert "ghcr.io/acme/vllm/vllm-openai:v0.24.0" in text and "1-4 replicas, 6.66 running requests" in text
    assert f"kubectl apply -k {out}/overlays/llm" in text
    deployment = yaml.safe_load((out / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    scaled = yaml.safe_load((out / "base" / "scaledobject.yaml").read_text())
    assert scaled["spec"]["maxReplicaCount"] == 4


def test_deploy_is_listed_with_its_flags():
    result = runner.invoke(app, ["deploy", "--help"])
    assert result.exit_code == 0
    for flag in ("--plan", "--out", "--namespace", "--image", "--registry", "--autoscaler", "--model-pvc",
                 "--hf-model", "--max-replicas"):
        assert flag in result.output
