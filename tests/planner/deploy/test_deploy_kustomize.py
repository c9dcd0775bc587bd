"""The written layout builds with Kustomize (`kubectl kustomize`, where kubectl is installed): the
base alone and the overlay, whose objects land in its namespace, run its image, and reach the
plan's ConfigMap under the hashed name Kustomize generates."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support.k8s import validate

from planner.deploy import DeployError, DeployOptions, write_deployment
from planner.deploy.kustomize import image_entry
from planner.search.plan import Plan

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: the layout is not built")


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _volumes(pod_spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec["volumes"]}


def test_the_layout_is_a_base_and_an_overlay_named_by_namespace(cpu_plan, tmp_path):
    paths = write_deployment(cpu_plan, tmp_path, DeployOptions(model_pvc="models", namespace="llm"))
    assert sorted(str(p.relative_to(tmp_path)) for p in paths) == [
        "base/deployment.yaml", "base/kustomization.yaml", "base/plan.yaml", "base/scaledobject.yaml",
        "base/service.yaml", "overlays/llm/kustomization.yaml"]
    # The base's plan file is the plan the pod reads: the original with the pod's paths.
    written = Plan.from_file(tmp_path / "base" / "plan.yaml")
    assert written.engine.model == "/models/smollm2-135m" and written.slos == cpu_plan.slos
    # Written again with another autoscaler, the base holds no object of the first.
    write_deployment(cpu_plan, tmp_path, DeployOptions(model_pvc="models", namespace="llm", autoscaler="hpa"))
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [
        "deployment.yaml", "hpa.yaml", "kustomization.yaml", "plan.yaml", "service.yaml"]


@needs_kubectl
def test_a_cpu_plan_builds_in_its_namespace_with_the_registry_s_image(cpu_plan, tmp_path):
    options = DeployOptions(model_pvc="models", namespace="llm-prod", registry="ghcr.io/acme")
    write_deployment(cpu_plan, tmp_path, options)
    base = {d["kind"]: d for d in kustomize(tmp_path / "base")}
    overlay = {d["kind"]: d for d in kustomize(tmp_path / "overlays" / "llm-prod")}
    assert set(overlay) == {"ConfigMap", "Deployment", "Service", "ScaledObject"}
    assert all("namespace" not in d["metadata"] for d in base.values())
    assert all(d["metadata"]["namespace"] == "llm-prod" for d in overlay.values())
    config_map = overlay["ConfigMap"]["metadata"]["name"]
    assert config_map.startswith("smollm2-135m-plan-")  # hashed: a new plan rolls the pods
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    assert _volumes(pod)["plan"]["configMap"]["name"] == config_map
    assert pod["containers"][0]["image"] == "ghcr.io/acme/pilot:0.1.0"
    assert base["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == "pilot:0.1.0"
    query = overlay["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]
    assert 'namespace="llm-prod"' in query
    assert 'namespace="default"' in base["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]
    assert Plan.model_validate(yaml.safe_load(overlay["ConfigMap"]["data"]["plan.yaml"])).engine.num_threads == 2
    for document in overlay.values():
        validate(document)


@needs_kubectl
def test_a_multi_node_plan_builds_with_the_config_map_reaching_both_templates(multi_node_plan, tmp_path):
    options = DeployOptions(model_pvc="models", namespace="big", image="registry.local:5000/vllm-openai:v0.24.0-fix")
    write_deployment(multi_node_plan, tmp_path, options)
    for directory in (tmp_path / "base", tmp_path / "overlays" / "big"):
        documents = {d["kind"]: d for d in kustomize(directory)}
        assert set(documents) == {"ConfigMap", "LeaderWorkerSet", "Service", "ScaledObject"}
        config_map = documents["ConfigMap"]["metadata"]["name"]
        group = documents["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
        for template in ("leaderTemplate", "workerTemplate"):
            pod = group[template]["spec"]
            assert _volumes(pod)["plan"]["configMap"]["name"] == config_map != "llama-3-1-70b-plan"
        for document in documents.values():
            validate(document)
    image = group["leaderTemplate"]["spec"]["containers"][0]["image"]
    assert image == group["workerTemplate"]["spec"]["containers"][0]["image"] == options.image


@needs_kubectl
def test_an_hpa_overlay_builds(gpu_plan, tmp_path):
    write_deployment(gpu_plan, tmp_path, DeployOptions(model_pvc="models", autoscaler="hpa", namespace="gpu"))
    documents = {d["kind"]: d for d in kustomize(tmp_path / "overlays" / "gpu")}
    assert documents["HorizontalPodAutoscaler"]["metadata"]["namespace"] == "gpu"
    assert documents["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "llama-3-1-8b"
    for document in documents.values():
        validate(document)


def test_image_flags_become_a_kustomize_images_entry():
    assert image_entry("pilot:0.1.0", None, None) is None
    assert image_entry("pilot:0.1.0", None, "ghcr.io/acme/") == {
        "name": "pilot", "newName": "ghcr.io/acme/pilot", "newTag": "0.1.0"}
    assert image_entry("vllm/vllm-openai:v0.24.0", "vllm/vllm-openai@sha256:abc", None) == {
        "name": "vllm/vllm-openai", "newName": "vllm/vllm-openai", "digest": "sha256:abc"}
    assert image_entry("pilot:0.1.0", "localhost:5000/pilot:dev", None) == {
        "name": "pilot", "newName": "localhost:5000/pilot", "newTag": "dev"}
    with pytest.raises(DeployError) as err:
        image_entry("pilot:0.1.0", "quay.io/me/pilot:1", "ghcr.io/acme")
    assert err.value.field == "registry"
