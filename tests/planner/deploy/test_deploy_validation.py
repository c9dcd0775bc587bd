"""Every object pilot deploy writes is valid for its kind, checked offline: built-in kinds
against the Kubernetes API schemas of pinned releases (strict: unknown fields fail), KEDA's
ScaledObject and LWS's LeaderWorkerSet against their CRDs' published schemas (tests/support/data/k8s)."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from support.k8s import KUBERNETES_VERSIONS, is_crd, validate

from planner.deploy import DeployOptions, build_manifests

VARIANTS = {
    "cpu-keda": ("cpu_plan", DeployOptions(model_pvc="models", api_key_secret="pilot-key")),
    "cpu-hpa": ("cpu_plan", DeployOptions(model_pvc="models", autoscaler="hpa", node_selector={"pool": "cpu"})),
    "gpu-hf": ("gpu_plan", DeployOptions(hf_model="meta-llama/Llama-3.1-8B-Instruct", hf_token_secret="hf:tok",
                                         cache_pvc="hf-cache", api_key_secret="vllm-key")),
    "gpu-pvc-hpa": ("gpu_plan", DeployOptions(model_pvc="models", autoscaler="hpa", memory="64Gi", cpus=8)),
    "multi-node": ("multi_node_plan", DeployOptions(model_pvc="models")),
    "multi-node-hpa": ("multi_node_plan", DeployOptions(hf_model="meta-llama/Llama-3.1-70B-Instruct",
                                                        autoscaler="hpa")),
}


def _documents(request, variant: str) -> list[dict]:
    fixture, options = VARIANTS[variant]
    manifests = build_manifests(request.getfixturevalue(fixture), options)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": manifests.config_map_name},
                  "data": {"plan.yaml": manifests.plan.to_yaml()}}
    return [*manifests.resources.values(), config_map]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_object_is_valid_for_its_kind(request, variant, version):
    documents = _documents(request, variant)
    kinds = {d["kind"] for d in documents}
    assert kinds & {"Deployment", "LeaderWorkerSet"} and "Service" in kinds
    for document in documents:
        validate(document, version)


def test_both_crds_are_checked_against_their_schemas(request):
    crds = {d["kind"] for v in ("multi-node", "cpu-keda") for d in _documents(request, v) if is_crd(d)}
    assert crds == {"ScaledObject", "LeaderWorkerSet"}


@pytest.mark.parametrize("variant, kind, path, value", [
    # A misspelt field, a field of the wrong type and a missing required one fail: the checks bite.
    ("cpu-keda", "Deployment", ["spec", "template", "spec", "containers", 0, "readinessProb"], {}),
    ("cpu-keda", "Service", ["spec", "ports", 0, "port"], "http"),
    ("cpu-keda", "ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], 6.5),
    ("cpu-keda", "ScaledObject", ["spec", "scaleTargetRef", "nam"], "x"),
    ("multi-node", "LeaderWorkerSet", ["spec", "leaderWorkerTemplate", "size"], "2"),
    ("multi-node", "LeaderWorkerSet", ["spec", "leaderWorkerTemplate", "workerTemplate", "spec", "containers", 0,
                                       "imagePullPolicy"], 1),
    ("cpu-hpa", "HorizontalPodAutoscaler", ["spec", "maxReplicas"], None),
])
def test_a_broken_object_fails_validation(request, variant, kind, path, value):
    (document,) = [copy.deepcopy(d) for d in _documents(request, variant) if d["kind"] == kind]
    node = document
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(document)
